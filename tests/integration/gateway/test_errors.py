"""Every refusal in OpenAI's error shape, with the status the OpenAI API would use and the field named."""
from __future__ import annotations

import asyncio
import json

import pytest
from gemma_client import (CancelledError, ConnectionFailedError, DeadlineExceededError, InvalidArgumentError,
                          ServerError, UnavailableError)

from gateway.errors import from_client_error

from tests.support.gateway import API_KEY, start_gateway
from tests.support.server import LONG, MODEL, free_ports
from tests.support.waiting import wait_for

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

PROMPT = "The quick brown fox"
USER = [{"role": "user", "content": "Hi"}]
COMPLETION = dict(model=MODEL, prompt=PROMPT, max_tokens=4)
CHAT = dict(model=MODEL, messages=USER, max_tokens=4)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert body["error"]["message"]
    return body["error"]


# (endpoint, body, the param the error names, its code)
BAD_REQUESTS = [
    pytest.param("completions", {**COMPLETION, "foo": 1}, "foo", "unknown_parameter", id="unknown-field"),
    pytest.param("chat/completions", {**CHAT, "logit_bias": {}}, "logit_bias", "unknown_parameter",
                 id="unknown-openai-field"),
    pytest.param("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "Hi", "name": "bob"}]},
                 "messages[0].name", "unknown_parameter", id="unknown-message-field"),
    pytest.param("completions", {**COMPLETION, "stream": True, "stream_options": {"bogus": 1}},
                 "stream_options.bogus", "unknown_parameter", id="unknown-stream-option"),
    pytest.param("completions", {"prompt": PROMPT}, "model", "missing_required_parameter", id="no-model"),
    pytest.param("chat/completions", {**CHAT, "logprobs": 1}, "logprobs", "invalid_value", id="chat-logprobs-int"),
    pytest.param("chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", "invalid_value",
                 id="top_logprobs-without-logprobs"),
    pytest.param("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
                 "invalid_value", id="top_logprobs-21"),
    pytest.param("completions", {**COMPLETION, "logprobs": True}, "logprobs", "invalid_value",
                 id="completion-logprobs-bool"),
    pytest.param("completions", {**COMPLETION, "logprobs": -1}, "logprobs", "invalid_value",
                 id="completion-logprobs-negative"),
    pytest.param("completions", {**COMPLETION, "presence_penalty": 2.5}, "presence_penalty",
                 "invalid_value", id="presence_penalty"),
    pytest.param("chat/completions", {**CHAT, "frequency_penalty": "1"}, "frequency_penalty",
                 "invalid_value", id="frequency_penalty"),
    pytest.param("completions", {**COMPLETION, "max_tokens": "8"}, "max_tokens", "invalid_value", id="str-int"),
    pytest.param("completions", {**COMPLETION, "max_tokens": 0}, "max_tokens", "invalid_value", id="max_tokens-0"),
    pytest.param("chat/completions", {**CHAT, "max_completion_tokens": -1}, "max_completion_tokens",
                 "invalid_value", id="max_completion_tokens"),
    pytest.param("completions", {**COMPLETION, "temperature": 2.5}, "temperature", "invalid_value", id="temperature"),
    pytest.param("completions", {**COMPLETION, "top_p": 0}, "top_p", "invalid_value", id="top_p-0"),
    pytest.param("completions", {**COMPLETION, "n": 0}, "n", "invalid_value", id="n-0"),
    pytest.param("completions", {**COMPLETION, "n": 17}, "n", "invalid_value", id="n-over-limit"),
    pytest.param("completions", {**COMPLETION, "stream": "yes"}, "stream", "invalid_value", id="stream-str"),
    pytest.param("chat/completions", {**CHAT, "ignore_eos": "true"}, "ignore_eos", "invalid_value",
                 id="ignore_eos-str"),
    pytest.param("completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value",
                 id="five-stops"),
    pytest.param("completions", {**COMPLETION, "stop": [""]}, "stop", "invalid_value", id="empty-stop"),
    pytest.param("completions", {**COMPLETION, "stream_options": {"include_usage": True}}, "stream_options",
                 "invalid_value", id="stream_options-without-stream"),
    pytest.param("completions", {**COMPLETION, "prompt": [1, 2, 3]}, "prompt", "invalid_value", id="token-prompt"),
    pytest.param("completions", {**COMPLETION, "prompt": ""}, "prompt", "invalid_value", id="empty-prompt"),
    pytest.param("chat/completions", {**CHAT, "messages": []}, "messages", "invalid_value", id="no-messages"),
    pytest.param("chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]},
                 "messages[0].tool_call_id", "invalid_value", id="tool-message-without-call-id"),
    pytest.param("chat/completions", {**CHAT, "messages": [{"role": "tool", "tool_call_id": "call_1", "content": "x"}]},
                 "messages[0].tool_call_id", "invalid_value", id="tool-message-without-a-call"),
    pytest.param("chat/completions", {**CHAT, "messages": USER + [{"role": "system", "content": "x"}] + USER},
                 "messages[1].role", "invalid_value", id="late-system"),
    pytest.param("chat/completions", {**CHAT, "messages": USER + USER}, "messages[1].role", "invalid_value",
                 id="two-user-turns"),
    pytest.param("chat/completions", {**CHAT, "messages": USER + [{"role": "assistant", "content": "x"}]},
                 "messages", "invalid_value", id="ends-with-assistant"),
    pytest.param("chat/completions",
                 {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                 "messages[0].content", "invalid_value", id="image-part"),
    # Refused by the model on Triton (INVALID_ARGUMENT), named in its message.
    # Over the context, whichever part is long: the prompt is named, as OpenAI does.
    pytest.param("completions", {**COMPLETION, "max_tokens": 100_000}, "prompt", "context_length_exceeded",
                 id="triton-max_tokens-over-context"),
    pytest.param("completions", {**COMPLETION, "prompt": "a " * 10_000}, "prompt", "context_length_exceeded",
                 id="triton-prompt-over-context"),
    pytest.param("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a " * 10_000}]},
                 "messages", "context_length_exceeded", id="triton-chat-over-context"),
    # Over the model's max_prompt_bytes (256 KiB shipped, 64 KiB on the tiny server), within the body limit.
    pytest.param("completions", {**COMPLETION, "prompt": "x" * 300_000}, "prompt", "invalid_value",
                 id="triton-prompt-over-max-bytes"),
]


