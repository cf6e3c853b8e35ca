"""Quantized linear weights: one pytree type for every format, and the matmul that reads it.

A `QuantizedWeight` stands wherever a family keeps a float matrix [in, out] (stacked [L, in, out] under
the layer loop: every leaf carries the same leading axes, so `lax.scan` slices it like any weight).
`layers.linear` dispatches on the weight's type at trace time, so a float weight keeps exactly its old
program and a quantized one gets its own.

    method   q                       scale                    compute
    fp8      float8_e4m3fn [in, out]  [1, out] per channel     W8A8: x quantized per token (or by the
                                                               checkpoint's static input_scale), an fp8
                                                               dot with float32 accumulation
    int8     int8 [in, out]           [1, out] per channel     weight-only: dequantized into the dot
    int4     uint4 [in, out]          [in / group, out]        weight-only, with zero points (AWQ, GPTQ)

On Hopper XLA lowers the fp8 dot to a cuBLASLt fp8 GEMM; elsewhere (the CPU) it is emulated. The
weight-only formats dequantize inside the jitted program, which XLA fuses into the dot's operand on a
GPU; a dequantizing GEMM kernel of our own (Pallas) does not exist yet.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

FP8_MAX = 448.0  # largest finite float8_e4m3fn
METHODS = ("fp8", "int8", "int4")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight:
    """A quantized matrix and its scales; `w ≈ (q - zero) * scale` row group by row group."""

    q: jax.Array  # [..., in, out] float8_e4m3fn | int8 | uint4
    scale: jax.Array  # [..., groups, out] float32; rows g*in/groups .. (g+1)*in/groups share group g
    zero: jax.Array | None = None  # [..., groups, out] float32 zero points (asymmetric int4); None: 0
    g_idx: jax.Array | None = None  # [..., in] int32: each row's group (GPTQ act-order); None: contiguous groups
    input_scale: jax.Array | None = None  # [...] float32: fp8's static activation scale; None: per token
    method: str = dataclasses.field(default="fp8", metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape


def dequantize(w: QuantizedWeight, dtype) -> jax.Array:
    """The float matrix [..., in, out] that `w` stands for, in `dtype`."""
    q = w.q.astype(jnp.float32)
    if w.g_idx is not None:  # act-order: row r uses group g_idx[r]
        rows = jax.vmap(lambda t, g: t[g]) if w.scale.ndim > 2 else (lambda t, g: t[g])
        scale = rows(w.scale, w.g_idx)  # [..., in, out]
        zero = None if w.zero is None else rows(w.zero, w.g_idx)
        out = (q if zero is None else q - zero) * scale
        return out.astype(dtype)
    *lead, n_in, n_out = q.shape
    groups = w.scale.shape[-2]
    q = q.reshape(*lead, groups, n_in // groups, n_out)
    if w.zero is not None:
        q = q - w.zero[..., :, None, :]
    return (q * w.scale[..., :, None, :]).reshape(*lead, n_in, n_out).astype(dtype)


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
    if w.method == "fp8" and w.scale.shape[-2] == 1 and w.g_idx is None:
        xq, x_scale = quantize_fp8_activations(x, w.input_scale)
        y = jnp.matmul(xq, w.q, preferred_element_type=jnp.float32)  # [..., out]
        return (y * x_scale * w.scale[0]).astype(x.dtype)
    return x @ dequantize(w, x.dtype)


# The stacked linear weights [L, in, out] of the families' layer pytrees (MoE routers and experts excluded).
LINEAR_FIELDS = ("wqkv", "wo", "w_gate_up", "w_down", "w_in", "w_out", "shared_gate_up", "shared_down")


def quantize_array(w: jax.Array, method: str) -> QuantizedWeight:
    """A float [..., in, out] -> per-output-channel symmetric "fp8" (E4M3) or "int8", on the device."""
    wf = w.astype(jnp.float32)
    amax = jnp.maximum(jnp.max(jnp.abs(wf), axis=-2, keepdims=True), 1e-12)  # [..., 1, out]
    if method == "fp8":
        scale = amax / FP8_MAX
        return QuantizedWeight(q=jnp.clip(wf / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn), scale=scale,
                               method="fp8")
    if method == "int8":
        scale = amax / 127.0
        return QuantizedWeight(q=jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8), scale=scale,
                               method="int8")
    raise ValueError(f"quantizing weights in memory takes fp8 or int8, not {method!r}")


def quantize_weights(params, method: str):
    """A family's float weights with their stacked linear weights (LINEAR_FIELDS, in `params.layers` or
    `params["layers"]`) quantized: for random-weight benchmarks, which have no checkpoint to load."""
    layers = params["layers"] if isinstance(params, dict) else params.layers
    fields = layers if isinstance(layers, dict) else {f.name: getattr(layers, f.name) for f in dataclasses.fields(layers)}
    quantize = jax.jit(quantize_array, static_argnums=1)
    new = {k: quantize(v, method) for k, v in fields.items()
           if k in LINEAR_FIELDS and isinstance(v, jax.Array) and v.ndim == 3}
    layers = {**layers, **new} if isinstance(layers, dict) else dataclasses.replace(layers, **new)
    return {**params, "layers": layers} if isinstance(params, dict) else dataclasses.replace(params, layers=layers)
