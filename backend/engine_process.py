"""The engine core in a process of its own, behind the same API as an in-process EngineCore.

Why: the engine thread's host work per step (schedule, layout, launch, apply the tokens) and the
threads that read its outputs (detokenizing, sending responses) need the GIL. Sharing one GIL, each
waits for the other: measured on an H200 with 64 streams, the in-process engine's step took 4.4 ms
of host time for 2.3 ms of GPU work, and the Triton server, whose responder thread shares the
engine's GIL, reached 0.68x of the engine alone. In a process of its own, the engine's loop has a GIL
to itself, as vLLM's engine core does.

The parent keeps everything per request in the front (backend/engine.py): tokenizing and checking,
the handles, detokenizing and stop strings; it resolved and checked the checkpoint before, so the
engine process loads no tokenizer. The engine process gets the config and the EOS ids, then each
accepted request (id, token ids, params) and each cancellation or stop string found, and sends back,
once per engine loop, the token deltas of every request as one message. Two pipes between the two
processes, commands one way and events the other, carry pickled tuples (pickle frames itself).

Several fronts can share one engine process (backend/engine_fronts.py says why): given a name
(`shared_as`), a front joins the engine process listening under it on an abstract Unix socket, and
starts it if none does; the socket carries the same messages as the pipes.

The engine process is `python -m backend.engine_process`, started with this process's sys.path
(not multiprocessing's spawn, which re-runs the parent's main module: a script without a main
guard, or Triton's stub, would not survive that).
"""
from __future__ import annotations

import logging
import os
import pickle
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from .engine_core import EngineStats, Publish
from .engine_fronts import SLOT_SHIFT, serve_engine
from .errors import EngineOverloadedError
from .outputs import TokenDelta
from .params import EngineConfig, SamplingParams

log = logging.getLogger(__name__)

JOIN_POLL_S = 0.1  # how often a front waiting for another front's engine start looks again
STATS_TIMEOUT_S = 30.0  # at most; 2 x step_timeout_s when that is shorter (tests)
# Added to the engine process's oom_score_adj: when memory runs out, the kernel's OOM killer takes the
# engine process, which the model restarts, rather than the stub or Triton, which nothing restarts in
# Triton 2.51 (docs/deploy.md, Health). 500 adds half the memory limit to its badness score.
OOM_SCORE_ADJ_RAISE = 500


