"""serving/metrics.py's BucketCounters: a histogram's observations, sent every HISTOGRAM_PERIODS flushes as
increments of the counters Prometheus reads as a histogram's series. The real server's exposition is
checked end to end in tests/integration/test_vllm_metrics.py; here, the arithmetic and the order."""
from __future__ import annotations

import collections
import math
import types

import pytest

from benchmarks.metrics_cost import counting_triton_module, measure, metrics_module


@pytest.fixture(scope="module")
def metrics():
    """An empty stand-in for Triton's module will do: BucketCounters is given its counters."""
    return metrics_module(types.ModuleType("triton_python_backend_utils"))


class Counters:
    """Stands for Triton's counters: every increment, in the order it was made."""

    def __init__(self):
        self.calls: list[tuple[str, str | None, float]] = []  # (suffix, le, amount)
        self.totals: dict[tuple[str, str | None], float] = {}

    def __call__(self, suffix: str, labels: dict[str, str]):
        key = (suffix, labels.get("le"))
        assert labels.get("engine") == "gemma_0", labels  # every series keeps the family's labels

        class Counter:
            def increment(_, amount: float) -> None:
                assert amount > 0  # a Triton counter refuses anything else
                self.calls.append((*key, amount))
                self.totals[key] = self.totals.get(key, 0) + amount
        return Counter()


def test_buckets_are_cumulative_and_a_value_on_a_bound_is_in_its_bucket(metrics):
    counters = Counters()
    histogram = metrics.BucketCounters((0.01, 0.05, 0.1), counters, {"engine": "gemma_0"})
    for value in [0.004, 0.01, 0.02, 0.05, 0.2]:
        histogram.observe(value)
    assert counters.calls == []  # nothing is sent before the flush
    histogram.flush()
    assert counters.totals == {("_count", None): 5, ("_bucket", "+Inf"): 5, ("_bucket", "0.1"): 4,
                               ("_bucket", "0.05"): 4, ("_bucket", "0.01"): 2, ("_sum", None): pytest.approx(0.284)}


def test_a_flush_sends_only_what_came_since_the_last_one(metrics):
    counters = Counters()
    histogram = metrics.BucketCounters((1.0, 2.5), counters, {"engine": "gemma_0"})
    for value in [0.5, 3.0]:
        histogram.observe(value)
    histogram.flush()
    sent = len(counters.calls)
    histogram.flush()  # nothing new: no IPC call at all
    assert len(counters.calls) == sent
    for value in [2.0, 2.0]:
        histogram.observe(value)
    histogram.flush()
    assert counters.totals == {("_count", None): 4, ("_bucket", "+Inf"): 4, ("_bucket", "2.5"): 3,
                               ("_bucket", "1"): 1, ("_sum", None): 7.5}
    assert ("_bucket", "1", 1) not in counters.calls[sent:]  # a bucket that did not move is not sent


def test_count_and_the_top_buckets_move_first(metrics):
    """A scrape that lands between two increments reads buckets that never shrink as le grows."""
    counters = Counters()
    histogram = metrics.BucketCounters((0.01, 0.1), counters, {"engine": "gemma_0"})
    for value in [0.001, 0.05, 5.0]:
        histogram.observe(value)
    histogram.flush()
    order = [(suffix, le) for suffix, le, _ in counters.calls]
    assert order == [("_count", None), ("_bucket", "+Inf"), ("_bucket", "0.1"), ("_bucket", "0.01"), ("_sum", None)]
    seen: dict = {}
    for suffix, le, amount in counters.calls:
        seen[le] = seen.get(le, 0) + amount
        bounds = sorted((math.inf if b == "+Inf" else float(b), n) for b, n in seen.items() if b is not None)
        assert all(low <= high for (_, low), (_, high) in zip(bounds, bounds[1:]))


def test_le_is_written_as_prometheus_writes_it(metrics):
    assert [metrics._le(b) for b in (0.001, 0.025, 1.0, 2.5, 80.0, math.inf)] == \
        ["0.001", "0.025", "1", "2.5", "80", "+Inf"]


def test_by_default_no_histogram_is_a_triton_histogram():
    """Every histogram, per request (TTFT, end to end, token counts, n) and per token (inter-token),
    is counted here and sent as counters: not one observe call, each a blocking IPC round trip with the
    stub's GIL held."""
    counters = measure(requests=70, tokens=64, requests_per_period=35)
    assert "observe" not in counters["by_kind_per_request"]


def test_a_requests_metric_calls_do_not_grow_with_its_tokens():
    """benchmarks/metrics_cost.py on the real GemmaMetrics: under load (35 requests a period) a request
    costs under one Triton metric call, whether it made 8 tokens or 512 (native: 27 and 1,539)."""
    short, long = (measure(requests=700, tokens=tokens, requests_per_period=35) for tokens in (8, 512))
    assert short["triton_calls_per_request"] < 1 and long["triton_calls_per_request"] < 1


def test_the_histograms_buckets_go_out_every_histogram_periods_flushes(metrics):
    calls = collections.Counter()
    metrics = metrics_module(counting_triton_module(calls))
    recorder = metrics.GemmaMetrics("gemma", "1", "gemma_0")
    recorder.record(metrics.RequestRecord("success", prompt_tokens=5, output_tokens=3, ttft_s=0.02,
                                          inter_token_s=[0.01, 0.01], e2e_s=0.05, finish_reason="length"))
    for _ in range(metrics.HISTOGRAM_PERIODS - 1):
        recorder.flush()
    counters_only = calls["increment"]  # the request's counters went out with the first flush
    assert counters_only > 0
    recorder.flush()
    histograms = {f.name for f in metrics.FAMILIES if f.kind == metrics.HISTOGRAM}
    assert calls["increment"] - counters_only >= 3 * len(histograms)  # at least _count, +Inf and _sum each


def test_native_histograms_cost_a_call_per_observation():
    """histograms "native": every histogram is a Triton histogram again, each observation one call:
    six a request, four a choice (the engine's phases; one here), and one per gap between tokens for
    each of the three inter-token families."""
    native = measure(requests=70, tokens=64, requests_per_period=35, native=True)
    assert native["by_kind_per_request"]["observe"] == 6 + 4 + 3 * 63
