"""backend.engine.Engine with engine="te": continuous batching gives each request the tokens it
gets alone, cancellation frees its blocks, and every block returns to the pool.

fp32 models are compared exactly: TE's fp32 GEMMs use TF32 inputs, which round the same way at any
batch size, so batching changes only fp32 accumulation order (~1e-6), far below greedy margins.
bf16 batching can flip near-ties (GEMM kernels differ by batch size); those runs are reported.
"""
import threading

import pytest

from tests.engine_runs import run_staggered, token_ids, wait_idle
from tests.gpu.helpers import FAMILIES, add_wordlevel_tokenizer, prompts_for, report, requires_te, save_tiny

pytestmark = [pytest.mark.gpu, requires_te]


def make_engine(path, dtype, **kw):
    from backend.loader import start_engine
    from backend.params import EngineConfig

    return start_engine(EngineConfig(checkpoint=str(path), engine="te", device="cuda", dtype=dtype,
                                     max_num_batched_tokens=16, max_num_seqs=8, kv_cache_bytes=64 << 20, **kw))


@pytest.fixture(scope="module")
def servable(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        path = save_tiny(tmp_path_factory.mktemp(family), family, seed=7)
        add_wordlevel_tokenizer(path, 512)
        out[family] = path
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_continuous_batching_matches_single_requests(family, dtype, servable):
    from backend.params import SamplingParams

    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts = prompts_for(512, [3, 29, 11, 50, 7], seed=8)
    engine = make_engine(servable[family], dtype)
    try:
        assert type(engine.core.runner.model).__name__ == "TEGemmaModel"
        graphs = engine.core.runner.graphs
        captured_at_start = sorted(graphs.entries)
        solo = [engine.submit(p, params).result().token_ids for p in prompts]
        together = [token_ids(outs) for outs in run_staggered(engine, prompts, params)]
        stats = wait_idle(engine)
        same = [a == b for a, b in zip(solo, together)]
        mixed = engine.core.runner.mixed_graphs  # steps holding prefill chunks (the fused TE model's varlen attention)
        mixed_replays = {str(tokens): e.replays for (tokens,), e in mixed.entries.items()}
        report(test="engine_batching", family=family, dtype=dtype, identical=same,
               graph_buckets=sorted(graphs.entries), captured_at_start=len(captured_at_start),
               replays=sum(e.replays for e in graphs.entries.values()), graphs_disabled=graphs.disabled,
               mixed_replays=mixed_replays, mixed_disabled=mixed.disabled)
        assert mixed.disabled is None and sum(mixed_replays.values()) > 0
        # The engine captured every reachable decode graph before serving; requests only replayed.
        # (max_num_seqs 8 -> batch buckets 1..8; 512 positions -> context buckets 128..512.)
        assert graphs.disabled is None and captured_at_start == sorted(graphs.entries)
        assert captured_at_start == [(b, c) for b in (1, 2, 4, 8) for c in (128, 256, 512)]
        assert sum(e.replays for e in graphs.entries.values()) > 0
        assert all(len(t) == 40 for t in together)
        assert stats.kv_cache.used_blocks == 0
        if dtype == "float32":
            assert all(same)
    finally:
        engine.shutdown()


def test_cancel_mid_generation_frees_blocks(servable):
    from backend.params import SamplingParams

    engine = make_engine(servable["gemma3_text"], "bfloat16")
    try:
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        first = threading.Event()
        handles = [engine.submit(p, long, on_ready=(lambda handle: first.set()) if i == 0 else None)
                   for i, p in enumerate(prompts_for(512, [9, 17, 4], seed=9))]
        assert first.wait(60)
        handles[0].cancel()
        results = [h.result() for h in handles[1:]]
        assert [r.finish_reason for r in results] == ["length", "length"]
        assert wait_idle(engine).kv_cache.used_blocks == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("family", FAMILIES)
def test_async_scheduling_gives_the_outputs_of_steps_one_at_a_time(family, servable):
    """Overlapped steps (the CUDA default: decodes of tokens still in flight fed from the previous
    step's sampled ids on the device, through decode and mixed graphs) against steps one at a time,
    fp32, requests of every kind submitted together."""
    from backend.params import SamplingParams

    prompts = prompts_for(512, [3, 29, 11, 50, 7, 18], seed=10)

    def run(scheduling):
        engine = make_engine(servable[family], "float32", async_scheduling=scheduling)
        try:
            first = engine.submit(prompts[0], SamplingParams(max_tokens=1, temperature=0)).result().token_ids[0]
            kinds = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                     SamplingParams(max_tokens=30, temperature=0.9, top_k=40, seed=5, ignore_eos=True),
                     SamplingParams(max_tokens=30, temperature=0, logprobs=2, ignore_eos=True),
                     SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(first,))]
            handles = [engine.submit(p, params) for params in kinds for p in prompts]
            outputs = [h.result() for h in handles]
            assert wait_idle(engine).kv_cache.used_blocks == 0
            replays = sum(e.replays for e in engine.core.runner.graphs.entries.values())
            return outputs, replays
        finally:
            engine.shutdown()

    (overlapped, replays), (one_at_a_time, _) = run("on"), run("off")
    same = [(a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason) for a, b in zip(overlapped, one_at_a_time)]
    # fp32 batching changes only the accumulation order (~1e-6): logprobs agree closely, not bitwise.
    logprob_error = max(abs(x.logprob - y.logprob) for a, b in zip(overlapped, one_at_a_time) if a.logprobs
                        for x, y in zip(a.logprobs, b.logprobs))
    report(test="async_scheduling", family=family, identical=same, decode_replays=replays,
           logprob_error=logprob_error)
    assert replays > 0 and all(same) and logprob_error < 1e-3
