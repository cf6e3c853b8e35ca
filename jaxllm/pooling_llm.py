"""The pooling half of the offline API: `LLM.embed`, `LLM.classify`, `LLM.score` and `LLM.encode`, with
vLLM's names and outputs. LLM inherits these; they work when the LLM was built with a pooling runner
(`runner="pooling"`, `task="embed"`, `convert="embed"`, or an encoder model)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from jaxllm.pooling_outputs import (ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput,
                                    EmbeddingRequestOutput, PoolingOutput, PoolingRequestOutput, ScoringOutput,
                                    ScoringRequestOutput)
from jaxllm.pooling_params import PoolingParams


def _as_list(value, name: str, what: str) -> list:
    try:
        return list(value)
    except TypeError:  # list()'s own message does not say which argument
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}") from None


def _texts(data, name: str) -> list[str]:
    """score()'s side: a string or strings (token ids and prompt dicts are not taken: a dict would be read
    as its keys)."""
    if isinstance(data, str):
        return [data]
    texts = _as_list(data, name, "a string or a sequence of strings") if not isinstance(data, dict) else [data]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"score(): {name}[{bad}] must be a string, got {type(texts[bad]).__name__}")
    return texts


class PoolingMixin:
    _pooling = None  # a PoolingEngine when the model runs for pooling

    def _pooling_engine(self, task: str):
        if self._pooling is None:
            raise ValueError(f"{task}() needs a pooling model, and this LLM generates text: build it with "
                             "LLM(model, runner='pooling') (or task='embed' / convert='embed')")
        self._pooling.check_task(task)
        return self._pooling

    def _refuse_if_pooling(self, method: str) -> None:
        if self._pooling is not None:
            raise ValueError(f"{method}() needs a generative model; this LLM was built as a pooling model: use "
                             f"{', '.join(t + '()' for t in self._pooling.supported_tasks)}")

    def _params_list(self, n: int, pooling_params, truncate_prompt_tokens, task: str) -> list[PoolingParams]:
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            params = [pooling_params or PoolingParams()] * n
        elif isinstance(pooling_params, (str, dict)):  # iterable, but as their characters or keys
            raise TypeError(f"pooling_params must be PoolingParams or a sequence of them, got "
                            f"{type(pooling_params).__name__}")
        else:
            params = _as_list(pooling_params, "pooling_params", "PoolingParams or a sequence of them")
            if len(params) != n:
                raise ValueError(f"pooling_params has {len(params)} entries for {n} prompts")
        for p in params:  # before the truncation below reads their fields
            if not isinstance(p, PoolingParams):
                raise TypeError(f"pooling_params must be PoolingParams, got {type(p).__name__}")
        if truncate_prompt_tokens is not None:
            params = [dataclasses.replace(p, truncate_prompt_tokens=truncate_prompt_tokens) for p in params]
        for p in params:
            self._pooling.check_params(p, task)
        return params

    def _run_pooling(self, task: str, prompts, pooling_params, truncate_prompt_tokens, use_tqdm,
                     labels: list[str] | None = None):
        """`labels`: how errors name each prompt (default prompts[i])."""
        engine = self._pooling_engine(task)
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = _as_list(prompts, "prompts", "a string, a list of token ids, a prompt dict or a sequence of them")
        params = self._params_list(len(prompts), pooling_params, truncate_prompt_tokens, task)
        inputs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                inputs.append(engine.tokenize(prompt, p))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{labels[i] if labels else f'prompts[{i}]'}: {e}") from None
        results = self._pool_with_bar(engine, inputs, params, use_tqdm)
        return [(str(next(self._pooling_ids)), x.token_ids, r) for x, r in zip(inputs, results)]

    def _pool_with_bar(self, engine, inputs, params, use_tqdm):
        bar = None
        if use_tqdm and inputs:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(inputs), desc="Processed prompts", dynamic_ncols=True)
        try:
            return engine.pool(inputs, params)
        finally:
            if bar is not None:
                bar.update(len(inputs))
                bar.close()

    def embed(self, prompts, pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, *,
              truncate_prompt_tokens: int | None = None, use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (a string, token ids, or vLLM's prompt dict), in input order."""
        return [EmbeddingRequestOutput(rid, EmbeddingOutput(v.tolist()), ids)
                for rid, ids, v in self._run_pooling("embed", prompts, pooling_params, truncate_prompt_tokens, use_tqdm)]

    def classify(self, prompts, pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, *,
                 truncate_prompt_tokens: int | None = None, use_tqdm: bool = True) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt, from a *ForSequenceClassification model."""
        return [ClassificationRequestOutput(rid, ClassificationOutput(v.tolist()), ids)
                for rid, ids, v in self._run_pooling("classify", prompts, pooling_params, truncate_prompt_tokens,
                                                     use_tqdm)]

    def encode(self, prompts, pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, *,
               truncate_prompt_tokens: int | None = None, use_tqdm: bool = True) -> list[PoolingRequestOutput]:
        """The pooler's raw output per prompt (`outputs.data`, a numpy array)."""
        return [PoolingRequestOutput(rid, PoolingOutput(v), ids)
                for rid, ids, v in self._run_pooling("encode", prompts, pooling_params, truncate_prompt_tokens,
                                                     use_tqdm)]

    def score(self, data_1, data_2, /, *, truncate_prompt_tokens: int | None = None, use_tqdm: bool = True,
              pooling_params: PoolingParams | None = None) -> list[ScoringRequestOutput]:
        """Scores of text pairs, as vLLM: 1-to-1 (two strings), 1-to-N (a string and a list) or N-to-N (two lists
        of one length). A cross-encoder scores each pair jointly (the sigmoid of its logit); an embedding
        model gives the cosine similarity of the two embeddings."""
        engine = self._pooling_engine("score")
        texts_1, texts_2 = _texts(data_1, "data_1"), _texts(data_2, "data_2")
        if pooling_params is not None and not isinstance(pooling_params, PoolingParams):
            raise TypeError(f"pooling_params must be PoolingParams, got {type(pooling_params).__name__}")
        if not texts_1 or not texts_2:
            raise ValueError("score() needs at least one text on each side")
        if len(texts_1) == 1:
            texts_1 = texts_1 * len(texts_2)
        if len(texts_1) != len(texts_2):
            raise ValueError(f"score(): {len(texts_1)} texts in data_1 against {len(texts_2)} in data_2; give one text, "
                             "or as many as data_2")
        params = pooling_params or PoolingParams()
        if truncate_prompt_tokens is not None:
            params = dataclasses.replace(params, truncate_prompt_tokens=truncate_prompt_tokens)
        engine.check_params(params, "score")  # dimensions and normalize are refused, not dropped
        if engine.kind == "classify":
            inputs = []
            for i, (a, b) in enumerate(zip(texts_1, texts_2)):
                try:
                    inputs.append(engine.tokenize_pair(a, b, params))
                except (TypeError, ValueError) as e:
                    raise type(e)(f"pair {i}: {e}") from None
            results = self._pool_with_bar(engine, inputs, [params] * len(inputs), use_tqdm)
            return [ScoringRequestOutput(str(next(self._pooling_ids)), ScoringOutput(float(r[0])), x.token_ids)
                    for x, r in zip(inputs, results)]
        if params.use_activation is not None:
            raise ValueError("use_activation applies to cross-encoders; this is an embedding model (its scores are "
                             "cosine similarities)")
        embed_params = params
        unique = list(dict.fromkeys(texts_1 + texts_2))
        where = {}  # each text is embedded once; an error names where the caller put it first
        for name, texts in (("data_1", texts_1), ("data_2", texts_2)):
            for i, text in enumerate(texts):
                where.setdefault(text, f"{name}[{i}]")
        outs = {t: o for t, o in zip(unique, self._run_pooling("score", unique, embed_params, None, use_tqdm,
                                                                [where[t] for t in unique]))}
        scores = []
        for a, b in zip(texts_1, texts_2):
            (_, ids_a, va), (_, ids_b, vb) = outs[a], outs[b]
            cos = float(np.dot(va, vb) / max(float(np.linalg.norm(va) * np.linalg.norm(vb)), 1e-12))
            scores.append(ScoringRequestOutput(str(next(self._pooling_ids)), ScoringOutput(cos), ids_a + ids_b))
        return scores

    _pooling_ids = itertools.count()

    def _init_pooling(self, path, pooling_args: dict, **load_kwargs) -> bool:
        """Build the pooling engine when the arguments or the model ask for one; False for a generative model."""
        from jaxllm.pooling_engine import load_pooling_engine, read_hf_dict, resolve_runner

        runner, kind = resolve_runner(read_hf_dict(path), task=pooling_args.get("task", "auto"),
                                      runner=pooling_args.get("runner", "auto"),
                                      convert=pooling_args.get("convert", "auto"))
        if runner != "pooling":
            if "override_pooler_config" in pooling_args or "pooler_config" in pooling_args:
                raise ValueError("override_pooler_config/pooler_config apply to pooling models only")
            return False
        override = pooling_args.get("override_pooler_config", pooling_args.get("pooler_config"))
        self._pooling = load_pooling_engine(path, kind=kind, pooler_config=override, **load_kwargs)
        self.llm_engine = None
        self.model = path
        return True
