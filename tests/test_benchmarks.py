"""The benchmarks' pure parts on known inputs: percentiles, timelines, summaries, JSON lines, plots.
Nothing here is timed; `make bench` is the benchmark itself."""
import json
import math
import pickle

import pytest

from benchmarks import engine_level, run, serving
from benchmarks.stats import (Timeline, batch_metrics, distribution, json_line, percentile, poisson_arrivals,
                              read_json_lines, summarize_requests)


def test_percentile_interpolates_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 99) == pytest.approx(3.97)  # numpy.percentile([1, 2, 3, 4], 99)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_distribution_scales_to_ms():
    d = distribution([0.1, 0.2, 0.3], scale=1e3)
    assert d["p50"] == pytest.approx(200.0)
    assert d["mean"] == pytest.approx(200.0)
    assert d["n"] == 3
    assert distribution([])["p50"] is None


def test_timeline_splits_a_multi_token_delivery_into_per_token_gaps():
    t = Timeline(start=10.0, arrivals=[(10.5, 1), (10.7, 1), (11.3, 3)])
    assert t.ttft == pytest.approx(0.5)
    assert t.num_tokens == 5
    assert t.end == 11.3
    assert t.inter_token() == pytest.approx([0.2, 0.2, 0.2, 0.2])
    assert Timeline(start=1.0).ttft is None
    failed = Timeline(2.0, [(2.5, 2)], error="timeout")  # client processes send theirs back pickled
    assert pickle.loads(pickle.dumps([t, failed])) == [t, failed]


def test_summarize_requests_counts_errors_and_keeps_them_out_of_latencies():
    ok = Timeline(0.0, [(0.1, 1), (0.3, 1), (0.5, 1)])
    ok2 = Timeline(1.0, [(1.3, 1), (1.4, 1)])
    failed = Timeline(2.0, [(2.9, 1)], error="timeout")
    s = summarize_requests([ok, ok2, failed], wall_s=3.0)
    assert (s["requests"], s["errors"], s["error_kinds"]) == (3, 1, {"timeout": 1})
    assert s["output_tokens"] == 6  # what a failed request produced still counts as throughput
    assert s["tokens_per_s"] == pytest.approx(2.0)
    assert s["ttft_ms"]["n"] == 2 and s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["itl_ms"]["n"] == 3 and s["itl_ms"]["p50"] == pytest.approx(200.0)


def test_batch_metrics_decode_rate_is_batch_over_step():
    timelines = [Timeline(0.0, [(0.5, 1), (0.75, 1), (1.0, 1)]) for _ in range(4)]
    m = batch_metrics(timelines, wall_s=1.0, in_flight=4)
    assert m["total_tok_s"] == pytest.approx(12.0)
    assert m["ttft_ms"] == pytest.approx(500.0)
    assert m["step_ms"] == pytest.approx(250.0)
    assert m["decode_tok_s"] == pytest.approx(16.0)


def test_poisson_arrivals_are_seeded_increasing_and_near_the_rate():
    a = poisson_arrivals(2.0, 2000, seed=3)
    assert a == poisson_arrivals(2.0, 2000, seed=3)
    assert all(x < y for x, y in zip(a, a[1:]))
    assert 2000 / a[-1] == pytest.approx(2.0, rel=0.1)
    with pytest.raises(ValueError):
        poisson_arrivals(0, 1, seed=0)


def test_json_line_is_one_parseable_line_with_rounded_floats():
    line = json_line({"a": 1 / 3, "nested": {"b": [2 / 3, float("nan")]}, "s": "x\ny", "inf": math.inf})
    assert "\n" not in line
    (back,) = read_json_lines([line, ""])
    assert back == {"a": 0.3333, "nested": {"b": [0.6667, None]}, "s": "x\ny", "inf": None}


