"""The gateway tests' fixtures: the gateway (tests/support/gateway.py) in front of the suite's tritonserver.

Every test talks HTTP to it: with the official `openai` SDK, or with httpx for what the SDK hides
(SSE framing, status codes, headers, error bodies). The gateway and SDK packages are not in the
client image (docker/client.Dockerfile), so there these tests skip.
"""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tests.support.gateway import API_KEY, Gateway, start_gateway  # noqa: E402


@pytest.fixture(scope="session")
def gateway(server, tmp_path_factory) -> Gateway:
    """The gateway in front of the `server` under test, without an API key."""
    g = start_gateway(server.grpc_url, tmp_path_factory.mktemp("gateway") / "gateway.log",
                      metrics_url=server.metrics_url)
    yield g
    g.stop()


@pytest.fixture(scope="session")
def keyed_gateway(server, tmp_path_factory) -> Gateway:
    """The same, with GEMMA_API_KEY=API_KEY."""
    g = start_gateway(server.grpc_url, tmp_path_factory.mktemp("gateway-key") / "gateway.log", api_key=API_KEY,
                      metrics_url=server.metrics_url)
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
