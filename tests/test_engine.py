"""The engine end to end on a tiny random Gemma 3 with the real tokenizer: continuous batching,
KV cache accounting, cancellation, admission under cache pressure, bad requests."""
import dataclasses
from types import SimpleNamespace

import pytest

from backend.engine import Engine, bad_words_token_ids
from backend.errors import EngineOverloadedError, InvalidRequestError
from backend.loader import start_engine
from backend.params import EngineConfig, SamplingParams
from tests.engine_runs import GREEDY, PROMPTS, SEEDED, check_bad_requests_refused, run_staggered, token_ids, wait_idle
from tests.support.waiting import wait_for


def make_engine(checkpoint, scheduling: str, **kw) -> Engine:
    kw.setdefault("max_num_batched_tokens", 16)  # small: the long prompt is prefilled in chunks
    return start_engine(EngineConfig(checkpoint=str(checkpoint), async_scheduling=scheduling, **kw))


# Every test runs with steps one at a time and overlapped (async scheduling: step N+1 launched
# before step N's tokens are back; on by default on a GPU, forced here on the CPU).
@pytest.fixture(scope="module", params=["off", "on"], ids=["sync", "async"])
def scheduling(request):
    return request.param


@pytest.fixture(scope="module")
def engine(servable_checkpoint, scheduling):
    eng = make_engine(servable_checkpoint, scheduling)
    yield eng
    eng.shutdown()


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_staggered_requests_match_solo_runs(engine, params):
    solo = [engine.submit(p, params).result() for p in PROMPTS]
    # Join the running batch at different steps (prefills and decodes of different requests mix).
    together = [SimpleNamespace(token_ids=token_ids(outs), text="".join(o.text for o in outs),
                                finish_reason=outs[-1].finish_reason, num_output_tokens=outs[-1].num_output_tokens)
                for outs in run_staggered(engine, PROMPTS, params)]
    for a, b in zip(solo, together):
        assert b.token_ids == a.token_ids
        assert b.text == a.text
        assert b.finish_reason == "length" and b.num_output_tokens == 12
    assert wait_idle(engine).kv_cache.used_blocks == 0


def test_stream_deltas_concatenate_to_result(engine):
    deltas = list(engine.submit(PROMPTS[1], GREEDY))
    assert deltas[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    whole = engine.submit(PROMPTS[1], GREEDY).result()
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert whole.text == engine.tokenizer.decode(whole.token_ids)
    # Outputs merged as a consumer that fell behind merges them (the Triton responder) lose nothing.
    merged = deltas[0]
    for d in deltas[1:]:
        merged = merged.followed_by(d)
    assert merged.phases == deltas[-1].phases is not None  # the engine's timings, the last output's
    assert dataclasses.replace(merged, phases=None) == dataclasses.replace(whole, phases=None)


def test_greedy_logprobs_name_the_top_token_through_the_engine(engine):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3)
    deltas = list(engine.submit(PROMPTS[3], params))  # non-ASCII: some tokens are held for a whole character
    whole = engine.submit(PROMPTS[3], params).result()
    assert len(whole.logprobs) == len(whole.token_ids) == 12
    for token, lp in zip(whole.token_ids, whole.logprobs):
        assert lp.token_id == token == lp.top_ids[0] and lp.rank == 1
        assert lp.logprob == lp.top_logprobs[0] <= 0 and len(lp.top_ids) == 3
    assert [lp for d in deltas for lp in d.logprobs] == whole.logprobs
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert engine.submit(PROMPTS[3], GREEDY).result().logprobs is None


def test_logprobs_cover_the_eos_and_stop_string_cuts(engine):
    base = engine.submit(PROMPTS[3], GREEDY).result()
    first = base.token_ids[0]
    stopped = engine.submit(PROMPTS[3], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(first,),
                                                      logprobs=1)).result()
    assert stopped.finish_reason == "stop" and [lp.token_id for lp in stopped.logprobs] == [first]
    stop = base.text[2:4]
    cut = engine.submit(PROMPTS[3], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=(stop,),
                                                  logprobs=0)).result()
    assert [lp.token_id for lp in cut.logprobs] == cut.token_ids


