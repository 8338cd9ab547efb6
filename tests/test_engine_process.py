"""The engine in a process of its own (backend/engine_process.py), behind the same request API:
the same outputs as the engine on a thread, cancellation and stop strings reaching the engine
process, the queue bound and request checks on the caller's side, shutdown, and a start that fails
or an engine process that dies (or hangs) mid-generation ending every request with an error."""
import dataclasses
import json
import os
import pickle
import shutil
import signal
import threading
import time

import pytest

from backend.engine_fronts import pack_deltas
from backend.engine_process import unpack_deltas
from backend.errors import EngineOverloadedError
from backend.loader import start_engine
from backend.outputs import TokenDelta
from backend.params import EngineConfig, SamplingParams, TokenLogprobs
from tests.engine_runs import GREEDY, PROMPTS, SEEDED, check_bad_requests_refused, run_staggered, token_ids, wait_idle

LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)


def config(checkpoint, **kw) -> EngineConfig:
    return EngineConfig(checkpoint=str(checkpoint), max_num_batched_tokens=16, **kw)


@pytest.fixture(scope="module")
def engine(servable_checkpoint):
    eng = start_engine(config(servable_checkpoint), engine_process=True)
    yield eng
    eng.shutdown()


def test_a_loops_deltas_cross_the_pipe_unchanged_each_requests_in_order():
    logprob = TokenLogprobs(token_id=9, logprob=-0.5, rank=1, top_ids=(9,), top_logprobs=(-0.5,))
    deltas = [(1, TokenDelta([5], num_cached_tokens=16)),
              (2, TokenDelta([6, 7])),  # drafts accepted: more than one token
              (3, TokenDelta([8], "stop")),
              (4, TokenDelta([9], logprobs=[logprob])),
              (5, TokenDelta([1], "stop", ends_with_stop_id=False)),
              (6, TokenDelta([4])), (6, TokenDelta([], "error", "the constraint broke")),
              (7, TokenDelta([], "cancelled"))]
    plain, others = pack_deltas(deltas)
    assert plain == [1, 5, 16, 6, 4, 0] and all(isinstance(v, int) for v in plain)  # only one-token deltas
    unpacked = unpack_deltas(pickle.loads(pickle.dumps((plain, others))))
    assert sorted(unpacked, key=lambda d: d[0]) == sorted(deltas, key=lambda d: d[0])
    for request_id in range(1, 8):
        assert [d for i, d in unpacked if i == request_id] == [d for i, d in deltas if i == request_id]


def test_outputs_equal_the_engine_on_a_thread(engine, servable_checkpoint):
    in_process = start_engine(config(servable_checkpoint))
    try:
        for params in (GREEDY, SEEDED):
            expected = [in_process.submit(p, params).result() for p in PROMPTS]
            together = [token_ids(outs) for outs in run_staggered(engine, PROMPTS, params)]
            assert together == [e.token_ids for e in expected]
            assert [engine.submit(p, params).result().text for p in PROMPTS] == [e.text for e in expected]
    finally:
        in_process.shutdown()
    stats = wait_idle(engine)
    assert stats.kv_cache.used_blocks == 0 and stats.step_times.steps > 0


def test_cancel_and_stop_strings_reach_the_engine_process(engine):
    handle = engine.submit(PROMPTS[0], LONG)
    seen = []
    for out in handle:
        seen.append(out)
        if len(seen) == 3:
            handle.cancel()
    assert seen[-1].finish_reason == "cancelled" and seen[-1].num_output_tokens < 400
    base = engine.submit(PROMPTS[3], GREEDY).result()
    stop = base.text[2:4]
    cut = engine.submit(PROMPTS[3], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True, stop=(stop,)))
    out = cut.result()
    assert out.finish_reason == "stop" and out.text == base.text[:base.text.index(stop)]
    stats = wait_idle(engine)  # the stop string ended the sequence in the engine process too
    assert stats.kv_cache.used_blocks == 0


