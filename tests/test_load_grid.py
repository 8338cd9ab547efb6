"""Issue #28's load grid (benchmarks/load_grid.py) at a CPU test's size: ours on a tiny checkpoint in-process
and through a real tritonserver, vLLM's serving part on a stand-in AsyncLLM fed the same prompts, the
time limit, and the joined table's ratios and goal marks on made-up numbers."""
import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from backend.tokenizer import Tokenizer
from benchmarks import load_grid, vllm_baseline
from benchmarks.stats import Timeline

KINDS, TOKENS, CLIENTS, LONG = ["short", "long"], [2, 3], [1, 2], 32
GRID = ["--prompt-kinds", "short,long", "--server-tokens", "2,3", "--concurrencies", "1,2", "--long-prompt-tokens",
        str(LONG), "--min-requests", "2", "--requests-per-client", "1", "--server-reps", "1", "--rate", "50",
        "--open-requests", "2"]


@pytest.fixture(scope="module")
def tokenizer(default_checkpoint):
    return Tokenizer(default_checkpoint)  # the tiny checkpoints' too


def test_the_grid_runs_whole_blocks_first_and_open_loops_last():
    grid = load_grid.points(KINDS, TOKENS, CLIENTS, rates_per_s=[5.0])
    assert [(p.max_tokens, p.prompt_kind, p.mode, p.concurrency) for p in grid] == [
        (2, "short", "closed", 1), (2, "short", "closed", 2), (2, "long", "closed", 1), (2, "long", "closed", 2),
        (3, "short", "closed", 1), (3, "short", "closed", 2), (3, "long", "closed", 1), (3, "long", "closed", 2),
        (2, "short", "open", None), (2, "long", "open", None), (3, "short", "open", None), (3, "long", "open", None)]
    assert load_grid.points(KINDS, TOKENS, CLIENTS)[-1].mode == "closed"  # no rate: no open loop
    # A low rate and one near the knee: every (tokens, kind) at the first, then at the second.
    two = load_grid.points(KINDS, TOKENS, CLIENTS, rates_per_s=load_grid.rates("5,300"))
    assert [(p.rate_per_s, p.max_tokens, p.prompt_kind) for p in two if p.mode == "open"] == [
        (5.0, 2, "short"), (5.0, 2, "long"), (5.0, 3, "short"), (5.0, 3, "long"),
        (300.0, 2, "short"), (300.0, 2, "long"), (300.0, 3, "short"), (300.0, 3, "long")]
    with pytest.raises(argparse.ArgumentTypeError):
        load_grid.rates("16,0")
    with pytest.raises(ValueError, match="medium"):
        load_grid.points(["medium"], TOKENS, CLIENTS)
    load = load_grid.Load(requests_per_client=2, min_requests=8, open_requests=5)
    assert [load.requests(p) for p in grid[:2]] + [load.requests(grid[-1])] == [8, 8, 5]
    assert load.requests(load_grid.Point("short", 2, concurrency=256)) == 512


def test_long_prompts_are_distinct_and_the_same_wherever_the_grid_runs(default_checkpoint, tokenizer):
    ours, theirs = load_grid.Prompts(tokenizer, LONG), load_grid.Prompts(Tokenizer(default_checkpoint), LONG)
    a, b = load_grid.Point("long", 2, concurrency=2), load_grid.Point("long", 3, concurrency=2)
    sets = [ours.get(a, 4, "warmup"), ours.get(a, 4, "rep0"), ours.get(a, 4, "rep1"), ours.get(b, 4, "rep0")]
    prompts = [p for s in sets for p in s]
    assert len(set(prompts)) == 16  # no prompt is sent twice: no prefix-cache hit skips a prefill
    assert all(abs(len(tokenizer.encode(p)) - LONG) <= 2 for p in prompts)
    assert theirs.get(a, 4, "rep0") == sets[1]  # vLLM's side makes the same ones
    short = load_grid.Point("short", 2, concurrency=1)
    assert ours.get(short, 4, "rep0") == ours.short and 5 < ours.tokens("short") < 25 and ours.tokens("long") == LONG


class SlowTarget:
    name = "slow"

    def __init__(self, seconds):
        self.seconds = seconds

    async def stream(self, prompt, max_tokens, timeline):
        for _ in range(max_tokens):
            await asyncio.sleep(self.seconds)
            timeline.arrivals.append((time.perf_counter(), 1))


class Fixed:  # load_grid.Prompts' interface: one prompt
    def get(self, point, count, purpose):
        return ["p"]

    def tokens(self, kind):
        return 7


