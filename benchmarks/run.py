"""`make bench`: engine vs HF transformers, then the Triton server under load, then speculative decoding.

    python -m benchmarks.run [--quick] [--only engine|server] [--out results] [--publish]
                             [--checkpoint DIR] [--engine auto|te|torch] [--dtype auto|float32|bfloat16|float16]
                             [--max-num-seqs N] [--kv-cache-bytes N] [--gpu-memory-utilization F]
                             [--concurrencies 1,4,8] [--server-tokens N]
                             [--requests-per-client N] [--server-reps N] [--rate R] [--open-requests N]
                             [--openai-concurrency N] [--client-processes N] [--time-limit S]

Without options: the packaged Gemma 3 270M with EngineConfig's defaults on this machine (its CPU).
The engine options build the one EngineConfig that both the in-process engine and the server run
(serving.server_env), so the same command measures a GPU server (docs/benchmarks.md, "GPU (H100)
server level"). Where the gateway's packages are installed, the server level also measures the
OpenAI-compatible gateway in front of the same server against direct gRPC. Writes one JSON line per
measurement to stdout and OUT/bench.jsonl (the last line is the summary), OUT/throughput.png,
OUT/latency.png and OUT/table.md; progress goes to stderr. The speculative level (benchmarks/speculative.py)
runs an engine of its own with n-gram speculation and one with a draft model (the checkpoint's first
layers): an edit workload and one with nothing to look up, 1 and 8 streams, speculation off, n-gram
and draft model.
--publish copies the plots, the JSON lines and the table to docs/benchmarks/ (the committed
results, docs/benchmarks.md). The engine level on a GPU is benchmarks/gpu_bench.py (docs/gpu.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import chat_level, engine_level, plots, serving, speculative
from .engine_options import add_engine_options, engine_config, given
from .stats import json_line, poisson_arrivals, ratio

ROOT = Path(__file__).resolve().parents[1]
PUBLISH_DIR = ROOT / "docs" / "benchmarks"
# Goals met at or above their target. Multi-turn chat: the 4th turn's TTFT with prefix caching off
# over on (>= 4: on is <= 0.25x of off). The gateway: its tok/s over direct gRPC's at the same load.
GOALS = {"engine_vs_hf_single": 1.5, "engine_vs_hf_concurrent": 3.0, "server_vs_engine_throughput": 0.9,
         "prefix_cache_ttft_speedup": 4.0, "openai_vs_grpc_throughput": 0.95}
# Goals met at or below their target: the gateway's TTFT p50 minus direct gRPC's, ms.
CEILINGS = {"openai_ttft_overhead_ms_p50": 5.0}
SUMMARY_KEYS = ("engine_vs_hf_single", "engine_vs_hf_concurrent", "server_vs_engine_throughput", "ttft_p50_ms",
                "itl_p50_ms", "openai_vs_grpc_throughput", "openai_ttft_overhead_ms_p50")
# Speculative decoding, on over off (benchmarks/speculative.py): the edit workload's inter-token latency at 1
# stream and tokens/s at 8, and tokens/s where there is nothing to look up. The goals (>= 1.8,
# >= 1.3, >= 0.97) are for an H200; on a CPU they are reported, not judged.
# The draft model's (spec_draft_*) are reported beside them.
SPEC_KEYS = ("spec_edit_itl_speedup_1", "spec_edit_tok_s_ratio_8", "spec_free_tok_s_ratio_1", "spec_free_tok_s_ratio_8",
             "spec_draft_edit_itl_speedup_1", "spec_draft_free_tok_s_ratio_1")


@dataclass(frozen=True)
class Settings:
    engine_tokens: int = 32  # tokens per request, engine level
    reps: int = 3  # engine-level repetitions (medians); each runs every (system, batch size) once
    single_pairs: int = 3  # (engine b=1, HF b=1) pairs per repetition: the cheapest, noisiest comparison
    batch_sizes: tuple[int, ...] = engine_level.BATCH_SIZES
    server_tokens: int = 32  # tokens per request, server level
    concurrencies: tuple[int, ...] = (1, 4, 8)
    requests_per_client: int = 2  # closed loop: concurrency * this many requests (at least 3)
    open_requests: int = 8  # open loop: this many Poisson arrivals ...
    rate_per_s: float = 0.3  # ... at this rate
    time_limit_s: float = 240  # per load run; later requests are cancelled and counted as errors
    server_reps: int = 2  # closed-loop repetitions (medians); the open loop runs once
    openai_concurrency: int = 16  # closed-loop clients of gateway vs direct gRPC (0: no gateway)
    client_processes: int = 1  # processes the gRPC target's closed-loop clients are split over
    chat_reps: int = 2  # multi-turn conversations per engine (prefix caching on / off)
    spec_tokens: int = 64  # tokens per request, speculative level
    spec_reps: int = 2  # speculative-level repetitions (medians)


QUICK = Settings(engine_tokens=8, reps=1, single_pairs=1, server_tokens=8, requests_per_client=1, open_requests=4,
                 rate_per_s=1.0, time_limit_s=90, server_reps=1, chat_reps=1, spec_tokens=8, spec_reps=1)


class Report:
    """JSON lines to stdout and a file; progress to stderr."""

    def __init__(self, path: Path):
        self.file = open(path, "w")
        self.records: list[dict] = []
        self.t0 = time.monotonic()

    def emit(self, record: dict) -> dict:
        record = {**record, "loadavg": list(os.getloadavg())} if "loadavg" not in record else record
        line = json_line(record)
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()
        self.records.append(record)
        return record

    def progress(self, message: str) -> None:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"[bench {time.monotonic() - self.t0:6.0f}s, load {load}] {message}", file=sys.stderr, flush=True)


def machine(device) -> dict:
    """What ran the benchmark; the engine's torch.device is recorded as "cpu" or the GPU's name."""
    import torch
    import transformers
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": "cpu"}
    if device.type == "cuda":
        info.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def where(info: dict) -> str:
    """The machine in a few words: the GPU if one ran the engine, else the CPU."""
    if info["device"] != "cpu":
        return f"{info['device']} (CUDA {info['cuda']}), host {info['cpu']}, {info['cores']} cores"
    return f"{info['cpu']}, {info['cores']} cores"


def run_engine_level(report: Report, engine, s: Settings) -> list[dict]:
    dtype = engine.core.runner.model.dtype  # what the engine resolved "auto" to
    report.progress(f"loading HF transformers model (same checkpoint, {dtype}, {engine.device})")
    hf = engine_level.load_hf(engine.config.checkpoint, dtype, engine.device)
    try:
        records = [report.emit(r) for r in engine_level.run(engine, hf, s.engine_tokens, s.reps, s.batch_sizes,
                                                            s.single_pairs, report.progress)]
    finally:
        del hf
        gc.collect()
    return records


def run_chat_level(report: Report, engine, s: Settings) -> list[dict]:
    """The same conversations on `engine` (prefix caching on) and on a twin with it off."""
    if not engine.config.enable_prefix_caching:
        report.progress("chat level skipped: the engine runs without prefix caching")
        return []
    from backend.loader import start_engine
    report.progress("loading a second engine, prefix caching off")
    uncached = start_engine(dataclasses.replace(engine.config, enable_prefix_caching=False))
    try:
        engines = {"prefix_caching": engine, "no_prefix_caching": uncached}
        return [report.emit(r) for r in chat_level.run(engines, s.chat_reps, progress=report.progress)]
    finally:
        uncached.shutdown()
        del uncached
        gc.collect()


def run_speculative_level(report: Report, engine, s: Settings) -> list[dict]:
    """Speculation off and n-gram in one engine of its own (off is the per-request opt-out), a draft
    model in another; prefix caching off so a repeated prompt computes its prefill again."""
    from backend.loader import start_engine
    report.progress("loading engines with speculative decoding, n-gram and a draft model (prefix caching off)")
    config = dataclasses.replace(engine.config, enable_prefix_caching=False,
                                 speculative_config=json.dumps(speculative.SPECULATIVE_CONFIG))
    draft_config = speculative.draft_speculative_config(Path(engine.config.checkpoint))
    spec_engine = start_engine(config)
    draft_engine = start_engine(dataclasses.replace(config, speculative_config=json.dumps(draft_config)))
    try:
        return [report.emit(r) for r in speculative.run(spec_engine, s.spec_tokens, s.spec_reps,
                                                         progress=report.progress, draft_engine=draft_engine)]
    finally:
        spec_engine.shutdown()
        draft_engine.shutdown()
        del spec_engine, draft_engine
        gc.collect()


def _turn(targets: list, k: int) -> list:
    """`targets` forwards for even k, backwards for odd: which goes first alternates."""
    return targets if k % 2 == 0 else targets[::-1]


def run_server_level(report: Report, engine, s: Settings, out: Path) -> list[dict]:
    prompts = engine_level.PROMPTS
    report.progress(f"starting tritonserver (log: {out / 'server.log'})")
    server = serving.start_server(out / "server.log", engine.config)
    gateway = None
    records = []
    try:
        report.progress(f"server ready at {server.grpc_url}")
        if s.client_processes > 1:
            report.progress(f"starting {s.client_processes} client processes for the gRPC closed loops")
        grpc = serving.ServerTarget(server.grpc_url, timeout_s=s.time_limit_s, client_processes=s.client_processes)
        targets = [grpc, serving.EngineTarget(engine)]
        loads = {c: list(targets) for c in s.concurrencies}  # closed loop: clients -> the targets run
        if s.openai_concurrency:
            gateway = serving.start_gateway(server.grpc_url, out / "gateway.log")
            if gateway is None:
                report.progress("gateway vs gRPC skipped: the gateway's packages are not installed")
            else:
                report.progress(f"gateway ready at {gateway.url} (log: {out / 'gateway.log'})")
                loads.setdefault(s.openai_concurrency, [grpc]).append(
                    serving.GatewayTarget(gateway.url, timeout_s=s.time_limit_s))
        everyone = list(dict.fromkeys(t for at_c in loads.values() for t in at_c))
        # Warm-up, not recorded: the first connections and steps, and a few steps at each
        # concurrency, so that on a GPU each batch size's CUDA graph is captured before it is timed.
        for target in everyone:
            report.progress(f"server level: warm-up -> {target.name}")
            for c, at_c in loads.items():
                if target in at_c:
                    serving.measure(target, "closed", prompts, 4, s.time_limit_s, concurrency=c, num_requests=c)
        for rep in range(s.server_reps):
            for i, (c, at_c) in enumerate(loads.items()):
                n = max(3, c * s.requests_per_client)
                for target in _turn(at_c, rep + i):
                    report.progress(f"server level: rep {rep + 1}/{s.server_reps}: closed loop, {c} clients, "
                                    f"{n} requests x {s.server_tokens} tokens -> {target.name}")
                    before = engine.stats().step_times
                    record = serving.measure(target, "closed", prompts, s.server_tokens, s.time_limit_s,
                                             concurrency=c, num_requests=n)
                    if target.name == "engine_direct":  # where its steps' time went (backend/step_times.py)
                        record["engine_steps"] = engine.stats().step_times.since(before).per_step_ms()
                    records.append(report.emit({**record, "rep": rep}))
        arrivals = poisson_arrivals(s.rate_per_s, s.open_requests, seed=0)
        for target in _turn(targets, s.server_reps):
            report.progress(f"server level: open loop, {s.open_requests} Poisson arrivals at {s.rate_per_s}/s "
                            f"-> {target.name}")
            records.append(report.emit({**serving.measure(
                target, "open", prompts, s.server_tokens, s.time_limit_s, arrivals_s=arrivals,
                rate_per_s=s.rate_per_s), "rep": 0}))
        for target in everyone:
            serving.close(target)
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()
    return records


def summarize(engine_records: list[dict], server_records: list[dict], chat_records: list[dict], s: Settings,
              info: dict, load_start: list[float], elapsed_s: float, spec_records: Optional[list[dict]] = None) -> dict:
    summary: dict = {"type": "summary", **info, "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()),
                     "elapsed_s": elapsed_s, "settings": dataclasses.asdict(s)}
    summary.update(dict.fromkeys(SUMMARY_KEYS))  # always present; null when that level did not run
    if engine_records:
        engine_rows = engine_level.table(engine_records)
        summary.update(engine_level.ratios(engine_rows, s.batch_sizes))
        summary["paired"] = engine_level.paired_ratios(engine_records, s.batch_sizes)
        summary["engine_table"] = engine_rows
    if chat_records:
        summary.update(chat_level.summary(chat_records, "prefix_caching", "no_prefix_caching"))
    summary.update(dict.fromkeys(SPEC_KEYS))
    if spec_records:
        spec_rows = speculative.table(spec_records)
        summary.update(speculative.ratios(spec_rows))
        summary["spec_paired_tok_s_ratios"] = speculative.paired(spec_records)
        summary["spec_config"] = speculative.SPECULATIVE_CONFIG
        summary["spec_draft"] = {"layers": speculative.DRAFT_LAYERS, "num_speculative_tokens": speculative.DRAFT_TOKENS}
        summary["spec_table"] = spec_rows
    server_rows = serving.table(server_records)
    closed = {(r["system"], r["concurrency"]): r for r in server_rows if r["mode"] == "closed"}
    if closed:
        by_c = {str(c): ratio(closed[("server", c)]["tokens_per_s"], closed[("engine_direct", c)]["tokens_per_s"])
                for c in s.concurrencies}
        top = max(s.concurrencies)
        at = closed[("server", top)]
        summary.update({
            "server_vs_engine_throughput": by_c[str(top)],
            "server_vs_engine_by_concurrency": by_c,
            "server_tokens_per_s": at["tokens_per_s"],
            "ttft_p50_ms": at["ttft_ms"]["p50"], "ttft_p99_ms": at["ttft_ms"]["p99"],
            "itl_p50_ms": at["itl_ms"]["p50"], "itl_p99_ms": at["itl_ms"]["p99"],
            "latency_at": f"server, closed loop, {top} clients",
            "server_errors": sum(r["errors"] for r in server_rows if r["system"] == "server"),
            "engine_direct_errors": sum(r["errors"] for r in server_rows if r["system"] == "engine_direct"),
            "server_table": server_rows,
        })
    summary.update(openai_vs_grpc(server_records, server_rows, s.openai_concurrency))
    summary["goals"] = {name: _goal(summary.get(name), target, at_most=name in CEILINGS)
                        for name, target in {**GOALS, **CEILINGS}.items()}
    return summary


def openai_vs_grpc(records: list[dict], rows: list[dict], clients: int) -> dict:
    """The gateway against direct gRPC at `clients` closed-loop clients: the medians' tok/s ratio and
    TTFT p50 difference, and the ratio within each repetition (the two ran back to back). Empty
    when the gateway did not run."""
    def at(system, among):
        return next((r for r in among if (r["system"], r["mode"], r.get("concurrency")) == (system, "closed", clients)),
                    None)

    def tok_s(system, rep):
        return at(system, [r for r in records if r.get("rep") == rep])["tokens_per_s"]

    gateway, grpc = at("gateway", rows), at("server", rows)
    if gateway is None or grpc is None:
        return {}
    reps = sorted({r["rep"] for r in records if r["system"] == "gateway"})
    ttft = gateway["ttft_ms"]["p50"], grpc["ttft_ms"]["p50"]
    return {"openai_vs_grpc_throughput": ratio(gateway["tokens_per_s"], grpc["tokens_per_s"]),
            "openai_ttft_overhead_ms_p50": None if None in ttft else ttft[0] - ttft[1],
            "openai_vs_grpc_by_rep": [ratio(tok_s("gateway", k), tok_s("server", k)) for k in reps],
            "openai_at": f"closed loop, {clients} clients", "gateway_tokens_per_s": gateway["tokens_per_s"],
            "gateway_errors": gateway["errors"]}


def _goal(value: Optional[float], target: float, at_most: bool) -> dict:
    met = None if value is None else (value <= target if at_most else value >= target)
    return {"target": target, "at_most": at_most, "value": value, "met": met}


def _fmt(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def kv_cache_setting(config: dict) -> str:
    """What sized the KV cache: vLLM's share rule when set, else the fixed bytes."""
    utilization = config.get("gpu_memory_utilization")  # absent from runs recorded before it existed
    return f"kv_cache_bytes {config['kv_cache_bytes']}" if utilization is None else \
        f"gpu_memory_utilization {utilization}"