def test_requests_are_checked_on_the_callers_side(engine):
    check_bad_requests_refused(engine)
    assert engine.submit(PROMPTS[0], GREEDY).result().finish_reason == "length"


def test_queue_bound_refuses_with_overloaded(servable_checkpoint):
    eng = start_engine(config(servable_checkpoint, max_num_seqs=1, max_queue_size=2), engine_process=True)
    try:
        handles = [eng.submit(PROMPTS[0], LONG) for _ in range(3)]  # one running, two waiting
        with pytest.raises(EngineOverloadedError):
            eng.submit(PROMPTS[0], LONG)
        for h in handles:
            h.cancel()
        assert all(h.result().finish_reason == "cancelled" for h in handles)
        assert eng.submit(PROMPTS[0], GREEDY).result().finish_reason == "length"
    finally:
        eng.shutdown()


def test_shutdown_cancels_in_flight_and_refuses_new_requests(servable_checkpoint):
    eng = start_engine(config(servable_checkpoint), engine_process=True)
    handle = eng.submit(PROMPTS[0], LONG)
    next(iter(handle))
    eng.shutdown()
    assert handle.result().finish_reason == "cancelled"
    assert eng.core._process.returncode == 0
    with pytest.raises(EngineOverloadedError):
        eng.submit(PROMPTS[0], GREEDY)


def test_a_start_that_fails_raises_the_engines_error(servable_checkpoint, tmp_path):
    for f in servable_checkpoint.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        start_engine(config(tmp_path), engine_process=True)


def test_a_kv_cache_that_does_not_fit_fails_the_start_naming_the_setting(servable_checkpoint):
    with pytest.raises(ValueError, match=r"kv_cache_bytes=1125899906842624 does not fit: \d+ bytes are free on cpu"):
        start_engine(dataclasses.replace(config(servable_checkpoint), kv_cache_bytes=1 << 50), engine_process=True)


def test_an_engine_process_that_dies_ends_every_request_with_an_error(servable_checkpoint):
    eng = start_engine(config(servable_checkpoint), engine_process=True)
    try:
        started = threading.Event()
        handles = [eng.submit(p, LONG, on_ready=lambda h: started.set()) for p in PROMPTS[:2]]
        assert started.wait(60)
        eng.core._process.kill()
        outs = [h.result() for h in handles]
        assert [o.finish_reason for o in outs] == ["error", "error"]
        assert all("engine process exited" in o.error for o in outs) and "exit code -9" in eng.exit_error
        with pytest.raises(EngineOverloadedError):
            eng.submit(PROMPTS[0], GREEDY)
        with pytest.raises(EngineOverloadedError):
            eng.stats()
    finally:
        eng.shutdown()


def test_an_engine_process_whose_steps_stop_returning_is_killed_and_its_requests_end(servable_checkpoint):
    """A step that never returns (here: the whole process stopped) is a death the pipe cannot see:
    the watchdog kills the process once no step has returned for step_timeout_s while requests run."""
    eng = start_engine(dataclasses.replace(config(servable_checkpoint), step_timeout_s=1.0), engine_process=True)
    try:
        time.sleep(1.5)  # idle past the timeout: with nothing in flight, not a hang
        assert eng.submit(PROMPTS[0], GREEDY).result().finish_reason == "length"
        started = threading.Event()
        handle = eng.submit(PROMPTS[1], LONG, on_ready=lambda h: started.set())
        assert started.wait(60)
        os.kill(eng.core._process.pid, signal.SIGSTOP)
        out = handle.result()  # within a few seconds, not never
        assert out.finish_reason == "error" and "returned no step for" in out.error, out.error
        assert "step_timeout_s=1" in eng.exit_error and eng.core._process.returncode == -signal.SIGKILL
        with pytest.raises(EngineOverloadedError):
            eng.submit(PROMPTS[0], GREEDY)
    finally:
        eng.shutdown()