def test_nothing_starts_past_the_deadline_and_the_points_left_are_recorded():
    grid = load_grid.points(["short"], [2], [1, 2, 4])
    records = []
    deadline = time.monotonic() + 0.3
    done = load_grid.run_grid([SlowTarget(0.05)], grid, Fixed(), load_grid.Load(min_requests=2, warmup_tokens=1),
                              records.append, deadline)
    measured = [r for r in records if r.get("type") == "server"]
    assert done == len(measured) and 1 <= done < 3
    skipped = records[-1]
    assert skipped["kind"] == "load_grid_skipped" and skipped["points"] == [p.label for p in grid[done:]]
    assert all(r["errors"] == 0 or r["time_limit_s"] < 0.3 for r in measured)  # a run is bounded by the deadline


@pytest.fixture(scope="module")
def ours_run(tmp_path_factory, servable_checkpoint):
    """`load_grid ours` on the tiny checkpoint: engine_direct and a real tritonserver, the whole small grid."""
    pytest.importorskip("tritonclient.grpc")
    out = tmp_path_factory.mktemp("grid") / "ours.jsonl"
    argv = ["ours", "--checkpoint", str(servable_checkpoint), "--engine", "torch", "--dtype", "float32",
            "--max-num-seqs", "4", "--kv-cache-bytes", str(8 << 20), "--concurrencies", "1,2",
            "--output-tokens", "2,3", "--long-prompt-tokens", str(LONG), "--min-requests", "2",
            "--requests-per-client", "1", "--rate", "50", "--open-requests", "2", "--time-limit", "60", "--out", str(out)]
    assert load_grid.main(argv) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_ours_measures_every_point_on_both_systems_with_every_token(ours_run):
    run, *measured, end = ours_run
    assert run["kind"] == "load_grid_run" and run["engine_config"]["max_num_seqs"] == 4 and len(run["points"]) == 12
    assert end["kind"] == "load_grid_end" and end["measurements"] == len(measured) == 24
    assert {r["kind"] for r in measured} == {"load_grid"}
    for point in load_grid.points(KINDS, TOKENS, CLIENTS, [50.0]):
        at = [r for r in measured if (r["prompt_kind"], r["max_tokens"], r["mode"], r.get("concurrency")) ==
              (point.prompt_kind, point.max_tokens, point.mode, point.concurrency)]
        assert sorted(r["system"] for r in at) == ["engine_direct", "server"]
        for r in at:
            n = 2
            assert (r["requests"], r["errors"], r["output_tokens"]) == (n, 0, n * point.max_tokens), r
            assert r["prompt_tokens"] == (LONG if point.prompt_kind == "long" else pytest.approx(13, abs=8))
            if r["system"] == "server":  # where its requests waited: Triton's counters and the engine's phases
                assert r["server_intake"]["requests"] == r["engine_phases"]["requests"] == n, r
                assert r["engine_phases"]["queue_ms"] >= 0 and r["engine_phases"]["prefill_ms"] > 0, r
    assert all("engine_steps" in r for r in measured if r["system"] == "engine_direct")
    first = [r["system"] for r in measured if r["point"] in (0, 1)]
    assert first == ["engine_direct", "server", "server", "engine_direct"]  # who goes first alternates


class FakeAsyncLLM:
    """The AsyncLLM calls run_serving makes; every request streams its max_tokens one by one."""
    made = []
    vllm_config = None

    def __init__(self, kwargs):
        self.kwargs, self.prompts, self.shut = kwargs, [], False
        FakeAsyncLLM.made.append(self)

    @classmethod
    def from_engine_args(cls, args):
        return cls(args.kwargs)

    async def generate(self, prompt, params, request_id):
        self.prompts.append(prompt)
        for i in range(params.max_tokens):
            await asyncio.sleep(0)
            done = i == params.max_tokens - 1
            yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=[i], finish_reason="length" if done else None)],
                                  finished=done)

    def shutdown(self):
        self.shut = True


@pytest.fixture
def fake_vllm(monkeypatch):
    modules = {name: ModuleType(name) for name in ("vllm", "vllm.engine", "vllm.engine.arg_utils", "vllm.sampling_params",
                                                   "vllm.v1", "vllm.v1.engine", "vllm.v1.engine.async_llm")}
    modules["vllm.engine.arg_utils"].AsyncEngineArgs = lambda **kw: SimpleNamespace(kwargs=kw)
    modules["vllm.sampling_params"].SamplingParams = lambda **kw: SimpleNamespace(**kw)
    modules["vllm.sampling_params"].RequestOutputKind = SimpleNamespace(DELTA="delta")
    modules["vllm.v1.engine.async_llm"].AsyncLLM = FakeAsyncLLM
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    FakeAsyncLLM.made = []
    return FakeAsyncLLM


