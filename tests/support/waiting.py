"""Waiting for a condition by polling it, never for a fixed time: a loaded machine only makes it slower."""
from __future__ import annotations

import time


def wait_for(predicate, timeout: float = 15.0, period: float = 0.05):
    """The predicate's first truthy value, polled until `timeout` (then its last value). The timeout
    only keeps a test that would hang from hanging: assert the value, never the time it took."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(period)
    return value
