"""Structured outputs on the host: constraints compiled by llguidance, one matcher per constrained sample.

    compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)
    grammar = compiler.compile(params.structured_outputs)   # ValueError naming the field; cached by spec
    matcher = grammar.matcher()                             # one per sample
    fill_token_bitmask(bitmask, [(row, matcher), ...])      # [R, ceil(V / 32)] int32, bit t of word t // 32
    matcher.accept(token)                                   # after the step, on the host

Why llguidance and not xgrammar: xgrammar's wheel requires torch (and triton), which jaxllm must not
need at run time; llguidance depends on nothing, builds its tokenizer from the transformers fast
tokenizer the engine already holds, and fills bitmasks into numpy arrays. vLLM offers it as its
`guidance` backend, with the same grammar conversions used here.

The bitmask is one more input to the step (jaxllm/grammar_mask.py applies it to the logits), so free
and constrained rows share a step. A constrained row's mask depends on its previous token, which under
async scheduling is still on the device when the next step is launched: such a step runs as a model
program and a sampling program, and the engine fills the bitmask (`step_mask.StepMask`) once the grammars
have taken the previous step's tokens, while the device runs the model. No jax here.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict

import numpy as np

from jaxllm.sampling_params import StructuredOutputsParams, structural_tag_structures

logger = logging.getLogger("jaxllm")

CACHE_SIZE = 256  # compiled grammars kept, by spec


class StructuredOutputError(ValueError):
    """A constraint that compiled and started but whose parser failed while generating (a row of over 2,000
    items after some token): the request's fault, so it ends with a 400, not with a silent stop."""


class Grammar:
    """A compiled constraint; `matcher()` starts a fresh match of it."""

    def __init__(self, tokenizer, serialized: str):
        self._tokenizer = tokenizer
        self.serialized = serialized

    def matcher(self, wait_for: int | None = None) -> "Matcher":
        import llguidance

        return Matcher(llguidance.LLMatcher(self._tokenizer, self.serialized), wait_for)


class Matcher:
    """The state of one sample's match: which tokens may come next, and whether it is complete.

    `wait_for`: a token (a reasoning model's </think>) before which the output is free, as vLLM applies a
    constraint to the answer and not to the reasoning; the match starts with the token after it."""

    def __init__(self, matcher, wait_for: int | None = None):
        self._m = matcher
        self.wait_for = wait_for

    @property
    def waiting(self) -> bool:
        return self.wait_for is not None

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar refuses it (then the match is dead)."""
        if self.waiting:
            if token == self.wait_for:
                self.wait_for = None
            return True
        return self._m.consume_token(token)

    @property
    def terminated(self) -> bool:
        """The match is over: EOS was accepted, or the grammar allows nothing more, or it failed."""
        return not self.waiting and (self._m.is_stopped() or self.failed)

    @property
    def error(self) -> str:
        return self._m.get_error()

    @property
    def failed(self) -> bool:
        return self._m.is_error()

    @property
    def parser_failed(self) -> bool:
        """The match died of the parser's own limits, not of a token outside the grammar."""
        return self.failed and "doesn't satisfy the grammar" not in self.error


# llguidance's thread pool, for filling many rows and taking many tokens at once: 80% of the CPUs (at most
# 32), its default. Both release the GIL. All the CPUs measured no faster on a loaded 2-CPU host
# (benchmarks/grammar_host.py).
_executor = None


def _llguidance_executor():
    global _executor
    if _executor is None:
        import llguidance

        _executor = llguidance.LLExecutor()
    return _executor


def fill_token_bitmask(bitmask: np.ndarray, rows: list[tuple[int, Matcher]]) -> None:
    """Write the tokens each matcher allows next into its row of `bitmask` ([R, W] int32 words, token t
    at bit t % 32 of word t // 32); several rows are filled in parallel. A complete match allows only EOS."""
    import llguidance.numpy

    if len(rows) == 1:
        row, matcher = rows[0]
        llguidance.numpy.fill_next_token_bitmask(matcher._m, bitmask, row)
        return
    llguidance.numpy.fill_next_token_bitmask_par(_llguidance_executor(), [(m._m, row) for row, m in rows], bitmask)