def _engine_records():
    """Two repetitions of every (system, batch size); the engine is 2x HF sequential per request."""
    records = []
    for rep, noise in enumerate((1.0, 1.2)):
        for b in (1, 4, 8):
            records.append({"system": "engine", "batch_size": b, "rep": rep, "total_tok_s": 10.0 * b * noise,
                            "decode_tok_s": 12.0 * b * noise, "step_ms": 100.0, "ttft_ms": 50.0})
            records.append({"system": "hf_sequential", "batch_size": b, "rep": rep, "total_tok_s": 5.0 * noise,
                            "decode_tok_s": 6.0 * noise, "step_ms": 200.0, "ttft_ms": 60.0})
            if b > 1:
                records.append({"system": "hf_batched", "batch_size": b, "rep": rep, "total_tok_s": 4.0 * b,
                                "decode_tok_s": 5.0 * b, "step_ms": 250.0, "ttft_ms": None})
        # a second single-stream pair in each repetition, where the engine is 3x
        records.append({"system": "engine", "batch_size": 1, "rep": rep, "pair": 1, "total_tok_s": 15.0,
                        "decode_tok_s": 18.0, "step_ms": 60.0, "ttft_ms": 50.0})
        records.append({"system": "hf_sequential", "batch_size": 1, "rep": rep, "pair": 1, "total_tok_s": 5.0,
                        "decode_tok_s": 6.0, "step_ms": 200.0, "ttft_ms": 60.0})
    return records


def _server_record(system, mode, tok_s, c=None, rep=0, ttft_p50=100.0):
    rec = {"type": "server", "system": system, "mode": mode, "requests": 4, "errors": 0, "tokens_per_s": tok_s,
           "ttft_ms": {"p50": ttft_p50, "p99": 150.0}, "itl_ms": {"p50": 20.0, "p99": 40.0}, "rep": rep}
    return {**rec, "concurrency": c} if mode == "closed" else {**rec, "rate_per_s": 0.5}


def test_engine_table_takes_medians_and_ratios_follow_the_goals():
    rows = engine_level.table(_engine_records())
    engine8 = next(r for r in rows if r["system"] == "engine" and r["batch_size"] == 8)
    assert engine8["runs"] == 2 and engine8["total_tok_s"] == pytest.approx(88.0)  # median of 80, 96
    engine1 = next(r for r in rows if r["system"] == "engine" and r["batch_size"] == 1)
    assert engine1["runs"] == 4 and engine1["decode_tok_s"] == pytest.approx(16.2)  # median of 12, 14.4, 18, 18
    r = engine_level.ratios(rows)
    assert r["engine_vs_hf_single"] == pytest.approx(16.2 / 6.0)
    assert r["engine_vs_hf_concurrent"] == pytest.approx(16.0)  # 88 / 5.5
    assert r["engine_vs_hf_batched"] == pytest.approx(88.0 / 32.0)
    assert r["engine_vs_hf_by_batch"]["1"]["vs_batched"] is None


def test_paired_ratios_compare_within_each_repetition():
    paired = engine_level.paired_ratios(_engine_records())
    assert paired["engine_vs_hf_single"]["pairs"] == pytest.approx([2.0, 3.0, 2.0, 3.0])  # (rep, pair) order
    assert paired["engine_vs_hf_single"]["median"] == pytest.approx(2.5)
    assert paired["engine_vs_hf_concurrent"]["pairs"] == pytest.approx([16.0, 16.0])
    assert paired["engine_vs_hf_concurrent"]["median"] == pytest.approx(16.0)


def test_server_table_takes_medians_over_repetitions_and_sums_errors():
    a = _server_record("server", "closed", 10.0, 4)
    b = {**_server_record("server", "closed", 14.0, 4), "errors": 1, "ttft_ms": {"p50": 300.0, "p99": None}}
    other = _server_record("engine_direct", "closed", 1.0, 4)
    rows = serving.table([a, other, b])
    assert [(r["system"], r["reps"]) for r in rows] == [("server", 2), ("engine_direct", 1)]
    server = rows[0]
    assert (server["requests"], server["errors"], server["tokens_per_s"]) == (8, 1, 12.0)
    assert server["ttft_ms"] == {"p50": 200.0, "p99": 150.0}  # a missing value is left out, not zero


