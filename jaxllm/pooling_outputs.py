"""What the pooling calls return, with vLLM's names: `embed` -> EmbeddingRequestOutput, `classify` ->
ClassificationRequestOutput, `score` -> ScoringRequestOutput, `encode` -> PoolingRequestOutput."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PoolingOutput:
    """The raw pooled output of one prompt (after the pooler's normalisation or activation)."""

    data: np.ndarray  # [hidden_size] (embedding models) or [num_labels] (classifiers), float32


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    probs: list[float]  # per label: softmax (or sigmoid for one label) of the logits; raw logits without activation

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float  # cross-encoders: the (sigmoid of the) relevance logit; bi-encoders: cosine similarity


@dataclass
class PoolingRequestOutput:
    """One prompt's pooling result: `outputs` is one of the *Output classes above."""

    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class EmbeddingRequestOutput(PoolingRequestOutput):
    outputs: EmbeddingOutput


@dataclass
class ClassificationRequestOutput(PoolingRequestOutput):
    outputs: ClassificationOutput


@dataclass
class ScoringRequestOutput(PoolingRequestOutput):
    outputs: ScoringOutput
