"""The pooling engine: a model run for embeddings, classification or scores instead of generation.

`PoolingEngine` turns prompts (text, token ids, text pairs) into PoolInputs, runs them through the
PoolingRunner, and applies what follows the pooling per request (pooler.py). `LLM(..., runner="pooling")`
and the server's pooling routes both delegate to it. Which runner a model gets is decided by
`resolve_runner` with vLLM's names: `task`, `runner`, `convert`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxllm.pooler import (MatryoshkaInfo, PoolerConfig, classification_head, default_activation, embedding_head,
                           resolve_pooler_config)
from jaxllm.pooling_params import PoolingParams
from jaxllm.pooling_runner import PoolInput, PoolingRunner

logger = logging.getLogger("jaxllm")

TASKS = ("auto", "generate", "embed", "embedding", "classify", "score", "encode", "reward")
RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify")


def resolve_runner(hf: dict | None, *, task: str = "auto", runner: str = "auto", convert: str = "auto") -> tuple:
    """("generate" | "pooling", "embed" | "classify" | None): the runner and what the pooling model does,
    from vLLM's `task` (older), `runner` and `convert` and the model's architecture."""
    from jaxllm.loader.encoder import is_encoder_config

    for name, value, allowed in (("task", task, TASKS), ("runner", runner, RUNNERS), ("convert", convert, CONVERTS)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r}: must be one of {', '.join(allowed)}")
    if task == "reward":
        raise ValueError("task='reward': reward models are not supported; supported pooling tasks: embed, classify, score")
    arch = ((hf or {}).get("architectures") or [""])[0]
    encoder = hf is not None and is_encoder_config(hf)
    classifier = arch.endswith("ForSequenceClassification")
    wants_pooling = (runner == "pooling" or task in ("embed", "embedding", "classify", "score", "encode")
                     or convert in ("embed", "classify"))
    if runner == "generate" or task == "generate":
        if wants_pooling and (runner == "pooling" or task != "generate"):
            raise ValueError(f"task={task!r}, runner={runner!r}, convert={convert!r} contradict each other")
        if encoder:
            raise ValueError(f"{arch} is an encoder (a pooling model): it cannot generate; use runner='pooling'")
        return "generate", None
    if not wants_pooling and not encoder:
        return "generate", None
    if classifier or convert == "classify" or task == "classify":
        if not classifier:
            raise ValueError(f"convert='classify' / task='classify' needs a *ForSequenceClassification checkpoint; "
                             f"{arch or 'this model'} has no classification head (convert='embed' works for any model)")
        return "pooling", "classify"
    return "pooling", "embed"  # task="score" on an embedding model: the cosine of its embeddings


def read_hf_dict(path) -> dict | None:
    """The config.json of a model folder, or None (a GGUF file, or no folder)."""
    if path is None:
        return None
    config_file = Path(path) / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else None


class PoolingEngine:
    """Embeddings, classification and scores from one model.

    Args:
        params, config: an encoder's EncoderWeights/EncoderConfig, or a causal LM's Weights/ModelConfig.
        tokenizer: the model's transformers tokenizer.
        kind: "embed" or "classify".
        pooler_config: the resolved PoolerConfig (see `pooler.resolve_pooler_config`).
        matryoshka: which `dimensions` the model allows.
        activation: classifiers: "sigmoid", "softmax" or "identity".
    """

    def __init__(self, params, config, tokenizer, *, kind: str, pooler_config: PoolerConfig,
                 matryoshka: MatryoshkaInfo = MatryoshkaInfo(), activation: str = "softmax",
                 max_model_len: int | None = None, max_num_batched_tokens: int | None = None,
                 max_num_seqs: int | None = None):
        from jaxllm.models.bert import EncoderConfig

        self.config, self.tokenizer, self.kind = config, tokenizer, kind
        self.pooler_config, self.matryoshka, self.activation = pooler_config, matryoshka, activation
        self.is_encoder = isinstance(config, EncoderConfig)
        self.id2label: dict[int, str] = {}  # classifiers: config.json's label names
        model_len = config.max_model_len if self.is_encoder else config.max_position_embeddings
        self.max_model_len = min(max_model_len or model_len, model_len)
        if max_model_len is not None and max_model_len > model_len:
            raise ValueError(f"max_model_len={max_model_len} is more than the model's {model_len} positions")
        cpu = _on_cpu()
        max_num_seqs = max_num_seqs or (64 if cpu else 256)
        budget = max_num_batched_tokens or (2048 if cpu else 16384)
        if budget < self.max_model_len:  # an encoder cannot chunk a sequence: a whole one must fit a step
            if max_num_batched_tokens is not None:
                raise ValueError(f"max_num_batched_tokens={budget} must be >= max_model_len={self.max_model_len} "
                                 "(pooling models run every sequence in one step)")
            budget = self.max_model_len
        self.runner = PoolingRunner(params, config, pooling_type=pooler_config.pooling_type,
                                    max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                                    max_model_len=self.max_model_len)
        if not cpu:  # no request waits for a compile (on the CPU, where tests start many engines, on first use)
            self.runner.precompile()

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        if self.kind == "classify":
            return ("classify", "score", "encode") if self.config.num_labels == 1 else ("classify", "encode")
        return ("embed", "score", "encode")

    def check_task(self, task: str) -> None:
        if task not in self.supported_tasks:
            what = "a classification model" if self.kind == "classify" else "an embedding model"
            hint = {"score": " (scores need one label: a cross-encoder)"}.get(task, "")
            raise ValueError(f"{task}() is not supported by {what}{hint}; it supports: "
                             f"{', '.join(t + '()' for t in self.supported_tasks)}")

    # -- inputs ---------------------------------------------------------------------------------------
    def tokenize(self, prompt, params: PoolingParams) -> PoolInput:
        """A string, vLLM's {"prompt_token_ids": [...]} / {"prompt": "..."}, or a list of token ids."""
        trunc = self._truncation(params)
        if isinstance(prompt, dict):
            # vLLM's prompt dicts carry more (multi_modal_data, ...) than a text model can use: refused, not ignored
            unknown = sorted(map(str, set(prompt) - {"prompt", "prompt_token_ids"}))
            if unknown:
                raise ValueError(f"a prompt dict's {', '.join(map(repr, unknown))} is not supported; it takes 'prompt' "
                                 "or 'prompt_token_ids'")
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
                if not isinstance(prompt, (list, tuple)):
                    raise TypeError(f"'prompt_token_ids' must be a list of token ids, got {type(prompt).__name__}")
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            _check_unicode(prompt, "the prompt")
            kwargs = dict(truncation=True, max_length=trunc) if trunc else {}
            ids = self.tokenizer(prompt, **kwargs)["input_ids"]
        elif isinstance(prompt, (list, tuple)):
            bad = next((t for t in prompt if not isinstance(t, int) or isinstance(t, bool)), None)
            if bad is not None:
                raise TypeError(f"a list of token ids holds {bad!r} ({type(bad).__name__}); token ids are ints")
            ids = list(prompt)[-trunc:] if trunc else list(prompt)
            vocab = self.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token id {bad[0]} is out of the model's vocabulary [0, {vocab})")
        else:
            raise TypeError(f"a prompt must be a string, a list of token ids or a prompt dict, got {type(prompt).__name__}")
        return PoolInput(self._check_len(ids))

    def tokenize_pair(self, text_1: str, text_2: str, params: PoolingParams) -> PoolInput:
        """A cross-encoder's input: both texts in one sequence, with their token type ids."""
        for name, t in (("text_1", text_1), ("text_2", text_2)):
            if not isinstance(t, str):
                raise TypeError(f"{name} must be a string (or a list of strings), got {type(t).__name__}")
            _check_unicode(t, name)
        trunc = self._truncation(params)
        enc = self.tokenizer(text_1, text_2)
        if trunc and len(enc["input_ids"]) > trunc:
            # Only text_2 is cut, and it must keep a token: short of that, the tokenizer raises a bare Exception
            # or returns the pair uncut or cut wrongly, depending on by how much.
            first = len(enc["input_ids"]) - len(self.tokenizer(text_2, add_special_tokens=False)["input_ids"])
            if trunc <= first:
                raise ValueError(f"truncate_prompt_tokens={params.truncate_prompt_tokens} leaves text_2 no token: "
                                 f"text_1 with the pair's special tokens is {first} tokens, and only text_2 is cut")
            enc = self.tokenizer(text_1, text_2, truncation="only_second", max_length=trunc)
        ids = self._check_len(enc["input_ids"])
        types = enc.get("token_type_ids")
        return PoolInput(ids, list(types) if types is not None and self.config.type_vocab_size > 1 else None)

    def _truncation(self, params: PoolingParams) -> int | None:
        t = params.truncate_prompt_tokens
        if t is None:
            return None
        if t == -1:
            return self.max_model_len
        if t > self.max_model_len:  # check_params refuses it first; this guards direct callers
            raise ValueError(f"truncate_prompt_tokens={t} is more than max_model_len={self.max_model_len}")
        return t

    def _check_len(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens, but the input has "
                             f"{len(ids)} tokens; shorten it or pass truncate_prompt_tokens")
        return ids

    def check_params(self, params: PoolingParams, task: str) -> None:
        t = params.truncate_prompt_tokens
        if t is not None and t > self.max_model_len:
            raise ValueError(f"truncate_prompt_tokens={t} is more than max_model_len={self.max_model_len}")
        if task == "embed" or (task == "encode" and self.kind == "embed"):
            if params.use_activation is not None:
                raise ValueError(f"use_activation applies to classification and scores, not to {task}() on an "
                                 "embedding model")
            self.matryoshka.check(params.dimensions if params.dimensions is not None
                                  else self.pooler_config.dimensions, self.config.hidden_size)
        else:
            for name in ("dimensions", "normalize"):
                if getattr(params, name) is not None:
                    raise ValueError(f"{name} applies to embeddings, not to {task}")

    # -- running --------------------------------------------------------------------------------------
    def pool(self, inputs: Sequence[PoolInput], params: Sequence[PoolingParams]) -> list[np.ndarray]:
        """Each input's vector after the pooler: an embedding (normalised, cut) or class probabilities."""
        raw = self.runner.run(list(inputs))
        return [self.finish(row, p) for row, p in zip(raw, params)]

    def finish(self, row: np.ndarray, p: PoolingParams) -> np.ndarray:
        if self.kind == "classify":
            use = self.pooler_config.use_activation if p.use_activation is None else p.use_activation
            return classification_head(row, bool(use), self.activation).astype(np.float32)
        normalize = self.pooler_config.normalize if p.normalize is None else p.normalize
        dims = p.dimensions if p.dimensions is not None else self.pooler_config.dimensions
        return embedding_head(row, bool(normalize), dims).astype(np.float32)


