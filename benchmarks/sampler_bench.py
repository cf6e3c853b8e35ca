"""Device time of the sampler at a real vocabulary: greedy, temperature only, and the top-k/top-p/min-p
filters (the Pallas rejection kernel, the XLA threshold search at several widths, the Pallas threshold kernel
in one or more tilings, and the sort), with the filters' masks and the rejection kernel's tokens checked
against the sort on the device.

    python benchmarks/sampler_bench.py --rows 1 64 256 --vocab 151936 --output-json sampler.json
    python benchmarks/sampler_bench.py --rows 256 --ways --kernel-tiles 1024:16:8 2048:16:8 1024:8:4 512:32:8
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jaxllm import sampler  # noqa: E402
from pallas_kernels.top_k_top_p import top_k_top_p_threshold  # noqa: E402
from throughput import device_name, git_commit, write_result  # noqa: E402


def tensors(R: int, top_p: float, top_k: int, temperature: float) -> sampler.SamplingTensors:
    f32, i32 = np.float32, np.int32
    return sampler.SamplingTensors(
        temperature=np.full(R, temperature, f32), top_k=np.full(R, top_k, i32), top_p=np.full(R, top_p, f32),
        min_p=np.zeros(R, f32), seeds=np.arange(R, dtype=np.uint32), sample_index=np.zeros(R, i32),
        presence_penalty=np.zeros(R, f32), frequency_penalty=np.zeros(R, f32), repetition_penalty=np.ones(R, f32),
        penalty_rows=np.full(R, -1, i32), count_rows=np.full(R, -1, i32), bias_ids=np.full((R, 8), 1 << 30, i32),
        bias_values=np.zeros((R, 8), f32), allowed_ids=np.zeros((R, 0), i32), has_allowed=np.zeros(R, bool))


def kernel_filter(tiling: str):
    """`apply_top_k_top_p` on the threshold kernel tiled as "block_v:num_candidates:num_warps"."""
    block_v, num_candidates, num_warps = (int(v) for v in tiling.split(":"))

    def apply(logits, top_k, top_p):
        threshold = top_k_top_p_threshold(logits, top_k, top_p, block_v=block_v, num_candidates=num_candidates,
                                          num_warps=num_warps, interpret=jax.default_backend() != "gpu")
        return sampler.keep_from_threshold(logits, threshold)

    return apply


@contextlib.contextmanager
def variant(ways):
    """The sampler as traced with one filter variant, restored after: `None` (the sampler's own), an int (the
    XLA threshold search at that width), "sort", "rejection" (the rejection kernel draws the token itself:
    JAXLLM_TOP_P_REJECTION, read when `sample` is traced) or "kernel<tiling>" (the threshold kernel)."""
    saved = (sampler.apply_top_k_top_p, sampler.SEARCH_WAYS, sampler.SEARCH_PASSES,
             os.environ.get("JAXLLM_TOP_P_REJECTION"))
    os.environ["JAXLLM_TOP_P_REJECTION"] = "1" if ways == "rejection" else "0"
    if ways == "sort":
        sampler.apply_top_k_top_p = sampler.apply_top_k_top_p_sorted
    elif isinstance(ways, str) and ways.startswith("kernel"):
        sampler.apply_top_k_top_p = kernel_filter(ways.removeprefix("kernel"))
    elif isinstance(ways, int):
        sampler.apply_top_k_top_p = sampler.apply_top_k_top_p_search
        sampler.SEARCH_WAYS, sampler.SEARCH_PASSES = ways, -(-32 // (ways.bit_length() - 1))
    try:
        yield
    finally:
        sampler.apply_top_k_top_p, sampler.SEARCH_WAYS, sampler.SEARCH_PASSES, switch = saved
        if switch is None:
            os.environ.pop("JAXLLM_TOP_P_REJECTION")
        else:
            os.environ["JAXLLM_TOP_P_REJECTION"] = switch


def rejection_mismatches(flat: jax.Array, peaked: jax.Array, t: sampler.SamplingTensors) -> int:
    """Rows whose token from the rejection kernel differs from the sort's, same noise, over a few draws."""
    mismatches = 0
    for logits in (flat, peaked):
        for draw in range(4):
            t = dataclasses.replace(t, sample_index=np.full(logits.shape[0], draw, np.int32))
            tokens = {}
            for ways in ("sort", "rejection"):
                with variant(ways):
                    fn = jax.jit(lambda x, t: sampler.sample(x, t, use_filters=True)[0].sampled)
                    tokens[ways] = np.asarray(fn(logits, t))
            mismatches += int((tokens["sort"] != tokens["rejection"]).sum())
    return mismatches


