"""`make aiperf`: NVIDIA's AIPerf (a third-party load generator, issue #28) against the OpenAI gateway.

    python -m benchmarks.aiperf_run [--concurrency 1,4] [--requests-per-client 4] [--input-tokens 128]
                                    [--output-tokens 64] [--endpoints chat,completions] [--min-tokens]
                                    [--compare] [--pace 50] [--url URL] [--tokenizer DIR] [--aiperf PATH]
                                    [--aiperf-python PYTHON] [--out results/aiperf] [--keep DIR]

Starts tritonserver (the default model, or the engine options' checkpoint, engine, dtype...:
benchmarks/engine_options.py, the flags of benchmarks.run and load_grid) and the gateway in front of it (the launchers of
benchmarks/serving.py, which the integration tests use too), unless `--url` names a running
OpenAI server (ours or vLLM's `vllm serve`: the same command measures both). Then, per endpoint and
concurrency, one `aiperf profile`: streamed requests, a synthetic prompt of exactly `--input-tokens`
tokens (by the local tokenizer: no model hub) and `--output-tokens` asked for with AIPerf's
`max_completion_tokens` (chat) or `max_tokens` (completions) plus vLLM's `ignore_eos: true`
(and `min_tokens` with `--min-tokens`), greedy, closed loop, `--requests-per-client` x concurrency
requests after one warm-up request per client. AIPerf counts tokens from `usage`
(`--use-server-token-count`): re-tokenizing the streamed text gives a few tokens fewer than were
generated, a tokenizer round trip and not the server's doing.

Each run is checked: no failed request, every request's `usage.completion_tokens` equal to what was
asked, TTFT and ITL reported, `usage.prompt_tokens` at least AIPerf's own count of the prompt (the
server adds BOS, chat its turn markers). With `--compare`, our own load generator
(benchmarks/serving.py's GatewayTarget: streamed completions over httpx) runs the same prompts
(read back from AIPerf's inputs.json), tokens and concurrency against the same gateway.

AIPerf runs from its own venv (.venv-aiperf: `make aiperf` makes it; aiperf 0.13.0 needs Python >= 3.11
and ~1.2 GB of packages, so it is not a project dependency). `--aiperf-python PYTHON` (or the
environment's AIPERF_PYTHON) runs it as `PYTHON -m aiperf` instead, with this process's environment:
on the GPU machine, its python3 with the carried wheels (~/aiperf-site) first on PYTHONPATH
(scripts/prepare-gpu-aiperf-carry.sh). Writes OUT/<endpoint>_c<N>/ (AIPerf's
artifacts), OUT/aiperf.json (one row per run) and a markdown table on stdout; `--keep DIR` copies the
small exports (profile_export_aiperf.json/.csv, per-request profile_export.jsonl, inputs.json) there.
Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .engine_options import add_engine_options, engine_config

ROOT = Path(__file__).resolve().parents[1]
AIPERF = ROOT / ".venv-aiperf" / "bin" / "aiperf"
AIPERF_PYTHON = "AIPERF_PYTHON"  # environment variable: the default of --aiperf-python
MODEL = "gemma"  # the gateway's served model name
KEPT_FILES = ("profile_export_aiperf.json", "profile_export_aiperf.csv", "profile_export.jsonl", "inputs.json")


def aiperf_command(args, endpoint: str, concurrency: int, url: str, out: Path) -> list[str]:
    """One `aiperf profile` run; light on the client side (one worker, one record processor, no
    server-metrics scrape, no plots) so that on a 2-core CPU it takes little from the server."""
    extras = ["--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0"]
    if args.min_tokens:
        extras += ["--extra-inputs", f"min_tokens:{args.output_tokens}"]
    return [*aiperf_program(args), "profile", "--model", args.model, "--url", url, "--endpoint-type", endpoint,
            "--streaming", "--tokenizer", str(args.tokenizer),
            "--synthetic-input-tokens-mean", str(args.input_tokens), "--synthetic-input-tokens-stddev", "0",
            "--output-tokens-mean", str(args.output_tokens), "--output-tokens-stddev", "0", *extras,
            "--use-server-token-count", "--concurrency", str(concurrency), *pacing(args.pace),
            "--request-count", str(args.requests_per_client * concurrency),
            "--warmup-request-count", str(concurrency), "--random-seed", str(args.seed),
            "--workers-max", str(args.workers), "--record-processor-service-count", "1",
            "--no-server-metrics", "--no-gpu-telemetry", "--no-auto-plot", "--ui", "none",
            "--output-artifact-dir", str(out)]


def aiperf_program(args) -> list[str]:
    """The command that starts AIPerf: its venv's executable, or a Python that imports it."""
    return [args.aiperf_python, "-m", "aiperf"] if args.aiperf_python else [str(args.aiperf)]


