"""Time from process start to a ready engine (weights on the device, KV cache sized, every bucket compiled).

    python benchmarks/startup.py --model-shape qwen3-0.6b     # run twice: cold, then with the compilation cache
"""

import time

START = time.perf_counter()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-shape", default="qwen3-0.6b")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--label", default="")
    ap.add_argument("--output-json", default=None)
    ap.add_argument("--same-tokens-as", default=None, metavar="JSON",
                    help="another run's result: its greedy tokens must equal this run's (a warm start runs "
                         "programs loaded from the executable cache, a cold one programs it just compiled)")
    args = ap.parse_args()
    if args.same_tokens_as and not os.path.isfile(args.same_tokens_as):
        ap.error(f"--same-tokens-as: no such file: {args.same_tokens_as}")
    import logging

    import jax

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxllm").setLevel(logging.INFO)  # the engine's own phases: warm-up, cache, compile

    from jaxllm import LLM, SamplingParams
    from jaxllm.models.llama import init_random_weights
    from jaxllm.models.shapes import model_shape_config
    from throughput import device_name, git_commit, write_result

    config = model_shape_config(args.model_shape)
    jax.devices()
    imported = time.perf_counter() - START
    params = jax.block_until_ready(init_random_weights(config, jax.random.PRNGKey(0)))
    weighted = time.perf_counter() - START
    llm = LLM.from_params(params, config, None, max_model_len=args.max_model_len)
    ready = time.perf_counter() - START
    compiled = llm.llm_engine.runner.compile_seconds  # [(program key, seconds)], the programs not loaded
    compile_report = {
        "programs": len(compiled),
        "seconds_by_kind": {kind: round(sum(s for k, s in compiled if k[0] == kind), 1) for kind in ("forward", "sample")},
        "slowest": [[" ".join(map(str, k)), round(s, 2)] for k, s in sorted(compiled, key=lambda c: -c[1])[:10]]}
    # Greedy tokens of prompts that fill the largest token bucket (the Mosaic prefill kernel's) and then decode.
    rng = np.random.default_rng(0)
    n = args.max_model_len - 8
    prompts = [{"prompt_token_ids": rng.integers(3, config.vocab_size, n).tolist()} for _ in range(8)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert all(len(t) == 8 for t in tokens)
    same = None
    if args.same_tokens_as:
        with open(args.same_tokens_as) as f:
            same = json.load(f)["greedy_tokens"] == tokens
        print(f"greedy tokens {'equal' if same else 'DIFFER FROM'} {args.same_tokens_as}'s")
    result = {"benchmark": "startup", "model_shape": args.model_shape, "label": args.label,
              "start_to_ready_s": round(ready, 1),
              "phases_s": {"imports_and_backend": round(imported, 1), "random_weights": round(weighted - imported, 1),
                           "engine": round(ready - weighted, 1)},
              "compiled": compile_report,
              "compilation_cache": jax.config.jax_compilation_cache_dir,
              "greedy_tokens": tokens, "same_tokens_as": [args.same_tokens_as, same] if args.same_tokens_as else None,
              "device": device_name(), "jax_version": jax.__version__, "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)}
    print(json.dumps(result))
    write_result(result, args.output_json, f"startup-{args.model_shape}-{args.label or 'run'}.json")
    if same is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
