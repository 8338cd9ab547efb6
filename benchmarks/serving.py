"""Server level: a load generator of streaming requests, run against the Triton server over gRPC and
against the same engine in-process, so serving overhead is a measured ratio.

A target is anything with `async stream(prompt, max_tokens, timeline)` that fills the timeline:
- `ServerTarget`: `gemma_client.AsyncGemmaClient` on loopback gRPC (one channel, a stream per request);
  token times are taken when a delta reaches the client. With `client_processes` > 1 its closed loops
  run in that many client processes (`ClientProcesses`), so one process's CPU does not cap a fast server;
- `EngineTarget`: `Engine.submit` with a callback; token times are taken on the engine thread;
- `GatewayTarget`: the OpenAI-compatible gateway (gateway/) in front of the same server, streamed
  `POST /v1/completions` over one httpx client; token times are taken when an SSE chunk arrives.
Two load shapes, both bounded in requests and in time (late requests are cancelled, counted as errors):
- closed loop: `concurrency` workers, each sends its next request when the previous one ends;
- open loop: requests arrive at Poisson times (a seeded schedule, identical for both targets).
Every request asks for exactly `max_tokens` greedy tokens (EOS ignored, no stop strings); one that
ends with another count is an error (`wrong_token_count`), so a run's tokens/s is always of full
requests and a server that drops output (e.g. empty tensors under numpy 2, docs/gpu.md) shows.

Both targets run one `EngineConfig`: the in-process engine is built from it and the server gets it
as the GEMMA_* overrides model_repository/gemma/1/model.py reads (`server_env`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import os
import re
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

from .stats import Timeline, median, summarize_requests

ROOT = Path(__file__).resolve().parents[1]
# ignore_eos alone makes every request run to max_tokens. min_tokens would too, but it sends every
# step of the engine down the sampler's per-row path (a float copy of the logits, EOS masking), a
# cost no real greedy request pays.
GREEDY = {"temperature": 0.0, "ignore_eos": True}


class ServerTarget:
    name = "server"

    def __init__(self, url: str, timeout_s: float, client_processes: int = 1):
        from gemma_client import AsyncGemmaClient
        self.url = url
        self.client = AsyncGemmaClient(url, timeout=timeout_s)
        # Closed loops only; the open loop stays on `client`, in this process.
        self.processes = ClientProcesses(url, timeout_s, client_processes) if client_processes > 1 else None

    async def stream(self, prompt: str, max_tokens: int, timeline: Timeline) -> None:
        async for delta in self.client.stream(prompt, max_tokens=max_tokens, **GREEDY):
            if delta.token_ids:
                timeline.arrivals.append((time.perf_counter(), len(delta.token_ids)))

    async def close(self) -> None:
        await self.client.close()
        if self.processes is not None:
            self.processes.close()


class GatewayTarget:
    """Streamed completions through the gateway, the request the OpenAI SDK sends plus vLLM's
    `ignore_eos`. A chunk does not say how many tokens it holds (a gRPC delta that merged several is
    one chunk; a token whose text is not whole yet rides with the next): each chunk of the choice
    counts one, and the tokens the `usage` chunk adds beyond that count at the last one, by when
    they had all arrived. Totals and TTFT are exact; a merged chunk's inter-token gaps are not
    spread over its tokens as the other targets' are."""
    name = "gateway"

    def __init__(self, base_url: str, timeout_s: float, model: str = "gemma"):
        import httpx
        # No pool limit: a request never waits for a connection, so TTFT is the gateway's.
        self.client = httpx.AsyncClient(base_url=base_url, timeout=timeout_s,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        self.model = model

    async def stream(self, prompt: str, max_tokens: int, timeline: Timeline) -> None:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, **GREEDY}
        total = None
        async with self.client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                stamp = time.perf_counter()
                if not line.startswith("data: {"):  # the blank line ending each event, `data: [DONE]`
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk["usage"] is not None:
                    total = chunk["usage"]["completion_tokens"]
                if chunk["choices"]:
                    timeline.arrivals.append((stamp, 1))
        settle_token_counts(timeline, total)

    async def close(self) -> None:
        await self.client.aclose()


