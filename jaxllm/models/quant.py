"""Quantized linear weights: one pytree type for every format, and the matmul that reads it.

A `QuantizedWeight` stands wherever a family keeps a float matrix [in, out] (stacked [L, in, out] under
the layer loop: every leaf carries the same leading axes, so `lax.scan` slices it like any weight).
`layers.linear` dispatches on the weight's type at trace time, so a float weight keeps exactly its old
program and a quantized one gets its own.

    method   q                       scale                    compute
    fp8      float8_e4m3fn [out, in]  [1, out] per channel     W8A8: x quantized per token (or by the
                                                               checkpoint's static input_scale), an fp8
                                                               dot with float32 accumulation
    int8     int8 [in, out]           [1, out] per channel     weight-only: dequantized into the dot
    int4     int32 [in / 8, out]      [in / group, out] f16    weight-only, with zero points (AWQ, GPTQ):
             eight rows a word                                 the Pallas kernel, or dequantized into the dot

On Hopper XLA lowers the fp8 dot to a cuBLASLt fp8 GEMM, which takes both operands with the contracted
axis innermost: so fp8 keeps q [out, in], as checkpoints store it. Kept [in, out], every call paid a
transpose of the weight before its GEMM (H200, benchmarks/gemm_rates.py, 2026-12-03: Llama-3-8B's qkv at
16 tokens 204 us against 61 us, at 8,192 tokens 449 against 304 us; bf16 51 and 552 us). Elsewhere (the
CPU) the fp8 dot is emulated. int8
dequantizes inside the jitted program, which XLA fuses into the dot's operand on a GPU. int4 is packed
in the layout of `pallas_kernels/int4_matmul.py` (the loader repacks AWQ and GPTQ into it), whose kernel
dequantizes in registers: it runs on a GPU for decode batches (at most MAX_M rows), where reading the
weights bounds the step; larger batches (prefill) and other backends dequantize into an XLA dot.
JAXLLM_INT4_KERNEL=1 puts every int4 matmul whose shape the kernel takes on it (on a CPU in the Pallas
interpreter), =0 none. GPTQ act-order is sorted away at load: q's rows are put in group order and
the activations' columns are gathered to match (`perm`), as vLLM's exllama and Marlin kernels do.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from pallas_kernels.decode import pltriton
from pallas_kernels.int4_matmul import MAX_M, block_sizes, int4_matmul, pack_int4, unpack_int4

FP8_MAX = 448.0  # largest finite float8_e4m3fn
METHODS = ("fp8", "int8", "int4")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight:
    """A quantized matrix and its scales; `w ≈ (q - zero) * scale` row group by row group."""

    q: jax.Array  # [..., in, out] int8; fp8: [..., out, in] float8_e4m3fn; int4: [..., in / 8, out] int32
    scale: jax.Array  # [..., groups, out] float32 (int4: float16); rows g*in/groups .. (g+1)*in/groups share group g
    zero: jax.Array | None = None  # [..., groups, out] int4's zero points (float16); None: 0
    perm: jax.Array | None = None  # [..., in] int32: q's row i multiplies input column perm[i] (GPTQ act-order)
    input_scale: jax.Array | None = None  # [...] float32: fp8's static activation scale; None: per token
    method: str = dataclasses.field(default="fp8", metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The float matrix's shape [..., in, out]."""
        *lead, rows, cols = self.q.shape
        if self.method == "fp8":
            return (*lead, cols, rows)
        return (*lead, rows * 8 if self.method == "int4" else rows, cols)


def dequantize(w: QuantizedWeight, dtype) -> jax.Array:
    """The float matrix [..., in, out] that `w` stands for, in `dtype`, rows in the input's order."""
    rows = _dequantize_rows(w, dtype)
    if w.perm is None:
        return rows
    inverse = jnp.argsort(w.perm, axis=-1)  # [..., in]: where each input column's row sits in q
    return jnp.take_along_axis(rows, inverse[..., None], axis=-2)


def _dequantize_rows(w: QuantizedWeight, dtype) -> jax.Array:
    """q's rows dequantized [..., in, out], in q's order (act-order weights: the input's order by `perm`)."""
    q = {"int4": unpack_int4, "fp8": lambda q: q.swapaxes(-1, -2)}.get(w.method, lambda q: q)(w.q).astype(jnp.float32)
    *lead, n_in, n_out = q.shape
    groups = w.scale.shape[-2]
    q = q.reshape(*lead, groups, n_in // groups, n_out)
    if w.zero is not None:
        q = q - w.zero.astype(jnp.float32)[..., :, None, :]
    return (q * w.scale.astype(jnp.float32)[..., :, None, :]).reshape(*lead, n_in, n_out).astype(dtype)


def quantize_fp8_activations(x: jax.Array, input_scale: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """x [..., in] -> (float8_e4m3fn [..., in], float32 scale [..., 1] or a scalar): per token (the
    row's absolute maximum maps to FP8_MAX) unless a static scale is given."""
    xf = x.astype(jnp.float32)
    if input_scale is None:
        scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), 1e-12) / FP8_MAX
    else:
        scale = input_scale.astype(jnp.float32)
    return jnp.clip(xf / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn), scale


def matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [..., in] @ w -> [..., out] in x's dtype."""
    if w.method == "fp8" and w.scale.shape[-2] == 1:
        xq, x_scale = quantize_fp8_activations(x, w.input_scale)
        y = jax.lax.dot_general(xq, w.q, (((xq.ndim - 1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)  # [..., out]
        return (y * x_scale * w.scale[0]).astype(x.dtype)
    if w.perm is not None:  # act-order: the input's columns in q's row order
        x = jnp.take(x, w.perm, axis=-1)
    if w.method == "int4" and use_int4_kernel(x, w):
        *lead, n_in = x.shape
        y = int4_matmul(x.reshape(-1, n_in), w.q, w.scale, w.zero, interpret=jax.default_backend() != "gpu")
        return y.reshape(*lead, -1)
    return x @ _dequantize_rows(w, x.dtype)


def use_int4_kernel(x: jax.Array, w: QuantizedWeight) -> bool:
    """Whether x [..., in] @ int4 `w` runs the Pallas kernel (decided when traced): on a GPU for 16-bit
    activations of at most MAX_M rows, where the kernel's tiles fit (float32 activations would take the
    Triton dot's exact path, off the tensor cores). JAXLLM_INT4_KERNEL=1 forces it on (any rows and
    dtype, any backend: the interpreter off a GPU), =0 off."""
    mode = os.environ.get("JAXLLM_INT4_KERNEL", "")
    if mode not in ("", "0", "1"):
        raise ValueError(f"JAXLLM_INT4_KERNEL={mode!r}: expected 0 (never), 1 (always) or unset (decode "
                         "batches on a GPU)")
    if mode == "0" or w.q.ndim != 2 or w.zero is None:
        return False
    on_gpu = jax.default_backend() == "gpu"
    n_in, n_out = w.shape
    if pltriton is None or block_sizes(n_in, n_out, n_in // w.scale.shape[0], interpret=not on_gpu) is None:
        return False
    rows = x.size // n_in
    return mode == "1" or (on_gpu and rows <= MAX_M and x.dtype in (jnp.bfloat16, jnp.float16))


# The stacked linear weights [L, in, out] of the families' layer pytrees (MoE routers and experts excluded).
LINEAR_FIELDS = ("wqkv", "wo", "w_gate_up", "w_down", "w_in", "w_out", "shared_gate_up", "shared_down")


INT4_GROUP = 128  # rows a scale group in random-weight int4 (AWQ's and GPTQ's usual group size)
RANDOM_WEIGHT_METHODS = {"fp8": "fp8", "int8": "int8", "awq": "int4"}  # a benchmark's --quantization -> format


def quantize_array(w: jax.Array, method: str) -> QuantizedWeight:
    """A float [..., in, out] -> per-output-channel symmetric "fp8" (E4M3) or "int8", or "int4" with
    asymmetric (min / max) groups of INT4_GROUP rows as AWQ makes them, on the device."""
    wf = w.astype(jnp.float32)
    if method == "int4":
        return _quantize_int4(wf)
    amax = jnp.maximum(jnp.max(jnp.abs(wf), axis=-2, keepdims=True), 1e-12)  # [..., 1, out]
    if method == "fp8":
        scale = amax / FP8_MAX
        q = jnp.clip(wf / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn).swapaxes(-1, -2)  # [..., out, in]
        return QuantizedWeight(q=q, scale=scale, method="fp8")
    if method == "int8":
        scale = amax / 127.0
        return QuantizedWeight(q=jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8), scale=scale,
                               method="int8")
    raise ValueError(f"quantizing weights in memory takes fp8, int8 or int4, not {method!r}")


def _quantize_int4(wf: jax.Array) -> QuantizedWeight:
    *lead, n_in, n_out = wf.shape
    if n_in % INT4_GROUP:
        raise ValueError(f"int4 quantization: the input axis ({n_in}) is not a multiple of the group size {INT4_GROUP}")
    g = wf.reshape(*lead, n_in // INT4_GROUP, INT4_GROUP, n_out)
    lo, hi = g.min(axis=-2), g.max(axis=-2)  # [..., groups, out]
    scale = (jnp.maximum(hi - lo, 1e-5) / 15.0).astype(jnp.float16)  # stored as AWQ stores it
    s = scale.astype(jnp.float32)
    zero = jnp.clip(jnp.round(-lo / s), 0, 15)
    q = jnp.clip(jnp.round(g / s[..., None, :]) + zero[..., None, :], 0, 15).astype(jnp.int32)
    return QuantizedWeight(q=pack_int4(q.reshape(*lead, n_in, n_out)), scale=scale, zero=zero.astype(jnp.float16),
                           method="int4")


def quantize_weights(params, method: str):
    """A family's float weights with their stacked linear weights (LINEAR_FIELDS, in `params.layers` or
    `params["layers"]`) quantized by `method` (RANDOM_WEIGHT_METHODS: "awq" is int4 in groups of
    INT4_GROUP rows with zero points): for random-weight benchmarks, which have no checkpoint to load."""
    if method not in RANDOM_WEIGHT_METHODS:
        raise ValueError(f"quantization={method!r}: random weights are quantized in memory with "
                         f"{', '.join(RANDOM_WEIGHT_METHODS)}; other methods need a checkpoint")
    fmt = RANDOM_WEIGHT_METHODS[method]
    layers = params["layers"] if isinstance(params, dict) else params.layers
    fields = layers if isinstance(layers, dict) else {f.name: getattr(layers, f.name) for f in dataclasses.fields(layers)}
    # One layer at a time: int4's float32 intermediates of a whole stack would be several times its size.
    quantize = jax.jit(lambda w: jax.lax.map(lambda layer: quantize_array(layer, fmt), w))
    new = {k: quantize(v) for k, v in fields.items()
           if k in LINEAR_FIELDS and isinstance(v, jax.Array) and v.ndim == 3}
    layers = {**layers, **new} if isinstance(layers, dict) else dataclasses.replace(layers, **new)
    return {**params, "layers": layers} if isinstance(params, dict) else dataclasses.replace(params, layers=layers)
