"""Two model instances (instance_group count 2) in front of one engine process, against a real
tritonserver: each instance is a stub of its own that takes requests and sends responses, and both
hand them to one engine (backend/engine_fronts.py), so the batch stays whole and its queue bound holds
for both. The engine's own metrics come from one instance; a dead engine is replaced by one shared again."""
from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from gemma_protocol import split_error_status

from tests.support.server import (LONG, TINY_SERVER_ENV, engine_processes, repository_with_instances,
                                  start_servers, stop_servers)
from tests.support.waiting import wait_for

INSTANCES = ("gemma_0_0", "gemma_0_1")
PROMPT = "The capital of France is"
GREEDY_8 = '{"temperature": 0, "max_tokens": 8, "ignore_eos": true}'
GREEDY_LONG = f'{{"temperature": 0, "max_tokens": {LONG}, "ignore_eos": true}}'


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("shared")
    env = {**TINY_SERVER_ENV, "GEMMA_CHECKPOINT": str(tiny_checkpoint)}
    (server,) = start_servers((work / "server.log", env, repository_with_instances(work / "repository", 2)))
    yield server
    stop_servers([server])


def run_many(server, n: int) -> list:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: server.stream(PROMPT, sampling_parameters=GREEDY_8), range(n)))


def instance_requests(server) -> dict[str, float]:
    return {name: server.metric("gemma_requests_total", instance=name, outcome="success") for name in INSTANCES}


def test_both_instances_serve_from_one_engine_process(server):
    assert len(engine_processes(server)) == 1
    before = instance_requests(server)
    results = []
    # Triton hands a request to an idle instance; rounds of concurrent requests reach both.
    for _ in range(10):
        results += run_many(server, 8)
        done = instance_requests(server)
        if all(done[name] > before[name] for name in INSTANCES):
            break
    assert all(done[name] > before[name] for name in INSTANCES), done
    assert {r.text for r in results} == {results[0].text} and all(r.num_output_tokens == 8 for r in results)
    assert len(engine_processes(server)) == 1


def test_the_queue_bound_holds_for_both_instances_together(server):
    """8 running + 16 waiting fill the one engine whichever instance took each request: of a burst of
    40, at least 16 are refused UNAVAILABLE (each instance alone would let in 24 of its own)."""
    overloaded_before = server.metric("gemma_requests_total", outcome="overloaded")
    errors: list = []
    client = server.open_stream(errors.append)
    try:
        for i in range(40):
            server.send(client, f"{PROMPT} {i}", stream=True, sampling_parameters=GREEDY_LONG)
        assert wait_for(lambda: len(errors) >= 40 - 24, timeout=30), len(errors)
        for error in errors:
            status, message = split_error_status(error.message())
            assert status == "UNAVAILABLE" and "16 requests are already waiting" in message, error.message()
        assert wait_for(lambda: server.metric("gemma_requests_total", outcome="overloaded")
                        == overloaded_before + len(errors))
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    assert wait_for(server.is_idle, timeout=30)  # every cancelled request ended, queued ones too


def test_the_engines_own_metrics_come_from_one_instance(server):
    assert wait_for(lambda: server.metric("gemma_kv_blocks_total") > 0)
    per_instance = [server.metric("gemma_kv_blocks_total", instance=name) for name in INSTANCES]
    assert sorted(per_instance)[0] == 0, per_instance  # so a sum over instances counts the engine once
    assert server.metric("gemma_kv_blocks_total") == max(per_instance)


def test_a_killed_engine_is_replaced_by_one_shared_engine(server):
    (engine,) = engine_processes(server)
    restarts = server.metric("gemma_engine_restarts_total")
    os.kill(engine, signal.SIGKILL)
    # Each instance finds it dead and restarts; the first to take the start lock starts one, the other
    # joins it. One engine was started again: the sum over instances counts one restart.
    assert wait_for(lambda: server.metric("gemma_engine_restarts_total") == restarts + 1, timeout=90)
    assert wait_for(lambda: len(engine_processes(server)) == 1 and engine not in engine_processes(server))
    # Both instances serve again (the one that joined may take a moment longer: until then it answers
    # UNAVAILABLE), and a late restart would have counted by now.
    assert wait_for(lambda: all(server.metric("gemma_engine_state", instance=name, state="serving") == 1
                                for name in INSTANCES))
    assert server.metric("gemma_engine_restarts_total") == restarts + 1
    assert all(r.num_output_tokens == 8 for r in run_many(server, 8))
    assert len(engine_processes(server)) == 1


def test_the_server_stops_on_sigterm_leaving_no_engine(server):
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    assert engine_processes(server) == []
