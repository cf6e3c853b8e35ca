"""Attention kernels on the CPU: the jnp reference against naive dense attention, and the Pallas GPU
kernels (decode, ragged) against the reference under the Triton backend's interpreter."""

from __future__ import annotations

import functools
import os

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from pallas_kernels.decode import paged_decode_attention
from pallas_kernels.ragged import ragged_paged_attention as ragged_kernel
from pallas_kernels import reference as reference_module
from pallas_kernels.reference import ragged_paged_attention as reference


def random_batch(seed, q_lens, ctx_lens, *, num_q_heads=6, num_kv_heads=2, head_dim=32, block_size=8,
                 num_layers=2, pad_tokens=2, spare_blocks=1, dtype=jnp.float32):
    """A ragged batch with shuffled block tables, junk in unused table entries (`spare_blocks` columns
    past the longest context), a padding sequence (no tokens, seq_len 0) somewhere in the batch, and
    padding tokens at the end."""
    rng = np.random.default_rng(seed)
    S = len(q_lens)
    needed = [-(-c // block_size) for c in ctx_lens]
    max_blocks = max(needed) + spare_blocks
    num_blocks = sum(needed) + 3
    perm = rng.permutation(num_blocks)
    tables = rng.integers(0, num_blocks, (S, max_blocks)).astype(np.int32)
    used = 0
    for s, n in enumerate(needed):
        tables[s, :n] = perm[used:used + n]
        used += n
    T = sum(q_lens) + pad_tokens
    shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
    return dict(
        q=jnp.asarray(rng.standard_normal((T, num_q_heads, head_dim)), dtype),
        k_cache=jnp.asarray(rng.standard_normal(shape), dtype),
        v_cache=jnp.asarray(rng.standard_normal(shape), dtype),
        layer=jnp.int32(rng.integers(num_layers)),
        block_tables=jnp.asarray(tables),
        seq_lens=jnp.asarray(ctx_lens, jnp.int32),
        query_start_loc=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
    )


def dense_attention(b, scale, window=None, softcap=None, slopes=None):
    """Float64 numpy: gather each sequence's context through its block table, causal softmax per token
    (over the last `window` positions; scores soft-capped; plus slope * (key position - query position))."""
    q, k, v = (np.asarray(b[n], np.float64) for n in ("q", "k_cache", "v_cache"))
    layer, tables = int(b["layer"]), np.asarray(b["block_tables"])
    seq_lens, qsl = np.asarray(b["seq_lens"]), np.asarray(b["query_start_loc"])
    T, hq, d = q.shape
    bs, hkv = k.shape[2], k.shape[3]
    out = np.zeros_like(q)
    for s in range(len(seq_lens)):
        ctx = seq_lens[s]
        pos = np.arange(ctx)
        ks = k[layer, tables[s, pos // bs], pos % bs]  # [ctx, hkv, d]
        vs = v[layer, tables[s, pos // bs], pos % bs]
        q_len = qsl[s + 1] - qsl[s]
        for j in range(q_len):
            t, p = qsl[s] + j, ctx - q_len + j
            for h in range(hq):
                kv = h // (hq // hkv)
                logits = ks[: p + 1, kv] @ q[t, h] * scale
                if softcap is not None:
                    logits = softcap * np.tanh(logits / softcap)
                if slopes is not None:
                    logits = logits + slopes[h] * (np.arange(p + 1) - p)
                if window is not None:
                    logits[: max(0, p + 1 - window)] = -np.inf
                w = np.exp(logits - logits.max())
                out[t, h] = (w / w.sum()) @ vs[: p + 1, kv]
    return out


MIXED = dict(q_lens=[1, 5, 0, 13, 1, 20], ctx_lens=[1, 9, 0, 13, 40, 27])  # chunks, decode, padding seq
DECODE = dict(q_lens=[1, 1, 0, 1, 1], ctx_lens=[1, 8, 0, 17, 70])
# Long prefill chunks (several items each, lengths not multiples of the block size or of R) beside decodes.
LONG = dict(q_lens=[1, 67, 1, 0, 45, 1, 3, 0], ctx_lens=[30, 67, 9, 0, 101, 52, 21, 0])


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", [MIXED, DECODE, LONG], ids=["mixed", "decode", "long"])
def test_reference_matches_dense_attention(seed, case):
    b = random_batch(seed, **case)
    scale = 32**-0.5
    want = dense_attention(b, scale)
    got = np.asarray(reference(**b, scale=scale, kv_chunk_tokens=16))  # several chunks: exercises the loop
    n_real = int(b["query_start_loc"][-1])
    assert rel_err(got[:n_real], want[:n_real]) < 1e-5
    assert (got[n_real:] == 0).all()


FEATURES = {"window": dict(sliding_window=7), "softcap": dict(logit_softcap=1.5),
            "alibi": dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625, 0.03, 0.01], np.float32)),
            "all": dict(sliding_window=12, logit_softcap=3.0, alibi_slopes=np.linspace(0.01, 0.6, 6, dtype=np.float32))}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("case", [MIXED, DECODE, LONG], ids=["mixed", "decode", "long"])
def test_reference_attention_features(case, feature):
    """Sliding window, logit soft-capping and ALiBi (the model families' features) against dense
    attention, under jit with the window traced (as the layer loop passes each layer's window)."""
    b = random_batch(7, **case)
    kwargs = FEATURES[feature]
    scale = 32**-0.5
    want = dense_attention(b, scale, window=kwargs.get("sliding_window"), softcap=kwargs.get("logit_softcap"),
                           slopes=kwargs.get("alibi_slopes"))
    static = {k: v for k, v in kwargs.items() if k == "logit_softcap"}
    traced = {k: jnp.asarray(v) for k, v in kwargs.items() if k != "logit_softcap"}
    fn = jax.jit(functools.partial(reference, scale=scale, kv_chunk_tokens=16, **static))
    got = np.asarray(fn(**b, **traced))
    n_real = int(b["query_start_loc"][-1])
    assert rel_err(got[:n_real], want[:n_real]) < 1e-5
    assert rel_err(got[:n_real], dense_attention(b, scale)[:n_real]) > 1e-2  # the feature changed the result


@pytest.mark.parametrize("kernel", ["reference", "decode", "ragged"])
def test_window_over_blocks_freed_out_of_it(kernel):
    """Every sequence deep in its context, its table holding the null block (block 0, filled with large
    values) where blocks left the window, as the engine's tables do: what is gathered of the null block is
    masked. The reference starts its loop at the first chunk any window reaches; the kernels (interpreted)
    skip their tiles before the window."""
    window, bs = 7, 8
    q_lens = [1, 1, 0, 1, 1] if kernel == "decode" else [1, 9, 0, 1, 2]
    b = random_batch(11, q_lens=q_lens, ctx_lens=[70, 90, 0, 64, 83], block_size=bs, pad_tokens=3,
                     dtype=jnp.float32 if kernel == "reference" else jnp.bfloat16)
    tables = np.asarray(b["block_tables"]).copy()
    for s, (ctx, n) in enumerate(zip(np.asarray(b["seq_lens"]), q_lens)):
        tables[s, :max(0, ctx - n - window + 1) // bs] = 0  # dead for this sequence's first query
    b["block_tables"] = jnp.asarray(tables)
    b["k_cache"] = b["k_cache"].at[:, 0].set(1e4)
    b["v_cache"] = b["v_cache"].at[:, 0].set(1e4)
    scale = 32**-0.5
    if kernel == "reference":
        run = jax.jit(functools.partial(reference, scale=scale, kv_chunk_tokens=16))
    elif kernel == "decode":
        run = functools.partial(paged_decode_attention, scale=scale, num_splits=3, block_k=16, interpret=True)
    else:
        run = functools.partial(ragged_kernel, scale=scale, block_m=16, block_k=16, interpret=True)
    got = np.asarray(run(**b, sliding_window=jnp.int32(window)), np.float32)
    want = dense_attention(b, scale, window=window)
    n_real = int(b["query_start_loc"][-1])
    assert rel_err(got[:n_real], want[:n_real]) < (1e-5 if kernel == "reference" else 1e-2)
    assert (got[n_real:] == 0).all()


@pytest.mark.parametrize("rows", [1, 2, 16, 64])
@pytest.mark.parametrize("case", [MIXED, DECODE, LONG], ids=["mixed", "decode", "long"])
def test_reference_rows_per_item(monkeypatch, case, rows):
    """Every item size gives the same attention, under jit (shapes static, metadata traced); with
    R = 64 the long chunks fit in one item and a short one leaves most of its rows unused. The table is
    much wider than the longest context, as the engine's bucketed tables are: the loop stops early."""
    monkeypatch.setattr(reference_module, "rows_per_item", lambda num_tokens, num_seqs: rows)
    b = random_batch(40 + rows, **case, pad_tokens=5, spare_blocks=20)
    scale = 32**-0.5
    want = dense_attention(b, scale)
    got = np.asarray(jax.jit(functools.partial(reference, scale=scale, kv_chunk_tokens=32))(**b))
    n_real = int(b["query_start_loc"][-1])
    assert rel_err(got[:n_real], want[:n_real]) < 1e-5
    assert (got[n_real:] == 0).all()


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_work_items_cover_each_token_once(rows):
    """The static item count suffices for the worst layout (every chunk one token longer than a multiple
    of R) and every real token is one row of one item of its own sequence."""
    q_lens = [rows + 1] * 5 + [0, 1, 2 * rows + 1]
    T, S = sum(q_lens) + 3, len(q_lens)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    seq_lens = np.asarray(q_lens, np.int32) + 7
    seq, token, q_pos, valid = (np.asarray(x) for x in reference_module.work_items(
        jnp.asarray(qsl), jnp.asarray(seq_lens), T, rows))
    assert len(seq) == min(T, -(-T // rows) + S) >= sum(-(-n // rows) for n in q_lens)
    assert sorted(token[valid]) == list(range(qsl[-1]))
    assert (token[~valid] == T).all()
    for w, r in zip(*np.nonzero(valid)):
        s, t = seq[w], token[w, r]
        assert qsl[s] <= t < qsl[s + 1]
        assert q_pos[w, r] == seq_lens[s] - q_lens[s] + (t - qsl[s])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_kernel_interpret(num_splits):
    b = random_batch(10 + num_splits, **DECODE, num_q_heads=8, num_kv_heads=2, dtype=jnp.bfloat16)
    scale = 32**-0.5
    want = np.asarray(reference(**b, scale=scale), np.float32)
    got = np.asarray(paged_decode_attention(**b, scale=scale, num_splits=num_splits, block_k=16, interpret=True),
                     np.float32)
    n_real = int(b["query_start_loc"][-1])
    assert np.isfinite(got).all()
    assert rel_err(got[:n_real], want[:n_real]) < 1e-2
    assert (got[n_real:] == 0).all()


def test_decode_kernel_default_tiles_where_few_programs():
    """At two unsplit programs an SM or fewer the kernel picks 128-token tiles by itself (measured faster
    on an H200): that choice is exact too, over contexts not multiples of the tile."""
    from pallas_kernels.decode import NUM_SMS_HINT, choose_block_k, choose_num_splits

    num_seqs, num_kv_heads = 100, 2  # 200 programs: unsplit, under 2 an SM
    assert choose_num_splits(num_seqs, num_kv_heads, 512, 64) == 1
    assert choose_block_k(num_seqs * num_kv_heads, 1, 32) == 128
    assert choose_block_k(2 * NUM_SMS_HINT + 8, 1, 32) == 64  # more programs than two an SM
    assert choose_block_k(200, 2, 32) == choose_block_k(200, 1, 256) == 64  # split; head_dim 256
    rng = np.random.default_rng(7)
    b = random_batch(7, [1] * num_seqs, list(rng.integers(1, 300, num_seqs)), num_q_heads=4,
                     num_kv_heads=num_kv_heads, head_dim=32, block_size=16, dtype=jnp.bfloat16)
    want = np.asarray(reference(**b, scale=0.2), np.float32)
    got = np.asarray(paged_decode_attention(**b, scale=0.2, interpret=True), np.float32)
    assert rel_err(got[:num_seqs], want[:num_seqs]) < 1e-2
    assert (got[num_seqs:] == 0).all()


@pytest.mark.parametrize("num_q_heads", [6, 8])  # group 3 (padded to 4) and group 4
def test_ragged_kernel_interpret(num_q_heads):
    b = random_batch(20 + num_q_heads, **MIXED, num_q_heads=num_q_heads, num_kv_heads=2, dtype=jnp.bfloat16)
    scale = 32**-0.5
    want = np.asarray(reference(**b, scale=scale), np.float32)
    got = np.asarray(ragged_kernel(**b, scale=scale, block_m=16, block_k=16, interpret=True), np.float32)
    n_real = int(b["query_start_loc"][-1])
    assert np.isfinite(got).all()
    assert rel_err(got[:n_real], want[:n_real]) < 1e-2
    assert (got[n_real:] == 0).all()


@pytest.mark.parametrize("kernel,with_into,feature", [("ragged", False, None), ("ragged", True, None),
                                                     ("decode", False, None), ("decode", True, None),
                                                     ("ragged", True, "all"), ("decode", True, "all")])
def test_kernel_keep_writes_only_kept_rows(kernel, with_into, feature):
    """The dispatch's second and third kernels: sequences outside `keep` are another kernel's; their rows
    come out as zeros, or, given `into` (that kernel's output), as into's values, written around in place.
    The ragged kernel takes the short chunks of a mixed batch, the decode kernel its single tokens; with
    the attention features too, as the dispatch passes them to both."""
    features = {} if feature is None else kernel_features(feature)
    b = random_batch(31, **MIXED)
    q_lens = np.diff(np.asarray(b["query_start_loc"]))
    keep = (q_lens > 1) & (q_lens < 10) if kernel == "ragged" else q_lens == 1
    assert keep.any() and (~keep & (q_lens > 0)).any()
    qsl = np.asarray(b["query_start_loc"])
    mine = np.zeros(b["q"].shape[0], bool)
    for s in np.nonzero(keep)[0]:
        mine[qsl[s]:qsl[s + 1]] = True
    into = jnp.asarray(np.random.default_rng(0).standard_normal(b["q"].shape), b["q"].dtype)
    run = (functools.partial(ragged_kernel, block_m=16) if kernel == "ragged" else paged_decode_attention)
    got = np.asarray(run(**b, scale=0.2, block_k=16, interpret=True, keep=jnp.asarray(keep),
                         into=into if with_into else None, **features))
    want = np.asarray(reference(**b, scale=0.2, **features))
    assert rel_err(got[mine], want[mine]) < 1e-2
    np.testing.assert_array_equal(got[~mine], np.asarray(into)[~mine] if with_into else 0)


@pytest.mark.parametrize("num_tokens, prefill_kernel", [(300, None), (pallas_kernels.PREFILL_MIN_BUCKET, None),
                                                          (300, True), (pallas_kernels.PREFILL_MIN_BUCKET, False)])
def test_dispatch_lowers_for_cuda_with_mosaic_where_asked(num_tokens, prefill_kernel):
    """What an engine step runs per layer on the GPU: the Mosaic prefill kernel where the caller asks
    (the engine: its largest token bucket; its kernels are compiled at every start), by default in steps
    of at least PREFILL_MIN_BUCKET tokens; no while loop in the bookkeeping (a searchsorted scan there
    cost more than the kernel saved)."""
    b = random_batch(1, [num_tokens - 10, 1, 1, 6], [num_tokens, 40, 60, 200], num_q_heads=4, num_kv_heads=2,
                     head_dim=64, block_size=16, dtype=jnp.bfloat16)
    step = jax.jit(lambda *a: pallas_kernels._split_by_chunk_length(a, 0.1, prefill_kernel))
    text = step.trace(*b.values()).lower(lowering_platforms=("cuda",)).as_text()
    want = num_tokens >= pallas_kernels.PREFILL_MIN_BUCKET if prefill_kernel is None else prefill_kernel
    assert ("mosaic_gpu" in text) == want
    assert text.count("triton") >= 2  # the ragged and the decode kernels
    assert "stablehlo.while" not in text


def test_prepare_to_load_programs_imports_mosaic_gpu():
    """A warm start loads programs without tracing; their Mosaic GPU kernels link against a runtime that
    jax names only when its Mosaic GPU module is imported. A fresh process, since this one has it."""
    import subprocess
    import sys

    code = ("import sys, pallas_kernels; assert 'jax.experimental.mosaic.gpu' not in sys.modules; "
            "pallas_kernels.prepare_to_load_programs(); print('jax.experimental.mosaic.gpu' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("decode_only", [False, True])
def test_dispatch_uses_reference_on_cpu(decode_only):
    assert jax.default_backend() == "cpu"
    case = DECODE if decode_only else MIXED
    b = random_batch(30, **case)
    got = pallas_kernels.ragged_paged_attention(*b.values(), scale=0.2, decode_only=decode_only)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(reference(**b, scale=0.2)))



# -- the model families' attention features in the Triton kernels --------------------------------------

def kernel_features(name):
    """FEATURES[name] as a layer passes them: the window and the slopes as arrays (traced in the jitted
    kernels), the soft-cap a static float."""
    return {k: v if k == "logit_softcap" else jnp.asarray(v) for k, v in FEATURES[name].items()}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("kernel", ["decode", "ragged"])
def test_kernel_attention_features(kernel, feature):
    """Each feature and all together against the reference. 6 query heads over 2 kv heads (a GQA group of
    3, padded), a window of 7 or 12 beside 8-token blocks and 16-token tiles; the decode kernel in 3
    splits (some of them wholly before the window: empty), the ragged kernel over a mixed batch."""
    b = random_batch(60, **(DECODE if kernel == "decode" else MIXED), dtype=jnp.bfloat16)
    features = kernel_features(feature)
    scale = 32**-0.5
    run = (functools.partial(paged_decode_attention, num_splits=3, block_k=16) if kernel == "decode"
           else functools.partial(ragged_kernel, block_m=16, block_k=16))
    got = np.asarray(run(**b, scale=scale, interpret=True, **features), np.float32)
    want = np.asarray(reference(**b, scale=scale, **features), np.float32)
    n_real = int(b["query_start_loc"][-1])
    assert np.isfinite(got).all()
    assert rel_err(got[:n_real], want[:n_real]) < 1e-2
    assert (got[n_real:] == 0).all()
    plain = np.asarray(reference(**b, scale=scale), np.float32)
    assert rel_err(got[:n_real], plain[:n_real]) > 5e-2  # the kernel applied the feature


@pytest.mark.parametrize("kernel", ["decode", "ragged"])
def test_window_skips_tiles_before_it(kernel):
    """K/V wholly before every query's window is never read: NaN there leaves the output exact. A window
    of 40 over contexts of up to 101 in 16-token tiles: the decode kernel starts at the window's first
    position; the ragged kernel starts at the tile holding its first query's window start, and also runs
    unmasked tiles between the window's lower edge and the diagonal."""
    window, block_k = 40, 16
    q_lens, ctx_lens = ([1, 1, 1, 0], [100, 61, 5, 0]) if kernel == "decode" else ([1, 45, 30, 0], [100, 101, 97, 0])
    b = random_batch(61, q_lens, ctx_lens, dtype=jnp.bfloat16)
    want = np.asarray(reference(**b, scale=0.2, sliding_window=window), np.float32)
    k, v = np.array(b["k_cache"]), np.array(b["v_cache"])
    tables, layer, bs = np.asarray(b["block_tables"]), int(b["layer"]), k.shape[2]
    poisoned = 0
    for s, (q_len, ctx) in enumerate(zip(q_lens, ctx_lens)):
        lo = max(ctx - q_len - window + 1, 0)  # the window's start for the sequence's first query token
        for pos in range(lo if kernel == "decode" else lo // block_k * block_k):
            k[layer, tables[s, pos // bs], pos % bs] = v[layer, tables[s, pos // bs], pos % bs] = np.nan
            poisoned += 1
    assert poisoned >= 60
    b.update(k_cache=jnp.asarray(k), v_cache=jnp.asarray(v))
    run = (functools.partial(paged_decode_attention, num_splits=2) if kernel == "decode"
           else functools.partial(ragged_kernel, block_m=16))
    got = np.asarray(run(**b, scale=0.2, block_k=block_k, interpret=True, sliding_window=jnp.int32(window)),
                     np.float32)
    n_real = sum(q_lens)
    assert np.isfinite(got).all()
    assert rel_err(got[:n_real], want[:n_real]) < 1e-2


def test_ragged_kernel_window_traced_in_a_layer_scan():
    """Gemma 2's layer loop: windowed and global layers alternate under lax.scan, each layer's window a
    traced scalar (NO_WINDOW on the global ones); one compiled kernel serves both."""
    from jaxllm.models.layers import NO_WINDOW

    b = random_batch(63, **LONG, dtype=jnp.bfloat16)
    windows = jnp.asarray([7, NO_WINDOW], jnp.int32)

    def layer(carry, window):
        return carry, ragged_kernel(**b, scale=0.2, block_m=16, block_k=16, interpret=True, sliding_window=window,
                                    logit_softcap=20.0)

    _, got = jax.lax.scan(layer, 0, windows)
    n_real = int(b["query_start_loc"][-1])
    for i, window in enumerate([7, None]):
        want = np.asarray(reference(**b, scale=0.2, sliding_window=window, logit_softcap=20.0), np.float32)
        assert rel_err(np.asarray(got[i], np.float32)[:n_real], want[:n_real]) < 1e-2


def test_ragged_kernel_head_dim_256():
    """Gemma's head_dim with the kernel's own tiles for it (64 query rows, 64-token K/V tiles) and Gemma 2's
    features: a traced window, soft-capping."""
    from pallas_kernels.ragged import default_tiles

    assert default_tiles(256) == (64, 64, 2) and default_tiles(128) == (128, 128, 3)
    b = random_batch(64, [1, 70, 9, 0], [150, 70, 30, 0], num_q_heads=4, num_kv_heads=2, head_dim=256,
                     block_size=16, dtype=jnp.bfloat16)
    features = dict(sliding_window=jnp.int32(40), logit_softcap=50.0)
    got = np.asarray(ragged_kernel(**b, scale=256**-0.5, interpret=True, **features), np.float32)
    want = np.asarray(reference(**b, scale=256**-0.5, **features), np.float32)
    assert rel_err(got[:80], want[:80]) < 1e-2
    assert (got[80:] == 0).all()


@pytest.mark.parametrize("head_dim", [128, 256])
def test_dispatch_with_features_lowers_for_cuda_without_mosaic(head_dim):
    """A Gemma 2 / Falcon step on the GPU: every feature lowers into the Triton kernels (no reference
    attention's while loop), and the Mosaic kernel, which lacks them, is left out where the same step
    without features takes it (where this jaxlib has Mosaic GPU)."""
    b = random_batch(2, [300, 1, 1, 6], [310, 40, 60, 200], num_q_heads=4, num_kv_heads=2, head_dim=head_dim,
                     block_size=16, dtype=jnp.bfloat16)
    features = dict(logit_softcap=50.0)
    step = jax.jit(lambda *a: pallas_kernels._split_by_chunk_length(a[:7], 0.1, True, sliding_window=a[7],
                                                                    alibi_slopes=a[8], **features))
    args = (*b.values(), jnp.int32(64), jnp.linspace(0.1, 0.5, 4))
    text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" not in text
    assert text.count("triton") >= 2
    assert "stablehlo.while" not in text
    if head_dim == 128 and prefill.plgpu is not None:
        plain = jax.jit(lambda *a: pallas_kernels._split_by_chunk_length(a, 0.1, True))
        assert "mosaic_gpu" in plain.trace(*b.values()).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("kwargs, named", [(dict(sliding_window=0), "sliding_window"),
                                           (dict(sliding_window=jnp.ones(2, jnp.int32)), "sliding_window"),
                                           (dict(logit_softcap=0.0), "logit_softcap"),
                                           (dict(alibi_slopes=jnp.ones(4)), "alibi_slopes")])
def test_attention_features_refuse_bad_values(kwargs, named):
    """The dispatch names the bad argument; the jitted kernels see a window's value traced, so they check
    shapes only."""
    b = random_batch(3, **DECODE)
    shape_error = named == "alibi_slopes" or jnp.ndim(kwargs.get("sliding_window", 0)) > 0
    kernels = (paged_decode_attention, ragged_kernel) if shape_error else ()
    for attend in (pallas_kernels.ragged_paged_attention, *kernels):
        with pytest.raises(ValueError, match=named):
            attend(**b, scale=0.2, **kwargs)


# -- the Mosaic GPU prefill kernel (prefill.py) -------------------------------------------------------

from pallas_kernels import prefill  # noqa: E402


@pytest.mark.parametrize("seed", range(6))
def test_prefill_flat_tiles_hold_each_kept_row_once(seed):
    """Each tile's sequence range covers exactly the sequences with rows in the tile, and the order takes
    every tile once, the most K/V first."""
    rng = np.random.default_rng(seed)
    S, tile = int(rng.integers(1, 9)), 16
    q_lens = rng.integers(0, 70, S)
    keep = rng.random(S) < 0.7
    seq_lens = q_lens + rng.integers(0, 100, S)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    T = int(qsl[-1]) + int(rng.integers(0, 40))  # padding tokens at the end
    num_tiles = -(-T // tile)
    seg_lens = np.where(keep, q_lens, 0)
    order, seqs = map(np.asarray, prefill.flat_tiles(jnp.asarray(qsl), jnp.asarray(seg_lens, jnp.int32),
                                                     jnp.asarray(seq_lens, jnp.int32), num_tiles, tile))
    assert sorted(order.tolist()) == list(range(num_tiles))
    reach = np.zeros(num_tiles)
    for g in range(num_tiles):
        rows = range(g * tile, (g + 1) * tile)
        holders = {s for s in range(S) if any(qsl[s] <= r < qsl[s + 1] for r in rows)}
        held = set(range(seqs[0, g], seqs[1, g] + 1))
        assert holders <= held and all(q_lens[s] == 0 for s in held - holders)
        for s in holders:
            end = min(qsl[s] + seg_lens[s], (g + 1) * tile)
            if end > max(qsl[s], g * tile):
                reach[g] += seq_lens[s] - q_lens[s] + end - qsl[s]
    assert (np.diff(reach[order]) <= 0).all()
    assert (seqs[2] == (reach > 0)).all()  # busy: the tile reads K/V


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,block_size", [(4, 2, 128, 16), (8, 8, 64, 32)])
def test_prefill_kernel_lowers_to_mosaic_gpu(num_q_heads, num_kv_heads, head_dim, block_size):
    """The whole Pallas program (TMA copies, barriers, wgmma, the warp-specialised loop) lowers for CUDA
    on this CPU-only machine; numerics are checked on the device (tests/gpu/check_kernels.py)."""
    b = random_batch(40, [150, 37, 1], [170, 37, 90], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, block_size=block_size, dtype=jnp.bfloat16)
    f = jax.jit(lambda b: prefill.ragged_paged_attention(**b, scale=0.1, keep=b["seq_lens"] > 1))
    text = f.trace(b).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("kwargs, named", [(dict(num_ctas=0), "num_ctas"), (dict(num_ctas=-3), "num_ctas")])
def test_prefill_kernel_rejects_bad_arguments(kwargs, named):
    b = random_batch(41, [150], [150], num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                     dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=named):
        prefill.ragged_paged_attention(**b, scale=0.1, **kwargs)


INTERPRET_CASES = {  # q_lens, context lengths, keep
    "a tile holding two sequences": ([150, 37], [170, 37], None),
    "kept and left sequences, an empty one": ([40, 1, 200, 0, 60], [300, 90, 200, 5, 61],
                                              [True, False, True, False, True]),
    "whole tiles over context": ([128, 128], [128, 300], None),
    # Tiles holding only rows of other kernels' sequences read no K/V and take no query slot; with two
    # persistent CTAs each walks several items, so query slots are reused around them.
    "tiles left to other kernels": ([100, 400, 3], [150, 400, 20], [True, False, True]),
}


@pytest.mark.skipif((os.cpu_count() or 1) < 4 and not os.environ.get("JAXLLM_MGPU_INTERPRET"),
                    reason="the Mosaic GPU interpreter runs each warpgroup on a thread blocked in XLA host "
                           "callbacks, and XLA sizes its thread pool by the cores it may use; with 2 it "
                           "deadlocks (test_prefill_kernel_interpret_in_a_wider_process runs it anyway)")
@pytest.mark.parametrize("case", INTERPRET_CASES)
def test_prefill_kernel_interpret(case):
    q_lens, ctx_lens, keep = INTERPRET_CASES[case]
    b = random_batch(50, q_lens, ctx_lens, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                     dtype=jnp.bfloat16)
    want = np.asarray(reference(**b, scale=0.125), np.float32)
    got = np.asarray(prefill.ragged_paged_attention(
        **b, scale=0.125, block_kv=64, interpret=True, keep=None if keep is None else jnp.asarray(keep)),
        np.float32)
    qsl = np.asarray(b["query_start_loc"])
    mine = np.zeros(got.shape[0], bool)
    for s in range(len(q_lens)):
        mine[qsl[s]:qsl[s + 1]] = keep is None or keep[s]
    assert np.isfinite(got).all()
    assert rel_err(got[mine], want[mine]) < 1e-2
    assert (got[~mine] == 0).all()  # other kernels' rows and padding


AFFINITY_SHIM = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <string.h>
int sched_getaffinity(pid_t pid, size_t size, cpu_set_t *mask) {
  memset(mask, 0, size);
  for (int i = 0; i < 8; i++) CPU_SET_S(i, size, mask);
  return 0;
}
"""


@pytest.mark.skipif((os.cpu_count() or 1) >= 4 or os.environ.get("JAXLLM_MGPU_INTERPRET") is not None,
                    reason="test_prefill_kernel_interpret runs in this process")
def test_prefill_kernel_interpret_in_a_wider_process(tmp_path):
    """On a machine of fewer than 4 cores: the interpreter test in a child process told it may use 8
    (a preloaded sched_getaffinity), so XLA's thread pool has a thread for each warpgroup."""
    import shutil
    import subprocess
    import sys

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the affinity shim")
    (tmp_path / "shim.c").write_text(AFFINITY_SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-o", tmp_path / "shim.so", tmp_path / "shim.c"], check=True)
    env = dict(os.environ, LD_PRELOAD=str(tmp_path / "shim.so"), JAXLLM_MGPU_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "test_prefill_kernel_interpret and not wider"], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"{len(INTERPRET_CASES)} passed" in run.stdout