def test_bad_words_are_never_generated(engine):
    """A word of the greedy output, banned: the output is the same up to it and never holds it. A
    word of two tokens bans its second token only right after its first."""
    tokenizer = engine.tokenizer
    base = engine.submit(PROMPTS[0], GREEDY).result().token_ids

    def banned(word):
        return engine.submit(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                        bad_words=(word,))).result().token_ids

    def round_trips(ids):  # the word these tokens spell is banned as exactly these tokens
        return tuple(ids) in bad_words_token_ids(tokenizer, [tokenizer.decode(ids)])

    one = next(i for i, token in enumerate(base) if round_trips([token]))
    out = banned(tokenizer.decode([base[one]]))
    assert out[:one] == base[:one] and base[one] not in out
    # The pair's second token was generated earlier without its first: the ban must not bite there.
    two = next(i for i in range(len(base) - 1) if base[i + 1] in base[:i + 1] and round_trips(base[i:i + 2]))
    out = banned(tokenizer.decode(base[two:two + 2]))
    assert out[:two + 1] == base[:two + 1] and out[two + 1] != base[two + 1]
    with pytest.raises(InvalidRequestError, match="'bad_words'"):  # tokens the model cannot score
        engine.submit(PROMPTS[0], SamplingParams(max_tokens=4, bad_words_token_ids=((10**7,),)))


def test_max_tokens_none_generates_until_the_context_is_full(servable_checkpoint):
    eng = make_engine(servable_checkpoint, "off", max_model_len=64)
    try:
        prompt_ids = eng.tokenizer.encode(PROMPTS[0])
        out = eng.submit(PROMPTS[0], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)).result()
        assert out.finish_reason == "length" and out.num_output_tokens == 64 - len(prompt_ids)
        with pytest.raises(InvalidRequestError, match="exceeds the context of 64 tokens"):
            eng.submit(list(range(10, 74)), SamplingParams(max_tokens=None))
    finally:
        eng.shutdown()


