"""vLLM side by side (issue #17): vLLM on our GPU benchmarks' checkpoint and load, measured as ours are.

    PYTHONPATH=~/vllm-site python3 -m benchmarks.vllm_baseline --checkpoint DIR [--tokenizer DIR]
        [--out FILE] [--ours FILE ...] [--parts offline,serving] [--batches 1,8,32,64] [--prompt 64]
        [--new 64] [--reps 3] [--concurrencies 1,8,32,64] [--server-tokens 64[,256]] [--prompt-kinds short[,long]]
        [--long-prompt-tokens 1024] [--requests-per-client 4] [--min-requests 3] [--server-reps 3]
        [--rate R] [--open-requests 160] [--gpu-memory-utilization 0.5] [--max-num-seqs 64] [--max-model-len 1024]
        [--attention-backend FLASH_ATTN|auto] [--compilation default|none] [--time-limit 480]

On the GPU machine ~/vllm-carry/run.sh runs it (scripts/prepare-gpu-vllm-carry.sh, docs/benchmarks.md
"vLLM side by side"). The checkpoint is .gpu-serving/run.sh's random gemma-2b-shaped one with the Gemma 3
tokenizer; if it is missing, it is made here the same way (benchmarks.random_checkpoint, --tokenizer).
Each part runs in a process of its own (vLLM's engine core is its child), so the GPU is free between
parts and one failing part leaves the others:
- offline: `vllm.LLM.generate` on B prompts of --prompt random token ids, --new greedy tokens each (EOS
  ignored), for B in --batches. As benchmarks/gpu_bench.py times HF: decode time = time(--new tokens) -
  time(1 token) at the same B, decode tok/s = B * (new - 1) / decode time, step ms = decode time /
  (new - 1); medians over --reps, fresh prompts for every call (no prefix-cache hits). total tok/s =
  B * new / time(--new tokens), prefill and vLLM's per-call overhead included.
- serving: vLLM's AsyncLLM in this process (`VllmTarget`, beside our "engine_direct"), under
  benchmarks/serving.py's loads, so TTFT, ITL and tokens/s come from the code that computes ours. The
  points, prompts, warm-ups and order are benchmarks/load_grid.py's (`run_grid`): by default our server
  level's (short prompts, 64 tokens, 1 / 8 / 32 / 64 clients, 3 repetitions); with --prompt-kinds
  short,long, --server-tokens 64,256, --concurrencies up to 256 (and --max-num-seqs 256), --rate, issue
  #28's grid, long prompts made by the checkpoint's tokenizer exactly as `load_grid ours` makes them.
  Records (kind vllm_serving) carry load_grid's tags; `python -m benchmarks.load_grid table` joins them
  with ours (and the .md here is that table where the records span more than one prompt kind, output
  length or load shape). The part stops starting loads STOP_S before its time limit (the last part gets all the
  time left), the points left recorded as skipped.
A part that fails or runs out of time with --attention-backend / --compilation as given runs once more
with the fallback (vLLM picks the attention backend; no torch.compile, CUDA graphs of whole decode
steps) if time is left, and the parts after it start from the fallback; every record says which.
JSON lines go to stdout and --out; at the end a markdown table goes to stdout and --out with .md. With
--ours (JSON lines of benchmarks.gpu_bench and benchmarks.run from the same machine) the table shows both.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from . import load_grid, serving
from .stats import json_line, median, ratio, read_json_files

ROOT = Path(__file__).resolve().parents[1]
# Set before vLLM is imported (the parts inherit them). FlashInfer is not carried, and vLLM's sampler
# imports it at startup unless told not to; the GPU machine has no network.
VLLM_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1"}
# --compilation none: no torch.compile (no Inductor), decode steps still replayed as whole CUDA graphs.
NO_COMPILE = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
FALLBACK = {"attention_backend": "auto", "compilation": "none"}
PART_TIMEOUT_S = 240  # a part's cap, so that a hang in one leaves time for the next (the last one: the time left)
STOP_S = 30  # a part stops starting loads this long before its time limit, for vLLM's shutdown
RESERVE_S = 150  # kept back for each later part
# The wheel's files that scripts/prepare-gpu-vllm-carry.sh leaves out; recorded if absent, not assumed.
MAYBE_ABSENT = ("vllm_flash_attn/_vllm_fa2_C.abi3.so", "_moe_C_stable_libtorch.abi3.so", "vllm-rs")
VERSIONS = ("vllm", "torch", "transformers", "triton", "numpy", "pydantic", "xgrammar", "tokenizers")


class VllmTarget:
    """vLLM's AsyncLLM in this process under benchmarks/serving.py's load, as EngineTarget is our engine:
    each delta of token ids is timed when it reaches this event loop. `make_params(max_tokens)` gives
    the request's SamplingParams (serving.GREEDY, DELTA outputs)."""
    name = "vllm_asyncllm"

    def __init__(self, engine, make_params: Callable[[int], object]):
        self.engine, self.make_params = engine, make_params
        self._request_ids = itertools.count()

    async def stream(self, prompt: str, max_tokens: int, timeline) -> None:
        await stream_request(self.engine, prompt, self.make_params(max_tokens), f"bench-{next(self._request_ids)}",
                             timeline, ("length", "stop"))


