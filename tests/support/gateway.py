"""The gateway (`python -m gateway`) as a real process in front of a tritonserver, for the gateway tests
(tests/integration/gateway) and benchmarks/serving.py.

Importing this skips (pytest.importorskip) where the gateway's own packages are not installed, as in
the client image (docker/client.Dockerfile).
"""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from tests.support.server import ROOT, free_ports
from tests.support.waiting import wait_for

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

API_KEY = "test-key-0123456789"
STARTUP_TIMEOUT_S = 60
# Greedy sampling, as OpenAI's API asks for it.
GREEDY = dict(temperature=0.0)


@dataclass
class Gateway:
    url: str  # http://127.0.0.1:port
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 100) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/openapi.json", timeout=2):
                return True
        except urllib.error.HTTPError:  # an answer all the same
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_gateway(triton_url: str, log_path: Path, api_key: Optional[str] = None,
                  metrics_url: Optional[str] = None, workers: int = 1) -> Gateway:
    """`python -m gateway` on a free port, with GEMMA_API_KEY set only when `api_key` is given; returns
    once it answers. `metrics_url`: the server's metrics, where /health reads the engine's state (else
    the gateway's default, port 8002 of the server's host). `workers`: its --workers."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GEMMA_GATEWAY_") and k not in ("GEMMA_API_KEY", "GEMMA_TRITON_METRICS_URL")}
    options = ["--triton-url", triton_url, "--workers", str(workers)] + \
        (["--triton-metrics-url", metrics_url] if metrics_url else [])
    if api_key is not None:
        env["GEMMA_API_KEY"] = api_key
    for attempt in range(3):
        (port,) = free_ports(1)
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--port", str(port), *options],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        gateway = Gateway(f"http://127.0.0.1:{port}", process, log_path)
        wait_for(lambda: gateway.answers() or process.poll() is not None, timeout=STARTUP_TIMEOUT_S, period=0.1)
        if gateway.answers():
            return gateway
        gateway.stop()
        if "address already in use" not in gateway.log_tail().lower():  # else another process took the port
            break
    raise RuntimeError(f"the gateway did not start; its log:\n{gateway.log_tail()}")
