"""The requests NVIDIA's AIPerf sends (aiperf 0.13.0, as its inputs.json records them), answered as
AIPerf reads them: `make aiperf` (benchmarks/aiperf_run.py) runs AIPerf itself, too heavy for this suite.

AIPerf fixes the output length with vLLM's extras, `--extra-inputs ignore_eos:true` and/or
`min_tokens:<N>` (what its warning recommends and its vLLM recipes send, both at once); chat asks
with `max_completion_tokens`, completions with `max_tokens` and a bare-string prompt; a streamed
request always carries `stream_options.include_usage`, and `--use-server-token-count` reads the
usage chunk's counts.
"""
from __future__ import annotations

import json

import pytest

from tests.support.server import MODEL

PROMPT = " sir I trust I may have leave to speak And speak I will I am no child no babe"  # AIPerf's corpus
ASKED = 24
FIXED_LENGTH = {"ignore_eos": True, "min_tokens": ASKED}


def aiperf_chat(**extra) -> dict:
    return {"messages": [{"role": "user", "content": PROMPT}], "model": MODEL, "stream": True,
            "max_completion_tokens": ASKED, **extra, "stream_options": {"include_usage": True}}


def aiperf_completion(**extra) -> dict:
    return {"prompt": PROMPT, "model": MODEL, "stream": True, "max_tokens": ASKED, **extra,
            "stream_options": {"include_usage": True}}


def streamed(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        payloads = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


@pytest.mark.parametrize("path, body, text_of", [
    ("/v1/chat/completions", aiperf_chat(**FIXED_LENGTH), lambda c: c["delta"].get("content") or ""),
    ("/v1/completions", aiperf_completion(**FIXED_LENGTH), lambda c: c["text"]),
], ids=["chat", "completions"])
def test_aiperf_fixed_length_request_streams_exactly_the_tokens_asked_for_with_their_usage(http, path, body, text_of):
    chunks = streamed(http, path, body)
    *content, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == ASKED
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + ASKED
    assert all(c["usage"] is None for c in content)
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    # AIPerf's TTFT is the first chunk with text, its ITL spread over the chunks after it: text must come
    # before the end, not all in the last chunk.
    texts = [text_of(c["choices"][0]) for c in content]
    assert sum(bool(t) for t in texts) > ASKED // 2


def test_min_tokens_alone_holds_off_a_stop_string_until_that_many_tokens(http):
    whole = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 16,
                                                "temperature": 0, "ignore_eos": True}).json()
    text = whole["choices"][0]["text"]
    stop = text[1:3]  # met within the first three tokens
    early = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 16,
                                                "temperature": 0, "stop": [stop]}).json()
    held = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 16,
                                               "temperature": 0, "stop": [stop], "min_tokens": 10}).json()
    assert early["usage"]["completion_tokens"] < 3 and early["choices"][0]["finish_reason"] == "stop"
    assert held["usage"]["completion_tokens"] >= 10
    assert held["choices"][0]["text"].startswith(text[:1] + stop)


def test_min_tokens_above_max_tokens_is_a_400_naming_it(http):
    response = http.post("/v1/chat/completions", json={**aiperf_chat(min_tokens=ASKED + 1), "stream": False,
                                                       "stream_options": None})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "min_tokens"