class EngineCoreProcess:
    """The parent's end: the same API as an EngineCore (add, end, stats, shutdown, limits, device)."""

    def __init__(self, config: EngineConfig, eos_token_ids: frozenset[int], publish: Publish,
                 on_exit: Callable[[str], None], num_unfinished: Callable[[], int],
                 shared_as: Optional[str] = None):
        """Start the engine process and wait until its model is loaded (its CUDA graphs captured); a
        core that fails to start raises here, as an EngineCore does. With `shared_as`, join the engine
        process that name finds if one runs (the fronts of one engine: backend/engine_fronts.py), and
        start it otherwise. `on_exit(error)` is called if the process exits on its own.
        `num_unfinished()` is how many requests the front has added and not yet seen finish (its
        handles): the watchdog's only count of requests in flight."""
        self._publish, self._on_exit, self._num_unfinished = publish, on_exit, num_unfinished
        self._process: Optional[subprocess.Popen] = None  # only where this front started it
        self._send_lock = threading.Lock()
        self._closed = False  # shut down, or the process is gone
        self._engine_exits = True  # what the engine answered our shutdown: whether it exits (we were its last front)
        if shared_as is None:
            ready = self._start(config, eos_token_ids, None)
        else:
            ready = self._join_or_start(config, eos_token_ids, shared_as)
        self.limits, self.device, slot, self._pid = ready
        self.request_id_base = slot << SLOT_SHIFT  # this front's ids (backend/engine_fronts.py)
        self.reports_engine_stats = True  # False while another front of the shared engine reports them
        self._stats_lock = threading.Lock()
        self._stats: queue.SimpleQueue = queue.SimpleQueue()
        self._exit_error: Optional[str] = None
        self._step_timeout_s = config.step_timeout_s
        # A process that answers nothing (frozen whole, unlike a hung engine thread, which the watchdog
        # finds) is killed after this, idle or not. 2 x a short step_timeout_s (tests) leaves a stopped
        # process with requests in flight to the watchdog, which names the step.
        self._stats_timeout_s = min(STATS_TIMEOUT_S, 2 * config.step_timeout_s)
        self._last_progress = time.monotonic()  # the last step's deltas, or the first request after idling
        self._hung: Optional[str] = None  # why the watchdog killed the process
        self._receiver = threading.Thread(target=self._receive, name="gemma-engine-events", daemon=True)
        self._receiver.start()
        threading.Thread(target=self._watch, name="gemma-engine-watchdog", daemon=True).start()

    def _start(self, config: EngineConfig, eos_token_ids: frozenset[int], shared_as: Optional[str]) -> tuple:
        """Start an engine process (listening as `shared_as` once ready, if given) and become its first front."""
        commands_in, commands_out = os.pipe()
        events_in, events_out = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._process = subprocess.Popen(
            [python_executable(), "-m", "backend.engine_process", str(commands_in), str(events_out),
             *([shared_as] if shared_as is not None else [])],
            pass_fds=(commands_in, events_out), env=env)
        os.close(commands_in), os.close(events_out)  # the child's ends: EOF reaches us when it exits
        self._commands, self._events = os.fdopen(commands_out, "wb"), os.fdopen(events_in, "rb")
        self._send(("start", config, eos_token_ids))
        try:
            kind, payload = pickle.load(self._events)
        except EOFError:
            raise RuntimeError(f"the engine process exited while starting (exit code {self._process.wait()})")
        if kind == "failed":
            self._process.wait()
            raise payload
        return payload

    def _join_or_start(self, config: EngineConfig, eos_token_ids: frozenset[int], shared_as: str) -> tuple:
        """Join the engine process listening as `shared_as`; if none does, the front that takes the
        start lock (an abstract socket of its own: released when its holder dies) starts one, and the
        others join it once it is ready."""
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            while True:
                connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    connection.connect("\0" + shared_as)
                except OSError:  # none listens (yet)
                    connection.close()
                else:
                    joined = self._join(connection, config)
                    if joined is not None:
                        return joined
                    # It is shutting down and still holds the name: starting one now would fail to
                    # take it. Join (or start) the next once this one is gone.
                    continue
                try:
                    lock.bind("\0" + shared_as + ".starting")
                except OSError:  # another front is starting it: wait for it
                    time.sleep(JOIN_POLL_S)
                    continue
                return self._start(config, eos_token_ids, shared_as)
        finally:
            lock.close()

    def _join(self, connection: socket.socket, config: EngineConfig) -> Optional[tuple]:
        """The join handshake; None if the engine is shutting down (the caller tries again). A config
        other than the running engine's, or one front too many, is refused: raised here."""
        self._commands, self._events = connection.makefile("wb"), connection.makefile("rb")
        connection.close()  # the files keep it open
        self._send(("join", config))
        try:
            kind, payload = pickle.load(self._events)
        except (EOFError, OSError):  # it died meanwhile: as good as shutting down
            kind, payload = "failed", EngineOverloadedError("the shared engine exited")
        if kind == "ready":
            return payload
        self._commands.close(), self._events.close()
        if isinstance(payload, EngineOverloadedError):
            time.sleep(JOIN_POLL_S)
            return None
        raise payload

    @property
    def started_here(self) -> bool:
        """False where this front joined a shared engine's process instead of starting it."""
        return self._process is not None

    def add(self, request_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        # The front counts a request before it adds it (under its lock): 1 is this one alone, so the
        # engine was idle until now, and the time it spent idle is no stalled step.
        if self._num_unfinished() <= 1:
            self._last_progress = time.monotonic()
        self._send(("add", request_id, prompt_ids, params))

    def end(self, request_id: int, reason: str) -> None:
        self._send(("end", request_id, reason))

    def stats(self) -> EngineStats:
        """Asked of the engine process; refused (EngineOverloadedError) once it is shutting down or gone."""
        with self._stats_lock:  # one question in flight: the answers come back in order
            if self._closed:
                raise EngineOverloadedError(self._exit_error or "the engine process has stopped")
            self._send(("stats",))
            try:
                answer = self._stats.get(timeout=self._stats_timeout_s)
            except queue.Empty:  # hung while idle (the watchdog sees only steps with requests in flight)
                self._kill_hung(f"the engine process answered nothing for {self._stats_timeout_s:g} s "
                                f"(step_timeout_s={self._step_timeout_s:g}) and was killed")
                raise EngineOverloadedError(self._hung)
        if answer is None:  # it stopped meanwhile
            raise EngineOverloadedError(self._exit_error or "the engine process has stopped")
        stats, self.reports_engine_stats = answer
        return stats

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel everything this front has in flight (each gets a final "cancelled" delta) and leave;
        the engine process stops once its last front has left."""
        already, self._closed = self._closed, True
        if not already:
            self._send(("shutdown",))
        self._receiver.join(timeout)
        if self._process is not None and (self._engine_exits or self._receiver.is_alive()):
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("the engine process did not stop within %.0f s; killing it", timeout)
                self._process.kill()
                self._process.wait()
                self._receiver.join(timeout)  # it reads EOF now
        # Closed here, not whenever the garbage collector finds this object: a stub whose engine was
        # restarted ten times kept one pipe of each dead engine open.
        for pipe in (self._commands, self._events) if not self._receiver.is_alive() else (self._commands,):
            try:
                pipe.close()
            except OSError:  # what a dead process left unread in the buffer cannot be flushed
                pass

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                pickle.dump(message, self._commands)
                self._commands.flush()
        except (BrokenPipeError, OSError, ValueError):  # the process is gone; _receive has told the front
            pass

    def _receive(self) -> None:
        """Events from the engine process: token deltas, stats answers, and the end of it."""
        try:
            while True:
                kind, payload = pickle.load(self._events)
                if kind == "deltas":  # every completed step sends its deltas (none if it made none)
                    self._last_progress = time.monotonic()
                    self._publish(unpack_deltas(payload))
                elif kind == "stats":
                    self._stats.put(payload)
                elif kind == "closed":
                    self._engine_exits = payload
                    self._stats.put(None)  # a stats() asked after the shutdown gets no answer
                    return
        except (EOFError, OSError):
            # Only the front that started it can wait for its exit code.
            exit_code = f" (exit code {self._process.wait()})" if self._process is not None else ""
            # The cause before `_closed`: a stats() that finds it closed reports `_exit_error`, so the
            # front names why the engine died, not that it has stopped.
            self._exit_error = self._hung or f"the engine process exited unexpectedly{exit_code}"
            self._closed = True
            log.error(self._exit_error)
            self._on_exit(self._exit_error)
            self._stats.put(None)

    def _watch(self) -> None:
        """Kill an engine process whose steps stopped returning while requests are in flight: its
        stats may still answer (another thread), but nothing would ever finish."""
        # A look between the front counting a request and add() resetting the time would see the idle
        # time as a stall: a stall counts at most from the last look that found nothing in flight.
        idle_at = time.monotonic()
        while not self._closed:
            time.sleep(min(1.0, self._step_timeout_s / 4))
            waiting = self._num_unfinished()
            if not waiting:
                idle_at = time.monotonic()
                continue
            stalled = time.monotonic() - max(self._last_progress, idle_at)
            if stalled > self._step_timeout_s and not self._closed:
                self._kill_hung(f"the engine process returned no step for {stalled:.0f} s with {waiting} requests "
                                f"in flight (step_timeout_s={self._step_timeout_s:g}) and was killed")
                return

    def _kill_hung(self, why: str) -> None:
        """The receiver reads EOF and ends every request with `why`; the model starts a fresh engine."""
        if self._hung is None:
            self._hung = why
            log.error(why)
        try:
            os.kill(self._pid, signal.SIGKILL)
        except ProcessLookupError:  # it died meanwhile
            pass


def unpack_deltas(packed: tuple[list[int], list[tuple[int, TokenDelta]]]) -> list[tuple[int, TokenDelta]]:
    """backend/engine_fronts.py's pack_deltas, undone."""
    plain, others = packed
    return [(plain[i], TokenDelta([plain[i + 1]], None, None, plain[i + 2])) for i in range(0, len(plain), 3)] + others


def prefer_as_oom_victim() -> None:
    """Raise this process's oom_score_adj by OOM_SCORE_ADJ_RAISE (raising needs no privilege)."""
    adj = Path("/proc/self/oom_score_adj")
    try:
        adj.write_text(str(min(int(adj.read_text()) + OOM_SCORE_ADJ_RAISE, 1000)))
    except (OSError, ValueError):  # not Linux, or a sandbox that forbids it: nothing lost but the preference
        pass


def python_executable() -> str:
    """The interpreter for the engine process. Inside Triton's Python backend, sys.executable is not
    a Python interpreter; the stub runs the Python of the python3 first on PATH (its sys.prefix)."""
    if sys.executable and os.path.basename(sys.executable).startswith("python"):
        return sys.executable
    return shutil.which("python3") or os.path.join(sys.prefix, "bin", "python3")


if __name__ == "__main__":
    # Ctrl-C in a terminal interrupts the whole process group; the parent (Triton's stub) then
    # unloads the model and shuts this process down through the pipe, cancelling what is in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    prefer_as_oom_victim()
    serve_engine(os.fdopen(int(sys.argv[1]), "rb"), os.fdopen(int(sys.argv[2]), "wb"),
                 sys.argv[3] if len(sys.argv) > 3 else None)
