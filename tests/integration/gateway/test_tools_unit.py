"""The gateway's tool calling and response_format without a server: the constraints each tool_choice
asks for, the prompt format, the parsers (streamed in any chunking, they read what the whole text
reads) and the OpenAI shapes the responses take."""
from __future__ import annotations

import json

import pytest
from gemma_client import Delta

from gateway.errors import APIError
from gateway.prompts import chat_prompt
from gateway.responses import ChatFormat
from gateway.schemas import ChatCompletionRequest, ChatMessage, ResponseFormat
from gateway.structured import JSON_LAYOUT, one_constraint, response_format_constraint
from gateway.tools import (CALL_FENCE, ArrayParser, AutoParser, CallArguments, CallStart, Content, NamedParser,
                           parse_calls, tool_plan)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time"}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "gemma", "messages": USER, "tools": TOOLS, **fields})


def run(parser, chunks) -> list:
    pieces = []
    for chunk in chunks:
        pieces += parser.feed(chunk)
    return pieces + parser.end()


def calls_and_content(pieces) -> tuple[list[tuple[str, str]], str]:
    calls: list[list[str]] = []
    for piece in pieces:
        if isinstance(piece, CallStart):
            assert piece.index == len(calls)
            calls.append([piece.name, ""])
        elif isinstance(piece, CallArguments):
            calls[piece.index][1] += piece.text
    return [tuple(c) for c in calls], "".join(p.text for p in pieces if isinstance(p, Content))


def chunkings(text: str):
    yield [text]
    yield list(text)
    yield [text[i:i + 5] for i in range(0, len(text), 5)]


# --- Constraints ------------------------------------------------------------------------------------

def laid_out(schema: dict) -> dict:
    return {**schema, "x-guidance": JSON_LAYOUT}


def test_response_format_constraints():
    assert response_format_constraint(None) is None
    assert response_format_constraint(ResponseFormat(type="text")) is None
    assert response_format_constraint(ResponseFormat(type="json_object")) == \
        {"json": json.dumps(laid_out({"type": "object"}))}
    for strict in (True, False, None):
        schema = ResponseFormat.model_validate({"type": "json_schema",
                                                "json_schema": {"name": "w", "schema": WEATHER, "strict": strict}})
        assert response_format_constraint(schema) == {"json": json.dumps(laid_out(WEATHER)),
                                                      "disable_additional_properties": True}
    own = {**WEATHER, "x-guidance": {"whitespace_flexible": True}}  # a schema's own layout is kept
    assert json.loads(response_format_constraint(ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "w", "schema": own}}))["json"]) == own


def test_one_constraint_per_request():
    assert one_constraint(a=None, b=None) == (None, None)
    assert one_constraint(a=None, b={"regex": "x"}) == ({"regex": "x"}, "b")
    with pytest.raises(APIError) as info:
        one_constraint(a={"regex": "x"}, b=None, c={"choice": ["y"]})
    assert info.value.param == "a" and info.value.status == 400


def test_required_is_a_non_empty_array_of_calls_one_schema_per_tool():
    constraint = tool_plan(request(tool_choice="required")).constraint()
    schema = json.loads(constraint["json"])
    assert constraint["disable_additional_properties"] and schema["x-guidance"] == JSON_LAYOUT
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    weather, time = schema["items"]["anyOf"]
    assert weather["properties"] == {"name": {"type": "string", "enum": ["get_weather"]}, "parameters": WEATHER}
    assert time["properties"]["parameters"] == {"type": "object", "properties": {}}  # no parameters given
    assert weather["required"] == ["name", "parameters"] and weather["additionalProperties"] is False
    single = json.loads(tool_plan(request(tool_choice="required", parallel_tool_calls=False)).constraint()["json"])
    assert single["maxItems"] == 1


