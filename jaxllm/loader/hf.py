"""Hugging Face checkpoints (config.json + *.safetensors) -> ModelConfig and Weights.

HF's nn.Linear stores [out, in]; jaxllm computes x @ W, so every matrix is transposed on load, q/k/v
and gate/up are fused along the output axis, and per-layer tensors are stacked on a leading layer
axis; each family's module says how (`load_weights`, jaxllm/models/registry.py). `weights_from_state`
does that for any mapping from HF tensor names to numpy arrays, so the GGUF loader reuses it after
renaming llama.cpp's tensors to HF's.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes  # noqa: F401  (numpy bfloat16: lets safetensors read bf16 tensors into numpy)
import numpy as np
from safetensors import safe_open

from jaxllm.config import ModelConfig, model_config_from_hf
from jaxllm.loader.state import StateReader
from jaxllm.models.registry import model_module

DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_hf_folder(folder: Path, dtype: str = "auto"):
    config = read_hf_config(folder, dtype)
    with SafetensorsFolder(folder) as state:
        if dtype == "auto" and not _declares_dtype(folder):  # then the weights say what they are
            config = config.replace(dtype=state.float_dtype())
        return config, weights_from_state(config, state)


def read_hf_config(folder: Path, dtype: str = "auto") -> ModelConfig:
    """config.json, with generation_config.json's bos/eos ids merged in (instruct models often list
    their end-of-turn token only there)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; a Hugging Face model folder needs one")
    config = model_config_from_hf(json.loads(config_file.read_text()), dtype)
    gen_file = folder / "generation_config.json"
    if gen_file.is_file():
        gen = json.loads(gen_file.read_text())
        eos = gen.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
        merged = tuple(dict.fromkeys([*config.eos_token_ids, *map(int, eos)]))
        bos = config.bos_token_id if config.bos_token_id is not None else gen.get("bos_token_id")
        config = config.replace(eos_token_ids=merged, bos_token_id=bos)
    return config


class SafetensorsFolder(Mapping):
    """The tensors of every *.safetensors file in a folder, read on demand as numpy arrays.

    A context manager: the files stay open (memory-mapped) until exit.
    """

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are not in {folder}: {', '.join(missing)}")
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            hint = f" (found {', '.join(other)}: only safetensors weights are supported)" if other else ""
            raise FileNotFoundError(f"{folder} has no *.safetensors weights{hint}")
        self._stack = contextlib.ExitStack()
        self._where = {}
        for name in files:
            handle = self._stack.enter_context(safe_open(folder / name, framework="np"))
            self._where.update(dict.fromkeys(handle.keys(), handle))

    def __enter__(self) -> "SafetensorsFolder":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def float_dtype(self) -> str:
        """The checkpoint's float type, read off its first tensor's header."""
        name = next(iter(self._where))
        kind = self._where[name].get_slice(name).get_dtype()
        return {"BF16": "bfloat16", "F16": "float16"}.get(kind, "float32")

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def weights_from_state(config: ModelConfig, state: Mapping[str, np.ndarray]):
    """Convert HF-named tensors to the layout of `config.architecture`'s module (stacked layers, fused
    projections, [in, out] matrices) in `config.dtype`. Every tensor's shape is checked against the
    config; a missing tensor, or one the model would silently ignore (an o_proj bias, say), is a
    ValueError naming it."""
    reader = StateReader(config, state)
    weights = model_module(config.architecture).load_weights(config, reader)
    reader.check_all_used()
    return weights


def _declares_dtype(folder: Path) -> bool:
    hf = json.loads((folder / "config.json").read_text())
    return bool(hf.get("torch_dtype") or hf.get("dtype"))