def test_cancel_frees_blocks(engine):
    handle = engine.submit(PROMPTS[0], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    seen = []
    for out in handle:
        seen.append(out)
        if len(seen) == 3:
            handle.cancel()
    assert seen[-1].finish_reason == "cancelled"
    assert seen[-1].num_output_tokens < 400
    assert wait_idle(engine).kv_cache.used_blocks == 0


def test_cancel_while_waiting(servable_checkpoint, scheduling):
    eng = make_engine(servable_checkpoint, scheduling, max_num_seqs=1)
    try:
        long = eng.submit(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        queued = eng.submit(PROMPTS[1], GREEDY)
        queued.cancel()
        out = queued.result()
        assert out.finish_reason == "cancelled" and out.num_output_tokens == 0
        long.cancel()
        assert long.result().finish_reason == "cancelled"
        assert wait_idle(eng).kv_cache.used_blocks == 0
    finally:
        eng.shutdown()


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                                    SamplingParams(max_tokens=40, temperature=0.9, top_k=50, seed=7, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_cache_far_too_small_preempts_and_outputs_match(servable_checkpoint, scheduling, params):
    # 5 blocks of 16 tokens; each request ends holding 3-4 blocks, so three at once cannot all fit:
    # the newest is preempted (its blocks freed), requeued and recomputed, repeatedly.
    import torch

    from backend.config import GemmaConfig
    from backend.kv_cache import bytes_per_block

    cfg = GemmaConfig.from_checkpoint(servable_checkpoint)
    budget = 5 * bytes_per_block(cfg, 16, torch.float32)
    eng = make_engine(servable_checkpoint, scheduling, kv_cache_bytes=budget)
    try:
        prompts = PROMPTS[:3]
        solo = [eng.submit(p, params).result() for p in prompts]
        assert eng.stats().num_preemptions == 0
        together = [h.result() for h in [eng.submit(p, params) for p in prompts]]
        assert eng.stats().num_preemptions > 0
        for a, b in zip(solo, together):
            assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, "length")
        stats = wait_idle(eng)
        assert stats.kv_cache.used_blocks == 0
        with pytest.raises(InvalidRequestError, match="whole KV cache"):
            eng.submit(PROMPTS[0], SamplingParams(max_tokens=100))
    finally:
        eng.shutdown()


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_prefix_cache_reuses_a_shared_prompt(servable_checkpoint, scheduling, caching):
    eng = make_engine(servable_checkpoint, scheduling, enable_prefix_caching=caching, block_size=4)
    try:
        prompt = PROMPTS[1] + " " + PROMPTS[1]  # ~30 tokens: several full blocks of 4
        first = eng.submit(prompt, GREEDY).result()
        second = eng.submit(prompt, GREEDY).result()
        assert second.token_ids == first.token_ids and second.text == first.text
        assert first.num_cached_tokens == 0
        if caching:  # all full blocks of the prompt but the one holding its last token
            assert second.num_cached_tokens == (first.num_prompt_tokens - 1) // 4 * 4 > 0
        else:
            assert second.num_cached_tokens == 0
        stats = wait_idle(eng)
        assert stats.kv_cache.used_blocks == 0
        assert (stats.kv_cache.cached_blocks > 0) == caching
        assert stats.prefix_cache.queries == 2 * first.num_prompt_tokens
        assert stats.prefix_cache.hits == second.num_cached_tokens
    finally:
        eng.shutdown()


def test_queue_bound_refuses_with_overloaded(servable_checkpoint, scheduling):
    eng = make_engine(servable_checkpoint, scheduling, max_num_seqs=1, max_queue_size=2)
    try:
        params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
        handles = [eng.submit(PROMPTS[0], params)]
        assert wait_for(lambda: eng.stats().num_running == 1)  # so it no longer counts as waiting
        handles += [eng.submit(PROMPTS[0], params) for _ in range(2)]
        with pytest.raises(EngineOverloadedError):
            eng.submit(PROMPTS[0], params)
        for h in handles:
            h.cancel()
        assert all(h.result().finish_reason == "cancelled" for h in handles)
    finally:
        eng.shutdown()


def test_the_last_output_carries_the_engines_request_phases(servable_checkpoint, scheduling):
    eng = make_engine(servable_checkpoint, scheduling, max_num_seqs=1)  # the second request waits for the first
    try:
        first, second = (eng.submit(prompt, GREEDY) for prompt in PROMPTS[:2])
        first, second = first.result().phases, second.result().phases
        for phases in (first, second):
            assert phases.queue_s >= 0 and phases.prefill_s > 0 and phases.decode_s > 0
        # The second waits for the first to finish. It is queued by the time the first's prefill ends, not
        # necessarily before it starts: on a busy machine the engine thread can start that prefill (and hold
        # the GIL) before this thread's second submit runs.
        assert second.queue_s >= first.decode_s
        one_token = eng.submit(PROMPTS[2], SamplingParams(max_tokens=1, temperature=0)).result().phases
        assert one_token.prefill_s > 0 and 0 <= one_token.decode_s < one_token.prefill_s
        # Ended by a stop string the front found: the engine's last delta comes after the output's end.
        base = eng.submit(PROMPTS[3], GREEDY).result()
        cut = eng.submit(PROMPTS[3], SamplingParams(max_tokens=12, temperature=0, stop=(base.text[2:4],))).result()
        assert cut.finish_reason == "stop" and cut.phases is None
    finally:
        eng.shutdown()


def test_bad_requests(engine):
    check_bad_requests_refused(engine)


def test_stop_strings_and_min_tokens(engine):
    base = engine.submit(PROMPTS[3], GREEDY).result()
    assert len(base.text) > 4
    stop = base.text[2:4]
    cut = engine.submit(PROMPTS[3], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                  stop=(stop,))).result()
    assert cut.finish_reason == "stop"
    assert cut.text == base.text[: base.text.index(stop)]
    first = base.token_ids[0]
    stopped = engine.submit(PROMPTS[3], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(first,)))
    assert stopped.result().num_output_tokens == 1
    delayed = engine.submit(PROMPTS[3], SamplingParams(max_tokens=12, temperature=0, min_tokens=3,
                                                      stop_token_ids=(first,))).result()
    assert delayed.num_output_tokens >= 3


