"""Structured outputs and forced tool calls with the packaged Gemma 3 270M behind the gateway: free
strings inside a schema, several calls in one answer. (A base model: it does not follow the auto
format's instructions, so the auto parser is tested with a forced answer in test_structured.py.)"""
from __future__ import annotations

import json

import pytest

from tests.support.gateway import start_gateway
from tests.support.server import MODEL

openai = pytest.importorskip("openai")
BaseModel = pytest.importorskip("pydantic").BaseModel  # not in the client image: skipped there
jsonschema = pytest.importorskip("jsonschema")

pytestmark = pytest.mark.slow

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                            "parameters": CITY}}


class Capital(BaseModel):
    name: str
    country: str


@pytest.fixture(scope="module")
def real_sdk(default_server, tmp_path_factory):
    gateway = start_gateway(default_server.grpc_url, tmp_path_factory.mktemp("gateway-270m") / "gateway.log")
    try:
        with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
            yield client
    finally:
        gateway.stop()


def test_parse_fills_free_strings(real_sdk):
    completion = real_sdk.chat.completions.parse(
        model=MODEL, response_format=Capital, max_tokens=32, temperature=0.0,
        messages=[{"role": "user", "content": "Paris is the capital of France. Give the city and its country as JSON."}])
    (choice,) = completion.choices
    assert choice.finish_reason == "stop" and choice.message.parsed.name and choice.message.parsed.country


def test_required_calls_for_each_city(real_sdk):
    (choice,) = real_sdk.chat.completions.create(
        model=MODEL, tools=[WEATHER], tool_choice="required", max_tokens=48, temperature=0.0,
        messages=[{"role": "user", "content": "What is the weather in Paris and in Rome?"}]).choices
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), CITY)
