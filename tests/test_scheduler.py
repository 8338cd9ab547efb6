"""The scheduler and the block pool alone: no model, no tokenizer, no thread. A step is played by
hand: schedule(), then update() with made-up sampled tokens."""
import pytest

from backend.kv_cache import BlockPool
from backend.params import SamplingParams
from backend.batch import fed_token
from backend.scheduler import Scheduler, Sequence

BLOCK = 4
EOS = 1


def seq(request_id, prompt_len, **params):
    params.setdefault("max_tokens", 100)
    params.setdefault("ignore_eos", True)
    tokens = [100 + request_id * 1000 + i for i in range(prompt_len)]
    return Sequence(request_id, tokens, prompt_len, SamplingParams(**params), eos_token_ids=frozenset([EOS]))


def make(num_blocks=64, max_num_seqs=8, budget=64, caching=True):
    return Scheduler(BlockPool(num_blocks, caching), BLOCK, max_num_seqs, budget)


def step(sched, token=7):
    """One step: every chunk that needs logits samples `token` (or token(seq))."""
    out = sched.schedule()
    sampled = [token(c.seq) if callable(token) else token for c in out.chunks if c.needs_logits]
    sched.update(out, sampled)
    return out


def test_prefill_is_chunked_by_the_budget_and_decodes_go_first():
    sched = make(budget=8)
    a, b = seq(0, 3), seq(1, 20)
    sched.add(a)
    step(sched)  # a: whole prompt, samples its first token
    sched.add(b)
    out = step(sched)
    assert [(c.seq, len(c.chunk.token_ids), c.needs_logits) for c in out.chunks] == [(a, 1, True), (b, 7, False)]
    out = step(sched)
    assert [(c.seq, c.chunk.start, len(c.chunk.token_ids)) for c in out.chunks] == [(a, 4, 1), (b, 7, 7)]
    out = step(sched)
    assert [(c.seq, c.chunk.start, len(c.chunk.token_ids), c.needs_logits) for c in out.chunks] == \
        [(a, 5, 1, True), (b, 14, 6, True)]
    assert b.num_output_tokens == 1


def test_blocks_are_allocated_as_the_sequence_grows():
    sched = make(num_blocks=64)
    a = seq(0, 5, max_tokens=4000)  # reserving prompt + max_tokens would take all 64 blocks and more
    sched.add(a)
    step(sched)
    assert len(a.block_table) == 2 and sched.pool.num_used == 2
    for _ in range(3):
        step(sched)
    assert a.num_computed == 8 and len(a.token_ids) == 9 and len(a.block_table) == 2
    step(sched)  # token 9 starts the third block
    assert len(a.block_table) == 3


@pytest.mark.parametrize("token, params, reason, outputs", [
    (EOS, dict(ignore_eos=False), "stop", 1),
    (EOS, dict(ignore_eos=True, max_tokens=3), "length", 3),
    (9, dict(stop_token_ids=(9,)), "stop", 1),
    (9, dict(stop_token_ids=(9,), min_tokens=2), "stop", 2),
    (7, dict(max_tokens=2), "length", 2),
])
def test_update_applies_every_stop_rule(token, params, reason, outputs):
    sched = make()
    a = seq(0, 3, **params)
    sched.add(a)
    while a.finish_reason is None:
        step(sched, token)
    assert (a.finish_reason, a.num_output_tokens) == (reason, outputs)
    assert a.token_ids[-1] == token and sched.pool.num_used == 0 and not sched.running


def test_pool_running_dry_preempts_the_newest_and_it_resumes_where_it_was():
    sched = make(num_blocks=4, caching=False)  # (with caching, the resume would reuse b's first block)
    a, b = seq(0, 4), seq(1, 4)
    sched.add(a)
    sched.add(b)
    step(sched, token=lambda s: 10 + s.num_output_tokens)  # each: 1 block for its prompt, sampled 1 token
    assert sched.pool.num_used == 2
    for _ in range(4):  # tokens 5..8 fill each one's second block: the pool (4 blocks) is full
        step(sched, token=lambda s: 10 + s.num_output_tokens)
    assert sched.pool.num_free == 0 and len(a.token_ids) == len(b.token_ids) == 9
    out = step(sched, token=lambda s: 10 + s.num_output_tokens)  # both need a third block: b goes
    assert out.preempted == [b] and [c.seq for c in out.chunks] == [a]
    assert b.block_table == [] and b.num_computed == 0 and list(sched.waiting) == [b]
    assert b.token_ids[4:] == [10, 11, 12, 13, 14]  # what it generated is kept
    sched.finish(a, "cancelled")
    out = step(sched, token=lambda s: 10 + s.num_output_tokens)
    # Resumed: prompt and generated tokens recomputed as one prefill; its next token continues.
    assert [(c.seq, c.chunk.start, len(c.chunk.token_ids), c.needs_logits) for c in out.chunks] == [(b, 0, 9, True)]
    assert b.token_ids[-1] == 15 and b.num_preemptions == 1


