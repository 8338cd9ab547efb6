"""response_format and tools through the gateway, with the official `openai` SDK and raw HTTP.

The suite's server runs a tiny random Gemma 3: it follows a constraint but writes nothing sensible, so
the schemas and tool parameters here are bounded (enums, booleans, bounded integers) and a random
model completes them in a few tokens. What needs a model that answers sensibly (free strings, the
auto format's tool calls) is in test_structured_real_model.py, against the packaged 270M.
"""
from __future__ import annotations

import json
from typing import Literal

import pytest

from tests.support.server import MODEL

from .test_errors import error_of

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")  # the client image has neither (the gateway's tests skip there)
BaseModel, Field = pydantic.BaseModel, pydantic.Field
jsonschema = pytest.importorskip("jsonschema")

GREEDY = dict(temperature=0.0, max_tokens=48)
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_PARAMETERS = {"type": "object",
                      "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                     "unit": {"enum": ["C", "F"]}},
                      "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                            "parameters": WEATHER_PARAMETERS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                         "parameters": {"type": "object", "properties": {},
                                                        "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME["function"]["parameters"]}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


class Colour(BaseModel):
    name: Literal["red", "green", "blue"]
    bright: bool
    shade: int = Field(ge=1, le=9)


def check_call(call) -> dict:
    """A tool call in OpenAI's shape whose arguments validate against its function's parameters."""
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMETERS[call.function.name])
    return arguments


def streamed_calls(chunks) -> tuple[list[dict], str, str]:
    """Tool calls put together from stream chunks as the SDK's users do: (calls, content, finish_reason)."""
    calls: dict[int, dict] = {}
    content, finish_reason = "", None
    for chunk in chunks:
        (choice,) = chunk.choices
        content += choice.delta.content or ""
        for piece in choice.delta.tool_calls or ():
            if piece.index not in calls:  # a call's first chunk: id, type, name, empty arguments
                assert piece.id.startswith("call_") and piece.type == "function" and piece.function.arguments == ""
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            else:
                assert piece.id is None and piece.function.name is None
                calls[piece.index]["arguments"] += piece.function.arguments
        finish_reason = choice.finish_reason or finish_reason
    return [calls[i] for i in sorted(calls)], content, finish_reason


# --- response_format ----------------------------------------------------------------------------------

def test_parse_with_a_pydantic_model_returns_the_object(sdk):
    completion = sdk.chat.completions.parse(model=MODEL, messages=USER, response_format=Colour, **GREEDY)
    (choice,) = completion.choices
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Colour)
    assert Colour.model_validate_json(choice.message.content) == choice.message.parsed
    assert json.dumps(json.loads(choice.message.content)) == choice.message.content  # one line, ": " and ", "


def test_streamed_parse_gives_the_same_object(sdk):
    whole = sdk.chat.completions.parse(model=MODEL, messages=USER, response_format=Colour, **GREEDY)
    with sdk.chat.completions.stream(model=MODEL, messages=USER, response_format=Colour, **GREEDY) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == whole.choices[0].message.parsed


def test_json_schema_on_completions_and_text_format(sdk):
    schema = {"type": "json_schema", "json_schema": {"name": "colour", "schema": Colour.model_json_schema(),
                                                     "strict": True}}
    completion = sdk.completions.create(model=MODEL, prompt="Colour:", extra_body={"response_format": schema}, **GREEDY)
    Colour.model_validate_json(completion.choices[0].text)
    assert completion.choices[0].finish_reason == "stop"
    plain = sdk.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0.0)
    text = sdk.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0.0,
                                       response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content


def test_json_object_cut_by_max_tokens_ends_with_length(sdk):
    cut = sdk.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0.0,
                                      response_format={"type": "json_object"})
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content.startswith("{")


def lit(text: str) -> str:
    """`text` as a regular expression that matches only it."""
    return "".join("\\n" if c == "\n" else "\\" + c if c in ".^$*+?()[]{}|\\" else c for c in text)


