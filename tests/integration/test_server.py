"""The shipped model repository in a real tritonserver, over gRPC and HTTP (see conftest.py).

`server` tests run on any server (the suite's own tiny-model one, or GEMMA_TEST_SERVER_URL's);
`tiny_server` tests need the suite's own, with its checkpoint and small limits. A failed gRPC
stream carries its message alone, prefixed by the model with its status (gemma_protocol.tag_error);
see conftest.py for why no test asks Triton for the status code itself.
"""
from __future__ import annotations

import json
import threading
import time

import pytest
from gemma_protocol import split_error_status
from tritonclient.utils import InferenceServerException

from tests.support.waiting import wait_for

PROMPT = "The quick brown fox"
GREEDY = dict(temperature=0.0, ignore_eos=True)
LONG = 400  # max_tokens of a request that runs until it is cancelled (the tiny server's context is 512)


def greedy_json(max_tokens: int) -> str:
    return json.dumps({"max_tokens": max_tokens, **GREEDY})


def test_streaming_text_equals_non_streaming_text(server):
    whole = server.stream(PROMPT, sampling_parameters=greedy_json(16), exclude_input_in_output=True)
    streamed = server.stream(PROMPT, sampling_parameters=greedy_json(16), stream=True)
    assert whole.responses == 1 and streamed.responses > 1
    assert streamed.text == whole.text and streamed.token_ids == whole.token_ids
    assert len(whole.token_ids) == whole.num_output_tokens == 16
    assert whole.finish_reason == streamed.finish_reason == "length"
    assert whole.num_input_tokens == streamed.num_input_tokens > 0


def test_non_streaming_response_echoes_prompt_unless_excluded(server):
    echoed = server.stream(PROMPT, sampling_parameters=greedy_json(4))
    bare = server.stream(PROMPT, sampling_parameters=greedy_json(4), exclude_input_in_output=True)
    assert echoed.text == PROMPT + bare.text


def test_scalar_tensors_win_over_json(server):
    result = server.stream(PROMPT, sampling_parameters=greedy_json(16), max_tokens=3)
    assert result.num_output_tokens == 3 and result.finish_reason == "length"


def test_greedy_output_equals_in_process_engine(tiny_server, tiny_checkpoint):
    from backend.loader import start_engine
    from backend.params import EngineConfig, SamplingParams

    engine = start_engine(EngineConfig(checkpoint=str(tiny_checkpoint)))  # device and dtype as served
    try:
        outputs = list(engine.submit(PROMPT, SamplingParams(max_tokens=24, **GREEDY)))
    finally:
        engine.shutdown()
    served = tiny_server.stream(PROMPT, sampling_parameters=greedy_json(24), exclude_input_in_output=True)
    assert served.token_ids == [t for out in outputs for t in out.token_ids]
    assert served.text == "".join(out.text for out in outputs)


def test_http_generate(server):
    status, body = server.post("/v2/models/gemma/generate",
                               {"text_input": PROMPT, "max_tokens": 8, "temperature": 0.0,
                                "exclude_input_in_output": True, "return_finish_reason": True,
                                "return_num_output_tokens": True})
    assert status == 200, body
    reply = json.loads(body)
    grpc = server.stream(PROMPT, sampling_parameters=greedy_json(8), exclude_input_in_output=True)
    assert reply["finish_reason"] == "length" and reply["num_output_tokens"] == 8
    assert reply["text_output"] == grpc.text


def test_http_generate_stream(server):
    status, body = server.post("/v2/models/gemma/generate_stream",
                               {"text_input": PROMPT, "stream": True, "return_finish_reason": True,
                                "sampling_parameters": greedy_json(8)})
    assert status == 200, body
    events = [json.loads(line.removeprefix("data: ")) for line in body.splitlines() if line.startswith("data: ")]
    assert len(events) > 1 and all("error" not in e for e in events)
    grpc = server.stream(PROMPT, sampling_parameters=greedy_json(8), stream=True)
    assert "".join(e["text_output"] for e in events) == grpc.text
    assert events[-1]["finish_reason"] == "length"