def test_summary_has_the_issue_keys_and_goal_verdicts(tmp_path):
    records = _engine_records()
    rows = engine_level.table(records)
    server = [_server_record(s, "closed", tok, c) for c in (1, 4, 8)
              for s, tok in (("server", 9.0 * c), ("engine_direct", 10.0 * c))]
    server += [_server_record("server", "open", 5.0), _server_record("engine_direct", "open", 5.0)]
    # The gateway vs direct gRPC at 16 clients, two repetitions: 0.95x and 1.0x, TTFT +4 and +6 ms.
    for rep, tok, ttft in ((0, 95.0, 104.0), (1, 100.0, 106.0)):
        server += [_server_record("server", "closed", 100.0, 16, rep),
                   _server_record("gateway", "closed", tok, 16, rep, ttft)]
    info = {"cpu": "Test CPU", "cores": 2, "torch": "x", "torch_threads": 2, "transformers": "y", "date": "today",
            "device": "cpu", "engine_config": {"checkpoint": "/m/gemma-3-270m", "engine": "auto", "dtype": "auto",
                                               "max_num_seqs": 16, "kv_cache_bytes": 1 << 30}}
    chat = [{"type": "chat", "system": system, "rep": rep, "turn": turn, "prompt_tokens": 100 * turn,
             "cached_tokens": 80 * turn if system == "prefix_caching" else 0,
             "ttft_ms": (10.0 if system == "prefix_caching" else 50.0) * turn}
            for system in ("prefix_caching", "no_prefix_caching") for rep in (1, 2) for turn in (1, 2, 3, 4)]
    summary = run.summarize(records, server, chat, run.Settings(), info, [1.0, 1.0, 1.0], 10.0)
    assert summary["engine_table"] == rows
    for key in ("engine_vs_hf_single", "engine_vs_hf_concurrent", "server_vs_engine_throughput",
                "ttft_p50_ms", "itl_p50_ms"):
        assert summary[key] is not None, key
    assert summary["server_vs_engine_throughput"] == pytest.approx(0.9)
    assert summary["prefix_cache_ttft_speedup"] == pytest.approx(5.0)
    assert summary["chat_turn4_cached_tokens"] == 320 and summary["goals"]["prefix_cache_ttft_speedup"]["met"]
    assert summary["goals"]["engine_vs_hf_single"]["met"] is True
    assert summary["goals"]["server_vs_engine_throughput"]["met"] is True  # 0.9: the issue's bound, inclusive
    assert summary["openai_vs_grpc_throughput"] == pytest.approx(0.975)  # median 97.5 over median 100
    assert summary["openai_vs_grpc_by_rep"] == pytest.approx([0.95, 1.0])
    assert summary["openai_ttft_overhead_ms_p50"] == pytest.approx(5.0)  # median 105 - 100
    assert summary["openai_at"] == "closed loop, 16 clients"
    assert summary["goals"]["openai_vs_grpc_throughput"] == {"target": 0.95, "at_most": False,
                                                             "value": pytest.approx(0.975), "met": True}
    assert summary["goals"]["openai_ttft_overhead_ms_p50"]["at_most"] is True
    assert summary["goals"]["openai_ttft_overhead_ms_p50"]["met"] is True  # 5 ms: the bound, inclusive
    assert json.loads(json_line(summary))["type"] == "summary"
    assert summary["server_table"] == serving.table(server)
    table = run.markdown(rows, summary["server_table"], summary)
    assert "| engine | 8 |" in table and "closed, 8 clients" in table and "met" in table and "paired" in table
    assert "Multi-turn chat, turn 4 (400 prompt tokens, 320 of them cached): TTFT 40 ms" in table
    assert "| gateway | closed, 16 clients | 8 | 0 | 97.5 | 105 / 150 |" in table
    assert "per repetition: 0.95 / 1.00): TTFT p50 overhead 5.0 ms" in table
    assert "- goal `openai_vs_grpc_throughput` >= 0.95: 0.97 - met" in table
    assert "- goal `openai_ttft_overhead_ms_p50` <= 5.0: 5.00 - met" in table
    assert table.startswith("Test CPU, 2 cores,") and "Model gemma-3-270m: engine auto, dtype auto" in table
    gpu = {**summary, "device": "NVIDIA H100 80GB HBM3", "cuda": "13.0"}
    gpu_table = run.markdown(rows, summary["server_table"], gpu)
    assert gpu_table.startswith("NVIDIA H100 80GB HBM3 (CUDA 13.0), host Test CPU")

    from benchmarks import plots
    for draw in (plots.throughput, plots.latency):
        path = draw(rows, summary["server_table"], tmp_path / f"{draw.__name__}.png", "test")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_without_server_level_has_its_keys_as_null():
    summary = run.summarize(_engine_records(), [], [], run.Settings(),
                            {"cpu": "c"}, [0.0, 0.0, 0.0], 1.0)
    assert summary["server_vs_engine_throughput"] is None and summary["ttft_p50_ms"] is None
    assert summary["openai_vs_grpc_throughput"] is None and summary["openai_ttft_overhead_ms_p50"] is None
    assert summary["goals"]["engine_vs_hf_concurrent"]["met"] is True
    assert summary["goals"]["openai_ttft_overhead_ms_p50"]["met"] is None


