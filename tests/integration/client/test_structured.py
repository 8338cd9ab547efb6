"""`structured_outputs=` through GemmaClient, AsyncGemmaClient and the CLI against the real tritonserver.

The suite's server runs a tiny random Gemma 3, which follows a constraint but writes nothing sensible
inside it, so the constraints here are bounded (choices, enums, booleans, bounded integers, fixed-length
patterns): a random model still completes them within a few tokens.
"""
from __future__ import annotations

import asyncio
import json
import re

import pytest

from gemma_client import AsyncGemmaClient, GemmaClient, InvalidArgumentError
from gemma_client._wire import check_sampling

from .test_cli_args import run_cli

PROMPT = "Answer:"
GREEDY = dict(temperature=0.0, max_tokens=40)
CHOICES = ["yes", "no", "maybe"]
SCHEMA = {"type": "object",
          "properties": {"colour": {"enum": ["red", "green", "blue"]}, "bright": {"type": "boolean"},
                         "size": {"type": "integer", "minimum": 1, "maximum": 9},
                         "shape": {"type": "object", "properties": {"round": {"type": "boolean"}},
                                   "required": ["round"], "additionalProperties": False}},
          "required": ["colour", "bright", "size", "shape"], "additionalProperties": False}
REGEX = r"[0-9]{3}-[a-c]{2}"
GRAMMAR = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"\n'


@pytest.fixture(scope="module")
def client(server):
    return GemmaClient(server.grpc_url)


def valid(text: str) -> dict:
    jsonschema = pytest.importorskip("jsonschema")
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


def test_a_schema_object_is_sent_as_json_text():
    # Text does not count against the server's nesting limit for sampling_parameters.
    sampling = check_sampling({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}})
    assert sampling["structured_outputs"] == {"json": json.dumps(SCHEMA), "disable_any_whitespace": True}
    assert check_sampling({"structured_outputs": {"regex": "a+"}}) == {"structured_outputs": {"regex": "a+"}}
    with pytest.raises(InvalidArgumentError, match="structured_outputs"):
        check_sampling({"structured_outputs": ["regex"]})


def test_choice_gives_one_of_the_strings_and_stops(client):
    whole = client.generate(PROMPT, structured_outputs={"choice": CHOICES}, **GREEDY)
    assert whole.text in CHOICES and whole.finish_reason == "stop"
    streamed = list(client.stream(PROMPT, structured_outputs={"choice": CHOICES}, **GREEDY))
    assert "".join(d.text for d in streamed) == whole.text and streamed[-1].finish_reason == "stop"


def test_json_schema_output_validates(client):
    # Compact: with whitespace allowed between JSON tokens the random model writes tabs and newlines
    # until max_tokens (a real model can too; the gateway asks for compact JSON for that reason).
    constraint = {"json": SCHEMA, "disable_any_whitespace": True}
    whole = client.generate(PROMPT, structured_outputs=constraint, **GREEDY)
    assert whole.finish_reason == "stop", whole
    valid(whole.text)
    assert not re.search(r"\s", whole.text)
    as_text = client.generate(PROMPT, structured_outputs={**constraint, "json": json.dumps(SCHEMA)}, **GREEDY)
    assert as_text.text == whole.text
    streamed = list(client.stream(PROMPT, structured_outputs=constraint, **GREEDY))
    assert "".join(d.text for d in streamed) == whole.text and streamed[-1].finish_reason == "stop"


def test_regex_and_grammar_outputs_match(client):
    regex = client.generate(PROMPT, structured_outputs={"regex": REGEX}, **GREEDY)
    assert re.fullmatch(REGEX, regex.text) and regex.finish_reason == "stop"
    grammar = client.generate(PROMPT, structured_outputs={"grammar": GRAMMAR}, **GREEDY)
    assert grammar.text in ("The answer is yes.", "The answer is no.") and grammar.finish_reason == "stop"


def test_a_constraint_cut_by_max_tokens_ends_with_length(client):
    cut = client.generate(PROMPT, structured_outputs={"json_object": True}, temperature=0.0, max_tokens=2)
    assert cut.finish_reason == "length" and cut.text.startswith("{") and cut.num_output_tokens == 2