def settle_token_counts(timeline: Timeline, total: Optional[int]) -> None:
    """Give the tokens of `total` (the stream's usage) that one per chunk did not count to the last chunk."""
    if total is None:
        raise RuntimeError("the stream ended without a usage chunk")
    surplus = total - timeline.num_tokens
    if surplus < 0 or (surplus and not timeline.arrivals):
        raise RuntimeError(f"usage says {total} tokens, the stream held {len(timeline.arrivals)} chunks")
    if surplus:
        stamp, count = timeline.arrivals[-1]
        timeline.arrivals[-1] = (stamp, count + surplus)


class EngineTarget:
    name = "engine_direct"

    def __init__(self, engine):
        self.engine = engine
        # Reads handed over by the engine's receiver thread, run on the event loop in one wake-up per
        # batch: a call_soon_threadsafe per request and step (a write to the loop's self-pipe, and a
        # loop wake-up, each) was most of this process's CPU, which at 256 clients on the H100 held
        # the engine back (its steps waited to hand their deltas over: docs/benchmarks.md). Kept by
        # loop: a stream cancelled at a run's time limit gets its final delta after that run's loop
        # closed, and must not land in the next run's.
        self._reads: dict[asyncio.AbstractEventLoop, list[tuple]] = {}
        self._reads_lock = threading.Lock()

    def _hand_over(self, loop, read, handle) -> None:  # the engine's receiver thread
        call = (read, handle, time.perf_counter())
        with self._reads_lock:
            pending = self._reads.setdefault(loop, [])
            pending.append(call)
            first = len(pending) == 1
        if first:  # (raises for a closed loop, as a call_soon_threadsafe per read did)
            loop.call_soon_threadsafe(self._run_reads, loop)

    def _run_reads(self, loop) -> None:
        with self._reads_lock:
            reads = self._reads.pop(loop, [])
        for read, handle, stamp in reads:
            try:
                read(handle, stamp)
            except Exception as e:  # as the loop treats a failing callback: reported, the others still run
                loop.call_exception_handler({"message": "engine_direct: reading a stream failed", "exception": e})

    async def stream(self, prompt: str, max_tokens: int, timeline: Timeline) -> None:
        from backend.params import SamplingParams
        loop = asyncio.get_running_loop()
        with self._reads_lock:  # what was handed to runs that have ended is never read
            for ended in [other for other in self._reads if other.is_closed()]:
                del self._reads[ended]
        done: asyncio.Future = loop.create_future()

        def read(handle, stamp: float) -> None:  # event loop thread, as a server's responder reads
            out = handle.poll()
            if out is None:
                return
            if out.token_ids:
                timeline.arrivals.append((stamp, len(out.token_ids)))
            if out.finish_reason is not None and not done.done():
                done.set_result(out)

        handle = self.engine.submit(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY),
                                    on_ready=lambda handle: self._hand_over(loop, read, handle))
        try:
            out = await done
        except asyncio.CancelledError:
            handle.cancel()
            raise
        if out.finish_reason not in ("length", "stop"):
            raise RuntimeError(out.error or out.finish_reason)

    async def close(self) -> None:
        pass


async def _one(target, prompt: str, max_tokens: int, timelines: list[Timeline]) -> None:
    timeline = Timeline(time.perf_counter())
    timelines.append(timeline)
    try:
        await target.stream(prompt, max_tokens, timeline)
    except asyncio.CancelledError:
        timeline.error = "timeout"
        raise
    except Exception as e:  # counted, not fatal: a load test reports errors
        timeline.error = type(e).__name__
    else:
        if timeline.num_tokens != max_tokens:
            timeline.error = "wrong_token_count"


async def _bounded(tasks: list[asyncio.Task], deadline: float) -> None:
    """Wait for `tasks` until `deadline` (perf_counter), then cancel what is left."""
    remaining = deadline - time.perf_counter()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(remaining, 0))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def closed_loop(target, prompts: list[str], concurrency: int, num_requests: int, max_tokens: int,
                      time_limit_s: float) -> tuple[list[Timeline], float]:
    """`concurrency` clients, `num_requests` in all, prompts taken round-robin."""
    start = time.perf_counter()
    timelines = await _clients(target, prompts, concurrency, range(num_requests), max_tokens, start + time_limit_s)
    return timelines, time.perf_counter() - start