def _streamed(case):
    """The same request with stream=true: refused with a status before any event is sent."""
    endpoint, body, param, code = case.values
    return pytest.param(endpoint, {**body, "stream": True}, param, code, id=f"{case.id}-stream")


@pytest.mark.parametrize("endpoint, body, param, code", BAD_REQUESTS + [
    _streamed(case) for case in BAD_REQUESTS if not {"stream", "stream_options"} & set(case.values[1])])
def test_bad_request_is_400_naming_the_field(http, endpoint, body, param, code):
    error = error_of(http.post(f"/v1/{endpoint}", json=body), 400)
    assert (error["param"], error["code"]) == (param, code), error


def test_sdk_raises_bad_request_with_the_body(sdk):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model=MODEL, prompt=PROMPT, extra_body={"foo": 1})
    assert info.value.status_code == 400
    assert info.value.body == {"message": "Unrecognized request argument supplied: foo",
                               "type": "invalid_request_error", "param": "foo", "code": "unknown_parameter"}
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        sdk.chat.completions.create(model=MODEL, messages=USER, logprobs=True, top_logprobs=30)


def test_neutral_values_of_optional_fields_and_user_are_accepted(http):
    response = http.post("/v1/chat/completions", json={**CHAT, "logprobs": False, "top_logprobs": None,
                                                       "presence_penalty": 0, "frequency_penalty": 0.0,
                                                       "user": "someone"})
    assert response.status_code == 200, response.text


def test_unknown_model_is_404(http, sdk):
    error = error_of(http.post("/v1/completions", json={**COMPLETION, "model": "gpt-4"}), 404)
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4")


def test_malformed_bodies(http):
    error = error_of(http.post("/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"}), 400)
    assert error["code"] == "invalid_json"
    error = error_of(http.post("/v1/completions", content=json.dumps(COMPLETION).encode(),
                               headers={"content-type": "text/plain"}), 400)
    assert "application/json" in error["message"]
    error_of(http.post("/v1/completions", json=[COMPLETION]), 400)
    error_of(http.get("/v1/nothing-here"), 404)
    error_of(http.get("/v1/completions"), 405)


