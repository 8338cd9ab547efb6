"""A dead engine process, seen from the outside: what clients get, readiness, and the engine coming
back. With the vLLM backend's ENABLE_VLLM_HEALTH_CHECK (and model control mode explicit) the model
unloads itself and reads as not ready, for the orchestrator to restart the server; without it the
model starts a fresh engine process itself."""
from __future__ import annotations

import os
import queue
import re
import signal
import time
from pathlib import Path

import pytest

import tritonclient.grpc as grpcclient

from tests.support.server import (MODEL, RETURN_ALL, STARTUP_TIMEOUT_S, TINY_SERVER_ENV, engine_processes, launch,
                                  make_inputs, start_servers, stop_servers)
from tests.support.waiting import wait_for

GREEDY = '{"temperature": 0, "max_tokens": 4}'
# Over ten restarts. Measured (tiny checkpoint, 2-core CPU): +0.4 MB on a 683 MB stub; +1.2 GB while each
# restart loaded the tokenizer again.
STUB_GROWTH_KIB = 32 << 10


@pytest.fixture
def tiny_env(tiny_checkpoint):
    return {**TINY_SERVER_ENV, "GEMMA_CHECKPOINT": str(tiny_checkpoint)}


def error_of(server, **tensors):
    """The error a request ends with (None if it succeeds)."""
    try:
        server.stream("The capital of France is", sampling_parameters=GREEDY, timeout=60, **tensors)
    except Exception as e:  # noqa: BLE001 - the test reads it
        return e
    return None


def test_with_the_health_check_a_dead_engine_unloads_the_model(tmp_path, tiny_env):
    (server,) = start_servers((tmp_path / "server.log", {**tiny_env, "GEMMA_ENABLE_VLLM_HEALTH_CHECK": "true"},
                               ("--model-control-mode=explicit", f"--load-model={MODEL}")))
    try:
        assert error_of(server) is None
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            assert client.is_model_ready(MODEL)
            (engine,) = engine_processes(server)
            os.kill(engine, signal.SIGKILL)
            assert wait_for(lambda: not client.is_model_ready(MODEL), timeout=30)
            index = {m.name: m.state for m in client.get_model_repository_index().models}
            assert index[MODEL] != "READY"
        assert error_of(server) is not None
        assert engine_processes(server) == []  # nothing restarted behind the orchestrator's back
        assert server.process.poll() is None  # the server itself keeps running
    finally:
        stop_servers([server])


@pytest.fixture(scope="module")
def restarting_server(tiny_checkpoint, tmp_path_factory):
    """One server for the engine faults below, each of which leaves it serving again (the watchdog's
    step_timeout_s short, so a hung engine is found in seconds)."""
    env = {**TINY_SERVER_ENV, "GEMMA_CHECKPOINT": str(tiny_checkpoint), "GEMMA_STEP_TIMEOUT_S": "2"}
    (server,) = start_servers((tmp_path_factory.mktemp("restarts") / "server.log", env))
    yield server
    stop_servers([server])


def engine_state(server) -> str:
    """The state gemma_engine_state reads 1 for (serving/metrics.py, ENGINE_STATES)."""
    (state,) = [key.split('state="')[1].split('"')[0] for key, value in server.metrics().items()
                if key.startswith("gemma_engine_state{") and value == 1]
    return state


def serves_again(server, restarts: int) -> bool:
    """The model counted `restarts` restarts, reads serving and answers a request."""
    return (wait_for(lambda: server.metric("gemma_engine_restarts_total") == restarts, timeout=90)
            and wait_for(lambda: engine_state(server) == "serving", timeout=5)
            and wait_for(lambda: error_of(server) is None, timeout=30))


@pytest.mark.parametrize("fault, signal_number, cause", [
    ("killed", signal.SIGKILL, "exited unexpectedly"),
    # Stopped: its steps never return, as with a hung kernel or a deadlock; the watchdog kills it.
    ("hung", signal.SIGSTOP, "returned no step for"),
])
def test_without_it_a_dead_engine_fails_what_runs_and_is_restarted(restarting_server, fault, signal_number, cause):
    server = restarting_server
    restarts = server.metric("gemma_engine_restarts_total")
    (engine,) = engine_processes(server)
    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(lambda result, error: events.put((result, error)))
    client.async_stream_infer(MODEL, make_inputs("Once upon a time", stream=True, **RETURN_ALL,
                                                 sampling_parameters='{"max_tokens": 400, "ignore_eos": true}'))
    result, error = events.get(timeout=60)  # the stream is running
    assert error is None
    os.kill(engine, signal_number)
    while error is None:
        result, error = events.get(timeout=10)
    client.stop_stream()
    client.close()
    # In flight: UNAVAILABLE (worth a retry), naming the cause.
    assert "[UNAVAILABLE]" in error.message() and cause in error.message(), error.message()
    # While it is down the model's health says so (Triton 2.51 itself still reads it ready), and new
    # requests are refused at once, naming the cause.
    assert wait_for(lambda: engine_state(server) == "restarting", timeout=5)
    refused = error_of(server)
    assert refused is not None and "[UNAVAILABLE]" in str(refused) and cause in str(refused), refused
    # Then the model serves again, from a fresh engine process, and counts the restart.
    assert serves_again(server, restarts + 1)
    assert engine_processes(server) not in ([], [engine])
    assert wait_for(lambda: server.metric("gemma_kv_blocks_total") > 0)  # the new engine's stats