async def _clients(target, prompts: list[str], concurrency: int, requests: range, max_tokens: int,
                   deadline: float) -> list[Timeline]:
    """`concurrency` workers that send request i (prompt i mod len(prompts)) of `requests`, each
    when its previous one ends, until they are all sent or `deadline` passes."""
    timelines: list[Timeline] = []
    next_index = iter(requests)

    async def worker():
        for i in next_index:
            if time.perf_counter() >= deadline:
                return
            await _one(target, prompts[i % len(prompts)], max_tokens, timelines)

    await _bounded([asyncio.create_task(worker()) for _ in range(concurrency)], deadline)
    return timelines


def _split(total: int, parts: int) -> list[int]:
    """`total` in `parts` shares as even as can be, the larger ones first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


class ClientProcesses:
    """`count` client processes that share each closed loop of a `ServerTarget`: its workers and
    requests split as evenly as can be (with at least as many requests as workers, each process gets
    at least one request per worker), prompts numbered as in one process. Each has its own event
    loop and AsyncGemmaClient, kept from run to run as the in-process target keeps its own.

    Started once, spawned (a fork would copy this process's gRPC channel and event loop); each
    opens its channel (`check_ready`) before the first run. One barrier starts every run in all of
    them at once, so start-up and dispatch stay out of the measured time, and each one's deadline
    is its start plus the time limit. Each sends back its timelines, start and end (perf_counter is
    CLOCK_MONOTONIC on Linux, one clock for all processes): wall time = last end - first start."""

    READY_TIMEOUT_S = 300  # start-up: a child imports this process's main module (benchmarks.run: torch)
    GO_TIMEOUT_S = 60  # from sending a run's jobs to every process holding its own

    def __init__(self, url: str, timeout_s: float, count: int):
        ctx = multiprocessing.get_context("spawn")
        self.barrier = ctx.Barrier(count + 1)
        self.conns, self.processes = [], []
        for _ in range(count):
            conn, child_conn = ctx.Pipe()
            process = ctx.Process(target=_client_process, args=(url, timeout_s, child_conn, self.barrier),
                                  daemon=True, name="bench-client")
            process.start()
            child_conn.close()  # then recv() sees EOF if the child dies
            self.conns.append(conn)
            self.processes.append(process)
        self._answers(self.READY_TIMEOUT_S)

    def closed_loop(self, prompts: list[str], concurrency: int, num_requests: int, max_tokens: int,
                    time_limit_s: float) -> tuple[list[Timeline], float, int]:
        """`closed_loop` over the processes; also returns how many of them had workers (one per
        worker at most: those beyond `concurrency` sit the run out)."""
        workers = _split(concurrency, len(self.conns))
        used = sum(w > 0 for w in workers)
        requests = _split(num_requests, used) + [0] * (len(workers) - used)
        first = 0
        for conn, w, n in zip(self.conns, workers, requests):
            conn.send((prompts, w, range(first, first + n), max_tokens, time_limit_s))
            first += n
        try:
            self.barrier.wait(self.GO_TIMEOUT_S)
        except threading.BrokenBarrierError:
            pass  # a process failed: its error is among the answers
        results = self._answers(time_limit_s + self.GO_TIMEOUT_S)[:used]
        timelines = [t for mine, _, _ in results for t in mine]
        return timelines, max(end for _, _, end in results) - min(start for _, start, _ in results), used

    def _answers(self, timeout_s: float) -> list:
        """One message from each process; raises with every process's error if any failed."""
        answers = []
        for conn in self.conns:
            if not conn.poll(timeout_s):
                raise TimeoutError(f"a benchmark client process did not answer within {timeout_s:.0f} s")
            answers.append(conn.recv())  # EOFError: it died
        errors = [a for a in answers if isinstance(a, Exception)]
        if errors:
            raise RuntimeError("benchmark client processes failed:\n" + "\n".join(map(str, errors)))
        return answers

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:  # that one has exited already
                pass
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()


def _client_process(url: str, timeout_s: float, conn, barrier) -> None:
    """A `ClientProcesses` child: "ready" once its channel is open, then for each job received a
    closed loop started by the barrier, answered with (timelines, start, end); None ends it. A
    failure is answered with its traceback and breaks the barrier, so nobody waits for it."""
    loop = asyncio.new_event_loop()
    try:
        target = ServerTarget(url, timeout_s)
        loop.run_until_complete(target.client.check_ready())
        conn.send("ready")
        while (job := conn.recv()) is not None:
            prompts, concurrency, requests, max_tokens, time_limit_s = job
            barrier.wait(ClientProcesses.GO_TIMEOUT_S)
            start = time.perf_counter()
            timelines = loop.run_until_complete(
                _clients(target, prompts, concurrency, requests, max_tokens, start + time_limit_s))
            conn.send((timelines, start, time.perf_counter()))
        loop.run_until_complete(target.close())
    except BaseException:
        barrier.abort()
        conn.send(RuntimeError(f"client process {os.getpid()}: {traceback.format_exc()}"))


async def open_loop(target, prompts: list[str], arrivals_s: list[float], max_tokens: int,
                    time_limit_s: float) -> tuple[list[Timeline], float]:
    """One request at each offset in `arrivals_s`, whatever is still running."""
    timelines: list[Timeline] = []
    start = time.perf_counter()
    deadline = start + time_limit_s

    async def at(offset: float, prompt: str):
        await asyncio.sleep(max(start + offset - time.perf_counter(), 0))
        await _one(target, prompt, max_tokens, timelines)

    tasks = [asyncio.create_task(at(offset, prompts[i % len(prompts)])) for i, offset in enumerate(arrivals_s)
             if offset < time_limit_s]
    await _bounded(tasks, deadline)
    return timelines, time.perf_counter() - start


def measure(target, mode: str, prompts: list[str], max_tokens: int, time_limit_s: float,
            concurrency: int = 0, num_requests: int = 0, arrivals_s: Optional[list[float]] = None,
            rate_per_s: Optional[float] = None) -> dict:
    """Run one load shape on `target` and return its record (one JSON line)."""
    async def go():
        if mode == "closed":
            return await closed_loop(target, prompts, concurrency, num_requests, max_tokens, time_limit_s)
        return await open_loop(target, prompts, arrivals_s, max_tokens, time_limit_s)

    processes = getattr(target, "processes", None) if mode == "closed" else None
    if processes is None:
        (timelines, wall), used = _run(go()), 1
    else:
        timelines, wall, used = processes.closed_loop(prompts, concurrency, num_requests, max_tokens, time_limit_s)
    record = {"type": "server", "system": target.name, "mode": mode, "max_tokens": max_tokens,
              "client_processes": used}
    if mode == "closed":
        record["concurrency"] = concurrency
    else:
        record["rate_per_s"] = rate_per_s
    return {**record, **summarize_requests(timelines, wall)}


_loop: Optional[asyncio.AbstractEventLoop] = None


def _run(coro):
    """One event loop for the whole benchmark: the gRPC client's channel belongs to the loop it was made in."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(coro)


def intake_counters(grpc_url: str, model: str = "gemma") -> dict[str, int]:
    """Triton's own counters of the requests that reached `model`: how many, their time in Triton's
    queue before the model's one instance took them, and their time in its execute() (for a Python
    model, the round trip to the stub, which takes requests in one at a time)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        stats = client.get_inference_statistics(model_name=model, as_json=True)["model_stats"][0]["inference_stats"]
    finally:
        client.close()
    return {"requests": int(stats["queue"].get("count", 0)), "queue_ns": int(stats["queue"].get("ns", 0)),
            "execute_ns": int(stats["compute_infer"].get("ns", 0))}


