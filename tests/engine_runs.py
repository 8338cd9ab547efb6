"""Driving an Engine the way concurrent clients do; shared by the CPU and GPU engine tests."""
import threading
import time

import pytest

from backend.errors import InvalidRequestError
from backend.params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog, again and again and",
           "1 2 3 4 5", "Über naïve café — 東京"]


def run_staggered(engine, prompts, params, timeout: float = 60.0):
    """Submit each prompt once the previous one has produced output, so prefills and decodes of
    different requests share steps; return each request's outputs in order."""
    outputs = [[] for _ in prompts]
    readers = []
    for i, prompt in enumerate(prompts):
        started = threading.Event()

        def collect(handle, i=i, started=started):
            for out in handle:
                outputs[i].append(out)
                started.set()

        readers.append(threading.Thread(target=collect, args=(engine.submit(prompt, params),), daemon=True))
        readers[-1].start()
        assert started.wait(timeout)
    for reader in readers:
        reader.join(2 * timeout)
        assert not reader.is_alive()
    return outputs


def token_ids(outputs) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def wait_idle(engine, timeout: float = 30.0):
    """Engine stats once nothing runs or waits (fails after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0:
            return stats
        time.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


def check_bad_requests_refused(engine):
    """Each kind of bad request raises InvalidRequestError from submit (tiny model: 512 positions)."""
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.submit("", GREEDY)
    with pytest.raises(InvalidRequestError, match="exceeds the context"):
        engine.submit("word " * 600, SamplingParams(max_tokens=10))
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.submit([5, 10**7], GREEDY)
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        engine.submit("hi", SamplingParams(max_tokens=4, stop_token_ids=(10**7,)))
