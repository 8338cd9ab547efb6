"""vLLM's metric names (vllm:*) on a real server, checked as the vLLM backend's CI checks its own
(ci/L0_backend_vllm/metrics_test/vllm_metrics_test.py in triton-inference-server/vllm_backend): three
non-streamed requests on one gRPC stream, twice, then the counters, counts and sums on /metrics.

The server is shared by the session, so each test compares the samples before and after its own
requests: it needs a server that receives no other requests meanwhile.
"""
from __future__ import annotations

import json
import math
import queue
import re
import time
import urllib.request
from collections import Counter

import pytest
import tritonclient.grpc as grpcclient

from tests.support.server import MODEL, TINY_SERVER_ENV, make_inputs, start_servers, stop_servers
from tests.support.waiting import wait_for

PROMPTS = ("The most dangerous animal is", "The capital of France is", "The future of AI is")
ROUNDS = 2  # as the vLLM backend's test: the counters keep adding up, not only start right
MAX_TOKENS = 8
# String values, as the vLLM backend's test sends them. ignore_eos: every request generates MAX_TOKENS
# tokens, whatever the checkpoint.
SAMPLING = {"temperature": "0", "top_p": "1", "max_tokens": str(MAX_TOKENS), "ignore_eos": "true"}
# Longer than the histograms' period (HISTOGRAM_PERIODS of the model's METRICS_PERIOD_S: 1 s), so two
# reads that far apart that agree mean nothing is on its way.
SETTLE_S = 1.2
SAMPLE = re.compile(r"^(vllm:[^ {]+)(?:\{(.*)\})? (\S+)$", re.M)
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
PHASES = ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
          "request_inference_time_seconds")


def key(name: str, **labels) -> tuple[str, frozenset]:
    """A sample's key: `vllm:<name>` and labels to match (a bucket's `le` as a float)."""
    return f"vllm:{name}", frozenset(labels.items())


def vllm_samples(server) -> dict[tuple[str, frozenset], float]:
    """Every vllm:* sample on /metrics, by key()."""
    text = metrics_text(server)
    return {(name, frozenset((k, float(v) if k == "le" else v) for k, v in LABEL.findall(labels or ""))): float(value)
            for name, labels, value in SAMPLE.findall(text)}


def total(samples: dict, sample_key: tuple[str, frozenset]) -> float:
    """The sum of the samples of the key's name whose labels include its labels (over all instances)."""
    name, labels = sample_key
    return sum(value for (n, have), value in samples.items() if n == name and labels <= have)


def settled_samples(server) -> dict:
    """The samples once nothing that came before is still on its way into them."""
    samples: dict = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(SETTLE_S)
        previous, samples = samples, vllm_samples(server)
        if samples == previous:
            return samples
    raise AssertionError("the vllm:* samples kept changing while this test sent nothing")


def moved(server, before: dict, expected: dict) -> dict:
    """How far each key of `expected` moved since `before`, once all reach their expected values (the
    model records finished requests every 0.1 s) or 15 s have passed."""
    def deltas() -> dict:
        after = vllm_samples(server)
        return {k: total(after, k) - total(before, k) for k in expected}

    wait_for(lambda: deltas() == expected)
    return deltas()


def run_round(server, prompts, sampling: dict) -> list:
    """The prompts as non-streamed requests on one gRPC stream, as the vLLM backend's test sends them;
    their responses in the prompts' order."""
    responses: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        for i, prompt in enumerate(prompts):
            inputs = make_inputs(prompt, stream=False, sampling_parameters=json.dumps(sampling),
                                 return_num_input_tokens=True, return_num_output_tokens=True)
            client.async_stream_infer(MODEL, inputs, request_id=str(i))
        by_id = {}
        for _ in prompts:
            result, error = responses.get(timeout=120)
            assert error is None, error
            by_id[result.get_response().id] = result
        client.stop_stream()
    return [by_id[str(i)] for i in range(len(prompts))]


