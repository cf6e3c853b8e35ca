"""SamplingParams: the same names, meanings and defaults as vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to sample one request's completion.

    Args:
        n: number of completions to return for the prompt.
        temperature: 0 means greedy; higher is more random.
        top_p: keep the smallest set of tokens whose probability sums to at least top_p (1 = all).
        top_k: keep the k most likely tokens (0 or -1 = all).
        min_p: drop tokens less likely than min_p times the most likely one (0 = off).
        seed: per-request seed; the same seeded request samples the same tokens whatever else is batched with it.
        max_tokens: most tokens to generate (None: up to the model's context length).
        min_tokens: EOS and stop_token_ids cannot end the output before this many tokens.
        stop_token_ids: token ids that end the output (kept in token_ids, like vLLM).
        ignore_eos: keep generating past the EOS token.
        skip_special_tokens: leave special tokens out of the text.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop_token_ids: list[int] | None = field(default=None)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n != 1:
            # Parallel sampling (n > 1) comes with the SamplingParams issue; refuse rather than ignore.
            bad("n", "must be 1 (parallel sampling is not supported yet)")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad("temperature", "must be a number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "must be -1 (disable), 0 (disable) or a positive integer")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", "must be None or a non-negative integer")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be None or at least 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "must be a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens={self.max_tokens}")
        if self.stop_token_ids is not None:
            if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
                bad("stop_token_ids", "must be a list of non-negative token ids")
            self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self.temperature = float(self.temperature)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_filtering(self) -> bool:
        """Whether top-k / top-p / min-p apply (they need a sort over the vocabulary)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1 or self.min_p > 0)
