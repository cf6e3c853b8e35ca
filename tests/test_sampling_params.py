"""SamplingParams / BeamSearchParams / PoolingParams validation: vLLM's defaults, and a ValueError naming the
parameter."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm import BeamSearchParams, PoolingParams, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert (p.stop, p.stop_token_ids, p.bad_words, p.ignore_eos) == ([], [], [], False)
    assert (p.skip_special_tokens, p.spaces_between_special_tokens, p.detokenize) == (True, True, True)
    assert p.include_stop_str_in_output is False and p.logit_bias is None and p.allowed_token_ids is None


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.1}, "min_p"),
    ({"n": 0}, "n"),
    ({"n": "2"}, "n"),
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"frequency_penalty": 2.01}, "frequency_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"logprobs": -2}, "logprobs"),
    ({"logprobs": 1.5}, "logprobs"),
    ({"prompt_logprobs": -5}, "prompt_logprobs"),
    ({"seed": -3}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"stop": "x", "detokenize": False}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"bad_words": [""]}, "bad_words"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias"),
    ({"logit_bias": {1: "big"}}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"temperature": 0.0, "n": 2}, "n"),
])
def test_bad_values_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name) as e:
        SamplingParams(**kwargs)
    assert name in str(e.value).split()[0]  # the message starts with the parameter's name


def test_normalisation():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(stop="a").stop == ["a"]
    assert SamplingParams(logprobs=True).logprobs == 1
    assert SamplingParams(logit_bias={"7": 1}).logit_bias == {7: 1.0}  # JSON keys are strings
    g = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2)
    assert (g.temperature, g.top_k, g.top_p, g.min_p) == (0.0, 0, 1.0, 0.0)  # greedy: filters off
    assert SamplingParams(temperature=1e-6).temperature == 0.01  # raised to vLLM's smallest, not greedy
    assert SamplingParams(stop=["abc", "de"]).output_text_buffer_length == 2
    assert SamplingParams(stop=["abc"], include_stop_str_in_output=True).output_text_buffer_length == 0
    assert SamplingParams(n=2, best_of=5, temperature=1).num_samples == 5
    assert SamplingParams(max_tokens=None).max_tokens is None


@pytest.mark.parametrize("kwargs, name", [
    ({"beam_width": 0, "max_tokens": 4}, "beam_width"),
    ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
    ({"beam_width": 2, "max_tokens": 4, "temperature": -1}, "temperature"),
])
def test_beam_search_params(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BeamSearchParams(**kwargs)
    p = BeamSearchParams(beam_width=2, max_tokens=4)
    assert (p.ignore_eos, p.temperature, p.length_penalty, p.include_stop_str_in_output) == (False, 0.0, 1.0, False)


# Values of every kind a caller might pass by mistake, and the edges of each check.
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.sampled_from([0, 1, 2, -1, 5, 2**31, 2**64, -2**63])
    | st.sampled_from([0.0, 0.5, 1.0, -0.5, 2.5, float("nan"), float("inf"), -float("inf")])
    | st.sampled_from(["", "a", "x y", "[", "{}"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from([0, 1, "a", "json", "regex"]), inner,
                                                               max_size=2),
    max_leaves=4)


@settings(max_examples=300, deadline=None)
@given(st.data())
@pytest.mark.parametrize("cls,required", [(SamplingParams, {}), (BeamSearchParams, {"beam_width": 2, "max_tokens": 4}),
                                          (PoolingParams, {})], ids=lambda x: getattr(x, "__name__", ""))
def test_any_value_of_any_field_constructs_or_raises_naming_one(cls, required, data):
    """Property: the params built with any value in any few fields, or a ValueError whose message starts with
    one of those fields' names (the older `guided_decoding` too); never another exception."""
    chosen = data.draw(st.lists(st.sampled_from([f.name for f in dataclasses.fields(cls)]), min_size=1, max_size=3,
                                unique=True))
    kwargs = {f: data.draw(ANY_VALUE, label=f) for f in chosen}
    try:
        cls(**required | kwargs)
    except ValueError as e:
        first = str(e).split()[0].split(".")[0].split("[")[0].split("=")[0].rstrip(":,")
        assert first in chosen, (kwargs, str(e))