def _in_threads(call, count: int) -> dict:
    """call(i) for i in range(count), each on a thread of its own, all at once: i -> its result,
    or the exception it raised (for the caller's assertions)."""
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = call(i)
        except Exception as e:  # noqa: BLE001 - reported by the caller's assertions
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def _concurrent_streams(server, prompts: list[str]) -> dict:
    return _in_threads(lambda i: server.stream(prompts[i], stream=True,
                                               sampling_parameters=json.dumps({"max_tokens": 24 + i, **GREEDY})),
                       len(prompts))


def test_concurrent_streams(server):
    prompts = [f"Story number {i}: once upon a time" for i in range(10)]
    results = _concurrent_streams(server, prompts)
    assert sorted(results) == list(range(len(prompts)))
    for i, r in results.items():
        assert not isinstance(r, Exception), f"stream {i}: {r}"
        assert r.finish_reason == "length" and len(r.token_ids) == r.num_output_tokens == 24 + i


def test_each_streamed_response_carries_its_own_values(server):
    """The model reuses the tensors of values that recur (counts, finish reasons, common tokens),
    also across streams: concurrent streams, with prompts of different lengths, still get in each
    response their own counts and finish_reason "None" until the last."""
    prompts = ["word " * i + PROMPT for i in range(6)]
    sampling = json.dumps({"max_tokens": 20, **GREEDY})
    whole = [server.stream(p, sampling_parameters=sampling, exclude_input_in_output=True) for p in prompts]
    seen: dict[int, list] = {i: [] for i in range(len(prompts))}

    def stream(i: int):
        def record(r) -> bool:
            seen[i].append((len(r.token_ids), r.num_output_tokens, r.num_input_tokens, r.finish_reason))
            return False
        return server.stream(prompts[i], cancel_when=record, stream=True, sampling_parameters=sampling)

    results = _in_threads(stream, len(prompts))
    assert len({w.num_input_tokens for w in whole}) == len(prompts)
    for i, expected in enumerate(whole):
        assert not isinstance(results[i], Exception), f"stream {i}: {results[i]}"
        assert (results[i].text, results[i].token_ids) == (expected.text, expected.token_ids)
        assert [n_out for n_ids, n_out, _, _ in seen[i]] == [n_ids for n_ids, _, _, _ in seen[i]]
        assert {n_in for _, _, n_in, _ in seen[i]} == {expected.num_input_tokens}
        assert [reason for *_, reason in seen[i]] == ["None"] * (len(seen[i]) - 1) + ["length"]


def test_batched_greedy_equals_alone(tiny_server):
    """In float32 on the CPU, a stream batched with nine others gets what it gets alone."""
    prompts = [f"Story number {i}: once upon a time" for i in range(10)]
    results = _concurrent_streams(tiny_server, prompts)
    for i in (0, 3, 9):
        alone = tiny_server.stream(prompts[i], stream=True,
                                   sampling_parameters=json.dumps({"max_tokens": 24 + i, **GREEDY}))
        assert alone.token_ids == results[i].token_ids, i


SAMPLING_12 = json.dumps({"max_tokens": 12, "ignore_eos": True})


@pytest.mark.parametrize("tensors", [
    pytest.param(dict(sampling_parameters=SAMPLING_12, temperature=1e-40), id="temperature-1e-40"),
    pytest.param(dict(sampling_parameters='{"max_tokens": 12, "ignore_eos": true, "temperature": 1e-320}'),
                 id="temperature-1e-320-json"),
    pytest.param(dict(sampling_parameters=SAMPLING_12, top_p=1e-45), id="top_p-1e-45"),  # FP32's smallest
    pytest.param(dict(sampling_parameters='{"max_tokens": 12, "ignore_eos": true, "top_p": 1e-300, '
                                          '"temperature": 3.0, "seed": 5}'), id="top_p-1e-300-hot-seeded"),
])
def test_degenerate_sampling_serves_the_top_token_never_padding(server, tensors):
    """Used to serve token 0 (<pad>, empty text) for every step: temperature 1e-40 overflowed the
    logits, top_p 1e-300 rounded to 0 and kept no token."""
    greedy = server.stream(PROMPT, sampling_parameters=greedy_json(12), exclude_input_in_output=True)
    served = server.stream(PROMPT, exclude_input_in_output=True, **tensors)
    assert 0 not in served.token_ids and served.text
    assert served.token_ids == greedy.token_ids and served.text == greedy.text