def pacing(rate: float) -> list[str]:
    """AIPerf's closed loop (--concurrency alone) looks for a free slot in a busy loop (0.13.0's
    RequestRateStrategy with a zero interval: `yield_to_event_loop` until a request ends), a whole
    core the whole run: on 2 cores the server's engine is left one, and its ITL grew ~10x. With a
    constant `rate` as well, AIPerf tries once per 1/rate s and sleeps between (a free slot waits at
    most that long): still closed-loop at `concurrency`, with no core taken. 0: AIPerf's own loop."""
    if not rate:
        return []
    return ["--request-rate", f"{rate:g}", "--arrival-pattern", "constant", "--warmup-request-rate", f"{rate:g}"]


def summarize(endpoint: str, concurrency: int, out: Path) -> dict:
    """The row of one run, from AIPerf's summary export."""
    summary = json.loads((out / "profile_export_aiperf.json").read_text())

    def stat(name: str, q: str = "avg") -> Optional[float]:
        value = summary.get(name, {}).get(q)
        return None if value is None else round(value, 2)

    return {"endpoint": endpoint, "concurrency": concurrency, "requests": stat("request_count"),
            "errors": len(errors_of(out)), "output_tokens_per_s": stat("output_token_throughput"),
            "ttft_ms": {"p50": stat("time_to_first_token", "p50"), "p99": stat("time_to_first_token", "p99")},
            "itl_ms": {"p50": stat("inter_token_latency", "p50"), "p99": stat("inter_token_latency", "p99")},
            "request_latency_ms_p50": stat("request_latency", "p50"),
            "output_tokens": stat("usage_completion_tokens"), "prompt_tokens": stat("usage_prompt_tokens"),
            "aiperf_prompt_tokens": stat("input_sequence_length"), "seconds": stat("benchmark_duration"),
            "aiperf_version": summary.get("aiperf_version")}


def records(out: Path) -> list[dict]:
    path = out / "profile_export.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def errors_of(out: Path) -> list[str]:
    return [r["error"].get("message", str(r["error"]))[:300] for r in records(out) if r.get("error")]


def problems(row: dict, out: Path, args) -> list[str]:
    """What AIPerf saw that a user checking our server would call wrong."""
    found = [f"{row['endpoint']} c={row['concurrency']}: failed request: {e}" for e in errors_of(out)[:3]]
    for r in records(out):
        if r.get("error"):
            continue
        m = {k: (v["value"] if isinstance(v, dict) else v) for k, v in r["metrics"].items()}
        where = f"{row['endpoint']} c={row['concurrency']} {r['metadata'].get('x_request_id')}"
        if m.get("usage_completion_tokens") != args.output_tokens:
            found.append(f"{where}: usage.completion_tokens {m.get('usage_completion_tokens')}, "
                         f"asked for {args.output_tokens}")
        if m.get("time_to_first_token") is None or (args.output_tokens > 1 and m.get("inter_token_latency") is None):
            found.append(f"{where}: no TTFT or ITL")
        if (m.get("usage_prompt_tokens") or 0) < (m.get("input_sequence_length") or 0):
            found.append(f"{where}: usage.prompt_tokens {m.get('usage_prompt_tokens')} < AIPerf's count of the "
                         f"prompt {m.get('input_sequence_length')}")
    if row["requests"] != args.requests_per_client * row["concurrency"]:
        found.append(f"{row['endpoint']} c={row['concurrency']}: {row['requests']} requests reported, "
                     f"{args.requests_per_client * row['concurrency']} sent")
    return found


