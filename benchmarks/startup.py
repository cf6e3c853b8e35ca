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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-shape", default="qwen3-0.6b")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--label", default="")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    import jax

    from jaxllm import LLM, SamplingParams
    from jaxllm.models.llama import init_random_weights
    from jaxllm.models.shapes import model_shape_config
    from throughput import device_name, git_commit, write_result

    config = model_shape_config(args.model_shape)
    params = init_random_weights(config, jax.random.PRNGKey(0))
    llm = LLM.from_params(params, config, None, max_model_len=args.max_model_len)
    ready = time.perf_counter() - START
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4, detokenize=False), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    result = {"benchmark": "startup", "model_shape": args.model_shape, "label": args.label,
              "start_to_ready_s": round(ready, 1), "compilation_cache": jax.config.jax_compilation_cache_dir,
              "device": device_name(), "jax_version": jax.__version__, "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)}
    print(json.dumps(result))
    write_result(result, args.output_json, f"startup-{args.model_shape}-{args.label or 'run'}.json")


if __name__ == "__main__":
    main()