def markdown(engine_rows: list[dict], server_rows: list[dict], summary: dict) -> str:
    """The results tables for docs/benchmarks.md."""
    config = summary["engine_config"]
    lines = [f"{where(summary)}, torch {summary['torch']} ({summary['torch_threads']} "
             f"threads), transformers {summary['transformers']}; {summary['date']}; load average "
             f"{' '.join(_fmt(x, 2) for x in summary['loadavg_start'])} at start, "
             f"{' '.join(_fmt(x, 2) for x in summary['loadavg_end'])} at end.", "",
             f"Model {Path(config['checkpoint']).name}: engine {config['engine']}, dtype {config['dtype']}, "
             f"max_num_seqs {config['max_num_seqs']}, " + kv_cache_setting(config) + ".", ""]
    if engine_rows:
        st = summary["settings"]
        lines += [f"Engine level: medians over {st['reps']} repetitions ({st['reps'] * st['single_pairs']} runs for "
                  f"b = 1), {st['engine_tokens']} tokens per request.", "",
                  "| system | batch | total tok/s | decode tok/s | step ms | TTFT ms | engine / this (total tok/s) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        engine = {r["batch_size"]: r for r in engine_rows if r["system"] == "engine"}
        order = ("engine", "hf_sequential", "hf_batched")
        for r in sorted(engine_rows, key=lambda r: (order.index(r["system"]), r["batch_size"])):
            mine = engine.get(r["batch_size"], {}).get("total_tok_s")
            rel = "" if r["system"] == "engine" else _fmt(ratio(mine, r["total_tok_s"]), 2) + "x"
            lines.append(f"| {r['system']} | {r['batch_size']} | {_fmt(r['total_tok_s'])} | {_fmt(r['decode_tok_s'])} "
                         f"| {_fmt(r['step_ms'])} | {_fmt(r['ttft_ms'])} | {rel} |")
        lines.append("")
    if server_rows:
        st = summary["settings"]
        lines += [f"Server level: {st['server_tokens']} tokens per request; closed loop: median of {st['server_reps']} "
                  f"repetitions (requests and errors: all of them).", "",
                  "| system | load | requests | errors | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in sorted(server_rows, key=lambda r: (r["mode"], r.get("concurrency", 0), r["system"] != "server")):
            load = (f"closed, {r['concurrency']} client{'s' * (r['concurrency'] > 1)}" if r["mode"] == "closed"
                    else f"open, Poisson {r['rate_per_s']}/s")
            if r.get("client_processes", 1) > 1:
                load += f" in {r['client_processes']} processes"
            lines.append(f"| {r['system']} | {load} | {r['requests']} | {r['errors']} | {_fmt(r['tokens_per_s'])} "
                         f"| {_fmt(r['ttft_ms']['p50'], 0)} / {_fmt(r['ttft_ms']['p99'], 0)} "
                         f"| {_fmt(r['itl_ms']['p50'], 0)} / {_fmt(r['itl_ms']['p99'], 0)} |")
        lines.append("")
    if summary.get("prefix_cache_ttft_speedup") is not None:
        ttft = summary["chat_turn4_ttft_ms"]
        lines += [f"Multi-turn chat, turn {chat_level.TURNS} ({_fmt(summary['chat_turn4_prompt_tokens'], 0)} prompt "
                  f"tokens, {_fmt(summary['chat_turn4_cached_tokens'], 0)} of them cached): TTFT "
                  f"{_fmt(ttft['prefix_caching'], 0)} ms with prefix caching, {_fmt(ttft['no_prefix_caching'], 0)} ms "
                  f"without (median of {summary['settings']['chat_reps']} conversations).", ""]
    if summary.get("openai_vs_grpc_throughput") is not None:
        lines += [f"OpenAI-compatible gateway vs direct gRPC ({summary['openai_at']}, the same server; "
                  f"`openai_vs_grpc_throughput` per repetition: "
                  f"{' / '.join(_fmt(x, 2) for x in summary['openai_vs_grpc_by_rep'])}): TTFT p50 overhead "
                  f"{_fmt(summary['openai_ttft_overhead_ms_p50'])} ms.", ""]
    if summary.get("spec_table"):
        lines += [f"Speculative decoding (n-gram: `{json.dumps(summary['spec_config'])}`, off and n-gram in one "
                  f"engine; draft_model: the first {summary['spec_draft']['layers']} layers proposing up to "
                  f"{summary['spec_draft']['num_speculative_tokens']} tokens, in another), "
                  f"{summary['settings']['spec_tokens']} tokens per request, medians of "
                  f"{summary['settings']['spec_reps']} repetitions:", "",
                  speculative.markdown(summary["spec_table"], summary)]
    keys = ("engine_vs_hf_single", "engine_vs_hf_concurrent", "engine_vs_hf_batched", "server_vs_engine_throughput",
            "prefix_cache_ttft_speedup", "openai_vs_grpc_throughput") + SPEC_KEYS
    lines.append("Ratios: " + ", ".join(f"`{k}` {_fmt(summary.get(k), 2)}" for k in keys) + ".")
    paired = summary.get("paired", {})
    if paired:
        lines.append("Within each repetition (paired): " + ", ".join(
            f"`{k}` {' / '.join(_fmt(x, 2) for x in v['pairs'])} (median {_fmt(v['median'], 2)})"
            for k, v in paired.items()) + ".")
    for name, goal in summary["goals"].items():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[goal["met"]]
        lines.append(f"- goal `{name}` {'<=' if goal['at_most'] else '>='} {goal['target']}: "
                     f"{_fmt(goal['value'], 2)} - {verdict}")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _positive(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return int(text)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """Options; each one in the load and engine groups is named after (`dest`) the Settings or
    EngineConfig field it sets, and left out it keeps that field's default."""
    p = argparse.ArgumentParser(description="Engine and server benchmarks (see docs/benchmarks.md).")
    p.add_argument("--quick", action="store_true", help="few tokens, one repetition: a smoke test")
    p.add_argument("--only", choices=("engine", "chat", "server", "speculative"), help="run one level only")
    p.add_argument("--out", type=Path, default=ROOT / "results", help="output directory (default: results/)")
    p.add_argument("--publish", action="store_true", help="copy plots, JSON lines and table to docs/benchmarks/")
    p.add_argument("--engine-process", action="store_true",
                   help="the in-process engine in a process of its own (backend/engine_process.py), as the server "
                        "runs it; server and chat levels only")
    load = p.add_argument_group("load")
    load.add_argument("--reps", type=int, help="engine-level repetitions")
    load.add_argument("--concurrencies", type=_ints, help="closed-loop client counts, e.g. 1,8,32,64")
    load.add_argument("--server-tokens", type=int, help="tokens per request, server level")
    load.add_argument("--requests-per-client", type=int, help="closed loop: requests = clients x this (>= 3)")
    load.add_argument("--server-reps", type=int, help="closed-loop repetitions (medians)")
    load.add_argument("--chat-reps", type=int, help="multi-turn conversations per engine (medians)")
    load.add_argument("--spec-tokens", type=int, help="tokens per request, speculative level")
    load.add_argument("--spec-reps", type=int, help="speculative-level repetitions (medians)")
    load.add_argument("--rate", dest="rate_per_s", type=float, help="open-loop arrival rate, requests/s")
    load.add_argument("--open-requests", type=int, help="open-loop requests")
    load.add_argument("--openai-concurrency", type=int,
                      help="closed-loop clients of the OpenAI gateway vs direct gRPC comparison (0: none)")
    load.add_argument("--client-processes", type=_positive,
                      help="split the closed-loop clients of the server (gRPC) target, its run beside the gateway "
                           "included, over N processes, each with its own client and event loop, so one process's "
                           "CPU does not cap a fast server (default 1: in this process); engine_direct, the gateway "
                           "target and the open loop stay in this process")
    load.add_argument("--time-limit", dest="time_limit_s", type=float,
                      help="seconds per load run; what is left then is cancelled and counted as errors")
    add_engine_options(p, "engine (one EngineConfig: the in-process engine's and, through GEMMA_*, the server's)")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> Settings:
    return dataclasses.replace(QUICK if args.quick else Settings(), **given(args, Settings))


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    s = settings(args)
    config = engine_config(args)
    args.out.mkdir(parents=True, exist_ok=True)

    from backend.engine_core import resolve_device
    from backend.loader import start_engine
    report = Report(args.out / "bench.jsonl")
    info = {**machine(resolve_device(config.device)), "engine_config": dataclasses.asdict(config)}
    load_start = list(os.getloadavg())
    report.emit({"type": "run", **info, "settings": dataclasses.asdict(s), "only": args.only,
                 "gemma_env": {k: v for k, v in os.environ.items() if k.startswith("GEMMA_")}})
    report.progress(f"loading the engine ({config}) on {where(info)}")
    # With --engine-process, engine_direct drives the engine as the server hosts it by default.
    engine = start_engine(config, engine_process=args.engine_process)
    engine_records, chat_records, server_records, spec_records = [], [], [], []
    try:
        if args.only in (None, "engine"):
            engine_records = run_engine_level(report, engine, s)
        if args.only in (None, "chat"):
            chat_records = run_chat_level(report, engine, s)
        if args.only in (None, "server"):
            server_records = run_server_level(report, engine, s, args.out)
        if args.only in (None, "speculative"):
            spec_records = run_speculative_level(report, engine, s)
    finally:
        engine.shutdown()
    summary = summarize(engine_records, server_records, chat_records, s, info, load_start,
                        time.monotonic() - report.t0, spec_records)
    report.emit(summary)
    engine_rows, server_rows = summary.get("engine_table", []), summary.get("server_table", [])

    files = [args.out / "bench.jsonl"]
    if importlib.util.find_spec("matplotlib"):  # the GPU machine may not have it; the numbers do not need it
        title = f"{where(info)}, {info['date']}, load avg {summary['loadavg_start'][0]:.1f}"
        files += [plots.throughput(engine_rows, server_rows, args.out / "throughput.png", title),
                  plots.latency(engine_rows, server_rows, args.out / "latency.png", title)]
    else:
        report.progress("matplotlib is not installed: no plots")
    table = args.out / "table.md"
    table.write_text(markdown(engine_rows, server_rows, summary))
    files.append(table)
    report.progress(f"wrote {', '.join(str(f) for f in files)}")
    if args.publish:
        PUBLISH_DIR.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, PUBLISH_DIR / f"cpu_{f.name}")
        report.progress(f"copied to {PUBLISH_DIR}")
    return summary


if __name__ == "__main__":
    main()
