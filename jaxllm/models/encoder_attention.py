"""Encoders' bidirectional attention within segments of a packed step, by chunks no sequence crosses.

Three implementations of one function, picked by $JAXLLM_ENCODER_ATTENTION when a runner starts:
- "jnp" (the reference, and the GPU's default where cuDNN cannot run): scores [chunks, h, C, C] in
  float32, masked, softmax, values. XLA writes the scores to memory and reads them back, which is what
  makes 512-token inputs slow on a GPU.
- "loop" (the default on a CPU): the same arithmetic one (chunk, head) tile at a time in a `lax.map`, so
  a tile's [C, C] scores (1 MiB at C = 512) stay in cache between the matmul, the softmax and the values.
  XLA's CPU batched matmul and softmax over all tiles at once stream every score through memory; one
  tile at a time made the attention of four 512-token inputs about 2x faster on a 2-core x86 host.
  Chunks shorter than LOOP_MIN_CHUNK keep the jnp attention: their tiles are small, and hundreds of
  loop iterations cost more than the memory they save.
- "cudnn" (the GPU's default): `jax.nn.dot_product_attention(..., implementation="cudnn")`, cuDNN's
  fused flash attention, on the same chunks with the segment mask as a bias broadcast over heads. GPU
  only, 16-bit only. Chunks shorter than FUSED_MIN_CHUNK keep the jnp attention: their scores are small,
  and a flash kernel's query tile (64 or 128 rows) would be mostly padding.
- "pallas" (GPU, opt-in): JAX's own Pallas (Triton) flash attention, `jax.experimental.pallas.ops.gpu.
  attention.mha`, on the same chunks, each a batch row with its segment ids: one kernel that never writes
  the scores, and the one to use where cuDNN cannot run (float32, head_dim over 128).
The cuDNN path's layout and mask are tested on the CPU through the same call with XLA's implementation
("xla"), against the reference, and the Pallas path in the Pallas interpreter;
tests/gpu/check_encoder_attention.py checks both on a GPU.

Einsum letters: n chunk, t/s query/key token within a chunk, h head, d head_dim.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

ENV = "JAXLLM_ENCODER_ATTENTION"
IMPLEMENTATIONS = ("jnp", "loop", "cudnn", "pallas")
FUSED_MIN_CHUNK = 64
LOOP_MIN_CHUNK = 128


def cudnn_unsupported(dtype: str, backend: str, head_dim: int) -> str | None:
    """Why cuDNN's flash attention cannot run this model here, or None when it can."""
    if backend != "gpu":
        return f"needs a CUDA GPU; this backend is {backend!r}"
    if dtype not in ("bfloat16", "float16"):
        return f"needs bfloat16 or float16 weights; the model runs in {dtype}"
    if head_dim % 8 or head_dim > 128:
        return f"needs a head_dim that is a multiple of 8 up to 128; this model's is {head_dim}"
    return None


def encoder_attention_from_env(dtype: str, backend: str, head_dim: int) -> str:
    """The implementation $JAXLLM_ENCODER_ATTENTION names, refused by name where it cannot run. Unset:
    "loop" on a CPU; on a GPU "cudnn" where it can run (1.3x to 2.5x faster whole bge-m3 steps on an H200,
    benchmarks/results/check-encoder-attention-H200.json), else "jnp"."""
    name = os.environ.get(ENV)
    if not name:
        if backend == "cpu":
            return "loop"
        return "jnp" if cudnn_unsupported(dtype, backend, head_dim) else "cudnn"
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{ENV}={name!r}: must be one of {', '.join(IMPLEMENTATIONS)}")
    if name == "cudnn" and (why := cudnn_unsupported(dtype, backend, head_dim)):
        raise ValueError(f"{ENV}=cudnn {why} (unset it for the default attention)")
    if name == "pallas" and backend != "gpu":
        raise ValueError(f"{ENV}=pallas needs a CUDA GPU; this backend is {backend!r} (unset it for the default "
                         "attention)")
    return name


def _to_chunks(x: jax.Array, chunk: int, fill) -> jax.Array:
    """[T, ...] -> [n, C, ...], padding T up to a multiple of C with `fill` (the last, non-power-of-two
    token bucket need not be one)."""
    T = x.shape[0]
    n = -(-T // chunk)
    if n * chunk != T:
        x = jnp.concatenate([x, jnp.full((n * chunk - T, *x.shape[1:]), fill, x.dtype)])
    return x.reshape(n, chunk, *x.shape[1:])


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float,
                      chunk: int | None = None) -> jax.Array:
    """Bidirectional attention within segments of a packed step (the jnp reference).

    q, k, v: [T, h, d]; segment_ids: [T] int32, -1 for padding (padding rows come out as garbage the
    caller never reads, but finite). Returns [T, h, d].

    `chunk` (static): the caller laid the sequences out so that none crosses a multiple of `chunk`, so
    attention runs within chunks, [n, h, C, C], not over all [T, T]; None: one chunk of T."""
    T, h, d = q.shape
    C = chunk or T
    qc, kc, vc = (_to_chunks(a, C, 0) for a in (q, k, v))  # [n, C, h, d]
    seg = _to_chunks(segment_ids, C, -1)  # [n, C]
    s = jnp.einsum("nthd,nshd->nhts", qc, kc, preferred_element_type=jnp.float32) * scale  # [n, h, C, C]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)  # [n, C, C]
    p = jax.nn.softmax(jnp.where(same[:, None], s, -1e30), axis=-1)
    return jnp.einsum("nhts,nshd->nthd", p.astype(v.dtype), vc).reshape(-1, h, d)[:T]