def test_a_gateway_stream_counts_one_token_per_chunk_and_the_rest_of_usage_at_the_last():
    t = Timeline(0.0, [(0.5, 1), (0.6, 1), (0.9, 1)])
    serving.settle_token_counts(t, 5)  # a chunk held 3 tokens; which one, the stream does not say
    assert t.arrivals == [(0.5, 1), (0.6, 1), (0.9, 3)] and t.ttft == 0.5
    exact = Timeline(0.0, [(0.5, 1), (0.6, 1)])
    serving.settle_token_counts(exact, 2)
    assert exact.arrivals == [(0.5, 1), (0.6, 1)]
    for timeline, total in ((Timeline(0.0, [(0.5, 1), (0.6, 1)]), 1), (Timeline(0.0), 3),
                            (Timeline(0.0, [(0.5, 1)]), None)):
        with pytest.raises(RuntimeError):
            serving.settle_token_counts(timeline, total)


def test_client_processes_share_workers_and_requests_evenly():
    assert serving._split(7, 2) == [4, 3] and serving._split(3, 4) == [1, 1, 1, 0]
    for concurrency, requests, parts in ((3, 7, 2), (5, 6, 2), (5, 5, 4), (64, 256, 3), (8, 9, 3)):
        workers, shares = serving._split(concurrency, parts), serving._split(requests, parts)
        assert sum(shares) == requests and max(shares) - min(shares) <= 1
        assert all(n >= w for n, w in zip(shares, workers))  # no worker idle while another process queues


def test_the_table_shows_client_processes():
    records = [{**_server_record("server", "closed", 10.0, 8), "client_processes": 4},
               {**_server_record("engine_direct", "closed", 9.0, 8), "client_processes": 1}]
    rows = serving.table(records)
    assert [r["client_processes"] for r in rows] == [4, 1]
    summary = run.summarize([], records, [], run.Settings(concurrencies=(8,)), {"cpu": "c", "cores": 2,
                            "torch": "x", "torch_threads": 2, "transformers": "y", "date": "today", "device": "cpu",
                            "engine_config": {"checkpoint": "/m/x", "engine": "auto", "dtype": "auto",
                                              "max_num_seqs": 16, "kv_cache_bytes": 1}}, [0.0] * 3, 1.0)
    table = run.markdown([], summary["server_table"], summary)
    assert "| server | closed, 8 clients in 4 processes |" in table and "| engine_direct | closed, 8 clients |" in table

    assert "max_num_seqs 16, kv_cache_bytes 1." in table


def test_the_table_names_gpu_memory_utilization_when_it_sized_the_kv_cache():
    config = {"kv_cache_bytes": 1 << 30, "gpu_memory_utilization": 0.9}
    assert run.kv_cache_setting(config) == "gpu_memory_utilization 0.9"
    assert run.kv_cache_setting({**config, "gpu_memory_utilization": None}) == f"kv_cache_bytes {1 << 30}"


