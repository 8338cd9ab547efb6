"""`make soak`: a long streamed load on a server it starts, then the accounting and the memory of the
model's stub and engine processes.

    python -m benchmarks.soak [--requests 3000] [--concurrency 16] [--cancel 0.3] [--max-tokens 4,12]
                              [--constrained 0] [--warmup 300] [--checkpoint DIR] [--seed 0] [--out results]

`--requests` streamed requests (gemma_client.AsyncGemmaClient, one gRPC channel) from `--concurrency`
closed-loop clients, each with a random prompt (half of them a question alone, half with 1 to 20
sentences of context before it: 5 to ~400 tokens), random max_tokens and a random sampling setting
(greedy, top-p, top-k, repetition penalty, stop strings, half of them seeded). A `--cancel` fraction is
cancelled by the client: half of those before their first token (a random wait of up to 50 ms, the
time a prefill takes here), the rest after a random number of tokens. A `--constrained` fraction
carries a structured-outputs constraint (a JSON schema, a regex, a choice or any JSON object: issue
#26's soak), compiled by the engine beside its loop and cancelled like the others. Then:
- accounting: the model's KV blocks, running and waiting requests back to 0; every request Triton
  handed the model finished and counted once; its counters equal to what the clients saw, up to two
  races reported as such: a cancel that crossed the final response on the wire (a success on the
  server, `cancel_raced_finish`) and one that reached Triton before the model got the request (never
  executed, `cancelled_before_reaching_the_model`); no error, invalid or overloaded outcome;
- memory: the resident set (VmRSS, and its anonymous and shared parts) of the Python backend stub
  and its engine process together, after the first `--warmup` requests and after each quarter of
  the rest.
Goals (issue #15, default model on the CPU): 0 unexpected errors, 0 leaked blocks, RSS growth after
warm-up < 5% and < 1% over the last half. Writes OUT/soak.json (the summary and the RSS curve);
progress on stderr; exit status 1 when a goal is missed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
OUTCOMES = ("success", "cancelled", "invalid", "overloaded", "error")
SAMPLING_MIX = (
    {"temperature": 0.0},
    {"temperature": 0.8, "top_p": 0.9},
    {"temperature": 1.0, "top_k": 40},
    {"temperature": 0.7, "repetition_penalty": 1.2},
    {"temperature": 0.0, "stop": ["."], "min_tokens": 2},
)
QUESTIONS = ("Why is the sky blue?", "Write a haiku about the sea.", "The capital of France is",
             "List three prime numbers:", "Once upon a time, in a village by the mountains,",
             "Explain in one sentence what a compiler does.", "Translate to French: good morning, my friend.",
             "def fibonacci(n):")
# Context sentences (~15-25 tokens each) put before half of the questions, 1 to 20 of them, so prompts
# run from a few tokens to ~400 and the engine meets many distinct tokens-per-step counts, as a real
# server does (the CPU kernels are built and cached per shape: what made the stub grow).
CONTEXT = ("The river bends around the old mill, where the miller keeps his accounts in a leather book.",
           "In 1887 the railway reached the valley, and with it came letters, newspapers and strangers.",
           "A compiler reads source code, checks it, and translates it into instructions a machine can run.",
           "The committee met on Tuesday to discuss the budget, the new library and the broken fountain.",
           "Light from the sun is scattered by the molecules of the air, blue light more than red.",
           "She packed two apples, a map of the coast and a notebook full of half-finished poems.")
FIRST_TOKEN_WAIT_S = 0.05
CONSTRAINT_MIX = (
    {"json": {"type": "object", "required": ["answer", "confidence"], "additionalProperties": False,
              "properties": {"answer": {"type": "string", "maxLength": 40},
                             "confidence": {"enum": ["low", "medium", "high"]}}}},
    {"json": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4},
     "disable_any_whitespace": True},
    {"regex": r"[A-Z][a-z]{2,8}( [a-z]{2,8}){0,3}\."},
    {"choice": ["yes", "no", "maybe"]},
    {"json_object": True},
)
GOALS = {"rss_growth_after_warmup": 0.05, "rss_growth_last_half": 0.01}


@dataclass
class ClientTally:
    """What the clients saw."""
    completed: int = 0  # a final response (finish_reason) arrived
    cancelled_before_first_token: int = 0
    cancelled_mid_stream: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def cancelled(self) -> int:
        return self.cancelled_before_first_token + self.cancelled_mid_stream


@dataclass
class RssSample:
    requests_done: int
    seconds: float
    rss_mib: float
    anon_mib: float
    shmem_mib: float


def _processes():
    """(pid, /proc status fields, cmdline) of every process still readable."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            yield int(status.parent.name), fields, (status.parent / "cmdline").read_bytes()
        except OSError:
            continue