def test_an_engine_that_stops_answering_while_idle_is_replaced(restarting_server):
    """No request in flight, so no step is overdue: the model's health check (stats, every 0.1 s)
    finds it instead, after 2 x step_timeout_s without an answer, and it is killed and restarted."""
    server = restarting_server
    restarts = server.metric("gemma_engine_restarts_total")
    (engine,) = engine_processes(server)
    os.kill(engine, signal.SIGSTOP)
    assert wait_for(lambda: engine_state(server) == "restarting", timeout=30)
    assert serves_again(server, restarts + 1)
    assert engine not in engine_processes(server)
    assert "answered nothing for 4 s (step_timeout_s=2) and was killed" in server.log_tail(400)


def process_memory(pid: int) -> dict[str, int]:
    """Resident memory (KiB), threads and open file descriptors of a process."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_kib": int(status["VmRSS"].split()[0]), "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def test_memory_stays_flat_across_ten_engine_restarts(restarting_server):
    """Ten SIGKILLs of the engine process, each followed by a fresh one: the stub keeps no part of
    the dead engines (memory, threads, pipes), and each fresh engine process is the size of the first.
    The engine process is the one the kernel's OOM killer prefers (it is restarted; the stub is not)."""
    server = restarting_server
    restarts = server.metric("gemma_engine_restarts_total")
    (engine,) = engine_processes(server)
    stub = int(Path(f"/proc/{engine}/stat").read_text().rpartition(")")[2].split()[1])
    assert int(Path(f"/proc/{engine}/oom_score_adj").read_text()) > int(Path(f"/proc/{stub}/oom_score_adj").read_text())
    assert error_of(server) is None
    stub_before, engine_before = process_memory(stub), process_memory(engine)
    for kill in range(1, 11):
        os.kill(engine, signal.SIGKILL)
        assert serves_again(server, restarts + kill)
        (engine,) = engine_processes(server)
    stub_after, engine_after = process_memory(stub), process_memory(engine)
    print(f"stub {stub_before} -> {stub_after}; engine {engine_before} -> {engine_after}")
    assert stub_after["threads"] == stub_before["threads"] and stub_after["fds"] == stub_before["fds"]
    assert stub_after["rss_kib"] - stub_before["rss_kib"] < STUB_GROWTH_KIB
    assert abs(engine_after["rss_kib"] - engine_before["rss_kib"]) < 0.1 * engine_before["rss_kib"]
    assert engine_after["threads"] == engine_before["threads"]


def test_after_its_engine_restarts_the_server_stops_on_sigterm(restarting_server):
    """Issue #29 found a server whose engine had died still running 15 s after SIGTERM; after the
    restarts above (the last test on this server) it unloads the model and exits at once."""
    server = restarting_server
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    assert time.monotonic() - started < 15
    assert engine_processes(server) == []


def test_a_killed_stub_leaves_no_engine_process_behind(tmp_path, tiny_env):
    """What Triton 2.51 does when the model's stub dies (docs/deploy.md, Health): it does not start
    the stub again, and answers every request with an error at once (never a hang), while the model
    still reads ready. The model's heartbeat stops, which the liveness probe sees. The engine process
    reads EOF on its pipe and exits, so no orphan holds the GPU."""
    (server,) = start_servers((tmp_path / "server.log", tiny_env))
    try:
        assert error_of(server) is None
        (engine,) = engine_processes(server)
        stub = int(Path(f"/proc/{engine}/stat").read_text().rpartition(")")[2].split()[1])  # its parent
        assert b"triton_python_backend_stub" in Path(f"/proc/{stub}/cmdline").read_bytes()
        os.kill(stub, signal.SIGKILL)
        assert wait_for(lambda: engine_processes(server) == [], timeout=30)
        error = error_of(server)
        assert error is not None and "is not healthy" in str(error), error
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            assert client.is_model_ready(MODEL)  # Triton 2.51 does not look at the stub
        heartbeat = server.metric("gemma_heartbeat_timestamp_seconds")
        time.sleep(1)
        assert server.metric("gemma_heartbeat_timestamp_seconds") == heartbeat < time.time() - 1
        assert server.process.poll() is None
        # A SIGTERM would take Triton's exit timeout (30 s): the dead stub never finalizes the model.
        server.process.kill()
    finally:
        stop_servers([server])


def test_a_kv_cache_that_does_not_fit_fails_the_load_naming_the_setting(tmp_path, tiny_env):
    """The engine checks the cache against the free memory (on a CPU, MemAvailable) before it
    allocates it: the model fails to load with a message naming the setting and the free bytes, and
    the server (model control mode none) exits."""
    server = launch(tmp_path / "server.log", {**tiny_env, "GEMMA_KV_CACHE_BYTES": str(1 << 50)})
    try:
        assert server.process.wait(timeout=STARTUP_TIMEOUT_S) != 0
        log = server.log_tail(400)
        # The cause's message, and of the Python frames only the model's initialize (Triton adds them).
        assert re.search(r"failed to load 'gemma' version 1: Internal: EngineStartError: "
                         r"kv_cache_bytes=1125899906842624 does not fit: \d+ bytes are free on cpu \(after the "
                         r"weights\); set kv_cache_bytes below that\\n\\nAt:\\n  \S+/model.py\(\d+\): initialize\\n\"$",
                         log, re.M), log
    finally:
        server.stop()
