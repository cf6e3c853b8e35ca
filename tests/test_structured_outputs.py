"""Structured outputs: the params' validation, the device bitmask against numpy, and the default model's
constrained outputs (JSON schema, regex, choice, grammar) in a batch mixed with free requests."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm import LLM, GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from jaxllm.grammar_mask import apply_token_bitmask

jsonschema = pytest.importorskip("jsonschema")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
CODE = r"[0-9]{3}-[a-z]{2,4}"
CITIES = ["Paris", "London", "Berlin"]


# -- params ----------------------------------------------------------------------------------------
def test_exactly_one_kind():
    with pytest.raises(ValueError, match="only one kind"):
        StructuredOutputsParams(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match="one of json, regex"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="structured_outputs.json"):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(ValueError, match="structured_outputs.choice"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="structured_outputs.choice"):
        StructuredOutputsParams(choice=["a", 1])
    with pytest.raises(ValueError, match="structural_tag"):
        StructuredOutputsParams(structural_tag="{}")


def test_guided_decoding_alias_and_dict():
    p = SamplingParams(guided_decoding=GuidedDecodingParams(regex="a+"))
    assert p.structured_outputs.regex == "a+" and p.guided_decoding is None
    assert SamplingParams(structured_outputs={"choice": ["x"]}).structured_outputs.choice == ["x"]
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"choices": ["x"]})
    with pytest.raises(ValueError, match="guided_decoding"):
        SamplingParams(guided_decoding=GuidedDecodingParams(regex="a"), structured_outputs={"regex": "b"})
    with pytest.raises(ValueError, match="backend"):
        GuidedDecodingParams(regex="a", backend="outlines")
    # The compile cache's key ignores dict order.
    assert (StructuredOutputsParams(json={"a": 1, "b": 2}).key() == StructuredOutputsParams(json={"b": 2, "a": 1}).key())


# -- the device mask -------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 100), st.data())
def test_bitmask_matches_numpy_unpacking(rows, vocab, data):
    words = (vocab + 31) // 32
    bitmask = np.array(data.draw(st.lists(st.lists(st.integers(-2**31, 2**31 - 1), min_size=words, max_size=words),
                                          min_size=rows, max_size=rows)), np.int32)
    logits = np.arange(rows * vocab, dtype=np.float32).reshape(rows, vocab)
    out = np.asarray(apply_token_bitmask(jnp.asarray(logits), jnp.asarray(bitmask)))
    allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little").reshape(rows, -1)[:, :vocab].astype(bool)
    np.testing.assert_array_equal(out, np.where(allowed, logits, -np.inf))


# -- the default model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=256, num_gpu_blocks_override=128)


def chat(llm, question):
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                   add_generation_prompt=True)


def test_constrained_and_free_rows_in_one_batch(llm):
    greedy = dict(temperature=0, max_tokens=48)
    so = StructuredOutputsParams
    free_prompts = [chat(llm, "What is the capital of France?"), "1, 2, 3, 4,"]
    cases = [
        (chat(llm, "Describe a person as JSON."), SamplingParams(**greedy, structured_outputs=so(json=PERSON))),
        (free_prompts[0], SamplingParams(**greedy)),
        (chat(llm, "Give me a product code."), SamplingParams(**greedy, structured_outputs=so(regex=CODE))),
        (chat(llm, "Which city is in Germany?"), SamplingParams(**greedy, structured_outputs=so(choice=CITIES))),
        (free_prompts[1], SamplingParams(**greedy)),
        (chat(llm, "A JSON object about a cat."),
         SamplingParams(temperature=0.8, seed=3, max_tokens=64, structured_outputs=so(json_object=True))),
        (chat(llm, "Say yes or no."), SamplingParams(**greedy, structured_outputs=so(
            grammar='root ::= answer "."\nanswer ::= "yes" | "no"'))),
    ]
    outs = llm.generate([p for p, _ in cases], [s for _, s in cases], use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    eos = llm.llm_engine.eos_token_ids
    jsonschema.validate(json.loads(texts[0]), PERSON)
    assert re.fullmatch(CODE, texts[2]), texts[2]
    assert texts[3] in CITIES
    if outs[5].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(texts[5]), dict)
    assert texts[6] in ("yes.", "no.")
    for i in (0, 2, 3, 6):  # a complete match ends on EOS, as any request
        assert outs[i].outputs[0].finish_reason == "stop" and outs[i].outputs[0].token_ids[-1] in eos
    # The free rows sample exactly what they sample alone.
    alone = llm.generate(free_prompts, SamplingParams(**greedy), use_tqdm=False)
    assert [o.outputs[0].text for o in alone] == [texts[1], texts[4]]


def test_a_launch_failure_fails_the_constrained_request_alone(llm, monkeypatch):
    """A constrained step whose model program raises on the launcher thread, while the engine's thread fills
    its bitmask: nothing waits forever, the constrained request fails, the free one beside it gets its text
    alone, and the next constrained request runs."""
    from jaxllm.llm import RequestFailedError

    greedy = SamplingParams(temperature=0, max_tokens=12)
    prompts = [chat(llm, "Give me a product code."), "1, 2, 3, 4,"]
    alone = llm.generate(prompts[1], greedy, use_tqdm=False)[0].outputs[0].text
    runner = llm.llm_engine.runner
    run_step = runner._run_step

    def failing_run_step(args, bucket, state, mask, programs):
        if mask is not None:  # a step with constrained rows
            raise RuntimeError("injected launch failure")
        return run_step(args, bucket, state, mask, programs)

    monkeypatch.setattr(runner, "_run_step", failing_run_step)
    params = [SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex=CODE)),
              greedy]
    with pytest.raises(RequestFailedError, match="injected launch failure") as info:
        llm.generate(prompts, params, use_tqdm=False)
    assert info.value.failed == [0]
    assert info.value.outputs[1].outputs[0].text == alone
    assert not llm.llm_engine.has_unfinished_requests()
    monkeypatch.undo()
    (out,) = llm.generate(prompts[:1], params[:1], use_tqdm=False)
    assert re.fullmatch(CODE, out.outputs[0].text), out.outputs[0].text


def test_constrained_request_runs_every_step_under_async_scheduling(llm, monkeypatch):
    """The bitmask of step N+1 is filled after step N's tokens reach the grammar, while step N+1's model
    program runs: a constrained request samples at every engine step, not every other one."""
    engine = llm.llm_engine
    assert engine.config.async_scheduling
    steps = 0
    step = engine.step

    def counting_step():
        nonlocal steps
        steps += 1
        return step()

    monkeypatch.setattr(engine, "step", counting_step)
    # Two steps are in flight: a bitmask buffer is handed out again only after its step was collected.
    buffers, in_flight, used = engine.runner.bitmask_buffers, [], set()
    step_mask, release = buffers.step_mask, buffers.release

    def recording_step_mask(requests, num_rows):
        mask = step_mask(requests, num_rows)
        assert all(mask.bitmask is not m.bitmask for m in in_flight)
        in_flight.append(mask)
        used.add(id(mask.bitmask))
        return mask

    def recording_release(mask):
        in_flight.remove(mask)
        release(mask)

    monkeypatch.setattr(buffers, "step_mask", recording_step_mask)
    monkeypatch.setattr(buffers, "release", recording_release)
    engine.step_times = type(engine.step_times)()
    params = SamplingParams(temperature=0.7, seed=1, max_tokens=24, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(regex="[a-z]{200,400}"))
    (out,) = llm.generate([chat(llm, "Spell a long word.")], params, use_tqdm=False)
    text = out.outputs[0].text
    assert len(out.outputs[0].token_ids) == 24 and re.fullmatch("[a-z]+", text), text
    assert steps <= 24 + 3, steps  # prefill, 23 decodes, the async pipeline's last read (every other: 48)
    assert not in_flight and len(used) <= 3, len(used)  # 24 steps' masks in a few reused buffers
    assert engine.step_times.grammar > 0 and engine.step_times.summary()["ms_per_step"]["grammar"] > 0


def test_reused_bitmask_buffer_fills_as_a_fresh_one(llm):
    """A buffer back from an earlier step leaves no bits behind: a row constrained then and free now is
    all ones again, as is a finished request's; a mask never filled does not go back."""
    from types import SimpleNamespace

    from jaxllm.core.request import RequestStatus
    from jaxllm.step_mask import BitmaskBuffers
    from jaxllm.structured_output import bitmask_width, fill_token_bitmask

    compiler = llm.llm_engine.grammar_compiler
    width = bitmask_width(llm.llm_engine.model_config.vocab_size)
    so = StructuredOutputsParams
    json_row, code_row, city_row = (compiler.compile(s).matcher() for s in (so(json=PERSON), so(regex=CODE),
                                                                             so(choice=CITIES)))
    running, finished = RequestStatus.RUNNING, RequestStatus.FINISHED_STOPPED
    req = lambda matcher, status=running: SimpleNamespace(structured=matcher, status=status)  # noqa: E731
    buffers = BitmaskBuffers(width)
    first = buffers.step_mask([req(json_row), req(code_row), req(None), req(city_row)], 4)
    first.fill()
    second = buffers.step_mask([req(json_row)], 4)
    assert second.bitmask is not first.bitmask  # the first step is still in flight
    buffers.release(second)  # never filled: not reused
    buffers.release(first)
    later = [req(None), req(code_row), req(city_row), req(json_row, finished)]
    third = buffers.step_mask(later, 4)
    assert third.bitmask is first.bitmask
    third.fill()
    fresh = np.full((4, width), -1, np.int32)
    fill_token_bitmask(fresh, [(1, code_row), (2, city_row)])
    np.testing.assert_array_equal(third.bitmask, fresh)
    assert (third.bitmask[[0, 3]] == -1).all() and not (third.bitmask[1] == -1).all()
    assert buffers.step_mask(later, 4).bitmask is not second.bitmask


