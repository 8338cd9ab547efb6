"""Issue #28's load grid: ours and vLLM over the same points on one GPU machine, back to back, one table.

    python -m benchmarks.load_grid ours --checkpoint DIR [--engine te] [--dtype bfloat16] [--max-num-seqs 256]
        [--kv-cache-bytes N] [--gpu-memory-utilization F] [--max-num-batched-tokens N] [--engine-process]
        [--systems engine_direct,server] [--concurrencies 1,8,32,64,128,256] [--prompts short,long]
        [--output-tokens 64,256] [--long-prompt-tokens 1024] [--min-requests N] [--requests-per-client K]
        [--reps 1] [--rate R[,R...] --open-requests N] [--time-limit S] [--total-time-limit S] [--client-processes N]
        --out FILE
    python -m benchmarks.load_grid table --ours FILE [FILE ...] --vllm FILE [FILE ...] --out table.md

A point is (prompt kind, output tokens, load): a closed loop of C clients, or with --rate an open loop
of --open-requests Poisson arrivals at each of its rates (`points`: a low one, and one near the knee
of the closed loops' request rates). Prompt kinds: short, the server benchmark's prompts
(engine_level.PROMPTS, what benchmarks.run's server level sends); long, --long-prompt-tokens tokens each,
every one distinct (long_prompts.distinct_prompts, a seed per point, repetition and warm-up, the
checkpoint's tokenizer), so no prefix cache skips any prefill. Every request asks for exactly the
output tokens, greedy, EOS ignored (benchmarks/serving.py).

`ours` runs our engine in-process (engine_direct, serving.EngineTarget) and through Triton (server,
serving.ServerTarget + serving.start_server), both on one EngineConfig. The point order makes a cut
run useful: every system at a point (a warm-up where that system has not yet run the point's prompt
kind and clients, then --reps measurements, each one serving.measure call bounded by --time-limit),
which goes first alternating, before the next point; closed loops by output tokens, prompt kind, then
clients; open loops last. Nothing starts past --total-time-limit (from this process's start, less
STOP_RESERVE_S to stop the server): the points left are recorded as skipped (load_grid_skipped), an
interrupt (SIGINT) as load_grid_interrupted. Both engines are on the GPU at once: size each one's KV
for that (--kv-cache-bytes, or --gpu-memory-utilization: 0.4 each).

vLLM runs the same grid with the same prompts in benchmarks/vllm_baseline.py's serving part
(`--prompt-kinds`, `--server-tokens 64,256`, `--concurrencies`, `--rate`, ...: its docstring), records
tagged alike. On the GPU machine (docs/benchmarks.md: the TE and Triton installs, .gpu-serving carried;
for vLLM the .gpu-vllmN carry calls), one call each, ours first (it makes the checkpoint);
benchmarks/load_grid_gpu.sh runs `ours` in .gpu-serving/run.sh's environment (numpy<2 and the
repository through a .pth for Triton's stub, the tokenizer, the random gemma-2b checkpoint):

    OUT=$OUT LIMIT=560 bash benchmarks/load_grid_gpu.sh --engine te --dtype bfloat16 --max-num-seqs 256 \
      --gpu-memory-utilization 0.4 --concurrencies 1,8,32,64,128,256 --prompts short,long \
      --output-tokens 64,256 --long-prompt-tokens 1024 --min-requests 8 --requests-per-client 2 \
      --rate 16 --open-requests 64 --time-limit 60 --total-time-limit 500 --client-processes 4 \
      ; cp $OUT/ours.jsonl /tmp/gemma-serving/ours_grid.jsonl
    OUT=$OUT LIMIT=560 bash ~/vllm-carry/run.sh --parts serving --max-num-seqs 256 --max-model-len 2048 \
      --gpu-memory-utilization 0.4 --concurrencies 1,8,32,64,128,256 --prompt-kinds short,long \
      --server-tokens 64,256 --long-prompt-tokens 1024 --min-requests 8 --requests-per-client 2 \
      --server-reps 1 --rate 16 --open-requests 64 --load-time-limit 60 --time-limit 520 \
      --ours /tmp/gemma-serving/ours_grid.jsonl

(Or --kv-cache-bytes 8589934592 for ours: 8 GiB holds 256 sequences of 1,024 + 256 tokens at
gemma-2b's 18 KiB a token.) $OUT/vllm.md is then the joined
table; here: python -m benchmarks.load_grid table --ours ours.jsonl --vllm vllm.jsonl --out table.md.

`table` joins both: per point tok/s, TTFT and ITL p50/p99 of each system, ours / vLLM
tok/s, and the goals of issue #28 each point misses (ours / vLLM >= 1.0, >= 1.15 at 64 clients and
above, closed loop; TTFT p50 and ITL p99 no worse than vLLM's at every point).

Records: JSON lines to --out, each measurement a serving.measure record plus `prompt_kind`,
`prompt_tokens`, `point`, `rep`; progress to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from . import serving
from .engine_options import add_engine_options, engine_config
from .stats import json_line, median, poisson_arrivals, ratio, read_json_files

VLLM = "vllm_asyncllm"  # vllm_baseline.VllmTarget.name (that module imports this one)
OURS = ("engine_direct", "server")
PROMPT_KINDS = ("short", "long")
GOAL = 1.0  # ours / vLLM tok/s at every closed-loop point ...
GOAL_HIGH, HIGH_CLIENTS = 1.15, 64  # ... and at this many clients and above
STOP_RESERVE_S = 20  # kept back from --total-time-limit: closing the targets, stopping the server


@dataclass(frozen=True)
class Point:
    prompt_kind: str
    max_tokens: int
    mode: str = "closed"
    concurrency: Optional[int] = None
    rate_per_s: Optional[float] = None

    @property
    def label(self) -> str:
        c = self.concurrency
        load = f"{c} client{'s' * (c > 1)}" if self.mode == "closed" else f"Poisson {self.rate_per_s}/s"
        return f"{self.prompt_kind} prompts, {self.max_tokens} tokens, {load}"


def points(prompt_kinds: Iterable[str], output_tokens: Iterable[int], concurrencies: Iterable[int],
           rates_per_s: Iterable[float] = ()) -> list[Point]:
    """The grid in the order it runs: closed loops by output tokens, prompt kind, then clients (a cut
    leaves whole blocks); open loops last, one per (output tokens, prompt kind) at each rate in turn."""
    kinds, tokens, clients = list(prompt_kinds), list(output_tokens), list(concurrencies)
    unknown = set(kinds) - set(PROMPT_KINDS)
    if unknown:
        raise ValueError(f"prompt kinds {sorted(unknown)}: choose from {PROMPT_KINDS}")
    grid = [Point(k, n, "closed", concurrency=c) for n in tokens for k in kinds for c in clients]
    grid += [Point(k, n, "open", rate_per_s=rate) for rate in rates_per_s for n in tokens for k in kinds]
    return grid


class Prompts:
    """Every point's prompts, the same wherever the grid runs given the same tokenizer (the checkpoint's,
    backend.tokenizer.Tokenizer): short, engine_level.PROMPTS; long, `long_tokens`-token distinct
    prompts seeded by the point and the purpose ("warmup", "rep0", ...), so none repeats one an
    engine has seen."""

    def __init__(self, tokenizer, long_tokens: int):
        from .engine_level import PROMPTS

        self.tokenizer, self.long_tokens, self.short = tokenizer, long_tokens, list(PROMPTS)
        self.short_tokens = round(sum(len(tokenizer.encode(p)) for p in PROMPTS) / len(PROMPTS), 1)
        self._made: dict[tuple, list[str]] = {}  # the systems of a point share its prompts: made once

    def tokens(self, kind: str) -> float:
        """Prompt tokens per request (the short prompts' mean, <bos> included)."""
        return self.short_tokens if kind == "short" else self.long_tokens

    def get(self, point: Point, count: int, purpose: str) -> list[str]:
        if point.prompt_kind == "short":
            return self.short
        from .long_prompts import distinct_prompts
        key = (point, count, purpose)
        if key not in self._made:
            seed = zlib.crc32(f"{point.label}|{purpose}".encode())
            self._made[key] = distinct_prompts(self.tokenizer, count, self.long_tokens, seed)
        return self._made[key]


@dataclass(frozen=True)
class Load:
    requests_per_client: int = 2  # closed loop: requests = max(min_requests, clients x this)
    min_requests: int = 8
    open_requests: int = 160  # open loop: this many arrivals (at the point's rate)
    time_limit_s: float = 60  # one load run's bound; requests left then are cancelled, counted as errors
    reps: int = 1  # measurements per point and system (the table takes medians)
    warmup_tokens: int = 4  # the warm-up before each point: a closed loop of C requests of this many tokens

    def requests(self, point: Point) -> int:
        if point.mode == "open":
            return self.open_requests
        return max(self.min_requests, point.concurrency * self.requests_per_client)


def run_grid(targets: list, grid: list[Point], prompts: Prompts, load: Load, emit: Callable[[dict], object],
             deadline: float, progress: Callable[[str], None] = lambda m: None,
             probe: Callable[[object], Optional[Callable[[], dict]]] = lambda target: None) -> int:
    """Each point on every target (which goes first alternating from point to point): a warm-up (the
    first time that target sees the point's prompt kind and clients, so each batch size's CUDA graphs
    are captured before it is timed; an open loop only where no closed one of its prompt kind ran),
    then `load.reps` measurements, each emitted as its serving.measure record tagged with the point.
    Nothing starts at or past `deadline` (time.monotonic()); a run is bounded by it too. The points not
    measured are emitted in one record of kind load_grid_skipped. `probe(target)` may return a function whose
    dict is added to that target's records (taken after each measurement). Returns the records emitted."""
    done, warmed = 0, set()
    for i, point in enumerate(grid):
        for target in (targets if i % 2 == 0 else targets[::-1]):
            n = load.requests(point)
            warm = (target.name, point.prompt_kind, point.concurrency)
            cold = warm not in warmed if point.mode == "closed" else not any(w[:2] == warm[:2] for w in warmed)
            for rep in range(-1 if cold else 0, load.reps):  # -1: the warm-up
                left = deadline - time.monotonic()
                if left <= 0:
                    emit({"kind": "load_grid_skipped", "reason": "time limit", "at_system": target.name,
                          "at_rep": rep, "points": [p.label for p in grid[i:]]})
                    return done
                limit = min(load.time_limit_s, left)
                if rep < 0:
                    warmed.add(warm)
                    progress(f"{point.label}: warm-up -> {target.name}")
                    serving.measure(target, "closed", prompts.get(point, point.concurrency or 8, "warmup"),
                                    load.warmup_tokens, limit, concurrency=point.concurrency or 8,
                                    num_requests=point.concurrency or 8)
                    continue
                progress(f"{point.label}: rep {rep + 1}/{load.reps}, {n} requests -> {target.name}")
                chosen = prompts.get(point, n, f"rep{rep}")
                after = probe(target)
                if point.mode == "closed":
                    record = serving.measure(target, "closed", chosen, point.max_tokens, limit,
                                             concurrency=point.concurrency, num_requests=n)
                else:
                    arrivals = poisson_arrivals(point.rate_per_s, n, seed=0)
                    record = serving.measure(target, "open", chosen, point.max_tokens, limit, arrivals_s=arrivals,
                                             rate_per_s=point.rate_per_s)
                emit({**record, "prompt_kind": point.prompt_kind, "prompt_tokens": prompts.tokens(point.prompt_kind),
                      "point": i, "rep": rep, "time_limit_s": limit, **(after() if after else {})})
                done += 1
    return done


# ---- the table ----

def _key(r: dict) -> tuple:
    return (r["prompt_kind"], r["max_tokens"], r["mode"], r.get("concurrency"), r.get("rate_per_s"))


def _point_order(key: tuple) -> tuple:
    """A table's rows in order: closed loops first, then by output tokens, prompt kind and load."""
    prompt_kind, max_tokens, mode, concurrency, rate = key
    return (mode != "closed", max_tokens, PROMPT_KINDS.index(prompt_kind), concurrency or 0, rate or 0)


def _load_label(mode: str, concurrency: Optional[int], rate_per_s: Optional[float]) -> str:
    return f"{concurrency} client{'s' * (concurrency > 1)}" if mode == "closed" else f"open {rate_per_s}/s"


def grid_records(records: Iterable[dict]) -> list[dict]:
    """The measurements among a file's records (ours: kind load_grid; vLLM's serving part: vllm_serving)."""
    return [r for r in records if r.get("type") == "server" and "prompt_kind" in r]


def rows(records: list[dict]) -> list[dict]:
    """One row per point: each system's medians (serving.table), ours / vLLM tok/s, the goals missed."""
    out = []
    for key in sorted({_key(r) for r in records}, key=_point_order):
        mine = [r for r in records if _key(r) == key]
        at = {r["system"]: r for r in serving.table(mine)}
        row = {"prompt_kind": key[0], "max_tokens": key[1], "mode": key[2], "concurrency": key[3],
               "rate_per_s": key[4], "prompt_tokens": mine[0].get("prompt_tokens"), "systems": at,
               "ratios": {}, "missed": {}}
        vllm = at.get(VLLM)
        for system in OURS:
            if system not in at or vllm is None:
                continue
            ours = at[system]
            row["ratios"][system] = ratio(ours["tokens_per_s"], vllm["tokens_per_s"])
            row["missed"][system] = missed(row["ratios"][system], ours, vllm, key[2], key[3])
        out.append(row)
    return out


def missed(tok_s_ratio: Optional[float], ours: dict, vllm: dict, mode: str, concurrency: Optional[int]) -> list[str]:
    """Issue #28's goals this point misses for one of our systems (an unmeasured value misses)."""
    misses = []
    if mode == "closed":
        goal = GOAL_HIGH if concurrency >= HIGH_CLIENTS else GOAL
        if tok_s_ratio is None or tok_s_ratio < goal:
            misses.append(f"tok/s < {goal:.2f}x")
    for metric, q, name in (("ttft_ms", "p50", "TTFT p50"), ("itl_ms", "p99", "ITL p99")):
        mine, theirs = ours[metric][q], vllm[metric][q]
        if mine is None or theirs is None or mine > theirs:
            misses.append(f"{name} > vLLM")
    if ours["errors"] or vllm["errors"]:
        misses.append("errors")
    return misses


def _fmt(x: Optional[float], digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def markdown(ours: list[dict], vllm: list[dict]) -> str:
    """The one table of issue #28 from our records and vLLM's (all records of both files)."""
    run = next((r for r in ours if r.get("kind") == "load_grid_run"), {})
    env = next((r for r in vllm if r.get("kind") == "vllm_env"), {})
    startup = next((r for r in vllm if r.get("kind") == "vllm_startup" and r.get("part") == "serving"), {})
    config = run.get("engine_config", {})
    lines = [f"Ours: {run.get('device')} ({run.get('date')}), engine {config.get('engine')}, dtype {config.get('dtype')}, "
             f"max_num_seqs {config.get('max_num_seqs')}, kv_cache_bytes {config.get('kv_cache_bytes')}"
             + f", gpu_memory_utilization {config.get('gpu_memory_utilization')}, checkpoint {Path(config.get('checkpoint') or '-').name}"
             + "".join(f", {k} {v}" for k, v in run.get("serving_env", {}).items() if v) + ".",
             (f"vLLM {env.get('versions', {}).get('vllm')}: {env.get('gpu')}; " + ", ".join(
                 f"{k} {v}" for k, v in (startup.get("resolved") or {}).items()) + "." if env
              else "vLLM: no vllm_env record."), "",
             "tok/s: output tokens per second; ratios ours / vLLM (> 1: ours faster); latencies in ms, "
             "vLLM / engine_direct / server. Goals (issue #28): tok/s >= 1.0x at every closed-loop point, >= "
             f"{GOAL_HIGH}x at {HIGH_CLIENTS} clients and above; TTFT p50 and ITL p99 no worse than vLLM's.", "",
             "| prompts | out | load | tok/s vLLM | tok/s engine_direct | tok/s server | engine_direct / vLLM "
             "| server / vLLM | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | goals missed |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    table = rows(grid_records(ours) + grid_records(vllm))
    systems = (VLLM, *OURS)
    for row in table:
        at = row["systems"]

        def each(metric, q):
            return " / ".join(_fmt(at[s][metric][q], 1) if s in at else "-" for s in systems)

        load = _load_label(row["mode"], row["concurrency"], row["rate_per_s"])
        notes = "; ".join(f"{s}: {', '.join(m)}" for s, m in row["missed"].items() if m) or \
            ("met" if row["missed"] else "no pair")
        lines.append(f"| {row['prompt_kind']} ({_fmt(row['prompt_tokens'])}) | {row['max_tokens']} | {load} | "
                     + " | ".join(_fmt(at[s]["tokens_per_s"]) if s in at else "-" for s in systems)
                     + " | " + " | ".join(_fmt(row["ratios"].get(s), 2) for s in OURS)
                     + f" | {each('ttft_ms', 'p50')} | {each('ttft_ms', 'p99')} | {each('itl_ms', 'p50')} "
                     f"| {each('itl_ms', 'p99')} | {notes} |")
    lines.append("")
    for system in OURS:
        paired = [r for r in table if system in r["missed"]]
        if paired:
            ok = sum(not r["missed"][system] for r in paired)
            closed = [r["ratios"][system] for r in paired if r["mode"] == "closed" and r["ratios"][system] is not None]
            lines.append(f"- {system}: all goals met at {ok} of {len(paired)} points; tok/s over vLLM's "
                         f"{_fmt(min(closed, default=None), 2)} to {_fmt(max(closed, default=None), 2)} "
                         f"(median {_fmt(median(closed), 2)}) over the closed loop.")
    for r in ours + vllm:
        if r.get("kind") in ("load_grid_skipped", "error", "retry") or r.get("kind", "").endswith("_interrupted"):
            lines.append(f"- {r['kind']}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "kind"))
    return "\n".join(lines + server_waits(grid_records(ours))) + "\n"


def server_waits(records: list[dict]) -> list[str]:
    """Where the server's mean TTFT went, per point (medians over repetitions): Triton's queue and
    `execute` (server_intake), the engine's queue and prefill (engine_phases), and the rest: the
    model's intake, the pipes to and from the engine process, and the way back to the client."""
    measured = [r for r in records if r["system"] == "server" and r.get("engine_phases") and r.get("server_intake")]
    if not measured:
        return []
    lines = ["", "Where the server's TTFT went: means over a point's requests, ms (medians over repetitions).", "",
             "| prompts | out | load | TTFT | Triton queue | execute | engine queue | prefill | the rest |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key in sorted({_key(r) for r in measured}, key=_point_order):
        mine = [r for r in measured if _key(r) == key]
        parts = [median([r["ttft_ms"]["mean"] for r in mine])] + [
            median([r[source][name] for r in mine if r[source][name] is not None])
            for source, name in (("server_intake", "queue_ms"), ("server_intake", "execute_ms"),
                                 ("engine_phases", "queue_ms"), ("engine_phases", "prefill_ms"))]
        rest = None if None in parts else parts[0] - sum(parts[1:])
        prompt_kind, max_tokens, mode, concurrency, rate = key
        lines.append(f"| {prompt_kind} | {max_tokens} | {_load_label(mode, concurrency, rate)} | "
                     + " | ".join(_fmt(x, 1) for x in [*parts, rest]) + " |")
    return lines


# ---- ours ----

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def rates(text: str) -> list[float]:
    """--rate's comma-separated Poisson rates (/s), each positive."""
    values = [float(x) for x in text.split(",")]
    if not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: rates must be positive")
    return values


def _names(choices: Iterable[str]) -> Callable[[str], list[str]]:
    choices = tuple(choices)

    def parse(text: str) -> list[str]:
        names = text.split(",")
        if not names or set(names) - set(choices):
            raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(choices)}")
        return names
    return parse


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("ours", help="run the grid on our engine in-process and through Triton")
    add_engine_options(o, "engine (one EngineConfig for both systems)", max_num_seqs_default=256)
    o.add_argument("--engine-process", action="store_true",
                   help="engine_direct drives the engine in a process of its own, as the server hosts it")
    o.add_argument("--systems", type=_names(OURS), default=list(OURS))
    o.add_argument("--concurrencies", type=_ints, default=[1, 8, 32, 64, 128, 256])
    o.add_argument("--prompts", type=_names(PROMPT_KINDS), default=list(PROMPT_KINDS))
    o.add_argument("--output-tokens", type=_ints, default=[64, 256])
    o.add_argument("--long-prompt-tokens", type=int, default=1024)
    o.add_argument("--min-requests", type=int, default=Load.min_requests)
    o.add_argument("--requests-per-client", type=int, default=Load.requests_per_client)
    o.add_argument("--reps", type=int, default=Load.reps)
    o.add_argument("--rate", type=rates, default=[],
                   help="open loops: Poisson arrivals per second, one loop per rate, e.g. 16,300 (none: no open loop)")
    o.add_argument("--open-requests", type=int, default=Load.open_requests)
    o.add_argument("--time-limit", type=float, default=Load.time_limit_s, help="seconds per load run")
    o.add_argument("--total-time-limit", type=float, default=480,
                   help="seconds for everything from this process's start; points left then are skipped")
    o.add_argument("--client-processes", type=int, default=1, help="the server target's closed-loop client processes")
    o.add_argument("--instances", type=int,
                   help="the server's model instances (stubs), all in front of one engine process "
                   "(default: as model_repository/gemma/config.pbtxt ships)")
    o.add_argument("--out", type=Path, required=True, help="JSON lines")
    t = sub.add_parser("table", help="the markdown table of our records and vLLM's")
    t.add_argument("--ours", type=Path, nargs="+", required=True)
    t.add_argument("--vllm", type=Path, nargs="+", required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--plot", type=Path, help="also a PNG of tok/s and TTFT p50 against clients (matplotlib)")
    return p.parse_args(argv)


def load_settings(args: argparse.Namespace) -> Load:
    return Load(requests_per_client=args.requests_per_client, min_requests=args.min_requests,
                open_requests=args.open_requests, time_limit_s=args.time_limit, reps=args.reps)


def run_ours(args: argparse.Namespace, started: float) -> int:
    from backend.engine_core import resolve_device
    from backend.loader import start_engine
    from backend.tokenizer import Tokenizer

    from tests.support.server import shipped_instance_count

    from .run import machine

    deadline = started + args.total_time_limit - STOP_RESERVE_S
    config = engine_config(args)
    grid = points(args.prompts, args.output_tokens, args.concurrencies, args.rate)
    load = load_settings(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = open(args.out, "w")

    def emit(record: dict) -> dict:
        record = {"kind": "load_grid", **record} if "kind" not in record else record
        log.write(json_line(record) + "\n")
        log.flush()
        return record

    def progress(message: str) -> None:
        print(f"[load_grid {time.monotonic() - started:5.0f}s] {message}", file=sys.stderr, flush=True)

    emit({"kind": "load_grid_run", **machine(resolve_device(config.device)), "engine_config": dataclasses.asdict(config),
          "systems": args.systems, "load": dataclasses.asdict(load), "points": [p.label for p in grid],
          "argv": sys.argv[1:], "serving_env": {k: os.environ.get(k, "") for k in serving.SERVING_SETTINGS},
          "instances": args.instances or shipped_instance_count()})
    engine = server = None
    targets = []
    try:
        prompts = Prompts(Tokenizer(config.checkpoint), args.long_prompt_tokens)
        for system in args.systems:
            if system == "engine_direct":
                progress(f"loading the engine ({config})")
                engine = start_engine(config, engine_process=args.engine_process)
                targets.append(serving.EngineTarget(engine))
            else:
                log_path = args.out.with_suffix(".server.log")
                progress(f"starting tritonserver (log: {log_path})")
                server = serving.start_server(log_path, config, args.instances)
                targets.append(serving.ServerTarget(server.grpc_url, timeout_s=args.time_limit,
                                                    client_processes=args.client_processes))

        def probe(target):
            if target.name == "server":  # where requests waited: before the engine had them, and in it
                phases = serving.engine_phase_totals(server.metrics_url)
                counters = serving.intake_counters(target.url)
                return lambda: {"server_intake": serving.intake_since(counters, serving.intake_counters(target.url)),
                                "engine_phases": serving.engine_phases_since(
                                    phases, serving.engine_phase_totals(server.metrics_url))}
            # where engine_direct's steps' time went (backend/step_times.py), as benchmarks.run
            before = engine.stats().step_times
            return lambda: {"engine_steps": engine.stats().step_times.since(before).per_step_ms()}

        progress(f"{len(grid)} points x {len(targets)} systems, until {deadline - started:.0f} s")
        done = run_grid(targets, grid, prompts, load, emit, deadline, progress, probe)
    except KeyboardInterrupt:  # a wrapper's timeout (SIGINT): what was measured stays, the server is stopped
        emit({"kind": "load_grid_interrupted", "seconds": time.monotonic() - started})
        done = None
    finally:
        for target in targets:
            try:
                serving.close(target)
            except Exception as e:  # noqa: BLE001 - the server and engine still get stopped
                progress(f"closing {target.name}: {e!r}")
        if server is not None:
            server.stop()
        if engine is not None:
            engine.shutdown()
    emit({"kind": "load_grid_end", "measurements": done, "seconds": time.monotonic() - started})
    log.close()
    progress(f"wrote {args.out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    if args.command == "ours":
        return run_ours(args, started)
    ours, vllm = read_json_files(args.ours), read_json_files(args.vllm)
    text = markdown(ours, vllm)
    args.out.write_text(text)
    print(text)
    if args.plot is not None:
        from .plots import load_grid
        load_grid(rows(grid_records(ours) + grid_records(vllm)), args.plot, text.splitlines()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
