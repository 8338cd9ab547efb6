"""The server-level benchmark's closed loop split over client processes (benchmarks/serving.py,
`--client-processes`) against the tiny server: every request sent once, counted once, with all its
tokens, and the run's wall time taken over every process."""
from __future__ import annotations

import time

from tests.support.waiting import wait_for

PROMPTS = ["The quick brown fox", "¿Dónde está la biblioteca? 图书馆在哪里?", "Once upon a time"]


def test_a_closed_loop_over_two_client_processes_counts_every_request_once(tiny_server):
    from benchmarks import serving  # not in the client image (docker/client.Dockerfile); tiny_server skips there

    def successes():
        return tiny_server.metric("gemma_requests_total", outcome="success")

    target = serving.ServerTarget(tiny_server.grpc_url, timeout_s=60, client_processes=2)
    try:
        before = successes()
        began = time.perf_counter()
        record = serving.measure(target, "closed", PROMPTS, 6, 60, concurrency=3, num_requests=7)
        elapsed = time.perf_counter() - began
        # The same processes again, at one client: only one of them runs it.
        single = serving.measure(target, "closed", PROMPTS, 6, 60, concurrency=1, num_requests=2)
    finally:
        serving.close(target)
    assert (record["system"], record["client_processes"]) == ("server", 2)
    assert (record["requests"], record["errors"], record["output_tokens"]) == (7, 0, 7 * 6), record
    # A gap per token after each request's first response: 5 each, one fewer where a first response
    # carried two tokens (the engine a step ahead of the stub's responder).
    assert record["ttft_ms"]["n"] == 7 and 0 < record["itl_ms"]["n"] <= 7 * 5
    assert record["tokens_per_s"] > 0 and 0 < record["wall_s"] < elapsed
    assert (single["client_processes"], single["requests"], single["errors"], single["output_tokens"]) == (1, 2, 0, 12)
    assert wait_for(lambda: successes() == before + 9), (before, successes())  # the server saw each request once
    assert all(not p.is_alive() for p in target.processes.processes)
