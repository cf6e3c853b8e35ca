"""Quantized checkpoints and quantization at load: which scheme a model uses, and each format's on-disk
layout read into one unpacked form (models/quant.py's QuantizedWeight).

`quantization` (vLLM's argument) names the method; None takes the checkpoint's `quantization_config`:

    fp8                 a float checkpoint quantized at load (per-output-channel weight scales, dynamic
                        per-token activation scales), or vLLM's FP8 checkpoints (`quant_method: fp8`:
                        float8_e4m3fn `weight` [out, in], `weight_scale`, `input_scale` when static)
    compressed-tensors  llm-compressor's FP8 checkpoints (float weights with `weight_scale` per tensor or
                        per channel, dynamic or static `input_scale`)
    int8                a float checkpoint quantized at load, weight-only, per-channel symmetric
    awq                 AutoAWQ's GEMM format: int4 packed eight to an int32 along the output axis in the
                        interleaved order 0 2 4 6 1 3 5 7; qweight [in, out/8], qzeros [in/g, out/8],
                        scales [in/g, out]
    gptq                AutoGPTQ's format: int4 packed eight to an int32 along the input axis; qweight
                        [in/8, out], qzeros [in/g, out/8] (stored minus one in checkpoint_format "gptq",
                        as is in "gptq_v2"), scales [in/g, out], g_idx [in] (act-order with desc_act)

AWQ and GPTQ are unpacked to one value a byte, fused (q | k | v, gate | up), then repacked by
`int4_layout` into the int4 kernel's layout (pallas_kernels/int4_matmul.py: eight rows a word along the
input axis, float16 scales and zero points), once, on the host. GPTQ act-order rows are sorted into
contiguous groups there, with the permutation kept to gather the activations' columns to match.

Embeddings, the LM head, MoE routers and experts stay in float (as vLLM's FP8 for dense models).
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from pallas_kernels.int4_matmul import pack_int4

QUANTIZATION_METHODS = ("fp8", "int8", "awq", "gptq", "compressed-tensors")
FP8_MAX = 448.0
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of an AWQ int32 holds column AWQ_ORDER[k] of its eight


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How a model's linear weights are stored and computed."""

    method: str  # one of QUANTIZATION_METHODS
    from_checkpoint: bool  # the checkpoint holds quantized tensors (else float weights are quantized at load)
    group_size: int = -1  # int4: rows per scale group (-1: the whole input axis)
    desc_act: bool = False  # GPTQ act-order: rows map to groups through g_idx
    zeros_minus_one: bool = True  # GPTQ checkpoint_format "gptq" (v1) stores each zero point minus one

    @property
    def kernel_method(self) -> str:
        """QuantizedWeight.method: what the matmul does."""
        return {"fp8": "fp8", "compressed-tensors": "fp8", "int8": "int8"}.get(self.method, "int4")

    def stores_quantized(self, reader, name: str) -> bool:
        """Whether the linear weight `name` is quantized in this model (a checkpoint may keep some in float:
        AWQ's modules_to_not_convert, compressed-tensors' ignore list)."""
        if not self.from_checkpoint:
            return True
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        return reader.has(base + (".qweight" if self.method in ("awq", "gptq") else ".weight_scale"))


def unsupported(method: str, where: str) -> ValueError:
    return ValueError(f"{where} {method!r} is not supported; supported: {', '.join(QUANTIZATION_METHODS)}")