def test_vllm_structured_outputs_extension(sdk, http):
    chat = sdk.chat.completions.create(model=MODEL, messages=USER, extra_body={"structured_outputs": {"regex": "[0-9]{4}"}},
                                       **GREEDY)
    assert len(chat.choices[0].message.content) == 4 and chat.choices[0].message.content.isdigit()
    completion = sdk.completions.create(model=MODEL, prompt="Pick:", extra_body={"structured_outputs": {"choice": ["a", "b"]}},
                                        **GREEDY)
    assert completion.choices[0].text in ("a", "b") and completion.choices[0].finish_reason == "stop"
    error = error_of(http.post("/v1/chat/completions", json={**CHAT, "structured_outputs": {"regex": "(unclosed"}}), 400)
    assert error["param"] == "structured_outputs" and "structured_outputs.regex" in error["message"]


# --- tools ----------------------------------------------------------------------------------------------

def test_required_returns_tool_calls(sdk):
    completion = sdk.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, **GREEDY)
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.role == "assistant"
    (call,) = choice.message.tool_calls  # parallel_tool_calls false: one call
    check_call(call)


def test_required_streamed_equals_whole(sdk):
    request = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, **GREEDY)
    whole = sdk.chat.completions.create(**request).choices[0].message.tool_calls
    calls, content, finish_reason = streamed_calls(sdk.chat.completions.create(stream=True, **request))
    assert (content, finish_reason) == ("", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.function.name, c.function.arguments) for c in whole]


def test_named_function_is_called_streamed_and_not(sdk):
    request = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice=NAMED, **GREEDY)
    (choice,) = sdk.chat.completions.create(**request).choices
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and choice.finish_reason == "tool_calls"
    check_call(call)
    chunks = list(sdk.chat.completions.create(stream=True, **request))
    calls, content, finish_reason = streamed_calls(chunks)
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]
    assert (content, finish_reason) == ("", "tool_calls")
    fragments = [c for c in chunks if c.choices[0].delta.tool_calls]
    assert len(fragments) > 2  # the arguments arrive as they are generated, not in one piece
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].delta.tool_calls is None


def test_tool_choice_none_ignores_the_tools(sdk):
    plain = sdk.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0.0)
    none = sdk.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="none",
                                       max_tokens=8, temperature=0.0)
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.choices[0].message.tool_calls is None


def test_auto_answers_text_or_whole_calls(sdk):
    # The random model writes no ```tool_call block: the answer is content (the parser is unit-tested
    # in test_tools_unit.py; a real call in test_structured_real_model.py).
    (choice,) = sdk.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=8,
                                            temperature=0.0).choices
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            check_call(call)
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


# The auto format's answer, forced with a regex (the random model would not write it): text, then a call.
AUTO_ANSWER = lit('Let me check.\n```tool_call\n{"name": "get_weather", "arguments": {"city": "') + "(Paris|Rome)" \
    + lit('", "unit": "C"}}\n```')


def test_auto_parses_a_tool_call_block(sdk):
    request = dict(model=MODEL, messages=USER, tools=TOOLS, extra_body={"structured_outputs": {"regex": AUTO_ANSWER}},
                   **GREEDY)
    (choice,) = sdk.chat.completions.create(**request).choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check.\n"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and check_call(call)["unit"] == "C"
    calls, content, finish_reason = streamed_calls(sdk.chat.completions.create(stream=True, **request))
    assert (content, finish_reason) == ("Let me check.\n", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]


def test_auto_leaves_a_malformed_block_as_content(sdk):
    text = '```tool_call\n{"name": "no_such_tool", "arguments": {}}\n```'
    (choice,) = sdk.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, **GREEDY,
                                            extra_body={"structured_outputs": {"regex": lit(text)}}).choices
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (text, None, "stop")