def looped_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float,
                             chunk: int | None = None) -> jax.Array:
    """`segment_attention` one (chunk, head) tile at a time: the same scores, mask and softmax, with a
    tile's [C, C] scores small enough to stay in a CPU's cache. Same arguments and result."""
    T, h, d = q.shape
    C = chunk or T
    qc, kc, vc = (_to_chunks(a, C, 0).transpose(0, 2, 1, 3).reshape(-1, C, d) for a in (q, k, v))  # [n * h, C, d]
    seg = jnp.repeat(_to_chunks(segment_ids, C, -1), h, axis=0)  # [n * h, C]

    def tile(args):
        qt, kt, vt, st = args  # [C, d] x 3, [C]
        s = jnp.einsum("td,sd->ts", qt, kt, preferred_element_type=jnp.float32) * scale  # [C, C]
        same = (st[:, None] == st[None, :]) & (st[None, :] >= 0)  # [C, C]
        p = jax.nn.softmax(jnp.where(same, s, -1e30), axis=-1)
        return jnp.einsum("ts,sd->td", p.astype(vt.dtype), vt)  # [C, d]

    out = jax.lax.map(tile, (qc, kc, vc, seg))  # [n * h, C, d]
    return out.reshape(-1, h, C, d).transpose(0, 2, 1, 3).reshape(-1, h, d)[:T]


def fused_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float,
                            chunk: int | None = None, implementation: str = "cudnn") -> jax.Array:
    """`segment_attention` through `jax.nn.dot_product_attention`: each chunk a batch row, the segment
    mask [n, 1, C, C] shared by the heads. `implementation` is the call's: "cudnn" on a GPU, "xla"
    (the same masks through XLA) for checking the layout anywhere. Padding attends to padding, so no
    row is all masked."""
    T, h, d = q.shape
    C = chunk or T
    qc, kc, vc = (_to_chunks(a, C, 0) for a in (q, k, v))  # [n, C, h, d]
    seg = _to_chunks(segment_ids, C, -1)  # [n, C]
    mask = (seg[:, :, None] == seg[:, None, :])[:, None]  # [n, 1, C, C]
    out = jax.nn.dot_product_attention(qc, kc, vc, mask=mask, scale=scale, implementation=implementation)
    return out.reshape(-1, h, d)[:T]


def pallas_block(chunk: int) -> int | None:
    """The flash kernel's query and key tile for chunks of `chunk` tokens (it must divide them), or None."""
    return next((b for b in (128, 64, 32, 16) if chunk % b == 0), None)


def pallas_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float,
                             chunk: int | None = None, interpret: bool = False) -> jax.Array:
    """`segment_attention` by JAX's Pallas flash attention (`attention.mha`, not causal): each chunk a batch
    row, its segment ids keeping sequences apart (padding, -1, attends to padding). Same arguments and
    result; `interpret` runs the kernel in the Pallas interpreter (any backend)."""
    from jax.experimental.pallas.ops.gpu import attention

    T, h, d = q.shape
    C = chunk or T
    block = pallas_block(C)
    qc, kc, vc = (_to_chunks(a, C, 0) for a in (q, k, v))  # [n, C, h, d]
    seg = _to_chunks(segment_ids, C, -1)  # [n, C]
    out = attention.mha(qc, kc, vc, seg, sm_scale=scale, causal=False,
                        block_sizes=attention.BlockSizes(block_q=block, block_k=block), interpret=interpret)
    return out.reshape(-1, h, d)[:T]


def encoder_attention(q, k, v, segment_ids, scale: float, chunk: int | None, implementation: str) -> jax.Array:
    """[T, h, d] -> [T, h, d] by the named implementation ("jnp", "loop", "cudnn" or "pallas"; "xla" runs
    the cuDNN path's layout through XLA)."""
    C = chunk or q.shape[0]
    if implementation == "loop" and C >= LOOP_MIN_CHUNK:
        return looped_segment_attention(q, k, v, segment_ids, scale, chunk)
    if implementation in ("jnp", "loop") or C < FUSED_MIN_CHUNK:
        return segment_attention(q, k, v, segment_ids, scale, chunk)
    if implementation == "pallas":
        if pallas_block(C) is None:
            return segment_attention(q, k, v, segment_ids, scale, chunk)
        return pallas_segment_attention(q, k, v, segment_ids, scale, chunk)
    return fused_segment_attention(q, k, v, segment_ids, scale, chunk, implementation)
