"""The wire format, read as raw HTTP: SSE framing and chunk fields exactly as OpenAI sends them."""
from __future__ import annotations

import json

from tests.support.gateway import GREEDY
from tests.support.server import MODEL

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Hello!"}]


def events(response) -> list[str]:
    """The `data:` payloads of an event stream, checking its framing on the way."""
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.read().decode()
    assert body.endswith("\n\n")
    blocks = body[:-2].split("\n\n")
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks), body
    return [block[len("data: "):] for block in blocks]


def chunks_of(payloads: list[str]) -> list[dict]:
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


def check_heads(chunks: list[dict], obj: str, id_prefix: str) -> None:
    """One id, `created` and model for the whole stream."""
    first = chunks[0]
    assert first["id"].startswith(id_prefix) and isinstance(first["created"], int)
    for chunk in chunks:
        assert (chunk["id"], chunk["object"], chunk["created"], chunk["model"]) == \
            (first["id"], obj, first["created"], MODEL)


def test_completion_stream_framing(http):
    with http.stream("POST", "/v1/completions", json=dict(model=MODEL, prompt=PROMPT, max_tokens=10,
                                                          stream=True, **GREEDY)) as response:
        chunks = chunks_of(events(response))
    check_heads(chunks, "text_completion", "cmpl-")
    for chunk in chunks:
        assert "usage" not in chunk  # only with stream_options.include_usage
        (choice,) = chunk["choices"]
        assert set(choice) == {"index", "text", "logprobs", "finish_reason"} and choice["index"] == 0
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    whole = http.post("/v1/completions", json=dict(model=MODEL, prompt=PROMPT, max_tokens=10, **GREEDY)).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


def test_chat_stream_framing_with_usage(http):
    request = dict(model=MODEL, messages=MESSAGES, max_tokens=8, stream=True,
                   stream_options={"include_usage": True}, **GREEDY)
    with http.stream("POST", "/v1/chat/completions", json=request) as response:
        chunks = chunks_of(events(response))
    check_heads(chunks, "chat.completion.chunk", "chatcmpl-")
    *choice_chunks, usage_chunk = chunks
    assert all(c["usage"] is None for c in choice_chunks)  # present, null, in every chunk but the last
    deltas = [c["choices"][0]["delta"] for c in choice_chunks]
    reasons = [c["choices"][0]["finish_reason"] for c in choice_chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all(set(d) == {"content"} and d["content"] for d in deltas[1:-1])
    assert deltas[-1] == {} and reasons[-1] in ("stop", "length") and set(reasons[:-1]) == {None}
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    whole = http.post("/v1/chat/completions", json={**request, "stream": False, "stream_options": None}).json()
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached tokens may differ the second time
    assert [whole["usage"][key] for key in counts] == [usage[key] for key in counts]
    assert "".join(d.get("content", "") for d in deltas) == whole["choices"][0]["message"]["content"]


def test_n_streams_each_choice_opened_and_finished_once(http):
    request = dict(model=MODEL, messages=MESSAGES, max_tokens=6, n=3, seed=5, stream=True)
    with http.stream("POST", "/v1/chat/completions", json=request) as response:
        chunks = chunks_of(events(response))
    assert all(len(c["choices"]) == 1 for c in chunks)
    for index in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [m["finish_reason"] is not None for m in mine] == [False] * (len(mine) - 1) + [True]


def test_whole_responses_have_openai_fields(http):
    completion = http.post("/v1/completions", json=dict(model=MODEL, prompt=PROMPT, max_tokens=4)).json()
    chat = http.post("/v1/chat/completions", json=dict(model=MODEL, messages=MESSAGES, max_tokens=4)).json()
    for body, obj, prefix in ((completion, "text_completion", "cmpl-"), (chat, "chat.completion", "chatcmpl-")):
        assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
        assert body["object"] == obj and body["id"].startswith(prefix) and body["model"] == MODEL
        assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
        assert set(body["usage"]["prompt_tokens_details"]) == {"cached_tokens"}
    assert set(completion["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    assert set(chat["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
    assert set(chat["choices"][0]["message"]) == {"role", "content"}


def test_a_refused_stream_gets_an_error_status_not_an_event_stream(http):
    request = dict(model=MODEL, prompt=PROMPT, max_tokens=100_000, stream=True)
    with http.stream("POST", "/v1/completions", json=request) as response:
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        error = json.loads(response.read())["error"]
        assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