def resolve_scheme(hf: dict, quantization: str | None) -> QuantScheme | None:
    """The scheme for a config.json `hf` and the `quantization` argument (None: the checkpoint's own)."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise unsupported(quantization, "quantization")
    qc = hf.get("quantization_config")
    if not qc:
        if quantization in ("awq", "gptq", "compressed-tensors"):
            raise ValueError(f"quantization={quantization!r} needs a checkpoint quantized with it (its config.json "
                             "has no quantization_config); fp8 and int8 quantize a float checkpoint at load")
        return None if quantization is None else QuantScheme(quantization, from_checkpoint=False)
    method = str(qc.get("quant_method", "")).lower()
    if method not in ("fp8", "awq", "gptq", "compressed-tensors"):
        raise unsupported(method, "the checkpoint's quantization_config quant_method")
    if quantization is not None and quantization != method:
        raise ValueError(f"quantization={quantization!r} does not match the checkpoint's quant_method {method!r}")
    if method == "fp8":
        if qc.get("weight_block_size"):
            raise ValueError(f"FP8 checkpoints with block-wise scales (weight_block_size="
                             f"{qc['weight_block_size']}) are not supported; per-tensor and per-channel are")
        return QuantScheme("fp8", from_checkpoint=True)
    if method == "compressed-tensors":
        _check_compressed_tensors(qc)
        return QuantScheme("compressed-tensors", from_checkpoint=True)
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"{method} checkpoints with bits={bits} are not supported; 4-bit ones are")
    group = int(qc.get("group_size", qc.get("q_group_size", -1)))
    if method == "awq":
        if str(qc.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"AWQ version {qc.get('version')!r} is not supported; the GEMM packing is")
        if not qc.get("zero_point", True):
            raise ValueError("AWQ checkpoints without zero points (zero_point=false) are not supported")
        return QuantScheme("awq", from_checkpoint=True, group_size=group)
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; supported: gptq, gptq_v2")
    return QuantScheme("gptq", from_checkpoint=True, group_size=group, desc_act=bool(qc.get("desc_act", False)),
                       zeros_minus_one=fmt == "gptq")


def _check_compressed_tensors(qc: dict) -> None:
    fmt = qc.get("format", "float-quantized")
    for name, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if (w.get("type"), w.get("num_bits")) != ("float", 8) or w.get("strategy") not in ("tensor", "channel"):
            raise ValueError(f"compressed-tensors config group {name!r} (weights {w}, format {fmt!r}) is not "
                             "supported; FP8 weights with per-tensor or per-channel scales are")
        a = group.get("input_activations")
        if a and ((a.get("type"), a.get("num_bits")) != ("float", 8) or a.get("strategy") not in ("tensor", "token")):
            raise ValueError(f"compressed-tensors config group {name!r} has input_activations {a}; supported: "
                             "none, or FP8 per tensor (static) or per token (dynamic)")


@dataclasses.dataclass
class UnpackedLinear:
    """One linear layer's quantized weight, on the host: as read (int4 one value a byte, `g_idx`), or in the
    engine's layout after `int4_layout` (int4 packed, `perm`)."""

    q: np.ndarray  # [in, out] float8_e4m3fn | int8 | uint8 holding 0..15; packed: [in / 8, out] int32
    scale: np.ndarray  # [groups, out] float32; packed int4: float16
    zero: np.ndarray | None = None  # [groups, out] float32; packed int4: float16
    g_idx: np.ndarray | None = None  # [in] int32: each row's group (GPTQ act-order), as read
    input_scale: float | None = None
    perm: np.ndarray | None = None  # [in] int32: packed row i is input row perm[i] (act-order, sorted)


def quantize_float(w: np.ndarray, method: str) -> UnpackedLinear:
    """A float matrix w [in, out] -> per-output-channel symmetric fp8 (E4M3) or int8."""
    w = w.astype(np.float32)
    amax = np.maximum(np.abs(w).max(axis=0, keepdims=True), 1e-12)  # [1, out]
    if method == "fp8":
        scale = amax / FP8_MAX
        return UnpackedLinear(q=np.clip(w / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn), scale=scale)
    scale = amax / 127.0
    return UnpackedLinear(q=np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale=scale)


def unpack_int4(packed: np.ndarray, axis: int, order=None) -> np.ndarray:
    """int32 words holding eight 4-bit values (value k in bits 4k..4k+3) -> uint8 values, eight times as long
    along `axis`; with `order`, nibble k is element order[k] of its eight (AWQ)."""
    words = packed.astype(np.uint32)
    nibbles = np.stack([(words >> (4 * k)) & 0xF for k in range(8)], axis=-1).astype(np.uint8)  # [..., 8]
    if order is not None:
        nibbles = nibbles[..., np.argsort(order)]
    nibbles = np.moveaxis(nibbles, -1, axis + 1 if axis >= 0 else axis)
    shape = list(packed.shape)
    shape[axis] *= 8
    return nibbles.reshape(shape)