def test_oversized_body_is_413(http):
    error = error_of(http.post("/v1/completions", json={**COMPLETION, "prompt": "x" * (1 << 20)}), 413)
    assert error["code"] == "request_too_large"
    # Announced as chunked (no Content-Length): counted while it arrives.
    chunks = (b'{"model": "gemma", "prompt": "' + b"x" * 65536 for _ in range(20))
    error_of(http.post("/v1/completions", content=chunks, headers={"content-type": "application/json"}), 413)


def test_overload_is_503_with_retry_after_and_the_server_recovers(gateway, tiny_server):
    """8 running + 16 waiting fill the tiny server; a burst of 30 streams gets some refused."""
    server = tiny_server

    async def burst():
        async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
            async def one(i):
                request = client.build_request("POST", "/v1/completions", json=dict(
                    model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=LONG, stream=True))
                response = await client.send(request, stream=True)
                if response.status_code != 200:
                    await response.aread()
                return response

            tasks = [asyncio.create_task(one(i)) for i in range(30)]
            refused = None
            try:
                for next_done in asyncio.as_completed(tasks, timeout=60):
                    response = await next_done
                    if response.status_code != 200:
                        refused = response
                        break
            finally:
                for task in tasks:
                    task.cancel()
                for result in await asyncio.gather(*tasks, return_exceptions=True):
                    if isinstance(result, httpx.Response):
                        await result.aclose()  # the gateway cancels the streams of the ones let in
            return refused

    refused = asyncio.run(burst())
    assert refused is not None, "no request was refused"
    error = error_of(refused, 503)
    assert error["code"] == "overloaded" and "waiting" in error["message"]
    assert refused.headers["retry-after"] == "1"
    assert wait_for(server.is_idle, timeout=60)


@pytest.mark.parametrize("error, status", [
    (InvalidArgumentError("'top_p' must be in (0, 1]"), 400),
    (UnavailableError("16 requests are already waiting; retry later"), 503),
    (ConnectionFailedError("failed to connect"), 503),
    (CancelledError("the model is shutting down"), 503),
    (DeadlineExceededError("deadline exceeded"), 504),
    (ServerError("generation failed: CUDA error"), 500),
])
def test_client_errors_map_to_statuses(error, status):
    """The status of each way a Triton request fails; engine faults (INTERNAL) are 500."""
    api_error = from_client_error(error, prompt_param="prompt")
    assert api_error.status == status
    assert api_error.body()["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error.message in api_error.message


def test_triton_messages_name_openai_params():
    for message, param, code in [
        ("'text_input' is empty", "messages", "invalid_value"),
        ("'top_p' must be in (0, 1], got 0.0", "top_p", "invalid_value"),
        ("prompt (900 tokens) + max_tokens (8) = 908 exceeds the context of 512 tokens", "messages",
         "context_length_exceeded"),
    ]:
        error = from_client_error(InvalidArgumentError(message), prompt_param="messages")
        assert (error.param, error.code) == (param, code)


def test_health_is_ready_with_triton(http):
    response = http.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_without_triton_health_and_requests_are_503(tmp_path):
    (closed_port,) = free_ports(1)
    gateway = start_gateway(f"127.0.0.1:{closed_port}", tmp_path / "gateway.log")
    try:
        health = httpx.get(f"{gateway.url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        error = error_of(httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION, timeout=30), 503)
        assert error["code"] == "model_unavailable"
    finally:
        gateway.stop()


class TestApiKey:
    def test_requests_without_the_key_get_401(self, keyed_gateway):
        url = f"{keyed_gateway.url}/v1/models"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                        {"Authorization": f"Basic {API_KEY}"}, {"Authorization": f"Bearer {API_KEY}x"}):
            response = httpx.get(url, headers=headers)
            error = error_of(response, 401)
            assert error["code"] == "invalid_api_key" and response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200

    def test_key_is_checked_before_the_body(self, keyed_gateway):
        url = f"{keyed_gateway.url}/v1/completions"
        error_of(httpx.post(url, json={"foo": 1}), 401)
        error_of(httpx.post(url, json={"prompt": "x" * (2 << 20)}), 401)

    def test_sdk_with_the_key_works_and_health_needs_none(self, keyed_gateway):
        base = f"{keyed_gateway.url}/v1"
        with openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0) as good:
            assert good.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3).choices[0].text is not None
        with openai.OpenAI(base_url=base, api_key="nope", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        assert httpx.get(f"{keyed_gateway.url}/health").status_code == 200
