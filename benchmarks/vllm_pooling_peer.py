"""vLLM's pooling runner on the workload of benchmarks/embeddings.py, when vLLM is importable.

    python benchmarks/vllm_pooling_peer.py --model FOLDER --lengths 16 512 --num-requests 4096 128 \
        --repeats 5 --output-json vllm-embed.json

FOLDER holds a transformers config.json at an encoder's shape, sentence-transformers' modules.json and
1_Pooling/config.json, so that vLLM pools (CLS or mean) and normalises as jaxllm does, and a placeholder
tokenizer of the shape's vocabulary (vLLM's pooling runner will not start without one: its scoring input
processor asks for the tokenizer); benchmarks/encoder_folder.py writes it. vLLM loads random ("dummy")
weights at that shape; the inputs are `workload`'s token ids, the ones embeddings.py gives jaxllm, draw for
draw, so the tokenizer encodes nothing. Each row: one warm-up pass of up to 64 inputs, then --repeats timed
passes of `LLM.embed` over all of them.

This file imports neither jax nor jaxllm: vLLM and JAX never share a process (embeddings.py runs this
before JAX takes the GPU). `--dry-run` prints vLLM's arguments and the rows without importing vLLM.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np


def workload(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """n random sequences of `length` tokens (a start and an end token around random ids: 2..vocab)."""
    rng = np.random.default_rng(seed)
    return [[0, *rng.integers(5, vocab - 1, length - 2).tolist(), 2] for _ in range(n)]


def llm_kwargs(args) -> dict:
    """vLLM's `LLM(...)` arguments for this run."""
    kwargs = dict(model=args.model, runner="pooling", load_format="dummy",
                  dtype=args.dtype, seed=0, gpu_memory_utilization=args.gpu_memory_utilization,
                  max_model_len=args.max_model_len)
    optional = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    return {**kwargs, **{k: v for k, v in optional.items() if v is not None}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a folder as benchmarks/encoder_folder.py writes it")
    ap.add_argument("--lengths", nargs="+", type=int, required=True, help="tokens per input, one per row")
    ap.add_argument("--num-requests", nargs="+", type=int, required=True, help="inputs per row, one per length")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per row")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, required=True)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: vLLM's")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: vLLM's")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--output-json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="print vLLM's arguments and the rows; run nothing")
    args = ap.parse_args(argv)
    if len(args.lengths) != len(args.num_requests):
        ap.error(f"--lengths has {len(args.lengths)} values and --num-requests {len(args.num_requests)}")
    if args.repeats < 1:
        ap.error(f"--repeats={args.repeats} must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    with open(f"{args.model}/config.json") as f:
        vocab = json.load(f)["vocab_size"]
    rows = [dict(input_len=length, num_requests=n) for length, n in zip(args.lengths, args.num_requests)]
    if args.dry_run:
        print(json.dumps(dict(llm=llm_kwargs(args), rows=rows, repeats=args.repeats)))
        return {}
    try:
        import torch
        import vllm
        from vllm import LLM
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        raise SystemExit(f"vllm_pooling_peer.py needs vLLM importable ({e}); see benchmarks/NOTES.md, "
                         "'vLLM beside jaxllm'")
    if not torch.cuda.is_available():
        raise SystemExit("vllm_pooling_peer.py needs a CUDA device")
    start = time.perf_counter()
    llm = LLM(**llm_kwargs(args))
    init_s = time.perf_counter() - start
    for row in rows:
        prompts = [TokensPrompt(prompt_token_ids=p)
                   for p in workload(row["num_requests"], row["input_len"], vocab, seed=row["input_len"])]
        llm.embed(prompts[:64], use_tqdm=False)  # warm-up, not timed
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outputs = llm.embed(prompts, use_tqdm=False)
            runs.append(time.perf_counter() - t0)
        first = np.asarray(outputs[0].outputs.embedding)
        assert len(outputs) == len(prompts) and np.isfinite(first).all()
        row.update(elapsed_s=round(statistics.median(runs), 4), best_s=round(min(runs), 4),
                   runs_s=[round(r, 4) for r in runs], embedding_dim=int(first.shape[0]))
        print(f"vllm {vllm.__version__} len {row['input_len']:4d} x{row['num_requests']:5d}: "
              f"{row['num_requests'] / row['elapsed_s']:,.1f} req/s (median of {args.repeats})", flush=True)
    result = {"benchmark": "embeddings", "engine": "vllm", "vllm_version": vllm.__version__,
              "torch_version": torch.__version__, "device": torch.cuda.get_device_name(0),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "llm": llm_kwargs(args), "init_s": round(init_s, 2), "rows": rows}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
    # Everything is written: leave at once, so that an abort in vLLM's engine teardown cannot turn a finished
    # run into a failure.
    sys.stdout.flush()
    os._exit(0)