def test_vllm_runs_the_same_grid_with_the_same_prompts_and_the_table_joins_both(fake_vllm, servable_checkpoint, tmp_path,
                                                                                 ours_run, tokenizer):
    out = tmp_path / "vllm.jsonl"
    args = vllm_baseline.parse_args(["--checkpoint", str(servable_checkpoint), "--max-num-seqs", "256", *GRID,
                                     "--part-time-limit", "120"])
    vllm_baseline.run_serving(args, vllm_baseline.Report(out), {"attention_backend": "auto", "compilation": "none"})
    (engine,) = fake_vllm.made
    assert engine.shut and engine.kwargs["max_num_seqs"] == 256
    records = [json.loads(line) for line in out.read_text().splitlines()]
    measured = records[1:]
    assert records[0]["kind"] == "vllm_startup" and len(measured) == 12
    assert {(r["kind"], r["system"], r["errors"], r["compilation"]) for r in measured} == {
        ("vllm_serving", vllm_baseline.VllmTarget.name, 0, "none")}
    tags = ("mode", "prompt_kind", "prompt_tokens", "max_tokens", "concurrency", "rate_per_s", "point", "requests")
    ours = [r for r in ours_run if r["kind"] == "load_grid" and r["system"] == "server"]
    assert [{k: r.get(k) for k in tags} for r in measured] == [{k: r.get(k) for k in tags} for r in ours]
    # The long prompts vLLM got are those our engine got: load_grid's, from the same tokenizer.
    point = load_grid.points(["long"], [3], [2])[0]
    expected = load_grid.Prompts(tokenizer, LONG).get(point, 2, "rep0")
    assert set(expected) <= set(engine.prompts)
    table = load_grid.markdown(ours_run, records)
    assert table.count("| long (32) | 3 | 2 clients |") == 1 and table.count("| short (") == 6
    assert "- engine_direct: all goals met at" in table and "- server: all goals met at" in table
    assert table in vllm_baseline.markdown(records, ours_run)  # vllm.md, with our file as --ours: the same table


def test_vllm_serving_options_keep_the_old_defaults_and_check_the_long_prompts_fit():
    args = vllm_baseline.parse_args(["--checkpoint", "/m"])
    assert (args.prompt_kinds, args.server_tokens, args.concurrencies, args.server_reps, args.rate) == (
        ["short"], [64], [1, 8, 32, 64], 3, [])
    assert [(p.prompt_kind, p.max_tokens, p.concurrency) for p in load_grid.points(
        args.prompt_kinds, args.server_tokens, args.concurrencies, args.rate)] == [
        ("short", 64, 1), ("short", 64, 8), ("short", 64, 32), ("short", 64, 64)]
    with pytest.raises(SystemExit):  # 1024 + 256 tokens do not fit the default max_model_len 1024
        vllm_baseline.parse_args(["--prompt-kinds", "short,long", "--server-tokens", "64,256"])
    grid = vllm_baseline.parse_args(["--checkpoint", "/m", "--prompt-kinds", "short,long", "--server-tokens", "64,256",
                                     "--max-model-len", "2048"])
    argv = vllm_baseline.part_argv(grid, "serving", {}, 300.4)
    assert argv[argv.index("--part-time-limit") + 1] == "300" and argv.count("--part-time-limit") == 1
    assert argv[argv.index("--server-tokens") + 1] == "64,256" and argv[argv.index("--prompt-kinds") + 1] == "short,long"
    assert load_grid.VLLM == vllm_baseline.VllmTarget.name


