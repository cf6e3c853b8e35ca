"""Device check: every attention kernel against the reference over many ragged shapes.

Run on a CUDA machine from the repo root: `python tests/gpu/check_kernels.py [--log PATH]`.
Each case draws fresh random inputs (never zeros), shuffles and shares cache blocks between sequences,
poisons the allocator with NaN before the kernel runs (so an unwritten output row shows), and asserts
rel. error < 1e-2 against the pure-jnp reference (float32 math) and exact zeros on padding tokens.

`--features` checks instead the model families' attention features (sliding window, logit soft-capping,
ALiBi, and all three) in the decode and ragged kernels and through the dispatch, at real shapes (Gemma 2's
head_dim 256 with a 4096 window and a soft-cap of 50, Falcon's and MPT's ALiBi heads, Mistral's GQA),
each case also printing its max abs error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from throughput import git_commit  # noqa: E402  ($JAXLLM_GIT_COMMIT first: the device copy's .git is stale)

from pallas_kernels.decode import paged_decode_attention
from pallas_kernels import ragged_paged_attention as dispatch
from pallas_kernels.prefill import ragged_paged_attention as prefill_kernel
from pallas_kernels.ragged import ragged_paged_attention as ragged_kernel
from pallas_kernels.reference import ragged_paged_attention as reference

TOL = 1e-2


def make_case(rng, *, q_lens, ctx_lens, num_q_heads, num_kv_heads, head_dim, block_size, num_layers=3,
              pad_tokens=0, pad_seqs=0, share=True, dtype=jnp.bfloat16):
    """Random ragged batch. Sequences may share their first blocks (a common prefix), block tables are
    shuffled, unused table entries hold junk block ids, padding sequences have no tokens."""
    q_lens = list(q_lens) + [0] * pad_seqs
    ctx_lens = list(ctx_lens) + [0] * pad_seqs
    S = len(q_lens)
    blocks_needed = [-(-c // block_size) for c in ctx_lens]
    max_blocks = max(1, max(blocks_needed)) + int(rng.integers(0, 3))
    num_blocks = sum(blocks_needed) + 4
    perm = rng.permutation(num_blocks)
    tables = rng.integers(0, num_blocks, size=(S, max_blocks)).astype(np.int32)  # junk beyond the context
    used = 0
    for s, nb in enumerate(blocks_needed):
        tables[s, :nb] = perm[used:used + nb]
        used += nb
        if share and s > 0 and nb > 1 and blocks_needed[0] > 1 and rng.random() < 0.5:
            tables[s, 0] = tables[0, 0]  # a shared prefix block (read-only: written once)
    order = rng.permutation(S)  # padding sequences anywhere in the batch
    q_lens = [q_lens[i] for i in order]
    ctx_lens = [ctx_lens[i] for i in order]
    tables = tables[order]
    T = sum(q_lens) + pad_tokens
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    kshape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
    k = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), kshape, dtype)
    v = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), kshape, dtype)
    q = jnp.asarray(rng.standard_normal((T, num_q_heads, head_dim)), dtype)
    layer = int(rng.integers(num_layers))
    return (q, k, v, jnp.int32(layer), jnp.asarray(tables), jnp.asarray(ctx_lens, jnp.int32), jnp.asarray(qsl))


def poison(nbytes):
    """Leave NaN in freed device memory, so an output row that a kernel forgets to write shows up."""
    x = jnp.full((nbytes // 4 + 1024,), jnp.nan, jnp.float32)
    x.block_until_ready()
    del x


def check(name, fn, args, scale, log, **features):
    ref = np.asarray(reference(*args, scale=scale, **features), np.float32)
    poison(4 * ref.size * 4)
    t0 = time.perf_counter()
    out = np.asarray(fn(*args, scale=scale, **features), np.float32)
    dt = time.perf_counter() - t0
    T = out.shape[0]
    n_real = int(args[6][-1])
    real = slice(0, n_real)
    finite = bool(np.isfinite(out).all())
    pad_zero = bool((out[n_real:] == 0).all())
    err = float(np.linalg.norm(out[real] - ref[real]) / max(np.linalg.norm(ref[real]), 1e-30))
    max_abs = float(np.abs(out[real] - ref[real]).max()) if n_real else 0.0
    ok = finite and pad_zero and err < TOL
    rec = dict(name=name, T=T, ok=ok, rel_err=err, max_abs_err=max_abs, finite=finite, padding_zero=pad_zero,
               seconds=round(dt, 3))
    log.append(rec)
    print(("PASS" if ok else "FAIL"), json.dumps(rec), flush=True)
    return ok


def dispatch_mosaic_always(*args, scale, **features):
    """The dispatch asked for the Mosaic kernel (as the engine asks in its largest bucket), so these
    small cases reach it too (with features: the Triton kernels, which it must pick instead)."""
    return dispatch(*args, scale=scale, prefill_kernel=True, **features)


def cases(rng):
    heads = [(16, 8, 128), (32, 8, 128), (28, 4, 128), (8, 8, 64), (64, 8, 128)]
    for hq, hkv, d in heads:
        for bs in (16, 32):
            kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs)
            # decode: ragged contexts, non-multiples of the block size, single-token sequences, padding
            ctx = [1, 2, bs - 1, bs + 1, 1000, 4097, 37, 513]
            yield f"decode h{hq}/{hkv} d{d} bs{bs}", "decode", kw, dict(q_lens=[1] * len(ctx), ctx_lens=ctx,
                                                                         pad_tokens=3, pad_seqs=2)
            # mixed: prefill chunks (with and without earlier context) beside decode tokens
            q_lens = [1, 7, 300, 1, 64, 129]
            ctx = [50, 7, 1300, 1, 64 + 200, 129 + 5]
            yield f"mixed h{hq}/{hkv} d{d} bs{bs}", "ragged", kw, dict(q_lens=q_lens, ctx_lens=ctx, pad_tokens=5,
                                                                        pad_seqs=1)
    kw = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16)
    yield "decode 32k x4", "decode", kw, dict(q_lens=[1] * 4, ctx_lens=[32768, 32760, 20001, 9], num_layers=1)
    yield "decode batch 200", "decode", kw, dict(q_lens=[1] * 200, ctx_lens=list(rng.integers(1, 3000, 200)),
                                                  pad_seqs=56, num_layers=1)
    # 32 sequences x 8 kv heads: unsplit, 128-token tiles (`choose_block_k`)
    yield "decode batch 32, 128-token tiles", "decode", kw, dict(
        q_lens=[1] * 32, ctx_lens=list(rng.integers(1, 9000, 32)), num_layers=1)
    yield "prefill 32k tail chunk", "ragged", kw, dict(q_lens=[512], ctx_lens=[32768], num_layers=1)
    yield "prefill 2k fresh x2", "ragged", kw, dict(q_lens=[2048, 2000], ctx_lens=[2048, 2000], num_layers=1)
    yield "prefill 1k over 3k, 5 seqs, 1 token short of a tile", "ragged", kw, dict(
        q_lens=[1024, 127, 129, 1, 700], ctx_lens=[4096, 127, 1000, 3000, 700], pad_tokens=9, num_layers=1)
    yield "decode via ragged", "ragged", kw, dict(q_lens=[1] * 9, ctx_lens=[1, 5, 16, 17, 500, 999, 4000, 3, 64],
                                                  pad_tokens=7)


# Each feature at its model's shape: (name, heads (q, kv, head_dim), the features).
FEATURE_MODELS = [
    ("window 4096 (Mistral-7B heads)", (32, 8, 128), dict(sliding_window=4096)),
    ("window 4096 + soft-cap 50 (Gemma-2-9B heads)", (16, 8, 256), dict(sliding_window=4096, logit_softcap=50.0)),
    ("soft-cap 50, no window (Gemma-2 global layer)", (16, 8, 256), dict(logit_softcap=50.0)),
    ("window 512 (Gemma-3-1B heads)", (4, 1, 256), dict(sliding_window=512)),
    ("ALiBi (MPT-7B heads)", (32, 32, 128), dict(alibi_slopes="mpt")),
    ("ALiBi (falcon-rw-1b heads, slopes x scale)", (32, 32, 64), dict(alibi_slopes="falcon")),
    ("window 100 + soft-cap 30 + ALiBi (GQA 28/4)", (28, 4, 128), dict(sliding_window=100, logit_softcap=30.0,
                                                                       alibi_slopes="bloom")),
]


def feature_arrays(features, num_q_heads, head_dim):
    """The features as a layer passes them: the window a traced int32 scalar, the slopes an array
    (Falcon scales its slopes with the scores)."""
    from jaxllm.models.layers import alibi_slopes

    out = dict(features)
    if "sliding_window" in out:
        out["sliding_window"] = jnp.int32(out["sliding_window"])
    style = out.get("alibi_slopes")
    if style is not None:
        slopes = alibi_slopes(num_q_heads, style="mpt" if style == "mpt" else "bloom")
        out["alibi_slopes"] = jnp.asarray(slopes * (head_dim**-0.5 if style == "falcon" else 1.0))
    return out


def feature_cases(rng):
    """Decode batches and mixed prefill + decode batches, contexts from under a block to past 8k (so a
    4096 window skips tiles), chunks starting before, inside and past the window."""
    for label, (hq, hkv, d), features in FEATURE_MODELS:
        kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=16, num_layers=1)
        ctx = [1, 15, 100, 4095, 4096, 4097, 9000, int(rng.integers(1, 12000))]
        yield f"{label} decode", "decode", kw, features, dict(q_lens=[1] * len(ctx), ctx_lens=ctx, pad_tokens=3,
                                                            pad_seqs=1)
        q_lens = [1, 7, 300, 1, 700, 129, 2048]
        ctx = [50, 7, 9000, 5000, 4800, 129 + 4000, 2048]
        yield f"{label} mixed", "ragged", kw, features, dict(q_lens=q_lens, ctx_lens=ctx, pad_tokens=5, pad_seqs=1)


def check_feature_cases(rng, kernels, log) -> bool:
    """Each feature case through the decode kernel (also split 4 ways), the ragged kernel and the dispatch."""
    ok = True
    for name, kind, kw, features, spec in feature_cases(rng):
        args = make_case(rng, **kw, **spec)
        scale = kw["head_dim"] ** -0.5
        f = feature_arrays(features, kw["num_q_heads"], kw["head_dim"])
        if kind == "decode" and "decode" in kernels:
            ok &= check(name + " [decode kernel]", paged_decode_attention, args, scale, log, **f)
            ok &= check(name + " [decode kernel, 4 splits]",
                        lambda *x, scale, **f: paged_decode_attention(*x, scale=scale, num_splits=4, **f),
                        args, scale, log, **f)
        if "ragged" in kernels:
            ok &= check(name + " [ragged kernel]", ragged_kernel, args, scale, log, **f)
        if "dispatch" in kernels:
            ok &= check(name + " [dispatch, Mosaic asked for]", dispatch_mosaic_always, args, scale, log, **f)
            if kind == "decode":
                ok &= check(name + " [dispatch, decode_only]",
                            lambda *x, scale, **f: dispatch(*x, scale=scale, decode_only=True, **f),
                            args, scale, log, **f)
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default="check_kernels.json")
    ap.add_argument("--kernels", default="decode,ragged,prefill,dispatch", help="comma-separated subset to check")
    ap.add_argument("--features", action="store_true",
                    help="check the attention features (window, soft-cap, ALiBi) in the decode and ragged "
                         "kernels and the dispatch instead of the plain cases")
    a = ap.parse_args()
    kernels = set(a.kernels.split(","))
    if unknown := kernels - {"decode", "ragged", "prefill", "dispatch"}:
        ap.error(f"--kernels: unknown kernel(s) {sorted(unknown)}; choose from decode, ragged, prefill, dispatch")
    rng = np.random.default_rng(int(time.time()))
    log, ok = [], True
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    for name, kind, kw, spec in ([] if a.features else cases(rng)):
        args = make_case(rng, **kw, **spec)
        scale = kw["head_dim"] ** -0.5
        if kind == "decode" and "decode" in kernels:
            ok &= check(name + " [decode kernel]", paged_decode_attention, args, scale, log)
            ok &= check(name + " [decode kernel, 4 splits]",
                        lambda *x, scale: paged_decode_attention(*x, scale=scale, num_splits=4), args, scale, log)
            ok &= check(name + " [decode kernel, 3 pipeline stages]",
                        lambda *x, scale: paged_decode_attention(*x, scale=scale, num_stages=3), args, scale, log)
        if "ragged" in kernels:
            ok &= check(name + " [ragged kernel]", ragged_kernel, args, scale, log)
        if "dispatch" in kernels and kind == "ragged":  # what the engine calls: Mosaic for long chunks
            ok &= check(name + " [dispatch]", dispatch, args, scale, log)
            ok &= check(name + " [dispatch, Mosaic at any step size]", dispatch_mosaic_always, args, scale, log)
        if "prefill" in kernels:
            ok &= check(name + " [prefill kernel]", prefill_kernel, args, scale, log)
            if kind == "ragged":
                ok &= check(name + " [prefill kernel, kv tiles of 64, 3 stages]",
                            lambda *x, scale: prefill_kernel(*x, scale=scale, block_kv=64, num_stages=3),
                            args, scale, log)
    if a.features:
        ok &= check_feature_cases(rng, kernels, log)
    Path(a.log).parent.mkdir(parents=True, exist_ok=True)
    Path(a.log).write_text(json.dumps(dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                                             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                             commit=git_commit(), command=" ".join(sys.argv), ok=ok, cases=log),
                                      indent=1))
    print("ALL PASS" if ok else "SOME FAILED", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