def test_n_samples_each_follow_the_grammar(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=16,
                            structured_outputs=StructuredOutputsParams(choice=CITIES))
    (out,) = llm.generate([chat(llm, "Name a city.")], params, use_tqdm=False)
    assert len(out.outputs) == 3 and all(o.text in CITIES for o in out.outputs)


def test_invalid_constraint_refused_before_any_work(llm):
    engine = llm.llm_engine
    for field, kwargs in (("regex", {"regex": "[a-"}), ("json", {"json": {"type": "foo"}}),
                          ("grammar", {"grammar": "root ::= ("})):
        with pytest.raises(ValueError, match=f"structured_outputs.{field}"):
            llm.generate(["ok", "bad"], [SamplingParams(), SamplingParams(
                structured_outputs=StructuredOutputsParams(**kwargs))], use_tqdm=False)
    assert not engine.has_unfinished_requests() and not engine.requests


def test_compile_cache_and_parallel_fill(llm):
    from jaxllm.structured_output import bitmask_width, fill_token_bitmask

    compiler = llm.llm_engine.grammar_compiler
    so = StructuredOutputsParams
    assert compiler.compile(so(json=dict(PERSON))) is compiler.compile(so(json=json.dumps(PERSON)))
    specs = [so(json=PERSON), so(regex=CODE), so(choice=CITIES), so(json_object=True)]
    matchers = [compiler.compile(s).matcher() for s in specs]
    tok = llm.get_tokenizer()
    for token in tok.encode('{"name": "Al', add_special_tokens=False):
        assert matchers[0].accept(token)
    width = bitmask_width(llm.llm_engine.model_config.vocab_size)
    together = np.zeros((5, width), np.int32)
    fill_token_bitmask(together, list(enumerate(matchers)))
    for row, matcher in enumerate(matchers):
        alone = np.zeros((1, width), np.int32)
        fill_token_bitmask(alone, [(0, matcher)])
        np.testing.assert_array_equal(together[row], alone[0])
    assert not together[4].any()
    allowed = lambda row: set(np.nonzero(np.unpackbits(together[row].view(np.uint8), bitorder="little"))[0])  # noqa: E731
    assert {tok.decode([t]) for t in allowed(2)} >= {"Paris", "London"}
    assert all(tok.decode([t])[0].isdigit() for t in allowed(1))


