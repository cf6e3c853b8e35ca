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
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes  # numpy bfloat16 and float8 types (safetensors reads bf16 tensors into numpy through it)
import numpy as np
from safetensors import safe_open

from jaxllm.config import ModelConfig, model_config_from_hf
from jaxllm.loader.quantized import QuantScheme, resolve_scheme
from jaxllm.loader.state import StateReader
from jaxllm.models.registry import model_module

DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_hf_folder(folder: Path, dtype: str = "auto", quantization: str | None = None, on_host: bool = False):
    config = read_hf_config(folder, dtype)
    scheme = resolve_scheme(json.loads((folder / "config.json").read_text()), quantization)
    with SafetensorsFolder(folder) as state:
        if dtype == "auto" and not _declares_dtype(folder):  # then the weights say what they are
            config = config.replace(dtype=state.float_dtype())
        config = config.replace(kv_cache_scales=read_kv_cache_scales(config, state))
        return config, weights_from_state(config, state, scheme, on_host)


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
        self._file = {}
        for name in files:
            handle = self._stack.enter_context(safe_open(folder / name, framework="np"))
            self._where.update(dict.fromkeys(handle.keys(), handle))
            self._file.update(dict.fromkeys(handle.keys(), folder / name))

    def __enter__(self) -> "SafetensorsFolder":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def float_dtype(self) -> str:
        """The checkpoint's float type, read off its first 16- or 32-bit float tensor's header."""
        kinds = (self._where[n].get_slice(n).get_dtype() for n in self._where)
        kind = next((k for k in kinds if k in ("BF16", "F16", "F32")), "F32")
        return {"BF16": "bfloat16", "F16": "float16"}.get(kind, "float32")

    def __getitem__(self, name: str) -> np.ndarray:
        if self._where[name].get_slice(name).get_dtype() == "F8_E4M3":
            return _read_float8(self._file[name], name)  # safetensors' numpy reader has no float8 type
        return self._where[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def weights_from_state(config: ModelConfig, state: Mapping[str, np.ndarray], scheme: QuantScheme | None = None,
                       on_host: bool = False):
    """Convert HF-named tensors to the layout of `config.architecture`'s module (stacked layers, fused
    projections, [in, out] matrices) in `config.dtype`, linear weights quantized under `scheme`. Every
    tensor's shape is checked against the config; a missing tensor, or one the model would silently
    ignore (an o_proj bias, say), is a ValueError naming it. `on_host`: numpy arrays, not arrays on the
    default device."""
    reader = StateReader(config, state, scheme, on_host)
    weights = model_module(config.architecture).load_weights(config, reader)
    for name in state:
        if _KV_SCALE.search(name):
            reader.mark_used(name)  # read into config.kv_cache_scales (used by an FP8 KV cache only, as vLLM)
    reader.check_all_used()
    return weights


# vLLM's FP8 checkpoints (and llm-compressor's) name a layer's KV-cache scales `...layers.{i}.self_attn.k_scale`.
_KV_SCALE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.(?:self_attn|attn|self_attention)\.([kv])_scale$")


def read_kv_cache_scales(config: ModelConfig, state: Mapping[str, np.ndarray]) -> tuple[tuple[float, float], ...]:
    """The checkpoint's per-layer (k_scale, v_scale), or () when it has none."""
    found = {}
    for name in state:
        if m := _KV_SCALE.search(name):
            found[(int(m.group(1)), m.group(2))] = float(np.max(np.asarray(state[name], np.float32)))
    if not found:
        return ()
    missing = [f"layer {i} {kv}_scale" for i in range(config.num_layers) for kv in "kv" if (i, kv) not in found]
    if missing:
        raise ValueError(f"checkpoint has KV-cache scales for some layers but not {', '.join(missing[:4])}")
    return tuple((found[(i, "k")], found[(i, "v")]) for i in range(config.num_layers))


def _read_float8(path: Path, name: str) -> np.ndarray:
    """A float8_e4m3fn tensor of a safetensors file, memory-mapped from the header's offsets."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_len))[name]
    start, end = info["data_offsets"]
    raw = np.memmap(path, np.uint8, mode="r", offset=8 + header_len + start, shape=(end - start,))
    return raw.view(ml_dtypes.float8_e4m3fn).reshape(info["shape"])


def _declares_dtype(folder: Path) -> bool:
    hf = json.loads((folder / "config.json").read_text())
    return bool(hf.get("torch_dtype") or hf.get("dtype"))