def test_a_prefill_that_does_not_fit_preempts_itself_when_newest():
    sched = make(num_blocks=3, budget=64)
    a, b = seq(0, 8), seq(1, 4)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert sched.pool.num_used == 3  # a: 2 blocks, b: 1
    out = step(sched)  # a's token 9 needs a 3rd block: b (newest) is preempted, before it runs
    assert out.preempted == [b] and [c.seq for c in out.chunks] == [a]
    assert sched.pool.num_used == 3 and b.block_table == []


def test_prefix_cache_shares_full_blocks_and_keeps_them_after_finish():
    sched = make(num_blocks=16)
    a = seq(0, 10)
    sched.add(a)
    step(sched)
    a_blocks = list(a.block_table)
    b = Sequence(1, list(a.token_ids[:10]) + [5, 6], 12, SamplingParams(max_tokens=4, ignore_eos=True))
    sched.add(b)
    out = step(sched)
    # a's two full prompt blocks are b's first two: b computes from position 8.
    assert b.block_table[:2] == a_blocks[:2] and b.num_cached_prompt_tokens == 8
    assert [(c.seq, c.chunk.start) for c in out.chunks] == [(a, 10), (b, 8)]
    assert sched.prefix_cache.queries == 22 and sched.prefix_cache.hits == 8
    sched.finish(a, "stop")
    sched.finish(b, "stop")
    assert sched.pool.num_used == 0 and sched.pool.num_cached >= 2
    # The same prompt again hits blocks nobody references any more.
    c = Sequence(2, list(a.token_ids[:10]), 10, SamplingParams(max_tokens=4, ignore_eos=True))
    sched.add(c)
    step(sched)
    assert c.num_cached_prompt_tokens == 8 and c.block_table[:2] == a_blocks[:2]


def test_the_last_prompt_token_is_always_computed():
    sched = make()
    a = seq(0, 8)  # exactly two full blocks
    sched.add(a)
    step(sched)
    sched.finish(a, "stop")
    b = Sequence(1, list(a.token_ids[:8]), 8, SamplingParams(max_tokens=4, ignore_eos=True))
    sched.add(b)
    out = step(sched)
    assert b.num_cached_prompt_tokens == 4  # block 2 holds the last token: recomputed for its logits
    assert [(c.chunk.start, len(c.chunk.token_ids), c.needs_logits) for c in out.chunks] == [(4, 4, True)]


def test_cached_blocks_are_evicted_least_recently_used_first():
    pool = BlockPool(4)
    first = pool.allocate(2)
    pool.name(first[0], 111)
    pool.name(first[1], 222)
    pool.release(first)  # both cached; the tail (222) is older in the LRU: evicted first
    assert pool.num_used == 0 and pool.num_cached == 2 and pool.num_free == 4
    pool.allocate(3)  # 2 never-used blocks, then one eviction
    assert pool.cached_prefix([111, 222]) == [first[0]]


def test_without_prefix_caching_nothing_is_named_or_kept():
    sched = make(caching=False)
    a = seq(0, 10)
    sched.add(a)
    step(sched)
    sched.finish(a, "stop")
    assert sched.pool.num_cached == 0 and sched.pool.num_free == 64
    b = Sequence(1, list(a.token_ids[:10]), 10, SamplingParams(max_tokens=4))
    sched.add(b)
    step(sched)
    assert b.num_cached_prompt_tokens == 0


def test_admission_waits_for_a_free_slot_first_come_first_served():
    sched = make(max_num_seqs=1)
    a, b = seq(0, 3), seq(1, 3)
    sched.add(a)
    sched.add(b)
    out = step(sched)
    assert [c.seq for c in out.chunks] == [a] and list(sched.waiting) == [b]
    sched.finish(a, "cancelled")
    assert [c.seq for c in step(sched).chunks] == [b]
    sched.finish(b, "cancelled")
    assert sched.pool.num_used == 0


# --- overlapped steps (async scheduling): step N+1 is scheduled before step N's tokens are back ---