def test_tokens_taken_at_once_as_one_at_a_time(llm):
    """`accept_tokens` (llguidance's threads) leaves every matcher where `Matcher.accept` one at a time
    does, refusals included: same verdicts, same next-token masks."""
    from jaxllm.structured_output import accept_tokens, bitmask_width, fill_token_bitmask

    compiler, tok = llm.llm_engine.grammar_compiler, llm.get_tokenizer()
    so = StructuredOutputsParams
    specs = [so(json=PERSON), so(regex=CODE), so(choice=CITIES), so(json_object=True)] * 2
    steps = [tok.encode(text, add_special_tokens=False)[:3] for text in
             ('{"name', "12a", "Paris", '{"a', "x1", "99", "Lond", " {")]
    together, alone = ([compiler.compile(s).matcher() for s in specs] for _ in range(2))
    verdicts = []
    for i in range(3):
        tokens = [step[i] if i < len(step) else tok.eos_token_id for step in steps]
        verdicts += accept_tokens(list(zip(together, tokens)))
        assert verdicts[-len(tokens):] == [m.accept(t) for m, t in zip(alone, tokens)]
    assert True in verdicts and False in verdicts  # refusals (a letter in CODE, "x1" as JSON) are compared too
    width = bitmask_width(llm.llm_engine.model_config.vocab_size)
    masks = [np.zeros((len(specs), width), np.int32) for _ in range(2)]
    for mask, matchers in zip(masks, (together, alone)):
        fill_token_bitmask(mask, list(enumerate(matchers)))
    np.testing.assert_array_equal(*masks)