# The model sends its histograms once a second (serving/metrics.py, HISTOGRAM_PERIODS): read after this,
# /metrics holds every request finished before.
HISTOGRAMS_SETTLE_S = 1.2
ENGINE_PHASES = ("queue", "prefill")


def engine_phase_totals(metrics_url: str) -> dict[str, float]:
    """The engine's vllm:request_<phase>_time_seconds sums and counts on the server's /metrics, read
    once the model has sent what it counted (HISTOGRAMS_SETTLE_S)."""
    import urllib.request

    time.sleep(HISTOGRAMS_SETTLE_S)
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        lines = r.read().decode().splitlines()
    keys = {f"vllm:request_{phase}_time_seconds_{part}": f"{phase}_{part}"
            for phase in ENGINE_PHASES for part in ("sum", "count")}
    totals = dict.fromkeys(keys.values(), 0.0)
    for line in lines:
        key = keys.get(line.split("{", 1)[0].split(" ", 1)[0])
        if key is not None:  # summed over the series of every model instance
            totals[key] += float(line.rpartition(" ")[2])
    return totals


def engine_phases_since(before: dict[str, float], after: dict[str, float]) -> dict:
    """Per request between two `engine_phase_totals`: the mean ms it waited in the engine's queue and
    spent from its first step to its first token."""
    n = after["queue_count"] - before["queue_count"]
    mean_ms = lambda phase: (after[f"{phase}_sum"] - before[f"{phase}_sum"]) / n * 1e3 if n else None  # noqa: E731
    return {"requests": int(n), **{f"{phase}_ms": mean_ms(phase) for phase in ENGINE_PHASES}}