def test_cancelled_stream_frees_kv_blocks(server):
    cancelled_before = server.metric("gemma_requests_total", outcome="cancelled")
    kv_in_use: list[float] = []

    def once_kv_blocks_show(result) -> bool:
        kv_in_use.append(server.metric("gemma_kv_blocks_used"))
        return kv_in_use[-1] > 0

    result = server.stream(PROMPT, cancel_when=once_kv_blocks_show, stream=True,
                           sampling_parameters=greedy_json(LONG))
    assert result.finish_reason == "None" and kv_in_use[-1] > 0, "the stream ended before it was cancelled"
    assert wait_for(lambda: server.metric("gemma_requests_total", outcome="cancelled") > cancelled_before)
    assert wait_for(lambda: server.metric("gemma_kv_blocks_used") == 0)


# Each bad request and the field its error message must name.
BAD_REQUESTS = [
    pytest.param(PROMPT, dict(sampling_parameters="{not json"), "sampling_parameters", id="malformed-json"),
    pytest.param(PROMPT, dict(sampling_parameters='["max_tokens", 3]'), "sampling_parameters", id="json-not-object"),
    pytest.param(PROMPT, dict(sampling_parameters='{"bogus_key": 1}'), "bogus_key", id="unknown-key"),
    pytest.param(PROMPT, dict(sampling_parameters='{"max_tokens": "eight"}'), "max_tokens", id="wrong-type-str"),
    pytest.param(PROMPT, dict(sampling_parameters='{"max_tokens": 2.5}'), "max_tokens", id="wrong-type-float"),
    pytest.param(PROMPT, dict(sampling_parameters='{"temperature": true}'), "temperature", id="wrong-type-bool"),
    pytest.param(PROMPT, dict(sampling_parameters='{"stop": 5}'), "stop", id="wrong-type-list"),
    pytest.param(PROMPT, dict(sampling_parameters='{"lora_name": "x"}'), "lora_name", id="not-implemented"),
    pytest.param(PROMPT, dict(max_tokens=0), "max_tokens", id="max_tokens-0"),
    pytest.param(PROMPT, dict(sampling_parameters='{"max_tokens": -5}'), "max_tokens", id="max_tokens-negative-json"),
    pytest.param(PROMPT, dict(temperature=-0.5), "temperature", id="temperature-negative"),
    pytest.param(PROMPT, dict(top_p=0.0), "top_p", id="top_p-0"),
    pytest.param(PROMPT, dict(top_p=1.5), "top_p", id="top_p-above-1"),
    pytest.param(PROMPT, dict(top_k=-2), "top_k", id="top_k-below-minus-1"),
    pytest.param("", dict(max_tokens=4), "text_input", id="empty-prompt"),
    # Over the shipped max_prompt_bytes (256 KiB) and the tiny server's (64 KiB).
    pytest.param("x" * 300_000, dict(max_tokens=4), "text_input", id="prompt-over-max-bytes"),
    # Within both byte limits, over both contexts (shipped 8192 tokens, tiny server 512).
    pytest.param("a " * 10_000, dict(max_tokens=1), "prompt", id="prompt-over-context"),
    pytest.param(PROMPT, dict(max_tokens=100_000), "max_tokens", id="prompt-plus-max_tokens-over-context"),
    # Hostile JSON: nested ~100k deep (this used to raise RecursionError out of the model), nested
    # deep within the size limit, numbers too long to read.
    pytest.param(PROMPT, dict(sampling_parameters="[" * 100_000), "sampling_parameters", id="json-100k-arrays"),
    pytest.param(PROMPT, dict(sampling_parameters='{"a":' * 100_000 + "1" + "}" * 100_000), "sampling_parameters",
                 id="json-100k-objects"),
    pytest.param(PROMPT, dict(sampling_parameters="[" * 20_000 + "]" * 20_000), "sampling_parameters",
                 id="json-nested-within-size"),
    pytest.param(PROMPT, dict(sampling_parameters='{"max_tokens": ' + "9" * 5000 + "}"), "sampling_parameters",
                 id="json-5000-digit-number"),
    pytest.param(PROMPT, dict(sampling_parameters='{"temperature": ' + "9" * 400 + "}"), "temperature",
                 id="json-float-from-400-digit-integer"),
    # INT32 inputs (the TensorRT-LLM ensemble's types) at their extremes.
    pytest.param(PROMPT, dict(max_tokens=-(2**31)), "-2147483648", id="max_tokens-minus-2**31"),
    pytest.param(PROMPT, dict(max_tokens=2**31 - 1), "2147483647", id="max_tokens-2**31-1"),
    pytest.param(PROMPT, dict(top_k=-(2**31)), "-2147483648", id="top_k-minus-2**31"),
    # Sampling values that would make logits non-finite.
    pytest.param(PROMPT, dict(repetition_penalty=1e-300), "repetition_penalty", id="repetition_penalty-1e-300"),
    pytest.param(PROMPT, dict(sampling_parameters='{"repetition_penalty": 1e300}'), "repetition_penalty",
                 id="repetition_penalty-1e300"),
    pytest.param(PROMPT, dict(temperature=1e30), "temperature", id="temperature-1e30"),
    pytest.param(PROMPT, dict(presence_penalty=2.5), "presence_penalty", id="presence_penalty-2.5"),
    pytest.param(PROMPT, dict(sampling_parameters='{"frequency_penalty": -3}'), "frequency_penalty",
                 id="frequency_penalty-minus-3"),
    pytest.param(PROMPT, dict(sampling_parameters='{"logprobs": 21}'), "logprobs", id="logprobs-21"),
    pytest.param(PROMPT, dict(beam_width=2), "beam_width", id="beam_width-2"),
    pytest.param(PROMPT, dict(sampling_parameters='{"n": 2}', return_output_ids=True), "output_ids",
                 id="output_ids-with-n-2"),
    pytest.param(PROMPT, dict(sampling_parameters='{"logprobs": true}'), "logprobs", id="logprobs-bool"),
    # Request parameters are sampling keys (without `sampling_parameters`): a typo is refused, not ignored.
    pytest.param(PROMPT, dict(parameters={"temprature": 0.5}), "temprature", id="unknown-request-parameter"),
    pytest.param(PROMPT, dict(parameters={"max_tokens": "lots"}), "max_tokens", id="bad-request-parameter"),
]