def test_a_tool_round_trip(sdk):
    first = sdk.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=NAMED, **GREEDY)
    message = first.choices[0].message
    (call,) = message.tool_calls
    conversation = [*USER, message, {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    answer = sdk.chat.completions.create(model=MODEL, messages=conversation, tools=TOOLS, max_tokens=8,
                                         temperature=0.0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    again = sdk.chat.completions.create(model=MODEL, messages=conversation, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, **GREEDY)
    check_call(again.choices[0].message.tool_calls[0])


def test_each_choice_has_its_own_calls(sdk):
    completion = sdk.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=NAMED, n=2,
                                             seed=1, max_tokens=48, temperature=1.0)
    ids = [choice.message.tool_calls[0].id for choice in completion.choices]
    assert len(set(ids)) == 2
    for choice in completion.choices:
        check_call(choice.message.tool_calls[0])


# --- bad input ------------------------------------------------------------------------------------------

CHAT = dict(model=MODEL, messages=USER, max_tokens=4)
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
BAD_REQUESTS = [
    pytest.param("chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                 "tool_choice", id="unknown-tool-name"),
    pytest.param("chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice", id="tool_choice-without-tools"),
    pytest.param("chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice",
                 id="unknown-tool_choice"),
    pytest.param("chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice",
                 id="named-choice-without-function"),
    pytest.param("chat/completions", {**CHAT, "tools": []}, "tools", id="empty-tools"),
    pytest.param("chat/completions", {**CHAT, "tools": [WEATHER, WEATHER]}, "tools", id="repeated-tool"),
    pytest.param("chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]},
                 "tools[0].function.name", id="bad-function-name"),
    pytest.param("chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
                 "tools[0].function.parameters", id="parameters-not-an-object"),
    pytest.param("chat/completions", {**CHAT, "response_format": {"type": "json_schema"}},
                 "response_format.json_schema", id="json_schema-missing"),
    pytest.param("chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format.type",
                 id="unknown-format"),
    pytest.param("chat/completions", {**CHAT, "response_format": SCHEMA_FORMAT, "tools": TOOLS, "tool_choice": "required"},
                 "response_format", id="format-and-required-tools"),
    pytest.param("chat/completions", {**CHAT, "response_format": SCHEMA_FORMAT, "structured_outputs": {"regex": "a"}},
                 "structured_outputs", id="two-constraints"),
    pytest.param("chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": NAMED, "structured_outputs": {"regex": "a"}},
                 "structured_outputs", id="structured_outputs-and-named-tool"),
    pytest.param("completions", {"model": MODEL, "prompt": "x", "structured_outputs": "regex"}, "structured_outputs",
                 id="structured_outputs-not-an-object"),
    pytest.param("chat/completions", {**CHAT, "messages": [*USER, {"role": "assistant", "tool_calls": []}, *USER]},
                 "messages[1].tool_calls", id="empty-tool_calls"),
    pytest.param("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]},
                 "messages[0].tool_call_id", id="user-with-tool_call_id"),
    pytest.param("chat/completions", {**CHAT, "messages": [*USER, {"role": "assistant"}, *USER]},
                 "messages[1].content", id="assistant-without-content-or-calls"),
    # Refused by the engine (the grammar library's verdict), named as the request field that held it.
    pytest.param("chat/completions",
                 {**CHAT, "response_format": {"type": "json_schema",
                                              "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
                 "response_format", id="malformed-schema"),
    pytest.param("completions",
                 {"model": MODEL, "prompt": "x", "response_format": {"type": "json_schema",
                                                                     "json_schema": {"name": "x", "schema": {"minimum": "low"}}}},
                 "response_format", id="malformed-schema-completions"),
    pytest.param("chat/completions",
                 {**CHAT, "tool_choice": "required",
                  "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]},
                 "tools", id="malformed-parameters-required"),
    pytest.param("chat/completions",
                 {**CHAT, "tool_choice": {"type": "function", "function": {"name": "f"}},
                  "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]},
                 "tools", id="malformed-parameters-named"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint, body, param", BAD_REQUESTS)
def test_bad_input_is_400_naming_the_field(http, endpoint, body, param, stream):
    error = error_of(http.post(f"/v1/{endpoint}", json={**body, "stream": stream}), 400)
    assert (error["param"], error["code"]) == (param, "invalid_value"), error


def test_sdk_raises_bad_request_for_an_unknown_tool(sdk):
    with pytest.raises(openai.BadRequestError, match="no function named 'nope'"):
        sdk.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS,
                                    tool_choice={"type": "function", "function": {"name": "nope"}})