def accept_tokens(pairs: list[tuple[Matcher, int]]) -> list[bool]:
    """`Matcher.accept` for many matchers at once, on llguidance's thread pool (the GIL released): at 144
    rows, one at a time cost about 1 ms a step (benchmarks/grammar_host.py)."""
    matching = [i for i, (m, _) in enumerate(pairs) if not m.waiting]
    ok = [m.accept(token) if m.waiting else True for m, token in pairs]
    if len(matching) == 1:
        ok[matching[0]] = pairs[matching[0]][0].accept(pairs[matching[0]][1])
    elif matching:
        taken = _llguidance_executor().consume_token_par([(pairs[i][0]._m, pairs[i][1]) for i in matching])
        for i, t in zip(matching, taken):
            ok[i] = t
    return ok


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class GrammarCompiler:
    """Compiles StructuredOutputsParams into Grammars for one tokenizer; compiled grammars are cached
    by their spec (an LRU of CACHE_SIZE). Building llguidance's tokenizer takes ~1 s: it is built on
    the first constrained request, not at start."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids):
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._tokenizer = None
        self._cache: OrderedDict[tuple, Grammar] = OrderedDict()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf

            if self._hf_tokenizer is None:
                raise ValueError("structured_outputs needs a tokenizer, and this engine has none")
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=self.eos_token_ids or None)
        return self._tokenizer

    def compile(self, params: StructuredOutputsParams) -> Grammar:
        """The Grammar of `params`; ValueError naming the field if it does not compile."""
        key = params.key()
        grammar = self._cache.get(key)
        if grammar is not None:
            self._cache.move_to_end(key)
            return grammar
        import llguidance

        kind = params.kind
        try:
            serialized = _serialize(params)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"structured_outputs.{kind} is invalid: {e}") from None
        ok, error = _validate(llguidance, serialized, self.tokenizer)
        if not ok:
            raise ValueError(f"structured_outputs.{kind} is invalid: {error}")
        grammar = Grammar(self.tokenizer, serialized)
        error = _first_step_error(grammar, self.vocab_size)
        if error:
            raise ValueError(f"structured_outputs.{kind} cannot be followed: {error}")
        self._cache[key] = grammar
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return grammar


def _validate(llguidance, serialized: str, tokenizer) -> tuple[bool, str]:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(serialized, tokenizer)
    return not is_error, "; ".join(m.strip() for m in messages)


def _first_step_error(grammar: Grammar, vocab_size: int) -> str | None:
    """Why a constraint that validates cannot start, if it cannot: the parser's limits (a row of over 2,000
    items, a lexer of too many expressions) and constraints no text satisfies show only when the first
    mask is computed. Found here, they are the request's 400, not a generation that stops at once."""
    matcher = grammar.matcher()
    bitmask = np.zeros((1, bitmask_width(vocab_size)), np.int32)
    fill_token_bitmask(bitmask, [(0, matcher)])
    if matcher.failed:
        return matcher.error.splitlines()[0] if matcher.error else "the parser failed"
    if not bitmask.any():
        return "no text satisfies it"
    return None


def _serialize(params: StructuredOutputsParams) -> str:
    """llguidance's grammar for a constraint, as vLLM's guidance backend builds it."""
    import llguidance

    kind = params.kind
    options = {"whitespace_flexible": not params.disable_any_whitespace}
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else params.json
        if isinstance(schema, str):
            schema = json.loads(schema)
        if params.disable_additional_properties and isinstance(schema, dict):
            schema = _no_additional_properties(schema)
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=options)
    if kind == "regex":
        return llguidance.grammar_from("regex", params.regex)
    if kind == "choice":
        return llguidance.grammar_from("choice", params.choice)
    if kind == "structural_tag":  # free text with lazily triggered JSON segments
        tags = [llguidance.StructTag(trigger=trigger, begin=begin, grammar=schema, end=end)
                for trigger, begin, schema, end in structural_tag_structures(params.structural_tag)]
        return llguidance.grammar_from("lark", llguidance.StructTag.to_grammar(tags))
    return llguidance.grammar_from("grammar", params.grammar)


def _no_additional_properties(schema):
    """`additionalProperties: false` on every object schema that does not say otherwise."""
    if isinstance(schema, list):
        return [_no_additional_properties(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _no_additional_properties(v) for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out