@pytest.mark.parametrize("prompt, tensors, field", BAD_REQUESTS)
def test_bad_request_is_invalid_argument_naming_the_field(server, prompt, tensors, field):
    invalid_before = server.metric("gemma_requests_total", outcome="invalid")
    with pytest.raises(InferenceServerException) as info:
        server.stream(prompt, **tensors)
    status, message = split_error_status(info.value.message())
    assert status == "INVALID_ARGUMENT", info.value.message()
    assert field in message
    assert wait_for(lambda: server.metric("gemma_requests_total", outcome="invalid") == invalid_before + 1)


# Triton's HTTP generate endpoint makes each JSON key an input of that name, or else a request parameter.
HTTP_BAD_REQUESTS = [
    # Triton converts the JSON number into the INT32 input and wraps it (docs/vllm-backend.md).
    pytest.param({"max_tokens": 2147483648}, ["max_tokens", "-2147483648"], id="max_tokens-2**31-wraps"),
    pytest.param({"max_tokens": 3, "temprature": 0.5}, ["'temprature'", "'temperature'"], id="typo-temprature"),
    pytest.param({"max_token": 2}, ["'max_token'", "'max_tokens'"], id="typo-max_token"),
    pytest.param({"max_tokens": 3, "foo": "bar"}, ["'foo'"], id="unknown-foo"),
    pytest.param({"max_tokens": 3, "stop": 5}, ["'stop'"], id="sampling-key-of-the-wrong-type"),
]


@pytest.mark.parametrize("payload, words", HTTP_BAD_REQUESTS)
def test_http_generate_refuses_naming_the_key_and_the_value_sent(server, payload, words):
    invalid_before = server.metric("gemma_requests_total", outcome="invalid")
    status, body = server.post("/v2/models/gemma/generate", {"text_input": PROMPT, **payload})
    assert status == 400, body
    tag, message = split_error_status(json.loads(body)["error"])
    assert tag == "INVALID_ARGUMENT" and all(word in message for word in words), message
    assert wait_for(lambda: server.metric("gemma_requests_total", outcome="invalid") == invalid_before + 1)


