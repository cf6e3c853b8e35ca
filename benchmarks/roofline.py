"""One decode step against its roofline, with both ceilings measured in the same run.

    python benchmarks/roofline.py --model-shape llama3-8b --batch 256 --context 1024

A decode step at batch B over contexts of L tokens must read every weight once and every sequence's K/V
once, and does 2 FLOPs per weight per token plus the attention products. Bytes over the measured copy
bandwidth and FLOPs over the measured bf16 matmul rate give two floors; the larger is the roofline.
The step timed is the model forward (KV write + attention + matmuls + logits) with greedy argmax, its
inputs already on the device, two ways: back to back (20 steps launched in a row, the wall time over 20),
which is how the engine runs steps, each launched while the previous one runs; and one at a time (launch,
wait for the result), which adds the launch and the wait for completion to every step.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# torch shares this process's GPU: JAX's pool stays at its default 75% (importing jaxllm would make it 95%).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jaxllm.kv_cache import AttentionMetadata, KVCache  # noqa: E402
from jaxllm.models import llama  # noqa: E402
from jaxllm.models.llama import init_random_weights  # noqa: E402
from jaxllm.models.shapes import model_shape_config  # noqa: E402
from throughput import device_name, git_commit, write_result  # noqa: E402


def time_fn(fn, *args, iters=20, warmup=3):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_ceilings():
    """Copy bandwidth (bytes read + written) and bf16 matmul rate, through JAX and, if present, torch."""
    out = {}
    on_cpu = jax.default_backend() == "cpu"  # small sizes there: the CPU run only checks the script
    n = 2**22 if on_cpu else 2**30  # 2 GiB of bf16 on a GPU, several times its L2
    x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + 1)
    out["copy_jax_TBps"] = 2 * n * 2 / time_fn(copy, x) / 1e12
    del x
    m = 512 if on_cpu else 8192
    a = jax.random.normal(jax.random.PRNGKey(1), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (m, m), jnp.bfloat16)
    out["matmul_jax_TFLOPs"] = 2 * m**3 / time_fn(jax.jit(jnp.matmul), a, b) / 1e12
    del a, b
    try:
        import torch

        if torch.cuda.is_available():
            src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
            dst = torch.empty_like(src)
            ms = _torch_time(lambda: dst.copy_(src))
            out["copy_torch_TBps"] = 2 * n * 2 / (ms / 1e3) / 1e12
            del src, dst
            a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
            b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
            out["matmul_torch_TFLOPs"] = 2 * m**3 / (_torch_time(lambda: a @ b) / 1e3) / 1e12
            del a, b
            torch.cuda.empty_cache()
    except ImportError:
        pass
    out["copy_TBps"] = max(v for k, v in out.items() if k.startswith("copy_"))
    out["matmul_TFLOPs"] = max(v for k, v in out.items() if k.startswith("matmul_"))
    return {k: round(v, 3) for k, v in out.items()}


def _torch_time(fn, iters=20):
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def decode_inputs(config, batch: int, context: int, block_size: int = 16, seed: int = 0, fill: str = "random"):
    """A decode step's inputs: `batch` sequences of `context` cached tokens, each bringing its next token,
    their blocks scattered at random over a cache just large enough. Returns (cache, tokens, positions, md).

    `fill="random"` fills the cache with normal noise (one layer's worth, repeated over the layers, so no
    float32 temporary of the whole cache is needed); "zeros" leaves it as allocated."""
    B, L, bs = batch, context, block_size
    blocks_per_seq = -(-(L + 1) // bs)
    num_blocks = B * blocks_per_seq
    if fill == "random":  # no zeros first: two caches at once do not fit beside Llama-3-8B on an 80 GB card
        shape = (config.num_layers, num_blocks, bs, config.num_kv_heads, config.head_dim)
        cache = KVCache(*(
            jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(seed + i), shape[1:], config.dtype), shape)
            for i in (1, 2)))
    else:
        cache = KVCache.create(config, num_blocks, bs)
    rng = np.random.default_rng(seed)
    tables = rng.permutation(num_blocks).reshape(B, blocks_per_seq).astype(np.int32)
    positions = np.full(B, L, np.int32)  # the new token sits at position L; context after it is L + 1
    md = AttentionMetadata(
        slot_mapping=(tables[np.arange(B), L // bs] * bs + L % bs).astype(np.int32), block_tables=tables,
        seq_lens=np.full(B, L + 1, np.int32), query_start_loc=np.arange(B + 1, dtype=np.int32),
        logits_indices=np.arange(B, dtype=np.int32))
    tokens = rng.integers(0, config.vocab_size, B).astype(np.int32)
    return cache, *jax.device_put((tokens, positions, md))


@functools.partial(jax.jit, static_argnames=("config",), donate_argnums=(1,),
                   compiler_options=llama.step_compiler_options())
def decode_step(params, cache, token_ids, positions, md, config):
    logits, cache = llama.forward(params, token_ids, positions, cache, md, config, decode_only=True)
    return jnp.argmax(logits, -1), cache


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--fill", choices=["random", "zeros"], default="random", help="the cache's contents")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)

    ceilings = measure_ceilings()
    config = model_shape_config(args.model_shape, "bfloat16")
    params = init_random_weights(config, jax.random.PRNGKey(0))
    B, L = args.batch, args.context
    cache, tokens, pos, md = decode_inputs(config, B, L, args.block_size, fill=args.fill)

    for _ in range(3):
        out, cache = decode_step(params, cache, tokens, pos, md, config=config)
    jax.block_until_ready(out)
    one_at_a_time = []
    for _ in range(20):
        t0 = time.perf_counter()
        out, cache = decode_step(params, cache, tokens, pos, md, config=config)
        jax.block_until_ready(out)
        one_at_a_time.append(time.perf_counter() - t0)
    back_to_back = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            out, cache = decode_step(params, cache, tokens, pos, md, config=config)
        jax.block_until_ready(out)
        back_to_back.append((time.perf_counter() - t0) / 20)
    step_s, sync_s = float(np.median(back_to_back)), float(np.median(one_at_a_time))

    # Every weight is read once, except an untied embedding, of which only B rows are gathered.
    read_elems = sum(x.size for x in jax.tree.leaves(params)) - (params.embed.size if params.lm_head is not None else 0)
    weight_bytes = read_elems * jnp.dtype(config.dtype).itemsize
    kv_bytes = 2 * config.num_layers * B * (L + 1) * config.num_kv_heads * config.head_dim * 2
    flops = 2 * read_elems * B + 4 * config.num_layers * B * (L + 1) * config.num_heads * config.head_dim
    mem_floor = (weight_bytes + kv_bytes) / (ceilings["copy_TBps"] * 1e12)
    compute_floor = flops / (ceilings["matmul_TFLOPs"] * 1e12)
    roofline = max(mem_floor, compute_floor)
    result = {
        "benchmark": "roofline", "device": device_name(), "jax_version": jax.__version__, "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "model_shape": args.model_shape, "batch": B, "context": L, "cache_fill": args.fill,
        "ceilings": ceilings, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "flops": flops,
        "memory_floor_ms": round(mem_floor * 1e3, 3), "compute_floor_ms": round(compute_floor * 1e3, 3),
        "roofline_ms": round(roofline * 1e3, 3), "step_ms": round(step_s * 1e3, 3),
        "x_roofline": round(step_s / roofline, 2), "step_ms_one_at_a_time": round(sync_s * 1e3, 3),
        "x_roofline_one_at_a_time": round(sync_s / roofline, 2), "attention_backend": jax.default_backend(),
    }
    print(json.dumps(result, indent=2))
    write_result(result, args.output_json, f"roofline-{args.model_shape}-B{B}-L{L}.json")
    return result


if __name__ == "__main__":
    main()