def stub_pid(server_pid: int) -> int:
    """The gemma model's Python backend stub among the server's children."""
    for pid, fields, cmdline in _processes():
        if int(fields["PPid"]) == server_pid and b"triton_python_backend_stub" in cmdline and b"gemma" in cmdline:
            return pid
    raise RuntimeError(f"no Python backend stub under tritonserver (pid {server_pid})")


def rss(pid: int, requests_done: int, start: float) -> RssSample:
    """The stub's memory and its children's: the engine process (backend/engine_process.py) holds the
    model and its kernel caches."""
    tree = [fields for p, fields, _ in _processes() if p == pid or int(fields["PPid"]) == pid]
    mib = {key: sum(int(f[key].split()[0]) for f in tree) / 1024 for key in ("VmRSS", "RssAnon", "RssShmem")}
    return RssSample(requests_done, round(time.monotonic() - start, 1), round(mib["VmRSS"], 1),
                     round(mib["RssAnon"], 1), round(mib["RssShmem"], 1))


async def one_request(client, rng: random.Random, index: int, max_tokens: tuple[int, int], cancel_fraction: float,
                      tally: ClientTally, constrained_fraction: float = 0.0) -> None:
    sampling = {**rng.choice(SAMPLING_MIX), "max_tokens": rng.randint(*max_tokens)}
    if sampling["temperature"] > 0 and rng.random() < 0.5:
        sampling["seed"] = index
    if rng.random() < constrained_fraction:
        sampling["structured_outputs"] = rng.choice(CONSTRAINT_MIX)
    cancel = rng.random() < cancel_fraction
    first_token_wait = rng.uniform(0, FIRST_TOKEN_WAIT_S) if cancel and rng.random() < 0.5 else None
    stop_after = rng.randint(1, max(sampling["max_tokens"] - 1, 1)) if cancel else None
    prompt = f"{rng.choice(QUESTIONS)} ({index})"
    if rng.random() < 0.5:
        prompt = " ".join(rng.choice(CONTEXT) for _ in range(rng.randint(1, 20))) + "\n\n" + prompt
    tokens = 0
    try:
        async with client.stream(prompt, **sampling) as deltas:  # leaving the block early cancels
            while True:
                try:
                    if tokens == 0 and first_token_wait is not None:
                        delta = await asyncio.wait_for(deltas.__anext__(), first_token_wait)
                    else:
                        delta = await deltas.__anext__()
                except asyncio.TimeoutError:
                    tally.cancelled_before_first_token += 1
                    return
                tokens += len(delta.token_ids)
                if delta.finish_reason is not None:
                    tally.completed += 1
                    return
                if stop_after is not None and tokens >= stop_after:
                    tally.cancelled_mid_stream += 1
                    return
    except StopAsyncIteration:
        tally.errors.append(f"request {index}: the stream ended without a final response")
    except Exception as e:  # noqa: BLE001 - counted: the soak reports every unexpected error
        tally.errors.append(f"request {index}: {type(e).__name__}: {e}")
    finally:
        tally.tokens += tokens


