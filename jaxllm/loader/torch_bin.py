"""PyTorch `pytorch_model.bin` state dicts read into numpy without torch (many embedding checkpoints, bge-m3's
among them, ship no safetensors).

The file is a zip: `<name>/data.pkl` pickles the state dict, and each tensor's storage is a raw little-endian
file `<name>/data/<key>`. The unpickler below rebuilds tensors as numpy views of those files and refuses
every other global, so loading a checkpoint runs no code from it.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
                   "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_args) -> np.ndarray:
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size), strides=[s * item for s in stride])
    return np.array(view)  # a copy: contiguous, and not tied to the zip's buffer


def _rebuild_parameter(data, *_args):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"pytorch_model.bin refers to {module}.{name}, which a state dict of tensors "
                                     "does not need; convert the checkpoint to safetensors")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {kind!r} in pytorch_model.bin")
        return np.frombuffer(self.archive.read(f"{self.prefix}/data/{key}"), dtype=np.dtype(dtype).newbyteorder("<"))


def load_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a (zip-format, torch >= 1.6) pytorch_model.bin, by name."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a zip-format PyTorch checkpoint (saved by torch < 1.6?); convert it to "
                         "safetensors")
    with zipfile.ZipFile(path) as archive:
        pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
        if pkl is None:
            raise ValueError(f"{path} has no data.pkl: not a PyTorch checkpoint")
        with archive.open(pkl) as f:
            state = _Unpickler(f, archive, pkl[: -len("/data.pkl")]).load()
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


class TorchBinFolder(Mapping):
    """The tensors of a folder's pytorch_model.bin (or its shards, by pytorch_model.bin.index.json), a
    Mapping like SafetensorsFolder."""

    def __init__(self, folder: Path):
        index = folder / "pytorch_model.bin.index.json"
        if index.is_file():
            import json

            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["pytorch_model.bin"]
        self._state: dict[str, np.ndarray] = {}
        for name in files:
            self._state.update(load_torch_bin(folder / name))

    def __enter__(self) -> "TorchBinFolder":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def float_dtype(self) -> str:
        kind = next(a.dtype for a in self._state.values() if a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16)
        return {np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}.get(kind, "float32")

    def __getitem__(self, name: str) -> np.ndarray:
        return self._state[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)
