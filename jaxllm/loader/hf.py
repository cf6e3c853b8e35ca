"""Hugging Face checkpoints (config.json + *.safetensors) -> ModelConfig and Weights.

HF's nn.Linear stores [out, in]; jaxllm computes x @ W, so every matrix is transposed on load, q/k/v
and gate/up are fused along the output axis, and per-layer tensors are stacked on a leading layer
axis. `weights_from_state` does that for any mapping from HF tensor names to numpy arrays, so the
GGUF loader reuses it after renaming llama.cpp's tensors to HF's.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes  # numpy bfloat16; importing it also lets safetensors read bf16 tensors into numpy
import numpy as np
from safetensors import safe_open

from jaxllm.config import ModelConfig, model_config_from_hf
from jaxllm.models.llama import LayerWeights, Weights

DTYPES = ("auto", "float32", "bfloat16", "float16")
_NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}
# Tensors a checkpoint may carry that the model recomputes or never uses.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_folder(folder: Path, dtype: str = "auto") -> tuple[ModelConfig, Weights]:
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


def weights_from_state(config: ModelConfig, state: Mapping[str, np.ndarray]) -> Weights:
    """Convert HF-named tensors ([out, in] matrices) to jaxllm's stacked, fused, [in, out] layout in
    `config.dtype`. Every tensor's shape is checked against the config; a missing tensor, or one the
    model would silently ignore (an o_proj bias, say), is a ValueError naming it."""
    L, e, f, v = config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv, hd = config.q_size, config.kv_size, config.head_dim
    dtype = _NUMPY_DTYPES[config.dtype]
    prefix = "model." if "model.embed_tokens.weight" in state else ""
    used = set()

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in state:
            raise ValueError(f"checkpoint is missing tensor {name!r} (needed by {config.architecture})")
        array = state[name]
        if tuple(array.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {shape} from the config")
        used.add(name)
        return array

    def layers(parts: list[tuple[str, tuple[int, ...]]]) -> jnp.ndarray:
        """Stack per-layer tensors on a leading axis, concatenating `parts` along the output axis:
        [L, in, sum(out)] for matrices (transposed from HF), [L, sum(out)] for vectors."""
        width = sum(shape[0] for _, shape in parts)
        matrix = len(parts[0][1]) == 2
        out = np.empty((L, parts[0][1][1], width) if matrix else (L, width), dtype)
        for i in range(L):
            col = 0
            for suffix, shape in parts:
                array = take(f"{prefix}layers.{i}.{suffix}", shape)
                if matrix:
                    out[i, :, col:col + shape[0]] = array.T
                else:
                    out[i, col:col + shape[0]] = array
                col += shape[0]
        return jnp.asarray(out)

    def single(name: str, shape: tuple[int, ...], transpose: bool = False) -> jnp.ndarray:
        array = take(name, shape)
        return jnp.asarray((array.T if transpose else array).astype(dtype))

    attn = "self_attn."
    layer_weights = LayerWeights(
        attn_norm=layers([("input_layernorm.weight", (e,))]),
        wqkv=layers([(attn + "q_proj.weight", (q, e)), (attn + "k_proj.weight", (kv, e)),
                     (attn + "v_proj.weight", (kv, e))]),
        wo=layers([(attn + "o_proj.weight", (e, q))]),
        mlp_norm=layers([("post_attention_layernorm.weight", (e,))]),
        w_gate_up=layers([("mlp.gate_proj.weight", (f, e)), ("mlp.up_proj.weight", (f, e))]),
        w_down=layers([("mlp.down_proj.weight", (e, f))]),
        bqkv=layers([(attn + "q_proj.bias", (q,)), (attn + "k_proj.bias", (kv,)),
                     (attn + "v_proj.bias", (kv,))]) if config.qkv_bias else None,
        q_norm=layers([(attn + "q_norm.weight", (hd,))]) if config.qk_norm else None,
        k_norm=layers([(attn + "k_norm.weight", (hd,))]) if config.qk_norm else None,
    )
    weights = Weights(
        embed=single(prefix + "embed_tokens.weight", (v, e)),
        layers=layer_weights,
        final_norm=single(prefix + "norm.weight", (e,)),
        lm_head=None if config.tie_word_embeddings else single("lm_head.weight", (v, e), transpose=True),
    )
    if config.tie_word_embeddings:
        used.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    unused = sorted(n for n in state if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if unused:
        shown = ", ".join(unused[:8]) + (f", ... ({len(unused)} in all)" if len(unused) > 8 else "")
        raise ValueError(f"checkpoint has tensors {config.architecture} in jaxllm does not use "
                         f"(an unsupported feature?): {shown}")
    return weights


def _declares_dtype(folder: Path) -> bool:
    hf = json.loads((folder / "config.json").read_text())
    return bool(hf.get("torch_dtype") or hf.get("dtype"))
