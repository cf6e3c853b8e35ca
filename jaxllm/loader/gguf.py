"""llama.cpp GGUF files -> ModelConfig and Weights.

Every tensor is dequantized to float32 with the `gguf` library and renamed to its Hugging Face name,
so `hf.weights_from_state` does the layout conversion for both formats. One llama.cpp quirk is
undone on the way: its converter reorders the rows of Llama's q/k projections so that each head's
rotary pairs sit next to each other (GPT-J style); jaxllm, like HF, rotates half-split pairs.

The header is parsed here rather than by `gguf.GGUFReader`, which slices a np.memmap for each of
the ~100k tokenizer strings and so spent 2-4 s of a 5-10 s load on metadata this loader never uses.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from collections.abc import Iterator, Mapping
from math import prod
from pathlib import Path

import gguf
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.loader.hf import weights_from_state
from jaxllm.models.llama import Weights

# GGUF `general.architecture` -> the HF architecture with the same computation.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Only llama.cpp's Llama converter interleaves q/k rows; its Qwen converters keep HF's order.
_PERMUTED_QK = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def load_gguf_file(path: Path, dtype: str = "auto", quantization: str | None = None,
                   on_host: bool = False) -> tuple[ModelConfig, Weights]:
    """The GGUF's blocks are dequantized to `dtype`; `quantization` "fp8" or "int8" then requantizes the
    linear weights in the engine's own formats. `on_host`: numpy arrays, not arrays on the default device."""
    scheme = None
    if quantization is not None:
        from jaxllm.loader.quantized import QUANTIZATION_METHODS, QuantScheme, unsupported

        if quantization not in QUANTIZATION_METHODS:
            raise unsupported(quantization, "quantization")
        if quantization not in ("fp8", "int8"):
            raise ValueError(f"quantization={quantization!r} needs a Hugging Face checkpoint quantized with it; "
                             "a GGUF file takes fp8 or int8 (quantized at load)")
        scheme = QuantScheme(quantization, from_checkpoint=False)
    file = read_gguf(path)
    config = gguf_model_config(file, "float32" if dtype == "auto" else dtype)
    return config, weights_from_state(config, GGUFTensors(file, config), scheme, on_host)


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order, outermost first: [out, in] for a matrix
    data: np.ndarray  # uint8 [rows, bytes per row], a view of the memory-mapped file


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    metadata: dict  # key -> python value (lists for arrays)
    tensors: dict[str, GGUFTensor]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf(path: Path) -> GGUFFile:
    """Parse a (little-endian, v2/v3) GGUF file's metadata and tensor table; tensor data stays mapped."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 0

    def scalar(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = scalar("<Q")
        pos += n
        return buf[pos - n:pos].decode("utf-8", errors="replace")

    def value(kind: int):
        nonlocal pos
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            item_kind, count = scalar("<I"), scalar("<Q")
            if item_kind in _SCALARS:  # numeric arrays in one go
                dt = np.dtype(_SCALARS[item_kind])
                items = np.frombuffer(buf, dt, count, pos).tolist()
                pos += dt.itemsize * count
                return items
            return [value(item_kind) for _ in range(count)]
        return scalar(_SCALARS[kind])

    if buf[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (bad magic {buf[:4]!r})")
    pos = 4
    version = scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (supported: 2, 3; big-endian files are not)")
    num_tensors, num_kv = scalar("<Q"), scalar("<Q")
    metadata = {}
    for _ in range(num_kv):
        key = string()
        metadata[key] = value(scalar("<I"))
    infos = []
    for _ in range(num_tensors):
        name = string()
        dims = [scalar("<Q") for _ in range(scalar("<I"))]
        infos.append((name, dims, gguf.GGMLQuantizationType(scalar("<I")), scalar("<Q")))
    alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-pos // alignment) * alignment
    tensors = {}
    for name, dims, ggml_type, offset in infos:
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        shape = tuple(reversed(dims))  # GGUF lists dims innermost first
        row_bytes = shape[-1] // block_size * type_size
        rows = prod(shape[:-1])
        data = np.frombuffer(buf, np.uint8, rows * row_bytes, data_start + offset).reshape(rows, row_bytes)
        tensors[name] = GGUFTensor(ggml_type, shape, data)
    return GGUFFile(metadata, tensors)


def gguf_model_config(file: GGUFFile, dtype: str = "float32") -> ModelConfig:
    """The ModelConfig that the `<arch>.*` and `tokenizer.ggml.*` metadata describe."""
    arch = file.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")

    def meta(key, default=None):
        return file.metadata.get(f"{arch}.{key}", default)

    tensor_names = set(file.tensors)
    num_heads = int(meta("attention.head_count"))
    num_kv_heads = meta("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):
        raise ValueError(f"per-layer attention.head_count_kv in {arch} GGUF is not supported")
    hidden = int(meta("embedding_length"))
    head_dim = int(meta("attention.key_length", hidden // num_heads))
    rope_dim = int(meta("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embedding (rope.dimension_count={rope_dim}, head_dim={head_dim}) "
                         "is not supported")
    if meta("rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensor_names:
        raise ValueError("rope scaling in a GGUF (rope.scaling.type, or the rope_freqs.weight of Llama 3.1+ files) "
                         "is not supported; load the model's Hugging Face folder instead")
    vocab = meta("vocab_size") or len(file.metadata.get("tokenizer.ggml.tokens", ())) or \
        file.tensors["token_embd.weight"].shape[0]
    eos = [file.metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return ModelConfig(
        architecture=ARCHITECTURES[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(num_kv_heads),
        head_dim=head_dim,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        bos_token_id=file.metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos if i is not None)),
        dtype=dtype,
    )


class GGUFTensors(Mapping):
    """A GGUF file's tensors under their HF names, dequantized to float32 [out, in] on access.
    Tensors with no HF counterpart keep their GGUF name (so the loader can report them)."""

    def __init__(self, file: GGUFFile, config: ModelConfig):
        self._config = config
        self._permuted = file.metadata.get("general.architecture") in _PERMUTED_QK
        self._tensors = {_hf_name(name): t for name, t in file.tensors.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        array = gguf.quants.dequantize(tensor.data, tensor.ggml_type).reshape(tensor.shape)
        if self._permuted and (".q_proj." in name or ".k_proj." in name):
            heads = self._config.num_heads if ".q_proj." in name else self._config.num_kv_heads
            array = unpermute_rotary_rows(array, heads)
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def unpermute_rotary_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. Within each head llama.cpp stores row j of the first half
    and row j of the second half next to each other (rows 2j, 2j+1); HF keeps the halves apart."""
    rows = w.shape[0]
    per_head = w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])  # [head, pair, half, ...]
    return per_head.swapaxes(1, 2).reshape(w.shape)  # [head, half, pair, ...]


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return gguf_name