async def stream_request(engine, prompt, params, request_id: str, timeline, finish_reasons: tuple[str, ...]
                         ) -> list[int]:
    """One request to vLLM's AsyncLLM (DELTA outputs), each delta timed when it reaches this event loop;
    its tokens. A finish reason outside `finish_reasons` is an error."""
    tokens, finish_reason = [], None
    async for out in engine.generate(prompt, params, request_id):
        completion = out.outputs[0]
        if completion.token_ids:
            timeline.arrivals.append((time.perf_counter(), len(completion.token_ids)))
            tokens += completion.token_ids
        if out.finished:
            finish_reason = completion.finish_reason
    if finish_reason not in finish_reasons:
        raise RuntimeError(f"request {request_id} ended with finish_reason {finish_reason!r}")
    return tokens

    async def close(self) -> None:  # the engine belongs to whoever made it
        pass


def decode_metrics(batch: int, new: int, one_token_s: list[float], all_tokens_s: list[float]) -> dict:
    """gpu_bench's decode numbers from generate() timings: decode = median time of `new` tokens minus
    median time of 1 token, at the same batch."""
    t1, tn = median(one_token_s), median(all_tokens_s)
    decode = tn - t1
    return dict(one_token_s=t1, all_tokens_s=tn, decode_s=decode,
                decode_tok_s=batch * (new - 1) / decode if decode > 0 else None,
                step_ms=1e3 * decode / (new - 1), total_tok_s=batch * new / tn, reps=len(all_tokens_s))


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine arguments both parts give vLLM (LLM and AsyncEngineArgs take the same)."""
    kw = dict(model=str(args.checkpoint), tokenizer=str(args.checkpoint), tokenizer_mode="hf", dtype="bfloat16",
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              gpu_memory_utilization=args.gpu_memory_utilization, seed=0, disable_log_stats=True)
    if args.attention_backend != "auto":
        kw["attention_backend"] = args.attention_backend
    if args.compilation == "none":
        kw["compilation_config"] = dict(NO_COMPILE)
    return kw


def checkpoint_problems(path: Path) -> list[str]:
    """Why `path` is not a checkpoint this benchmark can give vLLM as GemmaForCausalLM (empty: it is)."""
    from .random_checkpoint import TOKENIZER_FILES

    config = path / "config.json"
    if not config.exists():
        return [f"no {config}"]
    c = json.loads(config.read_text())
    problems = []
    if c.get("model_type") != "gemma" or "GemmaForCausalLM" not in (c.get("architectures") or []):
        problems.append(f"model_type {c.get('model_type')!r}, architectures {c.get('architectures')!r}")
    if not any(path.glob("*.safetensors")):
        problems.append("no *.safetensors")
    problems += [f"no {name}" for name in TOKENIZER_FILES if not (path / name).exists()]
    return problems


class Report:
    """JSON lines to stdout and appended to `path` (the parts append to the same file)."""

    def __init__(self, path: Path):
        self.path = path

    def emit(self, **record) -> dict:
        line = json_line(record)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        return record

    def records(self) -> list[dict]:
        return read_json_files([self.path], missing_ok=True)


def resolved_config(vllm_config) -> dict:
    """What vLLM made of the engine arguments, as far as it says (names differ across versions)."""
    def get(*path):
        obj = vllm_config
        for name in path:
            obj = getattr(obj, name, None)
        return None if obj is None else str(obj)
    return {"max_num_batched_tokens": get("scheduler_config", "max_num_batched_tokens"),
            "async_scheduling": get("scheduler_config", "async_scheduling"),
            "enable_prefix_caching": get("cache_config", "enable_prefix_caching"),
            "block_size": get("cache_config", "block_size"),
            "compilation_mode": get("compilation_config", "mode"),
            "cudagraph_mode": get("compilation_config", "cudagraph_mode"),
            "attention_backend": get("attention_config", "backend")}


# ---- the parts (child processes; vLLM imported here only) ----

def run_offline(args, report: Report, settings: dict) -> None:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    report.emit(kind="vllm_startup", part="offline", seconds=time.perf_counter() - t0, **settings,
                resolved=resolved_config(llm.llm_engine.vllm_config))
    vocab = json.loads((args.checkpoint / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)

    def timed(batch: int, max_tokens: int) -> float:
        prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(args.prompt)]} for _ in range(batch)]
        params = SamplingParams(max_tokens=max_tokens, **serving.GREEDY)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        counts = sorted({len(o.outputs[0].token_ids) for o in outputs})
        if len(outputs) != batch or counts != [max_tokens]:
            raise RuntimeError(f"{batch} requests of {max_tokens} tokens gave {len(outputs)} with {counts}")
        return elapsed

    for batch in args.batches:
        try:
            timed(batch, args.new)  # warm-up
            one, every = [], []
            for _ in range(args.reps):
                one.append(timed(batch, 1))
                every.append(timed(batch, args.new))
            report.emit(kind="vllm_offline", batch=batch, prompt=args.prompt, new=args.new, **settings,
                        **decode_metrics(batch, args.new, one, every))
        except Exception as e:  # noqa: BLE001 - one batch size failing must not hide the others
            report.emit(kind="error", part="offline", batch=batch, error=repr(e))


def run_serving(args, report: Report, settings: dict) -> None:
    started = time.monotonic()  # the part's time limit counts from here (vLLM's imports included)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    from backend.tokenizer import Tokenizer

    async def start():  # in serving's event loop, where the loads will run
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(args)))

    t0 = time.perf_counter()
    engine = serving._run(start())
    report.emit(kind="vllm_startup", part="serving", seconds=time.perf_counter() - t0, **settings,
                resolved=resolved_config(engine.vllm_config))
    target = VllmTarget(engine, lambda n: SamplingParams(max_tokens=n, output_kind=RequestOutputKind.DELTA,
                                                         **serving.GREEDY))
    # benchmarks/load_grid.py's points, prompts (the checkpoint's tokenizer, as ours) and order; the
    # defaults are the server level's load: short prompts, 64 tokens, 1 / 8 / 32 / 64 clients.
    prompts = load_grid.Prompts(Tokenizer(args.checkpoint), args.long_prompt_tokens)
    grid = load_grid.points(args.prompt_kinds, args.server_tokens, args.concurrencies, args.rate)
    load = load_grid.Load(requests_per_client=args.requests_per_client, min_requests=args.min_requests,
                          open_requests=args.open_requests, time_limit_s=args.load_time_limit, reps=args.server_reps)
    # Nothing starts within STOP_S of the part's time limit, so the engine's shutdown fits in it.
    deadline = started + args.part_time_limit - STOP_S if args.part_time_limit else float("inf")
    try:
        load_grid.run_grid([target], grid, prompts, load, lambda r: report.emit(**{"kind": "vllm_serving", **r},
                                                                                **settings), deadline)
    finally:
        engine.shutdown()


def speculative_engine_kwargs(args, method: str) -> dict:
    """The speculative part's engine: benchmarks/speculative.py's checkpoint and settings (prefix caching
    off, prompts up to ~1,000 tokens) with vLLM's `method` drafting as our n-gram rows do (off: none)."""
    from .speculative import SPECULATIVE_CONFIG

    kw = {**engine_kwargs(args), "model": str(args.spec_checkpoint), "tokenizer": str(args.spec_checkpoint),
          "max_model_len": args.spec_max_model_len, "enable_prefix_caching": False,
          "disable_log_stats": False}  # its spec_decode counters are how acceptance is read
    if method != "off":
        kw["speculative_config"] = {**SPECULATIVE_CONFIG, "method": method}
    return kw