def test_named_choice_is_constrained_to_its_parameters():
    plan = tool_plan(request(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert plan.mode == "named" and plan.names == ("get_weather",)
    assert json.loads(plan.constraint()["json"]) == laid_out(WEATHER)
    assert "get_weather" in plan.instructions() and "get_time" not in plan.instructions()


def test_auto_is_the_default_and_unconstrained_and_none_ignores_the_tools():
    plan = tool_plan(request())
    assert plan.mode == "auto" and plan.constraint() is None
    assert CALL_FENCE in plan.instructions() and '"name": "get_time"' in plan.instructions()
    assert tool_plan(request(tool_choice="none")) is None


# --- Prompt -----------------------------------------------------------------------------------------

def test_a_tool_round_trip_renders_as_gemma_turns():
    messages = [ChatMessage.model_validate(m) for m in [
        {"role": "system", "content": "Be brief."},
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
    ]]
    prompt = chat_prompt(messages, tool_plan(request()).instructions())
    assert prompt.startswith("<start_of_turn>user\nBe brief.\n\nYou can call these functions")
    assert prompt.endswith(
        "Weather in Paris?<end_of_turn>\n"
        "<start_of_turn>model\n```tool_call\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '{"name": "get_time", "arguments": {}}\n```<end_of_turn>\n'
        "<start_of_turn>user\n```tool_result get_weather\n18 C, sunny\n```\n\n"
        "```tool_result get_time\nnoon\n```<end_of_turn>\n"
        "<start_of_turn>model\n")


def test_a_tool_message_must_answer_an_earlier_call():
    messages = [ChatMessage.model_validate(m) for m in
                [*USER, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]]
    with pytest.raises(APIError) as info:
        chat_prompt(messages)
    assert info.value.param == "messages[1].tool_call_id"


# --- Parsers ----------------------------------------------------------------------------------------

def test_array_parser_reads_each_call_in_any_chunking():
    text = ('[{"name":"get_weather","parameters":{"city":"Pa\\"ris","n":[1,{"x":"}"}]}},'
            '{"name":"get_time","parameters":{}}]')
    for chunks in chunkings(text):
        parser = ArrayParser()
        calls, content = calls_and_content(run(parser, chunks))
        assert calls == [("get_weather", '{"city":"Pa\\"ris","n":[1,{"x":"}"}]}'), ("get_time", "{}")]
        assert content == "" and parser.calls == 2


def test_array_parser_starts_a_call_only_once_its_name_has_come():
    parser = ArrayParser()
    assert parser.feed('[{"parameters":{"city":"Paris"},') == []
    assert parser.feed('"name":"get_weather"}]') == [CallStart(0, "get_weather"),
                                                       CallArguments(0, '{"city":"Paris"}')]


def test_array_parser_streams_arguments_as_they_come():
    parser = ArrayParser()
    assert parser.feed('[{"name":"get_weather","parameters":{"ci') == [CallStart(0, "get_weather"),
                                                                       CallArguments(0, '{"ci')]
    assert parser.feed('ty":"Paris"}}') == [CallArguments(0, 'ty":"Paris"}')]


def test_named_parser_streams_the_whole_output_as_arguments():
    parser = NamedParser("get_weather")
    assert run(parser, ['{"city"', ':"Paris"}']) == [CallStart(0, "get_weather"), CallArguments(0, '{"city"'),
                                                     CallArguments(0, ':"Paris"}')]


@pytest.mark.parametrize("text", ["The weather is fine.", "Use ``` fences ```python\nx\n``` freely", "``", "",
                                  "```tool_call\nnot json\n```", 'Hm ```tool_call\n{"name": "unknown", "arguments": {}}'])
def test_auto_parser_leaves_plain_text_as_content(text):
    for chunks in chunkings(text):
        parser = AutoParser(["get_weather"], parallel=True)
        assert calls_and_content(run(parser, chunks)) == ([], text) and parser.calls == 0


@pytest.mark.parametrize("block, calls", [
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', [("get_weather", '{"city": "Paris"}')]),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", '{"city": "Paris"}')]),
    ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', [("get_weather", '{"city": "Paris"}')]),
    ('{"name": "get_time", "arguments": {}}\n{"name": "get_weather", "arguments": {"city": "Rome"}}',
     [("get_time", "{}"), ("get_weather", '{"city": "Rome"}')]),
    ('[{"name": "get_time"}, {"name": "get_time", "arguments": {}}]', [("get_time", "{}"), ("get_time", "{}")]),
])
def test_auto_parser_reads_a_call_block(block, calls):
    text = f"\n{CALL_FENCE}\n{block}\n```\n"
    for chunks in chunkings(text):
        parser = AutoParser(["get_weather", "get_time"], parallel=True)
        assert calls_and_content(run(parser, chunks)) == (calls, "")


def test_auto_parser_sends_text_before_the_block_as_content_and_keeps_one_call_without_parallel():
    text = (f'Let me check.\n{CALL_FENCE}\n{{"name": "get_time", "arguments": {{}}}}\n'
            f'{{"name": "get_time", "arguments": {{}}}}')  # no closing fence: the output ended in the block
    parser = AutoParser(["get_time"], parallel=False)
    assert parser.feed(text[:16]) == [Content("Let me check.\n")]  # "``" held: it could begin the fence
    assert calls_and_content(parser.feed(text[16:]) + parser.end()) == ([("get_time", "{}")], "")
    assert parse_calls(text, {"get_time"}) == [("get_time", "{}"), ("get_time", "{}")]


# --- Responses --------------------------------------------------------------------------------------

def test_a_whole_tool_call_response_has_openai_shape():
    fmt = ChatFormat("gemma", tool_plan(request(tool_choice="required")))
    choice = fmt.choice(0, Delta('[{"name":"get_weather","parameters":{"city":"Paris"}}]', finish_reason="stop"))
    (call,) = choice["message"].pop("tool_calls")
    assert choice["message"] == {"role": "assistant", "content": None} and choice["finish_reason"] == "tool_calls"
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    cut = fmt.choice(0, Delta('[{"name":"get_weather","parameters":{"ci', finish_reason="length"))
    assert cut["finish_reason"] == "length" and cut["message"]["tool_calls"][0]["function"]["arguments"] == '{"ci'


def test_auto_without_a_call_is_content():
    fmt = ChatFormat("gemma", tool_plan(request()))
    choice = fmt.choice(0, Delta("It is sunny.", finish_reason="stop"))
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."}
    assert choice["finish_reason"] == "stop"


def test_streamed_tool_calls_have_openai_chunks():
    fmt = ChatFormat("gemma", tool_plan(request(tool_choice="required")))
    assert fmt.opening_choices(1) == [{"index": 0, "delta": {"role": "assistant", "content": None},
                                       "logprobs": None, "finish_reason": None}]
    chunks = fmt.chunk_choices(0, Delta('[{"name":"get_weather","parameters":{"ci'))
    chunks += fmt.chunk_choices(0, Delta('ty":"Paris"}}]', finish_reason="stop"))
    deltas = [c["delta"] for c in chunks]
    call_id = deltas[0]["tool_calls"][0]["id"]
    assert deltas == [
        {"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Paris"}'}}]},
        {}]
    assert [c["finish_reason"] for c in chunks] == [None, None, None, "tool_calls"]
