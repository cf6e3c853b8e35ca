"""GGUF files of every family llama.cpp converts, through the engine on the GPU (run on a CUDA machine).

Each tiny random model of tests/test_gguf_families.py is written as llama.cpp's converter writes it, then:
1. float32 (true float32 matmuls): the engine's greedy tokens for two prompts equal transformers' (CPU).
2. bfloat16 (the GPU kernels where the family has them): the engine runs, and the first index where its
   greedy tokens leave transformers' float32 ones is reported (a random tiny model may flip a near-tie).

    python tests/gpu/check_gguf_families.py --log $OUT/check_gguf_families.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import jax

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests"), os.path.join(_ROOT, "benchmarks")]

from hf_models import hf_greedy  # noqa: E402
from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.loader import load_model  # noqa: E402
from test_gguf_families import CASES, write_gguf  # noqa: E402
from test_model_numerics import random_prompt  # noqa: E402
from throughput import git_commit  # noqa: E402

NEW_TOKENS = 12


def greedy(path: Path, dtype: str, prompts) -> list[list[int]]:
    config, params = load_model(path, dtype=dtype)
    llm = LLM.from_params(params, config, None, max_model_len=64, block_size=16, max_num_seqs=2,
                          max_num_batched_tokens=64, num_gpu_blocks_override=16, enable_prefix_caching=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def check_case(case: str, folder: Path) -> dict:
    path = folder / f"{case}.gguf"
    hf, _ = write_gguf(case, folder / "hf", path)
    prompts = [random_prompt(13, seed=11), random_prompt(29, seed=12)]
    theirs = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    jax.config.update("jax_default_matmul_precision", "highest")  # XLA's GPU default is TF32
    try:
        f32 = greedy(path, "float32", prompts)
    finally:
        jax.config.update("jax_default_matmul_precision", None)
    bf16 = greedy(path, "bfloat16", prompts)
    # after a first bf16 near-tie flips, the continuations part: the index of that first flip says it all
    first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(bf16, theirs)]
    return {"float32_equal": f32 == theirs, "bfloat16_first_diff": first_diff, "new_tokens": NEW_TOKENS}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default="check_gguf_families.json")
    args = ap.parse_args()
    report = {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "command": " ".join(sys.argv), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            try:
                report["cases"][case] = check_case(case, Path(tmp) / case)
            except Exception as e:  # report and go on: one broken family must not hide the others
                report["cases"][case] = {"error": repr(e)}
    report["ok"] = all(r.get("float32_equal") for r in report["cases"].values())
    print(json.dumps(report, indent=2))
    with open(args.log, "w") as f:
        json.dump(report, f, indent=2)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