def ours(url: str, out: Path, concurrency: int, args) -> dict:
    """benchmarks/serving.py's gateway target on AIPerf's own prompts (its completions inputs.json)."""
    from . import serving
    payloads = [p for entry in json.loads((out / "inputs.json").read_text())["data"] for p in entry["payloads"]]
    prompts = [p["prompt"] for p in payloads]
    target = serving.GatewayTarget(url, timeout_s=args.time_limit_s)
    try:
        serving.measure(target, "closed", prompts, args.output_tokens, args.time_limit_s,  # warm-up, as AIPerf's
                        concurrency=concurrency, num_requests=concurrency)
        record = serving.measure(target, "closed", prompts, args.output_tokens, args.time_limit_s,
                                 concurrency=concurrency, num_requests=args.requests_per_client * concurrency)
    finally:
        serving.close(target)
    return {"endpoint": "completions (ours)", "concurrency": concurrency, "requests": record["requests"],
            "errors": record["errors"], "output_tokens_per_s": record["tokens_per_s"],
            "ttft_ms": record["ttft_ms"], "itl_ms": record["itl_ms"]}


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def markdown(rows: list[dict]) -> str:
    def num(x, digits=1):
        return "" if x is None else f"{x:.{digits}f}"
    lines = ["| endpoint | concurrency | requests | errors | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ttft, itl = r["ttft_ms"], r["itl_ms"]
        lines.append(f"| {r['endpoint']} | {r['concurrency']} | {r['requests']:.0f} | {r['errors']} | "
                     f"{num(r['output_tokens_per_s'])} | {num(ttft['p50'], 0)} / {num(ttft['p99'], 0)} | "
                     f"{num(itl['p50'], 0)} / {num(itl['p99'], 0)} |")
    return "\n".join(lines)


def start(out: Path, config, gateway_workers: int, instances: Optional[int]):
    """tritonserver running the engine `config` describes behind `instances` model instances (None: as
    shipped), and the
    gateway (`gateway_workers` processes), by benchmarks/serving.py's launchers."""
    from . import serving
    print(f"starting tritonserver and the gateway (logs: {out})", file=sys.stderr, flush=True)
    server = serving.start_server(out / "server.log", config, instances)
    gateway = serving.start_gateway(server.grpc_url, out / "gateway.log", gateway_workers)
    if gateway is None:
        server.stop()
        raise SystemExit("the gateway's packages are not installed (make setup)")
    return server, gateway


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aiperf_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4", help="comma-separated closed-loop client counts")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--endpoints", default="chat,completions")
    parser.add_argument("--min-tokens", action="store_true", help="also send min_tokens = --output-tokens")
    parser.add_argument("--compare", action="store_true",
                        help="also run our own load generator (benchmarks/serving.py) on the same prompts and load")
    parser.add_argument("--url", help="a running OpenAI server (no server started); e.g. vLLM's")
    parser.add_argument("--model", default=MODEL, help="the served model name (vLLM: its --served-model-name)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the server's checkpoint)")
    parser.add_argument("--aiperf", type=Path, default=AIPERF, help="AIPerf's executable (its venv's)")
    parser.add_argument("--aiperf-python", default=os.environ.get(AIPERF_PYTHON) or None,
                        help=f"run AIPerf as `PYTHON -m aiperf` instead of --aiperf, this environment's "
                             f"PYTHONPATH included (default: ${AIPERF_PYTHON}; the GPU machine's carry)")
    parser.add_argument("--pace", type=float, default=50,
                        help="requests/s AIPerf tries at most (a free client waits <= 1/pace s); 0: its busy loop")
    parser.add_argument("--workers", type=int, default=1, help="AIPerf's --workers-max")
    parser.add_argument("--gateway-workers", type=int, default=1,
                        help="without --url: the gateway's --workers (processes; one caps a GPU server's streams)")
    parser.add_argument("--instances", type=int,
                        help="without --url: the server's model instances (stubs), all in front of one engine "
                        "process (default: as model_repository/gemma/config.pbtxt ships)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit-s", type=float, default=600, help="our own generator's limit per run")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "aiperf")
    parser.add_argument("--keep", type=Path, help="copy AIPerf's small exports here (e.g. docs/benchmarks/...)")
    add_engine_options(parser, "the server's engine, without --url (one EngineConfig, through GEMMA_*)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.aiperf_python is None and not args.aiperf.exists():
        raise SystemExit(f"no aiperf at {args.aiperf}: `make aiperf` installs it into .venv-aiperf")
    if args.tokenizer is None:
        from backend.default_model import ensure_default_checkpoint
        args.tokenizer = args.checkpoint or ensure_default_checkpoint()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    endpoints = args.endpoints.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    # SIGTERM (a killed make) ends here as Ctrl-C does: the finally below stops what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = gateway = None
    rows, found = [], []
    try:
        if args.url is None:
            server, gateway = start(args.out, engine_config(args), args.gateway_workers, args.instances)
        url = args.url or gateway.url
        for endpoint in endpoints:
            for concurrency in concurrencies:
                out = args.out / f"{endpoint}_c{concurrency}"
                shutil.rmtree(out, ignore_errors=True)
                command = aiperf_command(args, endpoint, concurrency, url, out)
                print(f"{endpoint}, {concurrency} clients: {' '.join(command)}", file=sys.stderr, flush=True)
                started, cpu = time.monotonic(), children_cpu_s()
                with open(args.out / f"{endpoint}_c{concurrency}.log", "w") as log:
                    rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
                # AIPerf's own CPU (its ~8 service processes, start-up included): on a 2-core machine it
                # competes with the server it measures.
                aiperf_cpu = round(children_cpu_s() - cpu, 1)
                if not (out / "profile_export_aiperf.json").exists():
                    found.append(f"{endpoint} c={concurrency}: aiperf exited {rc} without results "
                                 f"(log: {args.out / f'{endpoint}_c{concurrency}.log'}): {errors_of(out)[:1]}")
                    continue
                row = summarize(endpoint, concurrency, out)
                found += problems(row, out, args)
                rows.append({**row, "wall_s": round(time.monotonic() - started, 1), "aiperf_cpu_s": aiperf_cpu})
                print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
                if args.compare and endpoint == "completions":
                    rows.append(ours(url, out, concurrency, args))
                    print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
                if args.keep is not None:
                    (args.keep / out.name).mkdir(parents=True, exist_ok=True)
                    for name in KEPT_FILES:
                        if (out / name).exists():
                            shutil.copy(out / name, args.keep / out.name / name)
    finally:
        if gateway is not None:
            gateway.stop()
        if server is not None:
            server.stop()
    report = {"input_tokens": args.input_tokens, "output_tokens": args.output_tokens, "pace_per_s": args.pace,
              "requests_per_client": args.requests_per_client, "min_tokens": args.min_tokens,
              "url": args.url or "gateway started here (default model)", "rows": rows, "problems": found}
    if args.url is None:
        from tests.support.server import shipped_instance_count
        report.update(instances=args.instances or shipped_instance_count(), gateway_workers=args.gateway_workers)
    (args.out / "aiperf.json").write_text(json.dumps(report, indent=1))
    if args.keep is not None:
        (args.keep / "aiperf.json").write_text(json.dumps(report, indent=1))
    print(markdown(rows))
    for problem in found:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