def test_http_generate_takes_sampling_keys_without_an_input_as_request_parameters(server):
    """A top-level key that is not an input becomes a request parameter, and request parameters are
    sampling keys (the vLLM backend's rule) when no `sampling_parameters` is sent."""
    status, body = server.post("/v2/models/gemma/generate",
                               {"text_input": PROMPT, "max_tokens": 5, "temperature": 0.0, "ignore_eos": True,
                                "exclude_input_in_output": True,
                                "return_num_output_tokens": True, "return_finish_reason": True})
    assert status == 200, body
    reply = json.loads(body)
    assert reply["num_output_tokens"] == 5 and reply["finish_reason"] == "length"


def test_overload_is_unavailable_and_the_engine_recovers(tiny_server):
    """8 running + 16 waiting fill the engine; more requests are refused, not queued."""
    server = tiny_server
    overloaded_before = server.metric("gemma_requests_total", outcome="overloaded")
    errors: list = []
    client = server.open_stream(errors.append)
    try:
        for i in range(30):  # a burst: some are refused before the engine admits the first ones
            server.send(client, f"{PROMPT} {i}", stream=True, sampling_parameters=greedy_json(LONG))
        assert wait_for(lambda: errors, timeout=30)
        status, message = split_error_status(errors[0].message())
        assert status == "UNAVAILABLE" and "waiting" in message, errors[0].message()
        assert wait_for(lambda: server.metric("gemma_requests_total", outcome="overloaded")
                        == overloaded_before + len(errors))
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    assert wait_for(server.is_idle, timeout=30)  # every cancelled request ended, queued ones too


def test_metrics_present_and_moving(server):
    names = {key.partition("{")[0] for key in server.metrics()}
    for name in ("gemma_requests_total", "gemma_prompt_tokens_total", "gemma_generated_tokens_total",
                 "gemma_time_to_first_token_seconds_count", "gemma_inter_token_latency_seconds_bucket",
                 "gemma_kv_blocks_used", "gemma_kv_blocks_total", "gemma_running_requests",
                 "gemma_queue_depth", "gemma_kv_blocks_cached", "gemma_prefix_cache_queries_total",
                 "gemma_prefix_cache_hits_total", "gemma_preemptions_total"):
        assert name in names
    before = server.metrics()
    result = server.stream(PROMPT, stream=True, sampling_parameters=greedy_json(10))

    def moved(name, by, **labels):
        return wait_for(lambda: server.metric(name, **labels) >= by + sum(
            v for k, v in before.items() if k.partition("{")[0] == name
            and all(f'{lk}="{lv}"' in k for lk, lv in labels.items())))

    assert moved("gemma_requests_total", 1, outcome="success")
    assert moved("gemma_generated_tokens_total", 10)
    assert moved("gemma_prompt_tokens_total", result.num_input_tokens)
    assert moved("gemma_time_to_first_token_seconds_count", 1)
    assert moved("gemma_inter_token_latency_seconds_count", 1)
    assert server.metric("gemma_kv_blocks_total") > 0


def test_a_repeated_prompt_hits_the_prefix_cache_with_the_same_output(server):
    # Long enough to fill several 16-token blocks; unique, so no earlier test cached it.
    prompt = f"{time.time_ns()} " + "a shared system prompt that many requests begin with, " * 6
    hits_before = server.metric("gemma_prefix_cache_hits_total")
    first = server.stream(prompt, sampling_parameters=greedy_json(8))
    second = server.stream(prompt, sampling_parameters=greedy_json(8))
    assert second.text == first.text and second.token_ids == first.token_ids
    cached = (first.num_input_tokens - 1) // 16 * 16  # all full blocks but the one with the last token
    assert cached >= 48
    assert wait_for(lambda: server.metric("gemma_prefix_cache_hits_total") - hits_before >= cached)
    assert wait_for(lambda: server.metric("gemma_kv_blocks_used") == 0)
    assert server.metric("gemma_kv_blocks_cached") > 0


def test_server_healthy_after_everything(server):
    """Last in this file: after errors, cancellations and overload the model still serves."""
    assert server.ready() and (server.process is None or server.process.poll() is None)
    result = server.stream(PROMPT, sampling_parameters=greedy_json(6))
    assert result.finish_reason == "length" and result.num_output_tokens == 6
    assert wait_for(lambda: server.metric("gemma_kv_blocks_used") == 0)
    assert wait_for(lambda: server.metric("gemma_running_requests") == 0
                    and server.metric("gemma_queue_depth") == 0)
    assert server.metric("gemma_requests_total", outcome="error") == 0