@pytest.mark.parametrize("constraint, field", [
    ({"regex": "(unclosed"}, "structured_outputs.regex"),
    ({"json": {"type": "no-such-type"}}, "structured_outputs.json"),
    ({"grammar": "start: undefined_rule"}, "structured_outputs.grammar"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
    ({"choice": []}, "structured_outputs.choice"),
])
def test_an_invalid_constraint_is_an_invalid_argument_naming_its_field(client, constraint, field):
    with pytest.raises(InvalidArgumentError) as info:
        client.generate(PROMPT, structured_outputs=constraint, **GREEDY)
    assert f"'{field}" in info.value.message or field in info.value.message, info.value.message
    with pytest.raises(InvalidArgumentError):
        list(client.stream(PROMPT, structured_outputs=constraint, **GREEDY))


def test_async_client_streams_constrained_output(server):
    async def main():
        async with AsyncGemmaClient(server.grpc_url) as aclient:
            outputs = await asyncio.gather(
                aclient.generate(PROMPT, structured_outputs={"choice": CHOICES}, **GREEDY),
                aclient.generate(PROMPT, structured_outputs={"json": SCHEMA, "disable_any_whitespace": True},
                                 **GREEDY))
            deltas = [d async for d in aclient.stream(PROMPT, structured_outputs={"regex": REGEX}, **GREEDY)]
            return outputs, deltas

    (choice, schema), deltas = asyncio.run(main())
    assert choice.text in CHOICES
    valid(schema.text)
    assert re.fullmatch(REGEX, "".join(d.text for d in deltas)) and deltas[-1].finish_reason == "stop"


# --- CLI ----------------------------------------------------------------------------------------------

def cli(server, *args: str):
    return run_cli("--url", server.grpc_url, "generate", PROMPT, "--temperature", "0", "--max-tokens", "40",
                   "--show-stats", *args)


def test_cli_options_constrain_the_output(server, client, tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    grammar_file = tmp_path / "answer.lark"
    grammar_file.write_text(GRAMMAR)

    choice = cli(server, "--choice", "yes", "--choice", "no", "--choice", "maybe")
    assert choice.returncode == 0, choice.stderr
    assert choice.stdout == client.generate(PROMPT, structured_outputs={"choice": CHOICES}, **GREEDY).text + "\n"
    assert "finish_reason=stop" in choice.stderr

    schema = cli(server, "--json-schema", str(schema_file), "--disable-any-whitespace", "--no-stream")
    assert schema.returncode == 0, schema.stderr
    assert schema.stdout == client.generate(PROMPT, structured_outputs={"json": SCHEMA, "disable_any_whitespace": True},
                                            **GREEDY).text + "\n"
    valid(schema.stdout)
    inline = cli(server, "--json-schema", json.dumps(SCHEMA), "--disable-any-whitespace")
    assert inline.stdout == schema.stdout

    regex = cli(server, "--regex", REGEX)
    assert regex.returncode == 0 and re.fullmatch(REGEX, regex.stdout.rstrip("\n"))
    grammar = cli(server, "--grammar", str(grammar_file))
    assert grammar.stdout in ("The answer is yes.\n", "The answer is no.\n")
    json_object = run_cli("--url", server.grpc_url, "generate", PROMPT, "--json-object", "--max-tokens", "2",
                          "--show-stats")
    # Two tokens of the tiny random model: an object cut short, or one it closed ("{}"), which is complete.
    assert json_object.returncode == 0 and json_object.stdout.startswith("{"), json_object.stderr
    if "finish_reason=stop" in json_object.stderr:
        assert isinstance(json.loads(json_object.stdout), dict)
    else:
        assert "finish_reason=length" in json_object.stderr


@pytest.mark.parametrize("args", [
    ("--regex", "a", "--choice", "a"),                 # two constraints
    ("--json-schema", "/no/such/file.json"),
    ("--json-schema", "{not json"),
    ("--grammar", "/no/such/file.lark"),
    ("--disable-any-whitespace",),                     # with no JSON constraint
])
def test_cli_refuses_bad_constraint_options_with_exit_2(args):
    result = run_cli("generate", "hi", *args)
    assert result.returncode == 2 and "usage" in result.stderr, result.stderr


def test_cli_reports_an_invalid_regex_as_invalid_argument(server):
    result = cli(server, "--regex", "(unclosed")
    assert result.returncode == InvalidArgumentError.exit_code
    assert result.stderr.startswith("gemma-client: InvalidArgumentError:") and "structured_outputs.regex" in result.stderr