SPEC_COUNTERS = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens": "accepted_tokens"}


def spec_counters(snapshot) -> dict[str, int]:
    """vLLM's spec_decode counters, summed over engines, from vllm.v1.metrics.reader's snapshot."""
    totals = dict.fromkeys(SPEC_COUNTERS.values(), 0)
    for metric in snapshot:
        if metric.name in SPEC_COUNTERS and hasattr(metric, "value"):
            totals[SPEC_COUNTERS[metric.name]] += metric.value
    return totals


async def generate_ids(engine, prompt_ids: list[int], params, request_id: str, timeline) -> list[int]:
    """One request of token ids; EOS is ignored, so every request runs to max_tokens."""
    return await stream_request(engine, {"prompt_token_ids": prompt_ids}, params, request_id, timeline, ("length",))


def tokens_digest(tokens: list[int]) -> str:
    return hashlib.sha1(json.dumps(tokens).encode()).hexdigest()[:12]


def run_speculative(args, report: Report, settings: dict) -> None:
    """benchmarks/speculative.py's workloads, prompts, sampling and schedule on vLLM's AsyncLLM with
    `args.spec_method` (off: no speculation), one engine per process: vLLM has no per-request opt-out."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.reader import get_metrics_snapshot

    from backend.tokenizer import Tokenizer

    from . import speculative
    from .stats import Timeline

    method = args.spec_method

    async def start():
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**speculative_engine_kwargs(args, method)))

    t0 = time.perf_counter()
    engine = serving._run(start())
    report.emit(kind="vllm_startup", part="speculative", seconds=time.perf_counter() - t0, **settings,
                resolved=resolved_config(engine.vllm_config),
                speculative_config=str(getattr(engine.vllm_config, "speculative_config", None)))
    prompts = speculative.workload_prompts(Tokenizer(args.spec_checkpoint))
    request_ids = itertools.count()

    async def group(chosen, params):
        timelines = [Timeline(time.perf_counter()) for _ in chosen]
        tokens = await asyncio.gather(*(generate_ids(engine, ids, p, f"spec-{next(request_ids)}", t)
                                        for ids, p, t in zip(chosen, params, timelines)))
        return timelines, tokens

    try:
        for rep, workload, n, chosen, max_tokens in speculative.schedule(prompts, args.spec_tokens, args.spec_reps,
                                                                          args.spec_streams):
            params = [SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=i, output_kind=RequestOutputKind.DELTA,
                                     **speculative.SAMPLING[workload]) for i in range(len(chosen))]
            before = spec_counters(get_metrics_snapshot())
            timelines, tokens, wall = [], [], 0.0
            for start_at in range(0, len(chosen), n):
                t0 = time.perf_counter()
                tl, tok = serving._run(group(chosen[start_at:start_at + n], params[start_at:start_at + n]))
                wall += time.perf_counter() - t0
                timelines += tl
                tokens += tok
            serving._run(asyncio.sleep(0.2))  # the last step's stats reach the counters
            after = spec_counters(get_metrics_snapshot())
            if rep == 0:
                continue
            report.emit(kind="vllm_speculative", type="speculative", system="vllm", rep=rep, workload=workload,
                        streams=n, speculation=method, prompt_tokens=[len(p) for p in chosen], max_tokens=max_tokens,
                        **speculative.outcome(timelines, wall, *(after[k] - before[k] for k in SPEC_COUNTERS.values())),
                        tokens_digest=[tokens_digest(t) for t in tokens], **settings)
    finally:
        engine.shutdown()


PARTS = {"offline": run_offline, "serving": run_serving, "speculative": run_speculative}
DEFAULT_PARTS = ("offline", "serving")
# vLLM's prompt lookup, both ways it ships it: numba on the CPU (vLLM turns async scheduling off for it)
# and on the GPU (async scheduling kept).
SPEC_METHODS = ("ngram", "ngram_gpu")


# ---- the parent: checkpoint, parts with timeouts and fallback, table ----

def gpu_name() -> Optional[str]:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001 - a machine without the tool still gets its other records
        return None


def environment() -> dict:
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    spec = importlib.util.find_spec("vllm")
    absent = None
    if spec and spec.submodule_search_locations:
        package = Path(list(spec.submodule_search_locations)[0])
        absent = [name for name in MAYBE_ABSENT if not (package / name).exists()]
    return {"gpu": gpu_name(), "python": sys.version.split()[0], "versions": versions,
            "vllm_at": str(package) if absent is not None else None, "vllm_files_absent": absent}


def ensure_checkpoint(args, report: Report) -> bool:
    problems = checkpoint_problems(args.checkpoint)
    if not problems:
        return True
    if args.tokenizer is None:
        report.emit(kind="error", stage="checkpoint", error=f"{args.checkpoint}: {problems}; no --tokenizer to make it")
        return False
    report.emit(kind="setup", what="making the checkpoint", checkpoint=str(args.checkpoint), problems=problems)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the machine's packages, not vLLM's
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "benchmarks.random_checkpoint", "--out", str(args.checkpoint),
                         "--tokenizer", str(args.tokenizer), "--layers", str(args.layers)], cwd=ROOT, env=env).returncode
    problems = checkpoint_problems(args.checkpoint)
    report.emit(kind="setup", what="checkpoint made", rc=rc, seconds=time.perf_counter() - t0, problems=problems)
    return rc == 0 and not problems


def part_argv(args, part: str, settings: dict, time_limit_s: Optional[float] = None) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.vllm_baseline", "--part", part]
    if time_limit_s is not None:
        argv += ["--part-time-limit", f"{time_limit_s:.0f}"]
    for key, value in vars(args).items():
        value = settings.get(key, value)
        if key in ("part", "parts", "ours", "time_limit", "part_time_limit") or value is None or value == []:
            continue  # (an empty list is an option left out: --rate's default)
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def stop_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """End `proc` and everything left in its process group (vLLM's engine core): TERM, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            proc.poll()  # reaps the leader, so that a group of only it counts as gone
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
    proc.wait()


def run_part(args, part: str, settings: dict, timeout_s: float, report: Report) -> bool:
    """One part in a new session (so its engine core goes with it); True if it measured something."""
    before = len(report.records())
    proc = subprocess.Popen(part_argv(args, part, settings, timeout_s), cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        rc = None
        report.emit(kind="error", part=part, stage="timeout", error=f"no end after {timeout_s:.0f} s", **settings)
    finally:
        stop_group(proc)
    return rc == 0 and any(r.get("kind") == f"vllm_{part}" for r in report.records()[before:])


def _fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def markdown(records: list[dict], ours: list[dict]) -> str:
    """The side-by-side tables: offline decode against gpu_bench's te_bf16 loop, the closed loop against
    benchmarks.run's engine_direct and server (ours / vLLM > 1: ours is faster)."""
    env = next((r for r in records if r.get("kind") == "vllm_env"), {})
    versions = env.get("versions", {})
    lines = [f"vLLM {versions.get('vllm')}, torch {versions.get('torch')}, transformers {versions.get('transformers')}"
             f" on {env.get('gpu')}; vLLM wheel files absent: {env.get('vllm_files_absent')}.", ""]
    for r in records:
        if r.get("kind") in ("vllm_startup", "error", "retry"):
            lines.append(f"- {r['kind']}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "kind"))
    lines.append("")
    offline = {r["batch"]: r for r in records if r.get("kind") == "vllm_offline"}
    te = {r["batch"]: r for r in ours if r.get("kind") == "te_bf16"}  # the last run wins
    if offline:
        lines += ["| batch | vLLM decode tok/s | vLLM step ms | vLLM total tok/s | ours decode tok/s | ours / vLLM |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for b, r in sorted(offline.items()):
            mine = te.get(b, {}).get("decode_tok_s")
            lines.append(f"| {b} | {_fmt(r['decode_tok_s'], 0)} | {_fmt(r['step_ms'], 2)} | {_fmt(r['total_tok_s'], 0)} "
                         f"| {_fmt(mine, 0)} | {_fmt(ratio(mine, r['decode_tok_s']), 2)} |")
        lines.append("")
    server = [r for r in records if r.get("type") == "server"] + \
             [r for r in ours if r.get("type") == "server" and r.get("mode") == "closed"]
    if len({(r.get("prompt_kind", "short"), r.get("max_tokens"), r["mode"]) for r in server}) > 1:
        lines.append(load_grid.markdown(ours, records))  # issue #28's grid: a row per point, not merged
    elif server:
        rows = serving.table(server)
        lines += ["| system | clients | requests | errors | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in sorted(rows, key=lambda r: (r.get("concurrency") or 0, r["system"])):
            lines.append(f"| {r['system']} | {r.get('concurrency')} | {r['requests']} | {r['errors']} "
                         f"| {_fmt(r['tokens_per_s'])} | {_fmt(r['ttft_ms']['p50'], 0)} / {_fmt(r['ttft_ms']['p99'], 0)} "
                         f"| {_fmt(r['itl_ms']['p50'], 0)} / {_fmt(r['itl_ms']['p99'], 0)} |")
        by = {(r["system"], r.get("concurrency")): r["tokens_per_s"] for r in rows}
        for c in sorted({c for s, c in by if s == VllmTarget.name}):
            mine = {s: ratio(by.get((s, c)), by[(VllmTarget.name, c)]) for s in ("engine_direct", "server")}
            if any(v is not None for v in mine.values()):
                lines.append(f"- {c} clients, tok/s over vLLM's: engine_direct {_fmt(mine['engine_direct'], 2)}, "
                             f"server (Triton) {_fmt(mine['server'], 2)}")
    lines += speculative_markdown([r for r in records if r.get("kind") == "vllm_speculative"],
                                  [r for r in ours if r.get("type") == "speculative"])
    return "\n".join(lines) + "\n"


def speculative_markdown(vllm_records: list[dict], ours: list[dict]) -> list[str]:
    """Ours (benchmarks.speculative) and vLLM's prompt lookup on the same workloads: medians over
    repetitions, each method against its own system's off, and vLLM's greedy outputs against its off."""
    from . import speculative

    if not vllm_records:
        return []
    rows = [("ours", r) for r in speculative.table(ours)] + [("vLLM", r) for r in speculative.table(vllm_records)]
    at = {(system, r["workload"], r["streams"], r["speculation"]): r for system, r in rows}
    lines = ["", "| workload | streams | system | speculation | ITL ms | tok/s | acceptance | tokens / verify "
             "| ITL speedup | tok/s ratio |", "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for system, r in sorted(rows, key=lambda sr: (sr[1]["workload"], sr[1]["streams"], sr[0], sr[1]["speculation"] != "off",
                                                  sr[1]["speculation"])):
        off = at.get((system, r["workload"], r["streams"], "off"))
        gains = ["", ""] if off is None or r["speculation"] == "off" else [
            f"{_fmt(ratio(off['itl_ms'], r['itl_ms']), 2)}x", f"{_fmt(ratio(r['tokens_per_s'], off['tokens_per_s']), 2)}x"]
        lines.append(f"| {r['workload']} | {r['streams']} | {system} | {r['speculation']} | {_fmt(r['itl_ms'], 2)} "
                     f"| {_fmt(r['tokens_per_s'])} | {_fmt(r['acceptance_rate'], 2)} | {_fmt(r['tokens_per_verify'], 2)} "
                     f"| {gains[0]} | {gains[1]} |")
    # Greedy (edit) outputs of each vLLM method against vLLM's off, request by request and repetition.
    digests = {(r["rep"], r["workload"], r["streams"], r["speculation"]): r["tokens_digest"] for r in vllm_records}
    for method in sorted({m for (_, _, _, m) in digests} - {"off"}):
        pairs = [(d, digests.get((rep, w, n, "off"))) for (rep, w, n, m), d in digests.items()
                 if m == method and w == "edit"]
        same = sum(a == b for d, off in pairs if off for a, b in zip(d, off))
        total = sum(len(d) for d, off in pairs if off)
        lines.append(f"- vLLM {method}: greedy outputs identical to vLLM off in {same}/{total} requests")
    return lines


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("/tmp/gemma-serving/gemma-2b-random"))
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory for making the checkpoint if it is missing")
    p.add_argument("--layers", type=int, default=18, help="layers of a checkpoint made here")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "vllm.jsonl")
    p.add_argument("--ours", type=Path, nargs="*", default=[],
                   help="our JSON lines (benchmarks.gpu_bench, benchmarks.run) for the table; missing files skipped")
    p.add_argument("--parts", type=lambda s: s.split(","), default=list(DEFAULT_PARTS),
                   help=f"of {', '.join(PARTS)}")
    p.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # set by the parent for a child
    p.add_argument("--part-time-limit", type=float, help=argparse.SUPPRESS)  # the child's, from the parent
    p.add_argument("--batches", type=_ints, default=[1, 8, 32, 64])
    p.add_argument("--prompt", type=int, default=64, help="offline: prompt tokens")
    p.add_argument("--new", type=int, default=64, help="offline: tokens generated per request")
    p.add_argument("--reps", type=int, default=3, help="offline: timed generate() pairs per batch size")
    p.add_argument("--concurrencies", type=_ints, default=[1, 8, 32, 64], help="serving: closed-loop clients")
    p.add_argument("--server-tokens", type=_ints, default=[64], help="serving: tokens per request, e.g. 64,256")
    p.add_argument("--prompt-kinds", type=lambda s: s.split(","), default=["short"],
                   help="serving: short (the server level's prompts) and/or long (load_grid's distinct ones)")
    p.add_argument("--long-prompt-tokens", type=int, default=1024, help="serving: tokens of each long prompt")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--min-requests", type=int, default=3, help="serving: closed-loop requests at least")
    p.add_argument("--server-reps", type=int, default=3)
    p.add_argument("--rate", type=load_grid.rates, default=[],
                   help="serving: open loops at these Poisson rates (/s, e.g. 16,300) after the closed ones")
    p.add_argument("--open-requests", type=int, default=160, help="serving: open-loop arrivals")
    p.add_argument("--load-time-limit", type=float, default=60, help="seconds per load run (benchmarks.run's --time-limit)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--attention-backend", default="FLASH_ATTN", help="a vLLM backend name, or auto: vLLM picks")
    p.add_argument("--compilation", choices=("default", "none"), default="default",
                   help="default: vLLM's torch.compile and CUDA graphs; none: no torch.compile, full decode graphs")
    p.add_argument("--spec-checkpoint", type=Path, default=Path("/tmp/gemma-real-model/gemma-3-270m"),
                   help="speculative: the checkpoint of our benchmarks.speculative run (.gpu-model* converts the 270M)")
    p.add_argument("--spec-methods", type=lambda s: s.split(","), default=list(SPEC_METHODS),
                   help="speculative: vLLM's methods beside off")
    p.add_argument("--spec-method", help=argparse.SUPPRESS)  # set by the parent for a child
    p.add_argument("--spec-tokens", type=int, default=128, help="speculative: tokens per request")
    p.add_argument("--spec-reps", type=int, default=3)
    p.add_argument("--spec-streams", type=_ints, default=[1, 8])
    p.add_argument("--spec-max-model-len", type=int, default=2048)
    p.add_argument("--time-limit", type=float, default=480, help="seconds for everything; parts are cut to fit")
    args = p.parse_args(argv)
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {list(PARTS)}")
    if set(args.prompt_kinds) - set(load_grid.PROMPT_KINDS):
        p.error(f"--prompt-kinds: choose from {', '.join(load_grid.PROMPT_KINDS)}")
    if "long" in args.prompt_kinds and args.long_prompt_tokens + max(args.server_tokens) > args.max_model_len:
        p.error(f"--max-model-len {args.max_model_len} < {args.long_prompt_tokens} prompt + "
                f"{max(args.server_tokens)} output tokens")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)
    report = Report(args.out)
    settings = {"attention_backend": args.attention_backend, "compilation": args.compilation}
    if args.part:  # a child: one part, then exit (its engine core goes with it)
        if args.spec_method:
            settings["spec_method"] = args.spec_method
        try:
            PARTS[args.part](args, report, settings)
        except Exception as e:  # noqa: BLE001 - reported, and the exit code tells the parent
            report.emit(kind="error", part=args.part, stage="run", error=repr(e), **settings)
            return 1
        return 0

    deadline = time.monotonic() + args.time_limit
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("")
    report.emit(kind="vllm_env", **environment(), checkpoint=str(args.checkpoint), argv=sys.argv[1:],
                env={k: os.environ[k] for k in VLLM_ENV})
    # One child process per part, and per vLLM method of the speculative part (one engine each).
    jobs = [(part, {"spec_method": m} if part == "speculative" else {})
            for part in args.parts for m in (["off", *args.spec_methods] if part == "speculative" else [None])]
    try:
        if set(args.parts) <= {"speculative"} or ensure_checkpoint(args, report):
            for i, (part, job) in enumerate(jobs):
                later = RESERVE_S * (len(jobs) - i - 1)
                cap = PART_TIMEOUT_S if later else float("inf")
                ok = run_part(args, part, {**settings, **job}, min(cap, deadline - time.monotonic() - later), report)
                if ok or settings == FALLBACK:
                    continue
                settings = dict(FALLBACK)  # for this part's second try and for the parts after it
                left = deadline - time.monotonic() - later
                if left > 120:
                    report.emit(kind="retry", part=part, **settings, **job)
                    run_part(args, part, {**settings, **job}, min(cap, left), report)
    except KeyboardInterrupt:  # run.sh's time limit: the table of what was measured still comes out
        report.emit(kind="error", stage="interrupted", error="SIGINT")
    table = markdown(report.records(), read_json_files(args.ours, missing_ok=True))
    args.out.with_suffix(".md").write_text(table)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
