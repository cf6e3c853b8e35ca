"""PoolingParams: vLLM's per-request options of a pooling call (embed, classify, score, encode)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolingParams:
    """Per-request pooling options, with vLLM's names.

    Args:
        truncate_prompt_tokens: keep at most this many prompt tokens (-1: the model's max_model_len); text
            is truncated by the tokenizer (its special tokens kept), token ids keep their last k.
        dimensions: embeddings only: cut to this many dimensions (Matryoshka models only).
        normalize: embeddings only: L2-normalise (None: the model's pooler default).
        use_activation: classification and scores: apply sigmoid/softmax (None: the model's default, on).
    """

    truncate_prompt_tokens: int | None = None
    dimensions: int | None = None
    normalize: bool | None = None
    use_activation: bool | None = None

    def __post_init__(self):
        t = self.truncate_prompt_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or (t < 1 and t != -1)):
            raise ValueError(f"truncate_prompt_tokens={t!r} must be a positive integer or -1")
        d = self.dimensions
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"dimensions={d!r} must be a positive integer")
        for name in ("normalize", "use_activation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be a boolean or None")
