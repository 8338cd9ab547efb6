"""What the model's metrics cost per finished request: Triton metric calls, and the Python around them.

    python -m benchmarks.metrics_cost [--requests 3500] [--tokens 64] [--requests-per-period 35] [--native]

Every Triton metric update (`increment`, `set`, `observe`) is a blocking IPC round trip from the stub
to the server process (18.6 us each on the CPU VM, docs/benchmarks.md), so the number of them per
request bounds how many requests a second the stub's monitor thread can record. This feeds
serving.metrics.GemmaMetrics `--requests` finished requests of `--tokens` tokens each, flushing after
every `--requests-per-period` of them (the defaults: 10 s at the H100 grid's 256-client point, ~350
requests a second, and the model's 0.1 s period), with a stand-in for Triton's module that counts the
calls. Prints one JSON line: calls per request by kind, and the Python time of `record` + `flush` per
request (the stand-in's calls cost nothing, so this is our side alone). With --native, the histograms
are Triton histograms (the model's `histograms` setting "native"), as every histogram was before
543ab29. Requests' times and token counts spread as a load's do, so a period moves several buckets.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import sys
import time
import types
from unittest import mock

from backend.outputs import RequestPhases

from .stats import json_line


def counting_triton_module(calls: collections.Counter) -> types.ModuleType:
    """A triton_python_backend_utils whose metrics count their updates in `calls`."""
    class Metric:
        def __init__(self, **_):
            pass

        def increment(self, _):
            calls["increment"] += 1

        def set(self, _):
            calls["set"] += 1

        def observe(self, _):
            calls["observe"] += 1

    class MetricFamily:
        COUNTER, GAUGE, HISTOGRAM = range(3)

        def __init__(self, **_):
            pass

        def Metric(self, **kwargs):
            return Metric(**kwargs)

    module = types.ModuleType("triton_python_backend_utils")
    module.MetricFamily = MetricFamily
    return module


def metrics_module(triton_module: types.ModuleType) -> types.ModuleType:
    """serving.metrics imported with `triton_module` standing in for Triton's stub module (which exists
    only inside Triton), and left out of sys.modules: the next import is a fresh one."""
    with mock.patch.dict(sys.modules, {"triton_python_backend_utils": triton_module}):
        sys.modules.pop("serving.metrics", None)
        module = importlib.import_module("serving.metrics")
        sys.modules.pop("serving.metrics")
    return module


def measure(requests: int, tokens: int, requests_per_period: int, native: bool = False) -> dict:
    calls: collections.Counter = collections.Counter()
    metrics = metrics_module(counting_triton_module(calls))
    recorder = metrics.GemmaMetrics("gemma", "1", "gemma_0", native_histograms=native)
    records = [metrics.RequestRecord("success", prompt_tokens=10 + i % 20, output_tokens=tokens,
                                     ttft_s=0.01 * (1 + i % 30), inter_token_s=[0.003 + (i % 7) * 1e-4] * (tokens - 1),
                                     e2e_s=0.2 + 0.05 * (i % 40), n=1, finish_reason="length",
                                     phases=[RequestPhases(0.001 * (i % 9), 0.01 * (1 + i % 30), 0.19 + 0.05 * (i % 40))])
               for i in range(requests)]
    start = time.perf_counter()
    for i, record in enumerate(records, start=1):
        recorder.record(record)
        if i % requests_per_period == 0:
            recorder.flush()
    recorder.flush()
    seconds = time.perf_counter() - start
    return {"requests": requests, "tokens": tokens, "requests_per_period": requests_per_period, "native": native,
            "triton_calls_per_request": sum(calls.values()) / requests,
            "by_kind_per_request": {kind: n / requests for kind, n in sorted(calls.items())},
            "python_us_per_request": 1e6 * seconds / requests}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3500)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--requests-per-period", type=int, default=35)
    p.add_argument("--native", action="store_true", help="the histograms as Triton histograms")
    args = p.parse_args(argv)
    print(json_line(measure(args.requests, args.tokens, args.requests_per_period, args.native)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
