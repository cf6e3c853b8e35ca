"""Tool-call and reasoning parsers on literal strings in each model's own format, and the grammar a
tool_choice forces."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.entrypoints.protocol import APIError, ChatCompletionRequest, Limits, parse
from jaxllm.entrypoints.reasoning_parsers import get_reasoning_parser
from jaxllm.entrypoints.tool_parsers import get_tool_parser

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def parse_tools(fields: dict):
    """The tool request a chat body with these tool fields makes, through the body's schema and checks."""
    body = {"messages": [{"role": "user", "content": "Hi"}], **fields}
    return parse(ChatCompletionRequest, body, Limits(vocab_size=1000, max_model_len=64, max_logprobs=20)).tool_request


def calls(parsed):
    content, found = parsed
    return content, [(c.name, json.loads(c.arguments)) for c in found]


def test_hermes():
    p = get_tool_parser("hermes")
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert calls(p.parse(text)) == ("Let me check.", [("get_weather", {"city": "Paris"}), ("get_time", {})])
    assert calls(p.parse('<tool_call>{"name": "f", "arguments": {"x": 1}}')) == (None, [("f", {"x": 1})])
    assert p.parse("no call here") == ("no call here", [])
    assert p.parse("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])


def test_llama3_json():
    p = get_tool_parser("llama3_json")
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'
    assert calls(p.parse(text)) == (None, [("get_weather", {"city": "Paris"}), ("get_time", {})])
    assert calls(p.parse('{"name": "f", "arguments": {"a": [1, 2]}}')) == (None, [("f", {"a": [1, 2]})])
    assert p.parse("The weather is nice.") == ("The weather is nice.", [])
    assert p.parse('{"not_a_call": 1}') == ('{"not_a_call": 1}', [])


def test_mistral():
    p = get_tool_parser("mistral")
    text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'
    assert calls(p.parse(text)) == (None, [("get_weather", {"city": "Paris"}), ("get_time", {})])
    assert p.parse("Bonjour") == ("Bonjour", [])
    with pytest.raises(ValueError, match="tool-call-parser"):
        get_tool_parser("pythonic_v9")


def test_reasoning_parsers():
    qwen3, r1 = get_reasoning_parser("qwen3"), get_reasoning_parser("deepseek_r1")
    assert qwen3.parse("<think>\nadd them\n</think>\n\n4") == ("\nadd them\n", "4")
    assert qwen3.parse("just 4") == (None, "just 4")
    assert r1.parse("add them</think>4") == ("add them", "4")
    assert r1.parse("<think>add them</think>4") == ("add them", "4")
    assert r1.parse("still thinking") == ("still thinking", None)


@settings(max_examples=30, deadline=None)
@given(st.text("ab<>/think\n ", max_size=30), st.text("ab<>/thinkc ", max_size=20), st.data())
def test_streamed_reasoning_adds_up_to_the_whole(reasoning, content, data):
    """Deltas cut at any points give the same reasoning and content as the finished text."""
    parser = get_reasoning_parser(data.draw(st.sampled_from(["qwen3", "deepseek_r1"])))
    text = f"<think>{reasoning}</think>{content}"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    sent_r, sent_c = "", ""
    for i, cut in enumerate(cuts + [len(text)]):
        r, c = parser.split_stream(text[:cut], finished=i == len(cuts))
        assert r.startswith(sent_r) and c.startswith(sent_c)  # deltas only ever add
        sent_r, sent_c = r, c
    r, c = parser.parse(text)
    assert (sent_r, sent_c) == (r or "", c or "")


def test_tool_choice_grammars():
    import jsonschema

    named = parse_tools({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert named.structured_outputs().json == WEATHER["function"]["parameters"]
    required = parse_tools({"tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": False})
    schema = required.structured_outputs().json
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Paris"}}], schema)
    for bad in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "get_time", "parameters": {}}] * 2,
                [{"name": "nope", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert parse_tools({"tools": [WEATHER]}).choice == "auto"
    assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}).structured_outputs() is None
    for body, param in (({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice"),
                        ({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
                        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
                        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
                        ({"tools": [{**WEATHER, "function": {**WEATHER["function"], "descriptionn": "typo"}}]},
                         "tools"),
                        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather",
                                                                                              "x": 1}}},
                         "tool_choice"),
                        ({"tools": [{**TIME, "function": {"name": ""}}]}, "tools"),
                        ({"tools": [WEATHER], "functions": [{"name": "f"}]}, "functions")):
        with pytest.raises(APIError) as e:
            parse_tools(body)
        assert e.value.param == param


def test_auto_tool_choice_and_reasoning_in_a_chat_message():
    """What the chat endpoint makes of a finished text with --tool-call-parser hermes and
    --reasoning-parser qwen3, whole and streamed (the stream's deltas add up to the whole message)."""

    from jaxllm.entrypoints.protocol import ChatCompletionRequest
    from jaxllm.entrypoints.serving import OpenAIServing

    serving = OpenAIServing.__new__(OpenAIServing)
    serving.tool_parser, serving.reasoning_parser = get_tool_parser("hermes"), get_reasoning_parser("qwen3")
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Paris?"}],
                                                "tools": [WEATHER, TIME]})
    text = '<think>Paris needs a call.</think>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    message, finish = serving._chat_message(req, text, "stop")
    assert finish == "tool_calls" and message["reasoning_content"] == "Paris needs a call."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Paris"})]
    assert _streamed(serving, req, text) == _whole(message)
    # Plain content with no call: finish_reason stays.
    message, finish = serving._chat_message(req, "It is sunny.", "stop")
    assert finish == "stop" and message["content"] == "It is sunny." and "tool_calls" not in message


