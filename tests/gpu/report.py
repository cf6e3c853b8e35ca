"""What the GPU checks share: each case printed PASS or FAIL as it is decided, and one JSON record of the
run (device, jax version, date, commit, command, every case), then the exit status."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from throughput import git_commit  # noqa: E402  ($JAXLLM_GIT_COMMIT first: the device copy's .git is stale)


def case(log: list, rec: dict) -> bool:
    """Record one case (its "ok" says whether it passed) and print it."""
    log.append(rec)
    print("PASS" if rec["ok"] else "FAIL", json.dumps(rec), flush=True)
    return rec["ok"]


def finish(path: str, ok: bool, log: list) -> None:
    """Write the run's record to `path` and exit 0 if every case passed, 1 otherwise."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    Path(path).write_text(json.dumps(dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__, date=date,
                                          commit=git_commit(), command=" ".join(sys.argv), ok=ok, cases=log), indent=1))
    print("ALL PASS" if ok else "SOME FAILED", flush=True)
    sys.exit(0 if ok else 1)


def engine_greedy_tokens(params, config) -> list[list[int]]:
    """The engine's greedy tokens for 16 fixed random prompts of 20-125 tokens, 32 each, at small step limits
    (few buckets to compile: with the defaults, 60 programs did not compile within 120 s): the A/B of a
    kernel against its fallback through the whole engine."""
    import numpy as np

    from jaxllm import LLM, SamplingParams

    llm = LLM.from_params(params, config, None, max_num_seqs=16, max_num_batched_tokens=512, max_model_len=512,
                          gpu_memory_utilization=0.5, enable_prefix_caching=False)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": [int(t) for t in rng.integers(100, 30000, 20 + 7 * i)]} for i in range(16)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    del llm
    return [list(o.outputs[0].token_ids) for o in outs]
