"""The gateway (`python -m gateway`) as a real process in front of the suite's tritonserver.

Every test talks HTTP to it: with the official `openai` SDK, or with httpx for what the SDK hides
(SSE framing, status codes, headers, error bodies). The gateway and SDK packages are not in the
client image (docker/client.Dockerfile), so there these tests skip.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from ..conftest import ROOT, _free_ports  # noqa: E402

MODEL = "gemma"
API_KEY = "test-key-0123456789"
STARTUP_TIMEOUT_S = 60
# Greedy, and requests that run until cancelled (the tiny server's context is 512 tokens).
GREEDY = dict(temperature=0.0)
LONG = 400


@dataclass
class Gateway:
    url: str  # http://127.0.0.1:port
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 100) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_gateway(triton_url: str, log_path: Path, api_key: Optional[str] = None) -> Gateway:
    """`python -m gateway` on a free port, with GEMMA_API_KEY set only when `api_key` is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEMMA_GATEWAY_") and k != "GEMMA_API_KEY"}
    if api_key is not None:
        env["GEMMA_API_KEY"] = api_key
    for attempt in range(3):
        (port,) = _free_ports(1)
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--port", str(port), "--triton-url", triton_url],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        gateway = Gateway(f"http://127.0.0.1:{port}", process, log_path)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                httpx.get(f"{gateway.url}/openapi.json", timeout=2)
                return gateway
            except httpx.TransportError:
                time.sleep(0.1)
        gateway.stop()
        if "address already in use" not in gateway.log_tail().lower():  # else another process took the port
            break
    raise RuntimeError(f"the gateway did not start; its log:\n{gateway.log_tail()}")


@pytest.fixture(scope="session")
def gateway(server, tmp_path_factory) -> Gateway:
    """The gateway in front of the `server` under test, without an API key."""
    g = start_gateway(server.grpc_url, tmp_path_factory.mktemp("gateway") / "gateway.log")
    yield g
    g.stop()


@pytest.fixture(scope="session")
def keyed_gateway(server, tmp_path_factory) -> Gateway:
    """The same, with GEMMA_API_KEY=API_KEY."""
    g = start_gateway(server.grpc_url, tmp_path_factory.mktemp("gateway-key") / "gateway.log", api_key=API_KEY)
    yield g
    g.stop()


@pytest.fixture
def sdk(gateway):
    """The official OpenAI client pointed at the gateway; no retries, so each call is one request."""
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture
def http(gateway):
    with httpx.Client(base_url=gateway.url, timeout=120) as client:
        yield client




@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, Gateway):
                report.sections.append((f"gateway log ({name}, last 100 lines)", value.log_tail()))
