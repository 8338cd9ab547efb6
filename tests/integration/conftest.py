"""The fixtures of the end-to-end tests: real tritonservers on model_repository/ (tests/support/server.py).

By default the suite starts its own servers, running the shipped repository unchanged: GEMMA_*
environment variables point it at a tiny seeded random Gemma 3 (tests/tiny_models.py, with the
real Gemma tokenizer) so the suite stays fast on a CPU. When a test fails, the log tail of each
server it used is attached to its report.

With GEMMA_TEST_SERVER_URL=host:8001 (and GEMMA_TEST_HTTP_URL=host:8000,
GEMMA_TEST_METRICS_URL=host:8002) the tests that work on any server run against that one instead
(scripts/e2e.sh in the client container); those that need the suite's own servers (the tiny
checkpoint, its small limits, an in-process reference engine) are skipped.

Module-level imports stay within what the client image has (no torch): see docs/deploy.md.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc")
from tests.support.server import (MODEL, STARTUP_TIMEOUT_S, TINY_SERVER_ENV, TritonServer, start_servers,  # noqa: E402
                                  stop_servers)
from tests.support.waiting import wait_for  # noqa: E402

EXTERNAL_GRPC_URL = os.environ.get("GEMMA_TEST_SERVER_URL", "")


@pytest.fixture
def idle_server(server):
    """The server once nothing from earlier tests is running, queued or holding KV blocks."""
    assert wait_for(server.is_idle, timeout=60), "server never went idle"
    return server


def _own_servers_only() -> None:
    if EXTERNAL_GRPC_URL:
        pytest.skip("needs the suite's own tritonserver; GEMMA_TEST_SERVER_URL points at another one")


@pytest.fixture
def own_servers_only() -> None:
    """Skips a test that starts servers of its own when the suite runs against GEMMA_TEST_SERVER_URL's."""
    _own_servers_only()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """tests/tiny_models.py's tiny Gemma 3 with the real Gemma tokenizer (as tests/conftest.py's
    `servable_checkpoint`, which scripts/e2e.sh's --confcutdir leaves out)."""
    _own_servers_only()
    from backend.default_model import ensure_default_checkpoint
    from tests.tiny_models import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3_text", seed=1,
                            tokenizer_dir=ensure_default_checkpoint())


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, tiny_checkpoint) -> TritonServer:
    """The suite's own tiny-model server (TINY_SERVER_ENV). Tests that rely on its checkpoint or
    limits use this fixture."""
    (s,) = start_servers((tmp_path_factory.mktemp("triton") / "server.log",
                          {**TINY_SERVER_ENV, "GEMMA_CHECKPOINT": str(tiny_checkpoint)}))
    yield s
    stop_servers([s])


@pytest.fixture(scope="session")
def server(request) -> TritonServer:
    """The server under test: GEMMA_TEST_SERVER_URL's, else the suite's own tiny-model server."""
    if not EXTERNAL_GRPC_URL:
        return request.getfixturevalue("tiny_server")
    host = EXTERNAL_GRPC_URL.rsplit(":", 1)[0]
    http = os.environ.get("GEMMA_TEST_HTTP_URL", f"{host}:8000")
    metrics = os.environ.get("GEMMA_TEST_METRICS_URL", f"{host}:8002")
    s = TritonServer(EXTERNAL_GRPC_URL, f"http://{http}", f"http://{metrics}/metrics")
    if not s.wait_ready(STARTUP_TIMEOUT_S):
        pytest.fail(f"model {MODEL!r} at {s.http_url} is not ready")
    return s


@pytest.fixture(scope="session")
def default_server(tmp_path_factory) -> TritonServer:
    """model_repository/ as shipped: the packaged Gemma 3 270M with the default settings (one for the
    session: three modules use it, and each start is ~12 s)."""
    _own_servers_only()
    (s,) = start_servers((tmp_path_factory.mktemp("triton-default") / "server.log", {}))
    yield s
    stop_servers([s])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, TritonServer) and value.process is not None:
                report.sections.append((f"tritonserver log ({name}, last 200 lines)", value.log_tail()))