def test_constraint_starts_after_the_reasoning(llm, monkeypatch):
    """With a reasoning parser, a constrained output is free until the token that ends the reasoning, and
    matches its grammar from the next token on (vLLM's default); a prompt that already ended the reasoning
    is constrained from the start. The default model has no <think> tokens, so two of its ordinary tokens
    stand in for them: the end tag is a token the free greedy output samples, so the reasoning ends there."""
    engine = llm.llm_engine
    prompt = chat(llm, "Which city is in Germany? Think first.")
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    ids = list(free.token_ids)
    prompt_ids = llm.get_tokenizer().encode(prompt, add_special_tokens=False)
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i] + prompt_ids)  # the end tag's first sample
    start = next(t for t in range(1000, 2000) if t not in ids + prompt_ids)
    monkeypatch.setattr(engine, "_reasoning_tags", (start, ids[k]))
    choice = SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(choice=CITIES))
    out = llm.generate([prompt], choice, use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids[:k + 1]) == ids[:k + 1]  # free through the end of the reasoning
    answer = llm.get_tokenizer().decode(list(out.token_ids[k + 1:]), skip_special_tokens=True)
    assert answer in CITIES and out.finish_reason == "stop"
    ended = prompt_ids + [start, ids[k]]
    out = llm.generate([{"prompt_token_ids": ended}], choice, use_tqdm=False)[0].outputs[0]
    assert out.text in CITIES  # the prompt ended the reasoning: constrained from the first token


