"""SamplingParams and BeamSearchParams: the same names, meanings and defaults as vLLM's.

Everything that can be checked without the model is checked at construction, and the error names the
parameter and the value. What needs the model (token ids inside the vocabulary, logprobs above the
engine's `max_logprobs`, bad words that need the tokenizer) is checked when the request is added.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, fields
from enum import Enum

logger = logging.getLogger("jaxllm")

_SAMPLING_EPS = 1e-5  # below this temperature, sampling is greedy (as vLLM)
_MAX_TEMP = 1e-2  # smallest non-zero temperature (as vLLM)


class RequestOutputKind(Enum):
    CUMULATIVE = 0  # every output carries the whole text so far
    DELTA = 1  # only what is new since the previous output
    FINAL_ONLY = 2  # one output, when the request finishes


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def structural_tag_structures(tag: str | dict) -> list[tuple[str, str, dict, str]]:
    """A structural tag's structures as (trigger, begin, schema, end), checked: ValueError naming the field."""
    where = "structured_outputs.structural_tag"
    if isinstance(tag, str):
        try:
            tag = json.loads(tag)
        except ValueError as e:
            raise ValueError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(tag, dict):
        raise ValueError(f"{where} must be an object with 'structures' and 'triggers', got {tag!r:.80}")
    if "format" in tag:
        raise ValueError(f"{where}: the 'format' form is not supported; give 'structures' and 'triggers'")
    unknown = next((k for k in tag if k not in ("structures", "triggers")), None)
    if unknown is not None:
        raise ValueError(f"{where}.{unknown} is not a field of a structural tag (it takes 'structures' and 'triggers')")
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError(f"{where}.triggers must be a non-empty list of non-empty strings, got {triggers!r:.80}")
    if not isinstance(structures, list) or not structures:
        raise ValueError(f"{where}.structures must be a non-empty list, got {structures!r:.80}")
    out = []
    for i, s in enumerate(structures):
        if not isinstance(s, dict) or not isinstance(s.get("begin"), str) or not isinstance(s.get("end"), str) \
                or not isinstance(s.get("schema"), dict):
            raise ValueError(f"{where}.structures[{i}] must have a string 'begin' and 'end' and a JSON schema "
                             f"'schema', got {s!r:.80}")
        unknown = next((k for k in s if k not in ("begin", "schema", "end")), None)
        if unknown is not None:
            raise ValueError(f"{where}.structures[{i}].{unknown} is not a field of a structure (it takes 'begin', "
                             "'schema' and 'end')")
        trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
        if trigger is None:
            raise ValueError(f"{where}.structures[{i}].begin {s['begin']!r} starts with none of the triggers "
                             f"{triggers}")
        out.append((trigger, s["begin"], s["schema"], s["end"]))
    return out

