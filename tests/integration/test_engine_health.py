"""A dead engine process, seen from the outside: what clients get, readiness, and the engine coming
back. With the vLLM backend's ENABLE_VLLM_HEALTH_CHECK (and model control mode explicit) the model
unloads itself and reads as not ready, for the orchestrator to restart the server; without it the
model starts a fresh engine process itself."""
from __future__ import annotations

import os
import queue
import signal
from pathlib import Path

import pytest

import tritonclient.grpc as grpcclient

from tests.support.server import (MODEL, RETURN_ALL, TINY_SERVER_ENV, engine_processes, make_inputs, start_servers,
                                  stop_servers)
from tests.support.waiting import wait_for

GREEDY = '{"temperature": 0, "max_tokens": 4}'


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


@pytest.mark.parametrize("fault, signal_number, cause", [
    ("killed", signal.SIGKILL, "exited unexpectedly"),
    # Stopped: its steps never return, as with a hung kernel or a deadlock; the watchdog kills it.
    ("hung", signal.SIGSTOP, "returned no step for"),
])
def test_without_it_a_dead_engine_fails_what_runs_and_is_restarted(tmp_path, tiny_env, fault, signal_number, cause):
    (server,) = start_servers((tmp_path / "server.log", {**tiny_env, "GEMMA_STEP_TIMEOUT_S": "2"}))
    try:
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
        # Then the model serves again, from a fresh engine process, and counts the restart.
        assert wait_for(lambda: error_of(server) is None, timeout=90)
        assert engine_processes(server) not in ([], [engine])
        assert wait_for(lambda: server.metric("gemma_engine_restarts_total") == 1)
        assert wait_for(lambda: server.metric("gemma_kv_blocks_total") > 0)  # the new engine's stats
    finally:
        stop_servers([server])


def test_a_killed_stub_leaves_no_engine_process_behind(tmp_path, tiny_env):
    """What Triton 2.51 does when the model's stub dies (docs/deploy.md, Health): it does not start
    the stub again, and answers every request with an error at once (never a hang). The engine process
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
        assert server.process.poll() is None
    finally:
        stop_servers([server])