def test_reasoning_parser_needs_its_tags_as_tokens():
    from jaxllm.engine import reasoning_tags
    from jaxllm.loader import default_model_path, load_tokenizer

    tok = load_tokenizer(default_model_path())
    with pytest.raises(ValueError, match="reasoning_parser='qwen3': <think> is not one token"):
        reasoning_tags("qwen3", tok)
    with pytest.raises(ValueError, match="--reasoning-parser 'r1'"):
        reasoning_tags("r1", tok)
    assert reasoning_tags(None, tok) is None


WEATHER_TAG = {"structures": [{"begin": "<function=get_weather>", "end": "</function>",
                               "schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"], "additionalProperties": False}}],
               "triggers": ["<function="]}


def test_structural_tag_constrains_only_what_follows_its_trigger(llm):
    """vLLM's structural tag: the text is free until a trigger; after a structure's `begin` comes JSON that
    matches its schema, then its `end`. Fed through the default model's tokenizer as a matcher would be."""
    from jaxllm.structured_output import bitmask_width, fill_token_bitmask

    compiler, tok = llm.llm_engine.grammar_compiler, llm.get_tokenizer()
    grammar = compiler.compile(StructuredOutputsParams(structural_tag=json.dumps(WEATHER_TAG)))
    width = bitmask_width(llm.llm_engine.model_config.vocab_size)

    def allowed(text: str) -> set[int] | None:
        """The tokens allowed after `text`, or None if the grammar refuses it."""
        matcher = grammar.matcher()
        if not all(matcher.accept(t) for t in tok.encode(text, add_special_tokens=False)):
            return None
        mask = np.zeros((1, width), np.int32)
        fill_token_bitmask(mask, [(0, matcher)])
        return set(np.nonzero(np.unpackbits(mask[0].view(np.uint8), bitorder="little"))[0])

    free = allowed("I will look it up. ")
    assert len(free) > tok.vocab_size // 2  # free text: nearly every token
    assert allowed('Sure. <function=get_weather>{"city": "Paris"}</function> Done.') is not None
    assert allowed('<function=get_weather>{"city": 5}') is None  # the schema holds after the trigger
    assert allowed('<function=get_weather>{"town": "Paris"}') is None
    inside = [tok.decode([t]).strip() for t in allowed('<function=get_weather>{"city": "Paris"')]
    assert "}" in inside and all(c == "" or c.startswith("}") for c in inside)  # only the object's close
    after = [tok.decode([t]) for t in allowed('<function=get_weather>{"city": "Paris"}')]
    assert after and all("</function>".startswith(a) for a in after)  # then only the structure's end


def test_structural_tag_is_checked_by_name():
    for tag, message in ((["x"], "must be an object"),
                         ({"structures": [], "triggers": ["<f"]}, "structures must be a non-empty list"),
                         ({"structures": [{"begin": "<g>", "schema": {}, "end": ""}], "triggers": ["<f"]},
                          "begin '<g>' starts with none of the triggers"),
                         ({"format": {"type": "triggered_tags"}}, "'format' form is not supported"),
                         ("{", "not valid JSON")):
        with pytest.raises(ValueError, match=f"structured_outputs.structural_tag.*{message}"):
            StructuredOutputsParams(structural_tag=tag)


def test_structural_tag_response_format():
    """The server's response_format {"type": "structural_tag", "structures", "triggers"} (vLLM's), and a
    400 naming response_format for a bad one."""
    from jaxllm.entrypoints.protocol import APIError
    from jaxllm.entrypoints.structured import parse_structured_outputs

    params, field = parse_structured_outputs({"response_format": {"type": "structural_tag", **WEATHER_TAG}})
    assert field == "response_format" and params.kind == "structural_tag"
    assert params.key() == StructuredOutputsParams(structural_tag=json.dumps(WEATHER_TAG)).key()
    with pytest.raises(APIError, match="triggers must be a non-empty list") as e:
        parse_structured_outputs({"response_format": {"type": "structural_tag", "structures": WEATHER_TAG["structures"]}})
    assert e.value.param == "response_format"