def intake_since(before: dict[str, int], after: dict[str, int]) -> dict:
    """Per request between two `intake_counters`: where a request waited before the engine had it."""
    n = after["requests"] - before["requests"]
    per_request_ms = lambda key: (after[key] - before[key]) / n / 1e6 if n else None  # noqa: E731
    return {"requests": n, "queue_ms": per_request_ms("queue_ns"), "execute_ms": per_request_ms("execute_ns")}


def close(target) -> None:
    _run(target.close())


# The model's own settings a benchmark passes on from its environment (e.g. GEMMA_RESPONDER_THREADS=4
# for one grid call and 1 for the next, or GEMMA_HISTOGRAMS=native against the default, to
# compare them on one machine).
SERVING_SETTINGS = ("GEMMA_ENGINE_PROCESS", "GEMMA_RESPONDER_THREADS", "GEMMA_HISTOGRAMS")


def server_env(config) -> dict[str, str]:
    """The GEMMA_* overrides under which the server's model builds the engine `config` describes:
    one for every EngineConfig field that config.pbtxt exposes. A field it does not expose cannot
    reach the server, so it must keep its default, or the two targets would differ unseen."""
    from backend.params import EngineConfig

    exposed = set(re.findall(r'key:\s*"(\w+)"', (ROOT / "model_repository" / "gemma" / "config.pbtxt").read_text()))
    env, defaults = {}, EngineConfig()
    for f in dataclasses.fields(EngineConfig):
        value = getattr(config, f.name)
        if f.name in exposed:
            env[f"GEMMA_{f.name.upper()}"] = "" if value is None else str(value)
        elif value != getattr(defaults, f.name):
            raise ValueError(f"EngineConfig.{f.name}={value!r}: the server cannot be given it (not a parameter "
                             "in model_repository/gemma/config.pbtxt)")
    for setting in SERVING_SETTINGS:  # the caller's, as no EngineConfig holds them
        env[setting] = os.environ.get(setting, "")
    return env


def start_server(log_path: Path, config, instances: Optional[int] = None):
    """tritonserver on model_repository/ running the engine `config` describes (`server_env`), started
    and stopped by the same code as the integration tests' servers; with `instances`, that many model
    instances (stubs) in front of the one engine, else as many as config.pbtxt ships. Returns an object
    with `grpc_url` and `stop()`."""
    from tests.support.server import repository_with_instances, start_servers

    args = () if instances is None else repository_with_instances(Path(tempfile.mkdtemp()), instances)
    (server,) = start_servers((log_path, server_env(config), args))
    return server


def start_gateway(triton_url: str, log_path: Path, workers: int = 1):
    """`python -m gateway --workers N` on a free loopback port in front of the server at `triton_url`, started and
    stopped by the gateway tests' own launcher. Returns an object with `url` and `stop()`, or None
    where the gateway's packages (and its tests') are not installed."""
    import pytest
    try:
        from tests.support.gateway import start_gateway
    except pytest.skip.Exception:  # its importorskip: fastapi, uvicorn, httpx or openai missing
        return None
    return start_gateway(triton_url, log_path, workers=workers)


def table(records: list[dict]) -> list[dict]:
    """One row per (system, load): medians over repetitions of tokens/s and of each latency
    percentile; requests and errors summed."""
    def load(r):
        return (r["system"], r["mode"], r.get("concurrency"), r.get("rate_per_s"))
    rows = []
    for key in dict.fromkeys(load(r) for r in records):
        mine = [r for r in records if load(r) == key]
        row = {k: v for k, v in mine[0].items() if k in ("type", "system", "mode", "concurrency", "rate_per_s",
                                                          "max_tokens", "client_processes")}
        row.update(reps=len(mine), requests=sum(r["requests"] for r in mine), errors=sum(r["errors"] for r in mine),
                   tokens_per_s=median([r["tokens_per_s"] for r in mine if r["tokens_per_s"] is not None]))
        for metric in ("ttft_ms", "itl_ms"):
            row[metric] = {q: median([r[metric][q] for r in mine if r[metric][q] is not None]) for q in ("p50", "p99")}
        rows.append(row)
    return rows