def _check_unicode(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # the tokenizer's own error says only that the type is wrong
        raise ValueError(f"{what} holds a lone surrogate at index {e.start}, which is not valid Unicode") from None


def _on_cpu() -> bool:
    import jax

    return jax.default_backend() == "cpu"


def load_pooling_engine(path, *, kind: str, tokenizer=None, dtype: str = "auto", max_model_len: int | None = None,
                        max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None,
                        pooler_config=None) -> PoolingEngine:
    """A PoolingEngine for a model folder (an encoder, or a causal LM converted to embeddings) or a GGUF."""
    from jaxllm.loader import load_model, load_tokenizer
    from jaxllm.loader.encoder import is_encoder_config, load_encoder_folder

    hf = read_hf_dict(path)
    folder = Path(path) if Path(path).is_dir() else None
    if hf is not None and is_encoder_config(hf):
        config, params = load_encoder_folder(folder, dtype)
    else:
        config, params = load_model(path, dtype=dtype)
    override = PoolerConfig.from_any(pooler_config)
    resolved = resolve_pooler_config(folder, is_encoder=hf is not None and is_encoder_config(hf), override=override)
    if folder is not None and max_model_len is None:  # sentence-transformers' own cap, as vLLM reads it
        st_file = folder / "sentence_bert_config.json"
        if st_file.is_file():
            st_len = json.loads(st_file.read_text()).get("max_seq_length")
            model_len = config.max_model_len if hasattr(config, "num_labels") else config.max_position_embeddings
            max_model_len = min(int(st_len), model_len) if st_len else None
    num_labels = getattr(config, "num_labels", 0)
    engine = PoolingEngine(params, config, load_tokenizer(tokenizer or path), kind=kind, pooler_config=resolved,
                         matryoshka=MatryoshkaInfo.from_hf(hf or {}), activation=default_activation(hf or {}, num_labels),
                         max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                         max_num_seqs=max_num_seqs)
    engine.id2label = {int(k): str(v) for k, v in ((hf or {}).get("id2label") or {}).items()}
    return engine
