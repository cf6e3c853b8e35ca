"""llama.cpp GGUF files -> ModelConfig and Weights.

Every tensor is dequantized to float32 with the `gguf` library and renamed to its Hugging Face name,
so `hf.weights_from_state` does the layout conversion for both formats, and the metadata becomes the
config.json that the family's `config_from_hf` reads. What llama.cpp's converter did to each
architecture's tensors (Llama's interleaved q/k rows, Gemma's 1 + w norms, stacked experts, ...) is
undone on the way; that knowledge lives in gguf_arch.py, this module is the same for every architecture.

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

from jaxllm.config import ModelConfig, model_config_from_hf
from jaxllm.loader.gguf_arch import GGUFLayout, gguf_layout
from jaxllm.loader.hf import weights_from_state

def load_gguf_file(path: Path, dtype: str = "auto", quantization: str | None = None,
                   on_host: bool = False) -> tuple[ModelConfig, object]:
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
    layout = file_layout(file)
    config = gguf_model_config(file, "float32" if dtype == "auto" else dtype, layout)
    return config, weights_from_state(config, GGUFTensors(file, layout, config), scheme, on_host)


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
_FLOAT32, _STRING, _ARRAY = 6, 8, 9


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
        if kind == _FLOAT32:
            # The converter wrote config.json's decimal (rms_norm_eps 1e-05) as float32; its shortest decimal
            # gives back that value rather than 9.99999974e-06.
            return float(str(np.float32(scalar("<f"))))
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


def file_layout(file: GGUFFile) -> GGUFLayout:
    """How `file` maps onto its Hugging Face checkpoint (jaxllm/loader/gguf_arch.py)."""
    shapes = {name: t.shape for name, t in file.tensors.items()}
    return gguf_layout(file.metadata, shapes, lambda name: _dequantize(file.tensors[name]))


def gguf_model_config(file: GGUFFile, dtype: str = "float32", layout: GGUFLayout | None = None) -> ModelConfig:
    """The ModelConfig that the `<arch>.*` and `tokenizer.ggml.*` metadata describe."""
    layout = layout or file_layout(file)
    return model_config_from_hf(layout.hf_config, dtype)


class GGUFTensors(Mapping):
    """A GGUF file's tensors under their HF names, dequantized to float32 in HF's layout on access. A stacked
    expert tensor [experts, out, in] reads as one tensor per expert. Tensors with no HF counterpart keep
    their GGUF name (so the loader can report them)."""

    def __init__(self, file: GGUFFile, layout: GGUFLayout, config: ModelConfig):
        self._config, self._restore = config, layout.restore
        self._sources: dict[str, tuple[GGUFTensor, int | None]] = {}  # HF name -> (tensor, expert or None)
        for name, tensor in file.tensors.items():
            if name in layout.consumed:
                continue
            hf_name = layout.hf_name(name) or name
            if "{j}" in hf_name:
                self._sources.update({hf_name.replace("{j}", str(j)): (tensor, j) for j in range(tensor.shape[0])})
            else:
                self._sources[hf_name] = (tensor, None)

    def __getitem__(self, name: str) -> np.ndarray:
        tensor, expert = self._sources[name]
        array = _dequantize(tensor, expert)
        return array if self._restore is None else self._restore(name, array, self._config)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def _dequantize(tensor: GGUFTensor, expert: int | None = None) -> np.ndarray:
    """float32 in numpy order; with `expert`, only that slice of a stacked [experts, ...] tensor (whose
    rows, quantized or not, are contiguous per expert)."""
    data, shape = tensor.data, tensor.shape
    if expert is not None:
        rows = data.shape[0] // shape[0]
        data, shape = data[expert * rows:(expert + 1) * rows], shape[1:]
    return gguf.quants.dequantize(data, tensor.ggml_type).reshape(shape)