def time_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return round(1e3 * float(np.median(times)), 3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--ways", type=int, nargs="*", default=[4, 16, 64], help="XLA threshold search widths")
    ap.add_argument("--kernel-tiles", nargs="*", default=["1024:16:8"],
                    help="threshold kernel tilings, block_v:num_candidates:num_warps")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for R in args.rows:
        # Flat logits as from random weights (most of the vocabulary in the nucleus), and peaked ones.
        key = jax.random.PRNGKey(R)
        flat = jax.random.normal(key, (R, args.vocab), jnp.float32) * 0.5
        peaked = jax.random.normal(key, (R, args.vocab), jnp.float32) * 4.0
        row = {"rows": R, "vocab": args.vocab}
        for name, t, filters, random_rows in (("greedy", tensors(R, 1.0, 0, 0.0), False, False),
                                              ("temperature", tensors(R, 1.0, 0, 0.8), False, True),
                                              ("top_p", tensors(R, 0.95, 0, 0.8), True, True),
                                              ("top_k_top_p", tensors(R, 0.95, 50, 0.8), True, True)):
            variants = ([*args.ways, "sort", "rejection", *(f"kernel{tiling}" for tiling in args.kernel_tiles)]
                        if filters else [None])
            for ways in variants:
                with variant(ways):
                    fn = jax.jit(lambda x, t, f=filters, r=random_rows: sampler.sample(x, t, use_filters=f,
                                                                                     random_rows=r)[0].sampled)
                    label = name if ways is None else f"{name}_{ways if isinstance(ways, str) else f'search{ways}'}"
                    row[label + "_ms"] = time_ms(fn, flat, t, repeats=args.repeats)
                    row[label + "_peaked_ms"] = time_ms(fn, peaked, t, repeats=args.repeats)
            if filters:
                row[f"{name}_rejection_token_mismatches"] = rejection_mismatches(flat, peaked, t)
        # The sort-based filter's parts.
        row["sort_only_ms"] = time_ms(jax.jit(lambda x: jnp.sort(x, axis=-1)), flat, repeats=args.repeats)
        row["cumsum_only_ms"] = time_ms(jax.jit(lambda x: jnp.cumsum(x, axis=-1)), flat, repeats=args.repeats)
        # The kernel alone (the threshold keys, no sampling around it).
        for tiling in args.kernel_tiles:
            block_v, num_candidates, num_warps = (int(v) for v in tiling.split(":"))
            kernel = jax.jit(lambda x, k, p, b=block_v, c=num_candidates, w=num_warps: top_k_top_p_threshold(
                x, k, p, block_v=b, num_candidates=c, num_warps=w, interpret=jax.default_backend() != "gpu"))
            for tk, label in ((0, "top_p"), (50, "top_k_top_p")):
                top_k, top_p = jnp.full(R, tk, jnp.int32), jnp.full(R, 0.95, jnp.float32)
                row[f"threshold_kernel{tiling}_{label}_ms"] = time_ms(kernel, flat, top_k, top_p, repeats=args.repeats)
                row[f"threshold_kernel{tiling}_{label}_peaked_ms"] = time_ms(kernel, peaked, top_k, top_p,
                                                                             repeats=args.repeats)
        # The filters' masks against the sort's, on the device (a top-p cut-off within float32 rounding of
        # top_p may differ by a tie's worth of tokens: the masses are summed in another order).
        checks = {**({"mask_mismatches": sampler.apply_top_k_top_p_search} if args.ways else {}),
                  **{f"kernel{tiling}_mask_mismatches": kernel_filter(tiling) for tiling in args.kernel_tiles}}
        for label, apply in checks.items():
            row[label] = 0
            for logits in (flat, peaked):
                for tk in (0, 50):
                    a = jax.jit(apply)(logits, jnp.full(R, tk, jnp.int32), jnp.full(R, 0.95))
                    b = jax.jit(sampler.apply_top_k_top_p_sorted)(logits, jnp.full(R, tk, jnp.int32), jnp.full(R, 0.95))
                    row[label] += int(jnp.sum(jnp.isfinite(a) != jnp.isfinite(b)))
        kept = jax.jit(sampler.apply_top_k_top_p_sorted)(flat, jnp.zeros(R, jnp.int32), jnp.full(R, 0.95))
        row["kept_of_vocab_flat_top_p"] = round(float(jnp.mean(jnp.isfinite(kept))), 4)
        print(row, flush=True)
        rows.append(row)
    result = {"benchmark": "sampler", "device": device_name(), "jax_version": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "command": " ".join(sys.argv), "rows": rows}
    write_result(result, args.output_json, f"sampler-{device_name().replace(' ', '-')}.json")


if __name__ == "__main__":
    main()