@dataclass
class StructuredOutputsParams:
    """Constrain a completion to a JSON schema, a regex, a list of choices or a grammar (vLLM's names).
    Exactly one of `json`, `regex`, `choice`, `grammar`, `json_object` or `structural_tag` is given. The constraint is compiled by llguidance when the request is added; an invalid one raises
    a ValueError naming the field.

    Args:
        json: a JSON schema, as a dict or its JSON text.
        regex: a regular expression (Rust `regex` syntax) the whole output matches.
        choice: the output is exactly one of these strings.
        grammar: a Lark or GBNF (llama.cpp) context-free grammar.
        json_object: True for any JSON object.
        structural_tag: vLLM's structural tag, as JSON text or a dict: {"structures": [{"begin", "schema",
            "end"}, ...], "triggers": [...]}: free text, in which each `begin` (starting with one of the
            triggers) is followed by JSON matching its `schema`, then `end` (tool calls in running text).
        disable_any_whitespace: JSON without free whitespace between tokens (compact output).
        disable_additional_properties: a JSON schema's objects allow no properties it does not list.
        disable_fallback, whitespace_pattern: accepted for vLLM compatibility (one backend: no fallback;
            a whitespace pattern is refused).
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | dict | None = None

    def __post_init__(self):
        kinds = [k for k in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
                 if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError(f"structured_outputs: only one kind of constraint can be given, got {', '.join(kinds)}")
        if not kinds:
            raise ValueError("structured_outputs: one of json, regex, choice, grammar, json_object or structural_tag "
                             "must be given")
        if self.structural_tag is not None:
            structural_tag_structures(self.structural_tag)
        if self.whitespace_pattern is not None:
            raise ValueError("structured_outputs.whitespace_pattern is not supported (use disable_any_whitespace)")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            else:
                schema = self.json
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {self.json!r:.80}")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError(f"structured_outputs.regex must be a non-empty string, got {self.regex!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) for c in self.choice)):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}")
            self.choice = list(self.choice)
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError(f"structured_outputs.grammar must be a non-empty string, got {self.grammar!r}")
        if self.json_object is not None and self.json_object is not True:
            raise ValueError(f"structured_outputs.json_object must be True when given, got {self.json_object!r}")
        for name in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured_outputs.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def kind(self) -> str:
        """Which constraint this is: json, regex, choice, grammar or json_object."""
        return next(k for k in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
                    if getattr(self, k) is not None)

    def key(self) -> tuple:
        """A hashable key of the constraint and the options that change its grammar (the compile cache's)."""
        spec = getattr(self, self.kind)
        if self.kind in ("json", "structural_tag"):  # a dict or its text, in any key order: one key
            spec = json.dumps(json.loads(spec) if isinstance(spec, str) else spec, sort_keys=True)
        elif self.kind == "choice":
            spec = tuple(spec)
        return self.kind, spec, self.disable_any_whitespace, self.disable_additional_properties


@dataclass
class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM's older name for StructuredOutputsParams (`SamplingParams(guided_decoding=...)`). `backend`
    may only name llguidance ("guidance", "llguidance") or be "auto"."""

    backend: str | None = None

    def __post_init__(self):
        if self.backend not in (None, "auto", "guidance", "llguidance"):
            raise ValueError(f"guided_decoding.backend={self.backend!r}: jaxllm's only backend is 'guidance'")
        super().__post_init__()


@dataclass
class SamplingParams:
    """How to sample a request's completions (vLLM's SamplingParams).

    Args:
        n: completions returned for the prompt.
        best_of: completions generated, of which the `n` with the highest cumulative logprob are
            returned (None: n).
        presence_penalty: subtracted from the logit of every token already generated (in [-2, 2]).
        frequency_penalty: subtracted once per occurrence of each token already generated (in [-2, 2]).
        repetition_penalty: for tokens in the prompt or generated: positive logits are divided by it,
            negative ones multiplied (1 = off; > 1 discourages repeats).
        temperature: 0 means greedy; higher is more random.
        top_p: keep the smallest set of top tokens whose probability reaches top_p (1 = all).
        top_k: keep the k most likely tokens (0 or -1 = all).
        min_p: drop tokens less likely than min_p times the most likely one (0 = off).
        seed: per-request seed; a seeded request samples the same tokens whatever else is batched with it.
            Sample i of a request with n > 1 uses seed + i.
        stop: strings that end the output when generated (left out of the text unless
            include_stop_str_in_output); `stop_reason` is the string.
        stop_token_ids: token ids that end the output (kept in token_ids); `stop_reason` is the id.
        bad_words: words that never appear: the last token of a word's tokenization is banned whenever
            the tokens before it were just generated.
        include_stop_str_in_output: keep the matched stop string (or stop token's text) in the text.
        ignore_eos: keep generating past the EOS token.
        max_tokens: most tokens to generate per completion (None: up to the model's context length).
        min_tokens: EOS and stop_token_ids are masked, and stop strings ignored, before this many tokens.
        logprobs: also return the log probabilities of this many most likely tokens per position (plus
            the chosen token). They are the model's raw distribution, before temperature, penalties and
            filters. -1: the whole vocabulary.
        prompt_logprobs: the same for every prompt token after the first.
        detokenize: False returns token ids only (text stays empty).
        skip_special_tokens: leave special tokens out of the text.
        spaces_between_special_tokens: put spaces between special tokens in the text.
        logit_bias: {token_id: bias} added to the logits before sampling.
        allowed_token_ids: only these tokens can be generated.
        truncate_prompt_tokens: keep only the last k prompt tokens (None: all).
        output_kind: CUMULATIVE, DELTA or FINAL_ONLY outputs from the engine's step().
        structured_outputs: a StructuredOutputsParams constraining the output (JSON schema, regex,
            choice, grammar); EOS is allowed only where the constraint is complete.
        guided_decoding: vLLM's older name for structured_outputs (a GuidedDecodingParams).
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None
    # Derived in __post_init__: characters of text held back from unfinished outputs, since they may
    # still turn out to be the start of a stop string.
    output_text_buffer_length: int = field(default=0, repr=False)

    def __post_init__(self):
        def bad(name, why, value=None):
            value = getattr(self, name) if value is None else value
            raise ValueError(f"{name} {why}, got {value!r}")

        for name in ("n", "top_k", "min_tokens"):
            if not _is_int(getattr(self, name)):
                bad(name, "must be an integer")
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"):
            if not _is_number(getattr(self, name)):
                bad(name, "must be a finite number")
            setattr(self, name, float(getattr(self, name)))
        for name in ("best_of", "seed", "max_tokens", "logprobs", "prompt_logprobs", "truncate_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                if name in ("logprobs", "prompt_logprobs") and value is True:
                    setattr(self, name, 1)  # vLLM reads logprobs=True as 1
                    continue
                bad(name, "must be None or an integer")
        for name in ("include_stop_str_in_output", "ignore_eos", "detokenize", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be a bool")

        if self.n < 1:
            bad("n", "must be at least 1")
        if self.best_of is not None and self.best_of < self.n:
            bad("best_of", f"must be >= n={self.n}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0.0:
            bad("repetition_penalty", "must be greater than zero")
        if self.temperature < 0.0:
            bad("temperature", "must be non-negative")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            bad("top_k", "must be 0 or -1 (disable), or at least 1")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if self.seed == -1:
            self.seed = None
        if self.seed is not None and self.seed < 0:
            bad("seed", "must be None, -1 or a non-negative integer")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            bad("min_tokens", "must be greater than or equal to 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be less than or equal to max_tokens={self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < -1:
                bad(name, "must be non-negative or -1")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            bad("truncate_prompt_tokens", "must be None or at least 1")

        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop = list(self.stop)
        else:
            bad("stop", "must be a string or a list of strings")
        if any(not s for s in self.stop):
            bad("stop", "cannot contain an empty string")
        if self.stop and not self.detokenize:
            bad("stop", "needs detokenize=True (stop strings are matched in the text)")
        self.stop_token_ids = self._token_list("stop_token_ids", self.stop_token_ids, empty_ok=True)
        if self.bad_words is None:
            self.bad_words = []
        elif isinstance(self.bad_words, (list, tuple)) and all(isinstance(w, str) and w for w in self.bad_words):
            self.bad_words = list(dict.fromkeys(self.bad_words))
        else:
            bad("bad_words", "must be a list of non-empty strings")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "must be a dict {token_id: bias}")
            bias = {}
            for token, value in self.logit_bias.items():
                try:
                    token_id = int(token)  # JSON keys arrive as strings
                except (TypeError, ValueError):
                    bad("logit_bias", "keys must be token ids", token)
                if not _is_number(value):
                    bad("logit_bias", f"values must be finite numbers (token {token_id})", value)
                bias[token_id] = float(value)
            self.logit_bias = bias
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = self._token_list("allowed_token_ids", self.allowed_token_ids, empty_ok=False)
        if not isinstance(self.output_kind, RequestOutputKind):
            bad("output_kind", "must be a RequestOutputKind")
        given_as = "structured_outputs"  # errors name the parameter the caller gave, the older one included
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                bad("guided_decoding", "cannot be given with structured_outputs (it is its older name)")
            self.structured_outputs, self.guided_decoding, given_as = self.guided_decoding, None, "guided_decoding"
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            if isinstance(self.structured_outputs, dict):
                names = {f.name for f in fields(StructuredOutputsParams)}
                unknown = sorted(map(repr, set(self.structured_outputs) - names))  # keys of any type
                if unknown:
                    bad(given_as, f"has unknown fields {', '.join(unknown)}", self.structured_outputs)
                try:
                    self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
                except ValueError as e:
                    raise ValueError(str(e).replace("structured_outputs", given_as, 1)) from None
            else:
                bad(given_as, "must be a StructuredOutputsParams", self.structured_outputs)

        if 0 < self.temperature < _MAX_TEMP:
            # As vLLM: tiny temperatures overflow the scaled logits; they are raised, not made greedy.
            logger.warning("temperature %s is less than %s, which may cause numerical errors; using %s",
                           self.temperature, _MAX_TEMP, _MAX_TEMP)
            self.temperature = _MAX_TEMP
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the filters cannot change the argmax, so they are switched off (as vLLM).
            self.temperature, self.top_p, self.top_k, self.min_p = 0.0, 1.0, 0, 0.0
            if self.n > 1:
                bad("n", "must be 1 when using greedy sampling (temperature=0)", self.n)
            if self.best_of is not None and self.best_of > 1:
                bad("best_of", "must be 1 when using greedy sampling (temperature=0)")
        if self.top_k == -1:
            self.top_k = 0
        if self.stop and not self.include_stop_str_in_output:
            self.output_text_buffer_length = max(len(s) for s in self.stop) - 1

    @staticmethod
    def _token_list(name: str, value, empty_ok: bool) -> list[int]:
        if value is None:
            return []
        if not isinstance(value, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in value):
            raise ValueError(f"{name} must be a list of non-negative token ids, got {value!r}")
        if not value and not empty_ok:
            raise ValueError(f"{name} must not be empty, got {value!r}")
        return list(dict.fromkeys(value))

    @property
    def num_samples(self) -> int:
        """Completions generated: best_of, or n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass
class BeamSearchParams:
    """vLLM's beam search parameters, for `LLM.beam_search`.

    Args:
        beam_width: beams kept per step, and sequences returned.
        max_tokens: most tokens to generate.
        ignore_eos: an EOS token does not finish a beam.
        temperature: passed to the sampler; beams are ranked by raw log probabilities either way.
        length_penalty: a finished beam's score is cum_logprob / len(tokens) ** length_penalty.
        include_stop_str_in_output: keep the EOS token's text in the returned text.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if not _is_int(self.beam_width) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a non-negative number, got {self.temperature!r}")
        if not _is_number(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
