"""A client that goes away cancels its Triton requests: the engine frees their KV blocks."""
from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

from tests.support.server import LONG, MODEL
from tests.support.waiting import wait_for

PROMPT = "The quick brown fox"


def cancelled(server) -> float:
    return server.metric("gemma_requests_total", outcome="cancelled")


def assert_cancelled_and_freed(server, before: float, count: int) -> None:
    assert wait_for(lambda: cancelled(server) == before + count), (cancelled(server), before)
    assert wait_for(lambda: server.metric("gemma_kv_blocks_used") == 0
                    and server.metric("gemma_running_requests") == 0)


def test_leaving_a_stream_cancels_it(http, idle_server):
    server = idle_server
    before = cancelled(server)
    request = dict(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=LONG, stream=True)
    with http.stream("POST", "/v1/chat/completions", json=request) as response:
        lines = response.iter_lines()
        contents = 0
        while contents < 3:  # past the role chunk, into the generated text
            line = next(lines)
            contents += line.startswith("data: ") and '"content":"' in line and '"content":""' not in line
        assert wait_for(lambda: server.metric("gemma_kv_blocks_used") > 0)  # the gauge updates every 0.1 s
    # Leaving `with` closes the connection mid-stream.
    assert_cancelled_and_freed(server, before, 1)


def test_leaving_a_stream_of_n_choices_cancels_them_all(http, idle_server):
    server = idle_server
    before = cancelled(server)
    request = dict(model=MODEL, prompt=PROMPT, max_tokens=LONG, n=3, stream=True)
    with http.stream("POST", "/v1/completions", json=request) as response:
        seen = set()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                seen.add(json.loads(line[len("data: "):])["choices"][0]["index"])
            if seen == {0, 1, 2}:
                break
    assert_cancelled_and_freed(server, before, 3)


def test_leaving_before_a_whole_response_cancels_it(gateway, idle_server):
    server = idle_server
    before = cancelled(server)
    body = json.dumps(dict(model=MODEL, prompt=PROMPT, max_tokens=LONG)).encode()
    url = urlsplit(gateway.url)
    with socket.create_connection((url.hostname, url.port)) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert wait_for(lambda: server.metric("gemma_kv_blocks_used") > 0), "the request never ran"
    # Closed without reading the answer.
    assert_cancelled_and_freed(server, before, 1)


def test_serves_after_the_disconnects(sdk):
    assert sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4).choices[0].finish_reason