def _streamed(serving, req, text: str, step: int = 3) -> dict:
    """What a client assembles from the chat stream's deltas of `text` arriving `step` characters at a time:
    reasoning, content, and each call's name and arguments by index."""
    from types import SimpleNamespace

    got, calls, sent = {"reasoning_content": "", "content": ""}, {}, ""
    for end in [*range(step, len(text), step), len(text)]:
        done = end == len(text)
        deltas, sent = serving._stream_deltas(req, SimpleNamespace(text=text[:end], finish_reason="stop" if done
                                                                   else None), sent)
        for delta in deltas:
            for key in ("reasoning_content", "content"):
                got[key] += delta.get(key, "")
            for call in delta.get("tool_calls", []):
                c = calls.setdefault(call["index"], {"name": "", "arguments": ""})
                c["name"] += call.get("function", {}).get("name", "")
                c["arguments"] += call.get("function", {}).get("arguments", "")
    return {**{k: v.strip() or None for k, v in got.items()},
            "calls": [dict(name=calls[i]["name"], arguments=json.loads(calls[i]["arguments"])) for i in sorted(calls)]}


def _whole(message: dict) -> dict:
    return {"reasoning_content": message.get("reasoning_content"), "content": (message["content"] or "").strip() or None,
            "calls": [dict(name=c["function"]["name"], arguments=json.loads(c["function"]["arguments"]))
                      for c in message.get("tool_calls", [])]}


@pytest.mark.parametrize("text", [
    "It is sunny in Paris.",
    "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
    '<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>',
    "Is 1 < 2? Yes, and <tool is not a tag.",
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}',  # cut short: the call counts at the end
    '<tool_call>{"arguments": {"tz": "UTC"}, "name": "get_time"}</tool_call>',  # name last: the call goes whole
    '<tool_call>\n{"name":"get_weather","arguments":{"city":"Lima","unit":"c"}}\n</tool_call>',  # compact JSON
])
@pytest.mark.parametrize("step", [1, 7])
def test_hermes_stream_adds_up_to_the_whole_message(text, step):
    """--tool-call-parser hermes with tool_choice "auto": the content streams as it comes, each call's name
    once known and its arguments piece by piece, and what a client assembles equals the non-streamed
    message."""
    from jaxllm.entrypoints.protocol import ChatCompletionRequest
    from jaxllm.entrypoints.serving import OpenAIServing

    serving = OpenAIServing.__new__(OpenAIServing)
    serving.tool_parser, serving.reasoning_parser = get_tool_parser("hermes"), None
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Paris?"}],
                                                "tools": [WEATHER, TIME]})
    message, _ = serving._chat_message(req, text, "stop")
    assert _streamed(serving, req, text, step) == _whole(message)
    if "Let me check" in text:  # the content went out before the call was complete, the arguments in pieces
        from types import SimpleNamespace

        deltas, _ = serving._stream_deltas(req, SimpleNamespace(text=text[:30], finish_reason=None), "")
        assert deltas == [{"content": "Let me check."}]
        cut = text.index("Par")
        deltas, sent = serving._stream_deltas(req, SimpleNamespace(text=text[:cut], finish_reason=None), "")
        (call,) = deltas[-1]["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "'}
        deltas, _ = serving._stream_deltas(req, SimpleNamespace(text=text[:cut + 5], finish_reason=None), sent)
        assert deltas == [{"tool_calls": [{"index": 0, "function": {"arguments": 'Paris'}}]}]