def test_a_token_in_flight_is_decoded_next_step_as_pending():
    sched = make()
    a = seq(0, 5)
    sched.add(a)
    first = sched.schedule()  # the prompt; its first token is in flight
    assert a.num_computed == 5 and a.num_in_flight == 1 and a.num_pending == 1
    second = sched.schedule()  # before first's token is back
    [chunk] = [c.chunk for c in second.chunks]
    assert (chunk.token_ids, chunk.start, chunk.needs_logits) == ([fed_token(0)], 5, True)  # row 0 of first's samples
    assert second.chunks[0].num_output_tokens == 1  # the token in flight counts as generated
    assert a.num_in_flight == 2 and a.num_computed == 6
    sched.update(first, [7])
    assert a.token_ids[5:] == [7] and a.num_in_flight == 1
    sched.update(second, [8])
    assert a.token_ids[5:] == [7, 8] and a.num_in_flight == 0 and a.num_pending == 1


def test_each_decode_in_flight_names_its_row_among_the_samples_of_the_step_in_flight():
    sched = make(budget=12)
    a, b, c = seq(0, 5), seq(1, 8), seq(2, 6)
    for s in (a, b, c):
        sched.add(s)
    first = sched.schedule()  # a's prompt (5) and b's first 7 tokens fill the budget: only a samples
    assert [(x.seq, x.needs_logits) for x in first.chunks] == [(a, True), (b, False)]
    assert not first.feeds_in_flight
    second = sched.schedule()  # a decodes its token in flight, sampled in row 0; b ends its prompt; c starts
    assert [(x.seq, x.chunk.token_ids) for x in second.chunks] == [(a, [fed_token(0)]), (b, b.token_ids[7:]),
                                                                   (c, c.token_ids)]
    assert second.feeds_in_flight
    sched.update(first, [7])
    third = sched.schedule()  # all three sampled in second: rows 0, 1, 2
    assert [(x.seq, x.chunk.token_ids) for x in third.chunks] == [(a, [fed_token(0)]), (b, [fed_token(1)]),
                                                                  (c, [fed_token(2)])]


def test_a_sequence_reaching_max_tokens_in_flight_gets_no_further_step():
    sched = make()
    a, b = seq(0, 3, max_tokens=2), seq(1, 3, max_tokens=50)
    sched.add(a), sched.add(b)
    first = sched.schedule()
    second = sched.schedule()  # a's second token is sampled here: its last
    assert [c.seq for c in second.chunks] == [a, b]
    sched.update(first, [7, 7])
    third = sched.schedule()
    assert [c.seq for c in third.chunks] == [b]  # a's max_tokens are all in flight or back
    sched.update(second, [7, 7])
    assert a.finish_reason == "length" and a.num_output_tokens == 2 and not a.block_table


def test_a_stop_found_late_wastes_one_row_and_its_blocks_come_back():
    sched = make()
    a = seq(0, 3, ignore_eos=False)
    sched.add(a)
    first = sched.schedule()
    second = sched.schedule()  # decodes first's token, which turns out to be EOS
    sched.update(first, [EOS])
    assert a.finish_reason == "stop" and sched.pool.num_used == 0
    assert sched.update(second, [7]) == []  # the wasted row's token is dropped
    assert a.token_ids[3:] == [EOS] and a.num_in_flight == 0


def test_a_sequence_preempted_with_a_token_in_flight_keeps_it_and_resumes_after_it():
    sched = make(num_blocks=3)
    a, b = seq(0, 4), seq(1, 3)
    sched.add(a), sched.add(b)
    first = sched.schedule()  # a: 1 block, b: 1 block; both tokens in flight
    second = sched.schedule()  # a's position 4 takes the last free block
    assert [c.seq for c in second.chunks] == [a, b]
    sched.update(first, [7, 8])
    third = sched.schedule()  # b's position 4 needs a block, none is free: b, the newest, is preempted
    assert b in third.preempted and b.num_in_flight == 1 and b.num_computed == 0
    assert [c.seq for c in third.chunks] == [a]
    sched.update(second, [9, 10])  # b is waiting, but its token is real
    assert b.token_ids[3:] == [8, 10] and b.num_in_flight == 0
    sched.update(third, [11])
    sched.finish(a, "stop")
    fourth = sched.schedule()  # b resumes: its first block from the prefix cache, the rest computed again
    [chunk] = [c.chunk for c in fourth.chunks]
    assert (chunk.token_ids, chunk.start, chunk.needs_logits) == ([10], 4, True) and b.token_ids[3:] == [8, 10]


def test_blocks_are_named_only_once_their_tokens_are_known():
    sched = make()
    a = seq(0, 3)
    sched.add(a)
    steps = [sched.schedule(), sched.schedule()]  # positions 0-2, then 3 (the token in flight)
    assert a.num_computed == 4 and not a.block_hashes  # block 0 is (being) computed, its 4th token unknown
    sched.update(steps[0], [7])  # the 4th token is back: block 0 gets its name
    assert len(a.block_hashes) == 1 and sched.pool.cached_prefix(a.block_hashes) == [a.block_table[0]]