def read_linear(reader, name: str, shape: tuple[int, int], transpose: bool, scheme: QuantScheme) -> UnpackedLinear:
    """The linear weight `name` (HF's "....weight", stored `shape`: [out, in] when transpose, else [in, out])."""
    n_out, n_in = shape if transpose else shape[::-1]
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    if not scheme.from_checkpoint:
        w = reader.take(name, shape)
        return quantize_float(w.T if transpose else w, scheme.method)
    if scheme.method in ("fp8", "compressed-tensors"):
        w = reader.take(name, shape)
        if w.dtype != ml_dtypes.float8_e4m3fn:
            raise ValueError(f"tensor {name!r} is {w.dtype}, expected float8_e4m3fn in an FP8 checkpoint")
        scale = _scale(reader, base + ".weight_scale", n_out)
        input_scale = None
        if reader.has(base + ".input_scale"):
            input_scale = float(np.max(reader.take(base + ".input_scale", reader.state[base + ".input_scale"].shape)))
        return UnpackedLinear(q=w.T if transpose else w, scale=scale, input_scale=input_scale)
    group = n_in if scheme.group_size == -1 else scheme.group_size
    if n_in % group or n_out % 8:
        raise ValueError(f"{base}: [{n_in}, {n_out}] does not fit group_size={scheme.group_size} and int4 packing")
    groups = n_in // group
    scales = reader.take(base + ".scales", (groups, n_out)).astype(np.float32)
    if scheme.method == "awq":
        q = unpack_int4(reader.take(base + ".qweight", (n_in, n_out // 8)), axis=1, order=AWQ_ORDER)
        zero = unpack_int4(reader.take(base + ".qzeros", (groups, n_out // 8)), axis=1, order=AWQ_ORDER)
        return UnpackedLinear(q=q, scale=scales, zero=zero.astype(np.float32))
    if n_in % 8:
        raise ValueError(f"{base}: input size {n_in} is not a multiple of 8 (GPTQ packs rows in eights)")
    q = unpack_int4(reader.take(base + ".qweight", (n_in // 8, n_out)), axis=0)
    zero = unpack_int4(reader.take(base + ".qzeros", (groups, n_out // 8)), axis=1).astype(np.float32)
    zero = zero + 1 if scheme.zeros_minus_one else zero
    g_idx = None
    if reader.has(base + ".g_idx"):
        g_idx = reader.take(base + ".g_idx", (n_in,)).astype(np.int32)
        if np.array_equal(g_idx, np.arange(n_in) // group):
            g_idx = None  # contiguous groups: no gather needed
        elif not scheme.desc_act:
            raise ValueError(f"{base}.g_idx is not contiguous groups but the quantization_config has desc_act=false")
    return UnpackedLinear(q=q, scale=scales, zero=zero, g_idx=g_idx)


def int4_layout(u: UnpackedLinear, name: str) -> UnpackedLinear:
    """An int4 weight as read -> the int4 kernel's layout: act-order rows sorted by group (stable, so rows
    keep their order within a group) with that permutation kept as `perm`, values packed eight rows a
    word (`pack_int4`), scale and zero in float16 (AWQ and GPTQ store float16 scales; zeros are 0..16)."""
    q, perm = u.q, None
    groups = u.scale.shape[0]
    if u.g_idx is not None:
        counts = np.bincount(u.g_idx, minlength=groups)
        if len(counts) != groups or (counts != q.shape[0] // groups).any():
            raise ValueError(f"{name}: g_idx gives groups of {counts.min()} to {counts.max()} rows over {len(counts)} "
                             f"groups; act-order needs {groups} groups of {q.shape[0] // groups} rows each")
        perm = np.argsort(u.g_idx, kind="stable").astype(np.int32)
        q = q[perm]
    return UnpackedLinear(q=pack_int4(q), scale=u.scale.astype(np.float16), zero=u.zero.astype(np.float16),
                          perm=perm)


def _scale(reader, name: str, n_out: int) -> np.ndarray:
    """A weight_scale per tensor ([], [1]) or per output channel ([out], [out, 1]) -> [1, out] float32."""
    if not reader.has(name):
        raise ValueError(f"checkpoint is missing tensor {name!r} (an FP8 weight needs its scale)")
    s = reader.take(name, reader.state[name].shape).astype(np.float32).reshape(-1)
    if s.size not in (1, n_out):
        raise ValueError(f"tensor {name!r} has {s.size} scales; expected 1 (per tensor) or {n_out} (per channel)")
    return np.broadcast_to(s, (n_out,)).reshape(1, n_out).copy()


def fuse(parts: list[UnpackedLinear], names: list[str]) -> UnpackedLinear:
    """Concatenate one layer's parts (q | k | v, gate | up) along the output axis. A fused layer runs one
    activation quantization, so static input scales become their maximum (as vLLM); act-order parts must
    share g_idx (they do when the parts share their input, as GPTQ orders rows by the input's statistics)."""
    if len(parts) == 1:
        return parts[0]
    g = [p.g_idx for p in parts]
    if any((a is None) != (g[0] is None) or (a is not None and not np.array_equal(a, g[0])) for a in g):
        raise ValueError(f"{', '.join(names)} are fused in jaxllm but have different g_idx")
    if len({p.scale.shape[0] for p in parts}) != 1:
        raise ValueError(f"{', '.join(names)} are fused in jaxllm but have different scale groups")
    statics = [p.input_scale for p in parts]
    return UnpackedLinear(
        q=np.concatenate([p.q for p in parts], axis=1), scale=np.concatenate([p.scale for p in parts], axis=1),
        zero=None if parts[0].zero is None else np.concatenate([p.zero for p in parts], axis=1), g_idx=g[0],
        input_scale=None if statics[0] is None else max(statics))