def _gpu_kill(before: float, after: float) -> dict:
    return {"fault": "kill", "gpu_memory_mib": {"before": {"used_mib": [before]}, "engine_gone": {"used_mib": [591.0]},
                                                 "after": {"used_mib": [after]}}}


def test_chaos_gpu_memory_is_checked_against_the_first_recovery_not_the_level_before_the_first_kill():
    """The H100 run of docs/soak.md: the first kill came while the first engine's allocator was still
    growing (65,657 MiB, then ~77.3-77.9 GiB after each recovery). That is no leak; a growth from one
    recovery to the next is."""
    from benchmarks import chaos

    h100 = [_gpu_kill(65_657, 77_937), _gpu_kill(77_937, 77_281), _gpu_kill(77_779, 77_803)]
    assert chaos.gpu_memory_problems(h100) == []
    assert chaos.gpu_memory_problems(h100[:1]) == []  # one kill: no warmed level to compare with
    one_outlier = [_gpu_kill(65_657, 77_937), _gpu_kill(77_937, 79_200), _gpu_kill(79_200, 77_900)]
    assert chaos.gpu_memory_problems(one_outlier) == [
        "fault 2 (kill): GPU memory after the recovery is 1263 MiB above its level after the first recovery"]
    leak = [_gpu_kill(65_657, 77_937), _gpu_kill(77_937, 78_300), {"fault": "hang"}, _gpu_kill(78_300, 79_100)]
    assert chaos.gpu_memory_problems(leak) == [
        "fault 4 (kill): GPU memory after the recovery is 1163 MiB above its level after the first recovery",
        "GPU memory grew by 1163 MiB from the first recovery to the last (3 restarts)"]


def test_host_step_measures_both_heaps_on_one_engine_and_gives_the_collector_back(capsys):
    import gc

    from benchmarks import host_step

    threshold = gc.get_threshold()
    walked, frozen = host_step.main(["--sequences", "4", "--steps", "3", "--warm-steps", "1"])
    assert [walked["heap"], frozen["heap"]] == ["as started", "frozen"]
    for run_ in (walked, frozen):
        assert run_["sequences"] == 4 and run_["steps"] >= 3
        assert run_["host_ms"] == pytest.approx(sum(run_.get(k, 0.0) for k in host_step.HOST_PHASES), abs=0.01)
        assert run_["full_collections"] == len(run_["full_collection_ms"])
    assert frozen["tracked_objects"] < walked["tracked_objects"]  # the startup heap left the walked set
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == threshold
    lines = capsys.readouterr().out.splitlines()
    assert frozen["one_full_collection_ms"] < walked["one_full_collection_ms"]
    assert set(json.loads(lines[-1])) == {"host_ms_frozen_over_walked", "wall_per_step_frozen_over_walked",
                                          "full_collection_frozen_over_walked"}


@pytest.mark.parametrize("min_tokens", [False, True], ids=["plain", "min_tokens"])
def test_engine_host_runs_the_closed_loop_on_the_fused_layouts_and_gives_the_collector_back(capsys, min_tokens):
    """benchmarks/engine_host.py: requests end at max_tokens and are replaced, steps with prefill chunks
    and decode-only ones both come, and the phases it reports are per step; with --min-tokens too."""
    import gc

    from benchmarks import engine_host

    threshold = gc.get_threshold()
    result = engine_host.main(["--sequences", "8", "--output-tokens", "4", "--seconds", "1", "--warm-seconds", "0.5"]
                              + ["--min-tokens"] * min_tokens)
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == result
    assert result["min_tokens"] is min_tokens
    assert result["tokens_per_s"] > 0 and result["steps"] > 10
    assert 0 < result["mixed_step_share"] < 1  # 4-token requests: arrivals come every few steps
    phases = [result[k] for k in ("schedule_ms", "prepare_ms", "forward_ms", "sample_ms", "update_ms", "publish_ms")]
    assert all(ms > 0 for ms in phases)
    assert sum(phases) < 1.5 * result["wall_ms_per_step"]  # per step, as the wall time is (edges: a step or so)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == threshold
