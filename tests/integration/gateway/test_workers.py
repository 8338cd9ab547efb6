"""`python -m gateway --workers N`: N processes serve one port, each with its own event loop and gRPC
channel to Triton (one process's ~0.3 ms of CPU per streamed token caps a GPU server's streams). The
options given on the command line reach every worker."""
from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import pytest

from tests.support.gateway import start_gateway
from tests.support.waiting import wait_for

httpx = pytest.importorskip("httpx")


def workers(pid: int) -> list[int]:
    """The gateway's worker processes: multiprocessing's spawned children (not its resource tracker)."""
    pids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def stream(url: str, i: int) -> tuple[str, str]:
    body = {"model": "gemma", "prompt": f"Count with me, {i}:", "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, finish = "", None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[len("data: "):])["choices"]:
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
    return text, finish


def test_two_workers_serve_one_port_with_the_options_given_on_the_command_line(server, tmp_path):
    gateway = start_gateway(server.grpc_url, tmp_path / "gateway.log", metrics_url=server.metrics_url, workers=2)
    try:
        pids = workers(gateway.process.pid)
        assert len(pids) == 2, gateway.log_tail()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: stream(gateway.url, i), range(8)))
        assert all(finish == "length" and text for text, finish in answers), answers
        # --triton-metrics-url reached the workers: /health reads the engine's state there.
        health = httpx.get(f"{gateway.url}/health", timeout=30)
        assert health.status_code == 200, health.text
    finally:
        gateway.stop()
    # Stopping the gateway stops its workers too.
    assert wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), timeout=15, period=0.1)


def test_the_number_of_workers_comes_from_the_environment_and_must_be_positive():
    from gateway.settings import Settings

    assert Settings.from_env({}).workers == 1
    assert Settings.from_env({"GEMMA_GATEWAY_WORKERS": "4"}).workers == 4
    with pytest.raises(ValueError, match="GEMMA_GATEWAY_WORKERS"):
        Settings.from_env({"GEMMA_GATEWAY_WORKERS": "0"})


def test_zero_workers_on_the_command_line_is_refused_not_taken_for_the_default():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "gateway", "--workers", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "must be >= 1, got 0" in done.stderr
