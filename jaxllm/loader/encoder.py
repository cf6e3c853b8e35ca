"""Hugging Face encoder checkpoints (BERT, RoBERTa, XLM-RoBERTa; bare or *ForSequenceClassification)
-> EncoderConfig and EncoderWeights: matrices transposed to [in, out], q/k/v fused, layers stacked."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxllm.loader.hf import SafetensorsFolder
from jaxllm.loader.state import NUMPY_DTYPES
from jaxllm.models.bert import (ClassifierWeights, EncoderConfig, EncoderLayerWeights, EncoderWeights,
                                encoder_config_from_hf)

# Tensors an encoder checkpoint may carry that an embedding or classification pass never reads:
# the position id buffer, the masked-LM head, and BERT's pooler on a bare (embedding) model.
_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids", "lm_head.", "cls.")


def is_encoder_config(hf: dict) -> bool:
    from jaxllm.models.bert import ENCODER_ARCHITECTURES, _MODEL_TYPES

    archs = hf.get("architectures") or []
    return (archs[0] in ENCODER_ARCHITECTURES) if archs else hf.get("model_type") in _MODEL_TYPES


def load_encoder_folder(folder: Path, dtype: str = "auto") -> tuple[EncoderConfig, EncoderWeights]:
    config = encoder_config_from_hf(json.loads((folder / "config.json").read_text()), dtype)
    no_safetensors = not any(folder.glob("*.safetensors"))
    if no_safetensors and ((folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file()):
        from jaxllm.loader.torch_bin import TorchBinFolder

        source = TorchBinFolder(folder)  # read without torch, running no code from the file
    else:
        source = SafetensorsFolder(folder)
    with source as state:
        hf = json.loads((folder / "config.json").read_text())
        if dtype == "auto" and not (hf.get("torch_dtype") or hf.get("dtype")):
            config = config.replace(dtype=state.float_dtype())
        return config, encoder_weights_from_state(config, state)


def encoder_weights_from_state(config: EncoderConfig, state: Mapping[str, np.ndarray]) -> EncoderWeights:
    """HF-named tensors -> EncoderWeights in `config.dtype`. Shapes are checked against the config; a
    missing tensor, or one the model would silently ignore, is a ValueError naming it."""
    L, e, f = config.num_layers, config.hidden_size, config.intermediate_size
    dtype = NUMPY_DTYPES[config.dtype]
    anchor = next((n for n in state if n.endswith("embeddings.word_embeddings.weight")), None)
    if anchor is None:
        raise ValueError(f"checkpoint has no '*embeddings.word_embeddings.weight' (needed by {config.architecture})")
    prefix = anchor[: -len("embeddings.word_embeddings.weight")]
    used = set()

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in state:
            raise ValueError(f"checkpoint is missing tensor {name!r} (needed by {config.architecture})")
        array = state[name]
        if tuple(array.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {shape} from the config")
        used.add(name)
        return np.asarray(array)

    def single(name: str, shape: tuple[int, ...], transpose: bool = False) -> jnp.ndarray:
        array = take(name, shape)
        return jnp.asarray((array.T if transpose else array).astype(dtype))

    def layers(parts: list[str], shape: tuple[int, ...]) -> jnp.ndarray:
        """Per-layer tensors stacked on a leading axis, `parts` concatenated along the output axis;
        matrices ([out, in] in HF) come out [L, in, sum(out)]."""
        stacked = []
        for i in range(L):
            arrays = [take(f"{prefix}encoder.layer.{i}.{p}", shape) for p in parts]
            stacked.append(np.concatenate([a.T if a.ndim == 2 else a for a in arrays], axis=-1))
        return jnp.asarray(np.stack(stacked).astype(dtype))

    att = "attention."
    layer_weights = EncoderLayerWeights(
        wqkv=layers([att + f"self.{n}.weight" for n in ("query", "key", "value")], (e, e)),
        bqkv=layers([att + f"self.{n}.bias" for n in ("query", "key", "value")], (e,)),
        wo=layers([att + "output.dense.weight"], (e, e)), bo=layers([att + "output.dense.bias"], (e,)),
        attn_ln_w=layers([att + "output.LayerNorm.weight"], (e,)), attn_ln_b=layers([att + "output.LayerNorm.bias"], (e,)),
        w_in=layers(["intermediate.dense.weight"], (f, e)), b_in=layers(["intermediate.dense.bias"], (f,)),
        w_out=layers(["output.dense.weight"], (e, f)), b_out=layers(["output.dense.bias"], (e,)),
        mlp_ln_w=layers(["output.LayerNorm.weight"], (e,)), mlp_ln_b=layers(["output.LayerNorm.bias"], (e,)))
    classifier = None
    if config.is_classifier:
        labels = config.num_labels
        if config.architecture.startswith("Bert"):  # pooler.dense, then classifier
            names = (prefix + "pooler.dense", "classifier")
        else:  # RoBERTa's head: classifier.dense, classifier.out_proj
            names = ("classifier.dense", "classifier.out_proj")
        classifier = ClassifierWeights(
            dense_w=single(names[0] + ".weight", (e, e), transpose=True), dense_b=single(names[0] + ".bias", (e,)),
            out_w=single(names[1] + ".weight", (labels, e), transpose=True),
            out_b=single(names[1] + ".bias", (labels,)))
    emb = prefix + "embeddings."
    weights = EncoderWeights(
        word_emb=single(emb + "word_embeddings.weight", (config.vocab_size, e)),
        pos_emb=single(emb + "position_embeddings.weight", (config.max_position_embeddings, e)),
        type_emb=single(emb + "token_type_embeddings.weight", (config.type_vocab_size, e)),
        emb_ln_w=single(emb + "LayerNorm.weight", (e,)), emb_ln_b=single(emb + "LayerNorm.bias", (e,)),
        layers=layer_weights, classifier=classifier)
    ignored = _IGNORED if config.is_classifier else (*_IGNORED, prefix + "pooler.")
    unused = sorted(n for n in state if n not in used and not n[len(prefix):].startswith(ignored)
                    and not n.startswith(ignored))
    if unused:
        shown = ", ".join(unused[:8]) + (f", ... ({len(unused)} in all)" if len(unused) > 8 else "")
        raise ValueError(f"checkpoint has tensors {config.architecture} in jaxllm does not use: {shown}")
    return weights
