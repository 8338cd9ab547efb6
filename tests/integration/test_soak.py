"""A short `make soak` (benchmarks/soak.py) on the tiny server: streamed requests with random
cancellation, mixed sampling and 30% structured-outputs constraints, then the accounting (the full run, with the stub's memory, is
`make soak`; its figures are in docs/soak.md)."""
from __future__ import annotations

import asyncio


def test_short_soak_accounts_for_every_request(tiny_server):
    from benchmarks import soak

    before = soak.outcome_counts(tiny_server)
    tally = asyncio.run(soak.run_load(tiny_server.grpc_url, num_requests=120, concurrency=8, cancel_fraction=0.3,
                                      max_tokens=(4, 12), seed=1, constrained_fraction=0.3))
    gauges = soak.wait_until_idle(tiny_server, before)
    after = soak.outcome_counts(tiny_server)
    report = soak.accounting(120, tally, {k: after[k] - before[k] for k in after}, gauges)
    assert report["problems"] == [], report
    assert tally.completed > 0 and tally.cancelled_before_first_token > 0 and tally.cancelled_mid_stream > 0