def test_counters_counts_and_sums_add_up_over_two_rounds_of_requests(idle_server):
    before = settled_samples(idle_server)
    prompt_tokens = generated_tokens = 0
    for _ in range(ROUNDS):
        for result in run_round(idle_server, PROMPTS, SAMPLING):
            prompt_tokens += int(result.as_numpy("num_input_tokens")[0])
            generated_tokens += int(result.as_numpy("num_output_tokens").sum())
    requests = ROUNDS * len(PROMPTS)
    assert generated_tokens == requests * MAX_TOKENS
    gaps = requests * (MAX_TOKENS - 1)  # N tokens of a request have N - 1 gaps between them
    observations = {"time_to_first_token_seconds": requests, "inter_token_latency_seconds": gaps,
                    "time_per_output_token_seconds": gaps, "e2e_request_latency_seconds": requests,
                    "request_prompt_tokens": requests, "request_generation_tokens": requests,
                    "request_params_n": requests, **dict.fromkeys(PHASES, requests)}
    expected = {
        key("prompt_tokens_total"): prompt_tokens,
        key("generation_tokens_total"): generated_tokens,
        key("request_success_total", finished_reason="length"): requests,
        key("request_success_total", finished_reason="stop"): 0,
        key("request_success_total", finished_reason="abort"): 0,
        key("request_prompt_tokens_sum"): prompt_tokens,
        key("request_generation_tokens_sum"): generated_tokens,
        key("request_params_n_sum"): requests,  # n = 1 each
    }
    for histogram, count in observations.items():
        expected[key(f"{histogram}_count")] = count
        # The vLLM backend's test reads the last bucket line, +Inf, which holds every observation.
        expected[key(f"{histogram}_bucket", le=math.inf)] = count
    assert moved(idle_server, before, expected) == expected

    after = vllm_samples(idle_server)
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "inter_token_latency_seconds"):
        assert total(after, key(f"{histogram}_sum")) > total(before, key(f"{histogram}_sum")), histogram
    # Two names for the same observations.
    assert total(after, key("inter_token_latency_seconds_sum")) == \
        total(after, key("time_per_output_token_seconds_sum"))
    # The engine's phases: a request's inference is its prefill and its decode; each decode of
    # MAX_TOKENS tokens and each prefill took time.
    spent = {phase: total(after, key(f"{phase}_sum")) - total(before, key(f"{phase}_sum")) for phase in PHASES}
    assert spent["request_prefill_time_seconds"] > 0 and spent["request_decode_time_seconds"] > 0
    assert spent["request_inference_time_seconds"] == pytest.approx(
        spent["request_prefill_time_seconds"] + spent["request_decode_time_seconds"])


def test_a_request_with_two_choices_is_counted_in_request_params_n(idle_server):
    before = settled_samples(idle_server)
    (result,) = run_round(idle_server, PROMPTS[:1], {**SAMPLING, "n": "2", "temperature": "1"})
    assert int(result.as_numpy("num_output_tokens").sum()) == 2 * MAX_TOKENS
    expected = {key("request_params_n_count"): 1, key("request_params_n_sum"): 2,
                key("request_params_n_bucket", le=1.0): 0, key("request_params_n_bucket", le=2.0): 1,
                key("generation_tokens_total"): 2 * MAX_TOKENS,
                key("request_success_total", finished_reason="length"): 1,
                **{key(f"{phase}_count"): 2 for phase in PHASES}}  # vLLM's phases: one per choice's sequence
    assert moved(idle_server, before, expected) == expected


def test_gauges_and_engine_counters_are_exported_per_engine(idle_server):
    samples = settled_samples(idle_server)
    names = {name for name, _ in samples}
    assert {*GAUGES, "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
            "vllm:num_preemptions_total"} <= names
    for (name, labels), value in samples.items():
        labels = dict(labels)
        assert labels["model_name"] == MODEL and labels["engine"], (name, labels)
        if name == "vllm:kv_cache_usage_perc":
            assert 0 <= value <= 1
        elif name in GAUGES:
            assert value == 0, name  # idle
    # One series per name and engine, as a reader that keeps one line per name (the vLLM backend's
    # test) expects; only the finish reasons, histogram buckets and speculative positions have one per
    # label value.
    per_engine = Counter((name, dict(labels)["engine"]) for name, labels in samples
                         if not {"finished_reason", "le", "position"} & {k for k, _ in labels})
    assert set(per_engine.values()) == {1}, [k for k, n in per_engine.items() if n > 1]


def metrics_text(server) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        return r.read().decode()


def last_line_values(text: str) -> dict[str, float]:
    """Each vllm:* name's value on its last line, as the vLLM backend's CI test reads /metrics (for a
    histogram's _bucket, the last line is +Inf's in Triton's order)."""
    return {name: float(value) for name, _, value in SAMPLE.findall(text)}


def test_native_histograms_read_as_the_vllm_backends_test_reads_them(own_servers_only, tiny_checkpoint, tmp_path):
    (server,) = start_servers((tmp_path / "server.log", {**TINY_SERVER_ENV, "GEMMA_CHECKPOINT": str(tiny_checkpoint),
                                                         "GEMMA_HISTOGRAMS": "native"}))
    try:
        run_round(server, PROMPTS, SAMPLING)
        requests, gaps = len(PROMPTS), len(PROMPTS) * (MAX_TOKENS - 1)
        assert wait_for(lambda: last_line_values(metrics_text(server)).get("vllm:time_per_output_token_seconds_count")
                        == gaps)
        text = metrics_text(server)
        for name, count in (("vllm:time_per_output_token_seconds", gaps), ("vllm:inter_token_latency_seconds", gaps),
                            ("vllm:time_to_first_token_seconds", requests), ("vllm:e2e_request_latency_seconds", requests)):
            assert f"# TYPE {name} histogram" in text
            assert last_line_values(text)[f"{name}_bucket"] == count  # +Inf, the last bucket line
    finally:
        stop_servers([server])


def test_by_default_every_histogram_is_counters_of_a_histograms_series(idle_server):
    text = metrics_text(idle_server)
    for name in ("vllm:time_per_output_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds", "vllm:request_params_n",
                 "gemma_time_to_first_token_seconds"):
        assert f"# TYPE {name}_bucket counter" in text and f"# TYPE {name} histogram" not in text