async def run_load(url: str, num_requests: int, concurrency: int, cancel_fraction: float,
                   max_tokens: tuple[int, int], seed: int, on_done=None, constrained_fraction: float = 0.0) -> ClientTally:
    """The closed-loop load; `on_done(requests_done)` is called after each request."""
    from gemma_client import AsyncGemmaClient

    tally = ClientTally()
    indices = iter(range(num_requests))
    done = 0

    async with AsyncGemmaClient(url, timeout=600) as client:
        async def worker() -> None:
            nonlocal done
            for index in indices:
                await one_request(client, random.Random(seed * 1_000_003 + index), index, max_tokens, cancel_fraction,
                                  tally, constrained_fraction)
                done += 1
                if on_done is not None:
                    on_done(done)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


def wait_until_idle(server, before: dict[str, int], timeout_s: float = 60) -> dict[str, float]:
    """Poll until the model has counted every request it received since `before` and its gauges show
    no block used and nothing running or waiting (counters trail the last responses by a metrics
    period); return the gauges."""
    deadline = time.monotonic() + timeout_s
    while True:
        gauges = {name: server.metric(name) for name in ("gemma_kv_blocks_used", "gemma_running_requests",
                                                         "gemma_queue_depth")}
        after = outcome_counts(server)
        counted = sum(after[o] - before[o] for o in OUTCOMES)
        if (counted >= after["received"] - before["received"] and not any(gauges.values())
                or time.monotonic() > deadline):
            return gauges
        time.sleep(0.5)


