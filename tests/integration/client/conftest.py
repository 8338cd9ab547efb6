"""Helpers for the client tests; the `server` fixtures come from tests/integration/conftest.py,
so the whole integration run shares one set of tritonservers."""
from __future__ import annotations

import time

import pytest


# Greedy and EOS ignored: outputs are reproducible and exactly max_tokens long.
GREEDY = dict(temperature=0.0, ignore_eos=True)
# A request that runs long past anything a test waits for, yet fits the tiny server's context
# (GEMMA_MAX_MODEL_LEN in tests/integration/conftest.py) with a short prompt.
LONG = 400


def wait_for(predicate, timeout: float = 15.0, period: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(period)
    return value


@pytest.fixture
def idle_server(server):
    """The server once nothing from earlier tests is running, queued or holding KV blocks."""
    assert wait_for(lambda: server.metric("gemma_running_requests") == 0
                    and server.metric("gemma_queue_depth") == 0
                    and server.metric("gemma_kv_blocks_used") == 0, timeout=60), "server never went idle"
    return server