def test_the_engine_options_reach_the_engine_config(tmp_path):
    base = ["ours", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--kv-cache-bytes", "1000"]
    config = load_grid.engine_config(load_grid.parse_args(base + ["--gpu-memory-utilization", "0.45"]))
    assert config.gpu_memory_utilization == 0.45
    config = load_grid.engine_config(load_grid.parse_args(base))
    assert (config.max_num_seqs, config.kv_cache_bytes, config.checkpoint, config.gpu_memory_utilization) == \
        (256, 1000, str(tmp_path), None)


def _record(system, tok_s, ttft_p50, itl_p99, concurrency=64, errors=0, mode="closed", kind="short"):
    return {"type": "server", "system": system, "mode": mode, "max_tokens": 64, "prompt_kind": kind,
            "prompt_tokens": 12.5, "concurrency": concurrency if mode == "closed" else None,
            "rate_per_s": 40.0 if mode == "open" else None, "requests": 128, "errors": errors,
            "tokens_per_s": tok_s, "ttft_ms": {"p50": ttft_p50, "p99": 2 * ttft_p50},
            "itl_ms": {"p50": itl_p99 / 2, "p99": itl_p99}}


def test_the_table_gives_ratios_and_marks_each_goal_a_point_misses():
    """Made-up numbers: at 64 clients 1.10x misses (>= 1.15 there), at 8 it meets (>= 1.0)."""
    vllm = [_record("vllm_asyncllm", 10_000.0, 30.0, 6.0), _record("vllm_asyncllm", 2_000.0, 20.0, 5.0, concurrency=8),
            _record("vllm_asyncllm", 2_000.0, 20.0, 5.0, mode="open")]
    ours = [_record("engine_direct", 11_000.0, 25.0, 5.0), _record("server", 12_000.0, 35.0, 7.0, errors=1),
            _record("engine_direct", 2_200.0, 20.0, 5.0, concurrency=8), _record("engine_direct", 1_900.0, 21.0, 4.0,
                                                                                  mode="open")]
    rows = load_grid.rows(ours + vllm)
    assert [(r["mode"], r["concurrency"]) for r in rows] == [("closed", 8), ("closed", 64), ("open", None)]
    at64 = rows[1]
    assert at64["ratios"] == {"engine_direct": pytest.approx(1.1), "server": pytest.approx(1.2)}
    assert at64["missed"] == {"engine_direct": ["tok/s < 1.15x"], "server": ["TTFT p50 > vLLM", "ITL p99 > vLLM", "errors"]}
    assert rows[0]["missed"] == {"engine_direct": []} and rows[2]["missed"] == {"engine_direct": ["TTFT p50 > vLLM"]}
    table = load_grid.markdown([{"kind": "load_grid_skipped", "points": ["x"]}] + ours, vllm)
    assert ("| short (12) | 64 | 64 clients | 10,000 | 11,000 | 12,000 | 1.10 | 1.20 | 30.0 / 25.0 / 35.0 "
            "| 60.0 / 50.0 / 70.0 | 3.0 / 2.5 / 3.5 | 6.0 / 5.0 / 7.0 | engine_direct: tok/s < 1.15x; "
            "server: TTFT p50 > vLLM, ITL p99 > vLLM, errors |") in table
    assert "| short (12) | 64 | 8 clients | 2,000 | 2,200 | - | 1.10 | - |" in table and "| met |" in table
    assert "- engine_direct: all goals met at 1 of 3 points; tok/s over vLLM's 1.10 to 1.10" in table
    assert "- load_grid_skipped: points ['x']" in table


def test_the_table_says_where_the_servers_ttft_went():
    """Made-up numbers: two repetitions of one server point; each part is the median of its two."""
    def server(ttft_mean, triton_queue, engine_queue):
        return {**_record("server", 12_000.0, 35.0, 7.0), "ttft_ms": {"p50": 35.0, "p99": 70.0, "mean": ttft_mean},
                "server_intake": {"requests": 128, "queue_ms": triton_queue, "execute_ms": 1.0},
                "engine_phases": {"requests": 128, "queue_ms": engine_queue, "prefill_ms": 4.0}}
    vllm = [_record("vllm_asyncllm", 10_000.0, 30.0, 6.0)]
    table = load_grid.markdown([server(40.0, 10.0, 2.0), server(50.0, 20.0, 4.0)], vllm)
    assert "| short | 64 | 64 clients | 45.0 | 15.0 | 1.0 | 3.0 | 4.0 | 22.0 |" in table
    assert "Where the server's TTFT went" not in load_grid.markdown([_record("server", 12_000.0, 35.0, 7.0)], vllm)


def test_the_table_command_also_plots_the_grid_when_asked(tmp_path):
    pytest.importorskip("matplotlib")
    vllm = [_record("vllm_asyncllm", 2_000.0 * c, 20.0 + c, 5.0, concurrency=c) for c in (1, 8, 64)]
    ours = [_record(system, 2_100.0 * c, 15.0 + c, 5.0, concurrency=c) for system in load_grid.OURS for c in (1, 8, 64)]
    for name, records in (("ours.jsonl", ours), ("vllm.jsonl", vllm)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_grid.main(["table", "--ours", str(tmp_path / "ours.jsonl"), "--vllm", str(tmp_path / "vllm.jsonl"),
                           "--out", str(tmp_path / "t.md"), "--plot", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| short (12) | 64 | 64 clients | 128,000 | 134,400 | 134,400 |" in (tmp_path / "t.md").read_text()
