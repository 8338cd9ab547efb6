"""/health follows the model's engine, not only Triton's readiness, which Triton 2.51 keeps true while
the engine is being restarted and after it failed for good. Here an engine is killed while its
checkpoint's weights are gone, so every restart fails: /health answers 503 while it restarts, then 503
for good once the restarts (two, 0.1 s apart: GEMMA_ENGINE_RESTART_DELAYS_S) have all failed. Then the
model refuses every request at once with UNAVAILABLE naming both causes, and the pod's readiness probe
(deploy/k8s/base/health.py, also compose's health check) fails as the gateway does."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.gateway import start_gateway
from tests.support.server import MODEL, ROOT, TINY_SERVER_ENV, engine_processes, start_servers, stop_servers
from tests.support.waiting import wait_for

httpx = pytest.importorskip("httpx")

RESTART_DELAYS_S = "0.1,0.1"
KILLED = "the engine process exited unexpectedly (exit code -9)"
NO_WEIGHTS = "no model.safetensors or model.safetensors.index.json"


def health(gateway) -> tuple[int, str]:
    response = httpx.get(f"{gateway.url}/health", timeout=30)
    return response.status_code, response.json().get("reason", "")


def engine_state(server) -> str:
    (state,) = [key.split('state="')[1].split('"')[0] for key, value in server.metrics().items()
                if key.startswith("gemma_engine_state{") and value == 1]
    return state


@pytest.fixture(scope="module")
def failed_engine(tiny_checkpoint, tmp_path_factory):
    """A server on its own copy of the tiny checkpoint (links to its files) and a gateway in front;
    /health read once while all is well, then every 0.1 s from the kill until the engine has failed."""
    checkpoint = tmp_path_factory.mktemp("checkpoint")
    for path in tiny_checkpoint.iterdir():
        (checkpoint / path.name).symlink_to(path)
    env = {**TINY_SERVER_ENV, "GEMMA_CHECKPOINT": str(checkpoint), "GEMMA_ENGINE_RESTART_DELAYS_S": RESTART_DELAYS_S}
    logs = tmp_path_factory.mktemp("failed-engine")
    (server,) = start_servers((logs / "server.log", env))
    gateway = start_gateway(server.grpc_url, logs / "gateway.log", metrics_url=server.metrics_url)
    try:
        before = health(gateway)
        (checkpoint / "model.safetensors").unlink()  # a fresh engine cannot load its weights
        (engine,) = engine_processes(server)
        os.kill(engine, signal.SIGKILL)
        readings = []

        def failed() -> bool:
            readings.append(health(gateway))
            return engine_state(server) == "failed"

        assert wait_for(failed, timeout=60, period=0.1), server.log_tail()
        readings.append(health(gateway))
        yield server, gateway, before, readings
    finally:
        gateway.stop()
        stop_servers([server])


def test_health_is_503_while_the_engine_restarts_and_after_it_failed(failed_engine):
    server, gateway, before, readings = failed_engine
    assert before == (200, "")
    assert (503, "gemma_0_0: the engine is restarting") in readings
    assert readings[-1] == (503, "gemma_0_0: the engine is failed")
    # Triton itself still reads the model ready: only the model's own metrics tell
    assert httpx.get(f"{server.http_url}/v2/models/{MODEL}/ready").status_code == 200
    # once not ready, never ready again: no request was served by a half-started engine
    first_down = next(i for i, (status, _) in enumerate(readings) if status == 503)
    assert all(status == 503 for status, _ in readings[first_down:])


def test_a_failed_engine_refuses_every_request_at_once_naming_both_causes(failed_engine):
    server, gateway, _, _ = failed_engine
    started = time.monotonic()
    with pytest.raises(Exception) as refused:
        server.stream("The capital of France is", sampling_parameters='{"max_tokens": 4}', timeout=30)
    assert time.monotonic() - started < 2  # refused at once, never a hang
    message = str(refused.value)
    assert "[UNAVAILABLE] Model is unavailable due to unhealthy engine: " + KILLED in message, message
    assert "no restart succeeded (2 attempts), the last failed: " in message and NO_WEIGHTS in message, message
    # The gateway's clients get the same cause, as a 503 their SDK retries
    response = httpx.post(f"{gateway.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4},
                          timeout=30)
    assert response.status_code == 503 and NO_WEIGHTS in response.json()["error"]["message"], response.text
    assert engine_processes(server) == []  # the failed starts left no process behind
    assert server.metric("gemma_engine_restarts_total") == 0


@pytest.mark.parametrize("kind", ["ready", "live"])
def test_the_pods_probes_fail_once_the_engine_failed(failed_engine, kind):
    """The script the pod's readiness and liveness probes and compose's health check run, with the
    container's port variables: only a restart of the server helps now."""
    server, _, _, _ = failed_engine
    ports = {"HTTP_PORT": server.http_url.rpartition(":")[2],
             "METRICS_PORT": server.metrics_url.rpartition(":")[2].partition("/")[0]}
    probe = subprocess.run([sys.executable, str(ROOT / "deploy" / "k8s" / "base" / "health.py"), kind],
                           env={**os.environ, **ports}, capture_output=True, text=True, timeout=30)
    assert (probe.returncode, probe.stdout.strip()) == (1, f"{kind}: gemma_0_0: the engine is failed")


def test_the_metrics_url_defaults_to_port_8002_of_tritons_host_and_none_turns_it_off():
    from gateway.settings import Settings

    assert Settings(triton_url="triton:8001").engine_metrics_url() == "http://triton:8002/metrics"
    assert Settings(triton_url="[::1]:9001").engine_metrics_url() == "http://[::1]:8002/metrics"
    assert Settings(triton_metrics_url="https://m:9/metrics").engine_metrics_url() == "https://m:9/metrics"
    assert Settings(triton_metrics_url="none").engine_metrics_url() is None


def test_a_metrics_url_that_is_no_url_stops_the_gateway_at_start_naming_it():
    result = subprocess.run([sys.executable, "-m", "gateway", "--triton-metrics-url", "localhost:8002"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert ("the Triton metrics URL (GEMMA_TRITON_METRICS_URL, --triton-metrics-url) must be "
            "http(s)://host:port/metrics or 'none', got 'localhost:8002'") in result.stderr, result.stderr