def outcome_counts(server) -> dict[str, int]:
    """The model's finished requests by outcome, and `received`: the requests Triton handed the model
    (its own nv_inference_exec_count; a request cancelled before that never reaches the model)."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        lines = r.read().decode().splitlines()
    received = sum(float(line.rpartition(" ")[2]) for line in lines
                   if line.startswith('nv_inference_exec_count{model="gemma"'))
    return {"received": int(received), **{o: int(server.metric("gemma_requests_total", outcome=o)) for o in OUTCOMES}}


def accounting(num_requests: int, tally: ClientTally, server_outcomes: dict[str, int],
               gauges: dict[str, float]) -> dict:
    """The server's view against the clients'; `problems` lists every mismatch."""
    raced = server_outcomes["success"] - tally.completed
    never_reached = num_requests - server_outcomes["received"]
    finished = server_outcomes["success"] + server_outcomes["cancelled"]
    problems = [f"unexpected client error: {e}" for e in tally.errors[:20]]
    problems += [f"{gauge} = {value} after the load" for gauge, value in gauges.items() if value]
    problems += [f"server counted {server_outcomes[o]} '{o}'" for o in ("invalid", "overloaded", "error")
                 if server_outcomes[o]]
    if finished != server_outcomes["received"]:
        problems.append(f"the model received {server_outcomes['received']} requests and finished {finished}")
    if not 0 <= never_reached <= tally.cancelled_before_first_token:
        problems.append(f"{never_reached} requests never reached the model, but clients cancelled only "
                        f"{tally.cancelled_before_first_token} before their first token")
    if not 0 <= raced <= tally.cancelled:
        problems.append(f"server successes {server_outcomes['success']} vs client completions {tally.completed}")
    return {"client": {**asdict(tally), "errors": len(tally.errors), "cancelled": tally.cancelled},
            "server": server_outcomes, "gauges_after": gauges, "cancel_raced_finish": raced,
            "cancelled_before_reaching_the_model": never_reached, "problems": problems}


def memory_report(samples: list[RssSample], warmup: int, num_requests: int) -> dict:
    """The stub and engine processes' RSS after warm-up and after each quarter of the remaining requests."""
    def at(done: int) -> RssSample:
        return next(s for s in samples if s.requests_done >= done)

    quarter = (num_requests - warmup) / 4
    points = [at(warmup)] + [at(round(warmup + k * quarter)) for k in (1, 2, 3, 4)]
    base, half, end = points[0].rss_mib, points[2].rss_mib, points[4].rss_mib
    return {"by_quarter": [asdict(p) for p in points], "peak_rss_mib": max(s.rss_mib for s in samples),
            "rss_growth_after_warmup": round((end - base) / base, 4),
            "rss_growth_last_half": round((end - half) / half, 4)}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cancel", type=float, default=0.3, help="fraction of requests the client cancels")
    parser.add_argument("--max-tokens", default="4,12", help="max_tokens is drawn from this range, inclusive")
    parser.add_argument("--constrained", type=float, default=0.0,
                        help="fraction of requests with a structured-outputs constraint (CONSTRAINT_MIX)")
    parser.add_argument("--warmup", type=int, help="requests before the memory baseline (default: 10%%)")
    parser.add_argument("--checkpoint", help="HF checkpoint directory (default: the packaged Gemma 3 270M)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from backend.params import EngineConfig

    from .serving import start_server

    args = parse_args(argv)
    low, high = (int(x) for x in args.max_tokens.split(","))
    warmup = args.warmup if args.warmup is not None else args.requests // 10
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "soak-server.log"
    print(f"starting tritonserver (log: {log_path})", file=sys.stderr, flush=True)
    server = start_server(log_path, EngineConfig(checkpoint=args.checkpoint))
    try:
        pid = stub_pid(server.process.pid)
        before = outcome_counts(server)
        start = time.monotonic()
        samples = [rss(pid, 0, start)]
        every = max(args.requests // 100, 1)

        def on_done(done: int) -> None:
            if done % every == 0 or done == warmup or done == args.requests:
                samples.append(rss(pid, done, start))
            if done % max(args.requests // 10, 1) == 0:
                s = samples[-1]
                print(f"{done}/{args.requests} requests, {s.seconds:.0f} s, stub + engine RSS {s.rss_mib:.0f} MiB "
                      f"(anon {s.anon_mib:.0f}, shared {s.shmem_mib:.0f})", file=sys.stderr, flush=True)

        tally = asyncio.run(run_load(server.grpc_url, args.requests, args.concurrency, args.cancel, (low, high),
                                     args.seed, on_done, args.constrained))
        wall = time.monotonic() - start
        gauges = wait_until_idle(server, before)
        samples.append(rss(pid, args.requests, start))
        after = outcome_counts(server)
        report = {"requests": args.requests, "concurrency": args.concurrency, "cancel_fraction": args.cancel,
                  "constrained_fraction": args.constrained,
                  "max_tokens": [low, high], "warmup": warmup, "seconds": round(wall, 1),
                  **accounting(args.requests, tally, {k: after[k] - before[k] for k in after}, gauges),
                  "memory": memory_report(samples, warmup, args.requests)}
    finally:
        server.stop()
    memory = report["memory"]
    missed = [goal for goal, limit in GOALS.items() if memory[goal] >= limit] + report["problems"]
    report["goals_missed"] = missed
    (args.out / "soak.json").write_text(json.dumps({**report, "rss_curve": [asdict(s) for s in samples]}, indent=1))
    print(json.dumps(report))
    print(f"{args.requests} requests in {wall:.0f} s: {report['client']['completed']} completed, "
          f"{tally.cancelled} cancelled ({report['cancel_raced_finish']} crossed their final response, "
          f"{report['cancelled_before_reaching_the_model']} never reached the model), "
          f"{len(tally.errors)} unexpected errors; stub + engine RSS by quarter (MiB): "
          f"{' -> '.join(str(p['rss_mib']) for p in memory['by_quarter'])}, growth after warm-up "
          f"{memory['rss_growth_after_warmup']:.1%}, over the last half {memory['rss_growth_last_half']:.1%}; "
          f"{'all goals met' if not missed else 'MISSED: ' + '; '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