def test_shutdown_cancels_in_flight(servable_checkpoint, scheduling):
    eng = make_engine(servable_checkpoint, scheduling)
    handle = eng.submit(PROMPTS[0], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    next(iter(handle))
    eng.shutdown()
    assert handle.result().finish_reason == "cancelled"
    assert eng.core.kv_cache.usage().used_blocks == 0
    with pytest.raises(EngineOverloadedError):
        eng.submit(PROMPTS[0], GREEDY)


def test_engine_fault_fails_request_and_keeps_serving(servable_checkpoint, scheduling):
    eng = make_engine(servable_checkpoint, scheduling)
    try:
        real_forward = eng.core.runner.model.forward
        calls = {"n": 0}

        def flaky(*args, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected fault")
            return real_forward(*args, **kw)

        eng.core.runner.model.forward = flaky
        failed = eng.submit(PROMPTS[0], GREEDY).result()
        assert failed.finish_reason == "error" and "injected fault" in failed.error
        assert eng.submit(PROMPTS[0], GREEDY).result().finish_reason == "length"
        assert wait_idle(eng).kv_cache.used_blocks == 0
    finally:
        eng.shutdown()


def test_load_failure_on_the_engine_thread_reaches_the_caller(servable_checkpoint, scheduling, tmp_path):
    import json
    import shutil

    for f in servable_checkpoint.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        make_engine(tmp_path, scheduling)


def test_non_finite_scores_fail_only_their_request(servable_checkpoint, scheduling):
    import math

    eng = make_engine(servable_checkpoint, scheduling)
    try:
        real_forward = eng.core.runner.model.forward
        poisoned = []

        def nan_in_first_row(*args, **kw):  # once both sequences decode: row 0 is the older one's
            logits = real_forward(*args, **kw)
            if logits.shape[0] == 2 and not poisoned:
                logits = logits.clone()  # (an inference-mode tensor cannot be written in place here)
                logits[0] = math.nan
                poisoned.append(True)
            return logits

        eng.core.runner.model.forward = nan_in_first_row
        long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        first = eng.submit(PROMPTS[0], long)
        next(iter(first))  # decoding before the second one arrives
        second = eng.submit(PROMPTS[2], GREEDY)
        failed, served = first.result(), second.result()
        assert poisoned
        assert failed.finish_reason == "error" and "not finite" in failed.error
        assert served.finish_reason == "length" and served.num_output_tokens == 12
        eng.core.runner.model.forward = real_forward
        assert served.token_ids == eng.submit(PROMPTS[2], GREEDY).result().token_ids
        assert wait_idle(eng).kv_cache.used_blocks == 0
    finally:
        eng.shutdown()


def test_overlapped_steps_give_the_outputs_of_steps_one_at_a_time(servable_checkpoint):
    """Requests of every kind together (greedy, seeded sampling, logprobs, min_tokens, stop ids
    found early, penalties and bad words, which make the batch wait for each step's tokens): the
    same outputs with async scheduling as without, and no block left behind."""
    def run(scheduling):
        eng = make_engine(servable_checkpoint, scheduling)
        try:
            first = eng.submit(PROMPTS[3], GREEDY).result().token_ids[0]
            kinds = [GREEDY, SEEDED, SamplingParams(max_tokens=9, temperature=0, logprobs=2, ignore_eos=True),
                     SamplingParams(max_tokens=9, temperature=0, min_tokens=2, stop_token_ids=(first,)),
                     SamplingParams(max_tokens=9, temperature=0, stop_token_ids=(first,)),
                     SamplingParams(max_tokens=9, temperature=0.8, seed=3, repetition_penalty=1.3,
                                    frequency_penalty=0.5, ignore_eos=True),
                     SamplingParams(max_tokens=9, temperature=0, bad_words=("hello world", "the"), ignore_eos=True)]
            # All queued before the core schedules any (its loop waits for this lock): which requests
            # share a step then does not depend on thread timing, and neither do the CPU matmuls' sums.
            with eng.core._lock:
                handles = [eng.submit(prompt, params) for params in kinds for prompt in PROMPTS]
            outputs = [h.result() for h in handles]
            assert wait_idle(eng).kv_cache.used_blocks == 0
            return [(o.token_ids, o.text, o.finish_reason, o.logprobs) for o in outputs]
        finally:
            eng.shutdown()

    overlapped, one_at_a_time = run("on"), run("off")
    assert overlapped == one_at_a_time
    assert {reason for _, _, reason, _ in overlapped} == {"length", "stop"}


def test_with_async_scheduling_the_next_step_is_launched_before_the_tokens_are_back(engine, scheduling):
    """Observable in the step count: a request whose first token is a stop id takes one step one at a
    time; overlapped, its decode of that token was already launched (one wasted row)."""
    first = engine.submit(PROMPTS[3], GREEDY).result().token_ids[0]
    wait_idle(engine)
    before = engine.stats().step_times
    out = engine.submit(PROMPTS[3], SamplingParams(max_tokens=9, temperature=0, stop_token_ids=(first,))).result()
    assert out.token_ids == [first] and out.finish_reason == "stop"
    # The whole prompt fits one step (16 tokens per step here).
    assert engine.stats().step_times.since(before).steps == {"off": 1, "on": 2}[scheduling]
