"""Ctrl-C after hostile traffic: the server and its Python backend stub both stop.

Found by a fuzz run (issue #15): requests whose `sampling_parameters` nested 100k deep raised
RecursionError out of the model's `execute`, and a later SIGINT left Triton waiting for the model to
unload until its exit timeout (30 s), after which it exited and the stub lived on, orphaned. The
server here is the suite's tiny-model one, started for this test alone since the test stops it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

from tests.support.server import TINY_SERVER_ENV, start_servers, stop_servers
from tests.support.waiting import wait_for

STOP_LIMIT_S = 30  # Triton's own exit timeout: a model that has not unloaded by then is abandoned
HOSTILE_SAMPLING = ["[" * 100_000, '{"a":' * 50_000, "[" * 20_000, '{"max_tokens": ' + "9" * 5000 + "}",
                    '{"temperature": 1e-320, "max_tokens": 4}', '{"top_p": 1e-300, "max_tokens": 4}']


def process_group(pgid: int) -> dict[int, str]:
    """pid -> command line of every live process in the process group `pgid`."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            if int(fields[2]) == pgid and fields[0] != "Z":
                members[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue  # gone meanwhile
    return members


def hostile_round(server) -> list:
    """12 valid streams at once with the hostile requests; returns what went wrong."""
    problems: list = []
    greedy = json.dumps({"max_tokens": 16, "temperature": 0.0, "ignore_eos": True})

    def valid(i: int) -> None:
        try:
            result = server.stream(f"Story {i}:", stream=True, sampling_parameters=greedy, timeout=120)
            if result.num_output_tokens != 16:
                problems.append(f"stream {i}: {result}")
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            problems.append(f"stream {i}: {e}")

    def hostile(sampling: str) -> None:
        try:
            server.stream("Hi", sampling_parameters=sampling, timeout=120)
        except Exception as e:  # noqa: BLE001 - an INVALID_ARGUMENT is what these should get
            if "[INVALID_ARGUMENT]" not in str(e):
                problems.append(f"hostile {sampling[:20]!r}: {e}")

    def http_typo() -> None:
        status, body = server.post("/v2/models/gemma/generate", {"text_input": "Hi", "temprature": 0.5})
        if status != 400:
            problems.append(f"HTTP typo: {status} {body[:200]}")

    threads = [threading.Thread(target=valid, args=(i,)) for i in range(12)]
    threads += [threading.Thread(target=hostile, args=(s,)) for s in HOSTILE_SAMPLING]
    threads.append(threading.Thread(target=http_typo))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return problems


def test_sigint_after_hostile_traffic_stops_the_server_and_every_stub(tmp_path, tiny_checkpoint):
    (server,) = start_servers((tmp_path / "server.log",
                               {**TINY_SERVER_ENV, "GEMMA_CHECKPOINT": str(tiny_checkpoint)}))
    pgid = server.process.pid  # the launcher starts the server in a session (and group) of its own
    try:
        for _ in range(2):
            assert hostile_round(server) == []
        assert server.ready()
        assert any("triton_python_backend_stub" in cmd for cmd in process_group(pgid).values())

        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=STOP_LIMIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"tritonserver still runs {STOP_LIMIT_S} s after SIGINT:\n{server.log_tail(30)}")
        assert wait_for(lambda: not process_group(pgid), timeout=STOP_LIMIT_S, period=0.2), \
            f"still running {STOP_LIMIT_S} s after SIGINT: {process_group(pgid)}\n{server.log_tail(30)}"
        assert "Exit timeout expired" not in server.log_tail(), server.log_tail(30)
    finally:
        stop_servers([server])  # whatever is left of its process group goes too


def test_ctrl_c_in_a_terminal_finishes_what_is_in_flight_and_stops_every_process(tmp_path, tiny_checkpoint):
    """Ctrl-C interrupts the whole process group: tritonserver, its stub and the stub's engine process
    (backend/engine_process.py). Triton lets in-flight requests finish before it unloads the model;
    the engine process ignores the interrupt and leaves its shutdown to the stub, so a stream in
    flight still gets all its tokens, and then everything exits."""
    (server,) = start_servers((tmp_path / "server.log",
                               {**TINY_SERVER_ENV, "GEMMA_CHECKPOINT": str(tiny_checkpoint)}))
    pgid = server.process.pid
    outcome: list = []
    # Half the stream has arrived: the interrupt finds it in flight, and what is left finishes well
    # within Triton's exit timeout on a loaded machine.
    flowing = threading.Event()
    long = json.dumps({"max_tokens": 400, "temperature": 0.0, "ignore_eos": True})

    def half_way(result) -> bool:
        if result.num_output_tokens >= 200:
            flowing.set()
        return False  # the stream goes on

    def stream() -> None:
        try:
            outcome.append(server.stream("Once upon a time", stream=True, sampling_parameters=long, timeout=120,
                                         cancel_when=half_way))
        except Exception as e:  # noqa: BLE001 - reported by the assertion
            outcome.append(e)
        flowing.set()  # also when it failed before: the assertions below report it

    try:
        assert any("backend.engine_process" in cmd for cmd in process_group(pgid).values())
        reader = threading.Thread(target=stream)
        reader.start()
        assert flowing.wait(120), "the stream never started"
        assert not outcome, outcome  # still in flight when the interrupt comes
        os.killpg(pgid, signal.SIGINT)
        reader.join(STOP_LIMIT_S)
        server.process.wait(timeout=STOP_LIMIT_S)
        assert wait_for(lambda: not process_group(pgid), timeout=STOP_LIMIT_S, period=0.2), server.log_tail(30)
        assert len(outcome) == 1 and getattr(outcome[0], "num_output_tokens", None) == 400, outcome
        assert outcome[0].finish_reason == "length"
        log = server.log_tail(400)
        assert "Traceback" not in log and "exited unexpectedly" not in log, log
    finally:
        stop_servers([server])
