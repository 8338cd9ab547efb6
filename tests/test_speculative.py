"""Speculative decoding: the n-gram proposer, its configuration, verify chunks in the scheduler and the
layouts, the sampler's acceptance, and the engine's outputs with speculation on against off (greedy
token for token; seeded sampling token for token too, and its distribution against the model's)."""
import json
import math
import threading
from collections import Counter

import pytest
import torch

from backend.attention.layout import grouped_layout, varlen_layout
from backend.batch import HostToDevice, SeqChunk
from backend.engine_core import EngineCore
from backend.kv_cache import BlockPool
from backend.params import EngineConfig, SamplingParams, SpeculativeConfig
from backend.sampling import SampledOnDevice, SamplingRow, make_generator
from backend.scheduler import Scheduler, Sequence
from backend.speculative import (FIRST_PAUSE, MAX_MISSES, MAX_PAUSE, PROBE_DRAFTS, ROW_PRIOR, Acceptance, DraftControl,
                                 DraftRequest, NgramProposer, SpecDecodeStats, Speculation, StepCosts,
                                 best_num_drafts)
from tests.tiny_models import hf_model, write_checkpoint

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


# --- configuration --------------------------------------------------------------------------------

def test_lookup_bounds_default_as_vllm_does():
    assert (SpeculativeConfig(num_speculative_tokens=2).prompt_lookup_min,
            SpeculativeConfig(num_speculative_tokens=2).prompt_lookup_max) == (5, 5)
    only_max = SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_max=4)
    only_min = SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_min=3)
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (4, 4)
    assert (only_min.prompt_lookup_min, only_min.prompt_lookup_max) == (3, 3)


@pytest.mark.parametrize("text, words", [
    ("{", "not valid JSON"), ("[1]", "JSON object"), ('{"method": "ngram"}', "num_speculative_tokens is required"),
    ('{"method": "eagle", "num_speculative_tokens": 2}', "method"),
    ('{"num_speculative_tokens": 0}', "num_speculative_tokens"), ('{"num_speculative_tokens": 17}', "num_speculative_tokens"),
    ('{"num_speculative_tokens": "2"}', "integer"),
    ('{"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}', "prompt_lookup_min"),
    ('{"num_speculative_tokens": 2, "prompt_lookup_min": 0}', "prompt_lookup_min"),
    ('{"num_speculative_tokens": 2, "drafter": "x"}', "unknown key"),
    ('{"method": "eagle", "num_speculative_tokens": 2, "model": "x"}', "'eagle' is not supported"),
    ('{"method": "draft_model", "num_speculative_tokens": 2}', "needs `model`"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}', "use method draft_model"),
    ('{"model": "x", "num_speculative_tokens": 2, "prompt_lookup_max": 3}', "for method ngram"),
    ('{"model": "x", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2}', "must be 1"),
])
def test_engine_config_refuses_a_bad_speculative_config_naming_it(text, words):
    with pytest.raises(ValueError, match="speculative_config") as info:
        EngineConfig(speculative_config=text)
    assert words in str(info.value)


def test_speculative_config_is_off_by_default_and_takes_a_dict_as_json():
    assert EngineConfig().speculative() is None and EngineConfig(speculative_config=" ").speculative() is None
    config = EngineConfig(speculative_config=NGRAM)
    assert json.loads(config.speculative_config) == NGRAM
    assert config.speculative() == SpeculativeConfig(**NGRAM)


def test_the_model_parameter_reaches_the_engine_config():
    from serving.config import engine_config
    config = engine_config({"speculative_config": json.dumps(NGRAM)})
    assert config.speculative().num_speculative_tokens == 3


def test_a_request_opts_out_in_its_sampling_parameters():
    import numpy as np

    from serving.requests import parse_request
    sampling = json.dumps({"speculate": "false", "max_tokens": 4}).encode()
    request = parse_request({"text_input": np.array([b"hi"], dtype=object),
                             "sampling_parameters": np.array([sampling], dtype=object)})
    assert request.params.speculate is False and SamplingParams().speculate is True


# --- the proposer ---------------------------------------------------------------------------------

def propose(tokens, k=3, low=1, high=3, index=None):
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=k, prompt_lookup_min=low, prompt_lookup_max=high))
    return proposer.lookup(index if index is not None else proposer.start(tokens), tokens, k)


def test_ngram_proposes_what_followed_the_longest_match():
    # "9 1 2" matches at its 3 tokens once (-> 5 6), "1 2" twice; the longer match wins.
    assert propose([9, 1, 2, 5, 6, 7, 0, 1, 2, 8, 8, 3, 9, 1, 2]) == [5, 6, 7]
    assert propose([1, 2, 5, 6, 7, 0, 1, 2, 8, 8, 3, 1, 2]) == [8, 8, 3]  # equal length: the most recent
    assert propose([4, 5, 6, 7], low=2) == []  # nothing recurs
    assert propose([1, 2, 3, 1, 2], k=2) == [3, 1]
    assert propose([7, 7], k=3) == [7]  # what follows runs into the end: fewer drafts


def test_ngram_index_grows_with_the_sequence():
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_min=2, prompt_lookup_max=2))
    tokens = [1, 2, 3, 4]
    index = proposer.start(tokens)
    assert proposer.lookup(index, tokens, 2) == []
    tokens += [1, 2]
    assert proposer.lookup(index, tokens, 2) == [3, 4]
    tokens += [3, 9, 2, 3]
    assert proposer.propose([DraftRequest(index, tokens, 2), DraftRequest(proposer.start(tokens), tokens, 1)]) \
        == [[9, 2], [9]]  # "2 3" ended at 2 and at 6: the most recent wins
    assert index.num_indexed == len(tokens) - 1


def test_a_draft_pays_when_accepted_more_often_than_it_costs():
    """k > 0 drafts exactly when the acceptance beats the cost in shares of a step, whatever the batch;
    more drafts the more of them are accepted; none when even certain drafts cost a whole share."""
    for running in (1, 8):
        for acceptance in (0.05, 0.2, 0.35, 0.5, 0.7, 0.9):
            for cost in (0.0, 0.1, 0.3, 0.6, 0.95):
                assert (best_num_drafts(acceptance, cost, running, 4) > 0) == (acceptance > cost)
    assert [best_num_drafts(a, 0.15, 1, 4) for a in (0.1, 0.3, 0.5, 0.9)] == [0, 1, 2, 4]
    assert best_num_drafts(0.45, 0.3, 1, 4) == 1  # one draft pays, a second would not
    assert best_num_drafts(1.0, 1.0, 1, 4) == best_num_drafts(1.0, 1.5, 8, 4) == 0
    assert best_num_drafts(0.9, 0.0, 8, 3) == 3


def test_acceptance_is_the_accepted_over_accepted_and_rejections():
    acceptance = Acceptance(0.0, 0.0)
    acceptance.add(4, 4, decay=1.0)  # all accepted: no rejection seen
    acceptance.add(4, 1, decay=1.0)  # one accepted, then a rejection
    acceptance.add(2, 0, decay=1.0)
    assert (acceptance.accepted, acceptance.rejected) == (5, 2) and acceptance.rate == pytest.approx(5 / 7)
    weighed = acceptance.weighing(2.0)
    assert weighed.rate == pytest.approx(5 / 7) and weighed.accepted + weighed.rejected == pytest.approx(2.0)
    assert Acceptance().rate == 1.0  # nothing seen: optimistic


def test_step_costs_fit_a_steps_time_per_batch_size_as_shares_and_draft_rows():
    costs = StepCosts()
    assert costs.fit(1) is None and costs.draft_cost(1) is None
    for step in range(60):  # alone: a step 0.07 s, a draft row 0.012 s; 8 sequences: 0.16 s, 0.01 s a row
        drafts = (0, 1, 2, 4, 3)[step % 5]
        costs.observe_step(1, drafts, 0.07 + 0.012 * drafts)
        costs.observe_step(8, 8 * drafts, 0.16 + 0.01 * 8 * drafts)
    costs.observe_proposal(8, 0.008)  # 1 ms a draft
    assert costs.fit(1) == pytest.approx((0.07, 0.012), rel=0.02)
    assert costs.fit(8) == pytest.approx((0.02, 0.01), rel=0.06) == costs.fit(6)  # the nearest batch size seen (the
    # prior, v = ROW_PRIOR s, still pulls the fit a little)
    assert costs.draft_cost(1) == pytest.approx((0.001 + 0.012) / 0.07, rel=0.03)
    assert costs.draft_cost(8) == pytest.approx((0.001 + 0.01) / 0.02, rel=0.1)  # a share is smaller beside others
    for _ in range(200):  # the machine slows down: the fit follows the recent steps
        costs.observe_step(1, 0, 0.15)
        costs.observe_step(1, 4, 0.15 + 4 * 0.03)
    assert costs.fit(1) == pytest.approx((0.15, 0.03), rel=0.02)
    alike = StepCosts()  # every step one sequence with 3 drafts: the time is split as ROW_PRIOR says
    for _ in range(10):
        alike.observe_step(1, 3, 0.08)
    s, v = alike.fit(1)
    assert v == pytest.approx(ROW_PRIOR * s) and s + 3 * v == pytest.approx(0.08)
    slow_rows = StepCosts()  # rows that seem to cost more than a sequence's share: at most that
    for step in range(20):
        slow_rows.observe_step(1, step % 2, 0.05 + 0.2 * (step % 2))
    s, v = slow_rows.fit(1)
    assert v == s


def test_a_sequence_pauses_when_its_drafts_do_not_pay_then_probes():
    spec = Speculation(state=None, max_drafts=4)
    assert spec.plan(None, 1, 0) == 4  # nothing measured yet: all it may
    assert spec.plan(0.3, 1, 0) == 4  # nothing seen: every draft taken to be accepted

    def verifies_until_paused(at):
        for n in range(1, 20):
            drafts = spec.plan(0.3, 1, at)
            if drafts == 0:
                return n
            spec.record_verify(drafts, 0)
    assert verifies_until_paused(10) <= 4
    assert not spec.active(10 + FIRST_PAUSE - 1) and spec.active(10 + FIRST_PAUSE)
    assert spec.plan(0.3, 1, 10 + FIRST_PAUSE) == PROBE_DRAFTS  # after the pause, a probe
    spec.record_verify(PROBE_DRAFTS, 0)  # that fails: paused twice as long
    at = 10 + FIRST_PAUSE
    assert spec.plan(0.3, 1, at) == 0 and not spec.active(at + 2 * FIRST_PAUSE - 1) and spec.active(at + 2 * FIRST_PAUSE)
    at += 2 * FIRST_PAUSE
    assert spec.plan(0.3, 1, at) == PROBE_DRAFTS
    spec.record_verify(PROBE_DRAFTS, PROBE_DRAFTS)  # the text turned repetitive: one probe brings it back
    assert spec.plan(0.3, 1, at + 3) > 0
    # The same acceptance pays alone, where a sequence's share of a step is large, and not where a
    # draft costs more than the sequence's share (beside others); nothing pays at r >= 1.
    third = Acceptance(1.0, 2.0)
    assert Speculation(None, 3, Acceptance(1.0, 2.0)).plan(0.2, 1, 5) > 0
    assert Speculation(None, 3, Acceptance(1.0, 2.0)).plan(0.5, 8, 5) == 0
    hopeless = Speculation(None, 3, third)  # proposing a draft costs a share: the longest pause at once
    assert hopeless.plan(1.2, 1, 0, hopeless=True) == 0 and not hopeless.active(MAX_PAUSE - 1)
    assert hopeless.active(MAX_PAUSE) and hopeless.plan(1.2, 1, MAX_PAUSE, hopeless=True) == PROBE_DRAFTS
    missing = Speculation(state=None, max_drafts=4)
    for _ in range(MAX_MISSES):
        missing.record_miss(3)
    assert not missing.active(3)


def test_a_new_sequence_starts_from_what_the_engines_drafts_have_done():
    control = DraftControl(max_drafts=4, pinned_cost=0.3)
    assert control.start(None).plan(control.draft_cost(1), 1, 0) == 4
    for _ in range(200):  # earlier sequences' drafts were accepted 1 in 5
        control.record_verify(control.start(None), 5, 1)
    assert control.acceptance.rate == pytest.approx(0.5, abs=0.01)  # 1 accepted, 1 rejection a verify
    assert control.start(None).plan(control.draft_cost(1), 1, 0) == 1
    for _ in range(100):
        control.record_verify(control.start(None), 4, 0)
    late = control.start(None)
    assert late.plan(control.draft_cost(1), 1, 0) == 0 and not late.active(1)  # paused from its first token
    control.pinned_cost = None  # measured: the fit's r raised by COST_MARGIN
    assert control.draft_cost(1) is None
    control.costs.observe_step(1, 2, 0.1)
    control.costs.observe_proposal(2, 0.0)
    assert control.draft_cost(1) > control.costs.draft_cost(1) > 0
    # Drafts accepted every time, but a draft model as slow as the target: paused the longest at once.
    control.acceptance = Acceptance(10.0, 0.0)
    control.costs.observe_proposal(2, 0.4)
    slow = control.start(None)
    assert slow.plan(None, 1, 0) == 4 and control.plan(slow, 1, 0) == 0 and not slow.active(MAX_PAUSE - 1)


def test_spec_decode_stats_count_per_position():
    stats = SpecDecodeStats().plus(3, 2, positions=3).plus(3, 0, positions=3).plus(1, 1, positions=3)
    assert stats == SpecDecodeStats(3, 7, 3, (2, 1, 0))
    assert stats.acceptance_rate == pytest.approx(3 / 7)


# --- the scheduler --------------------------------------------------------------------------------

BLOCK = 4


def scheduler(num_blocks=32, budget=64, caching=True):
    return Scheduler(BlockPool(num_blocks, caching), BLOCK, 8, budget)


def running(sched, prompt, **params):
    params.setdefault("ignore_eos", True)
    params.setdefault("max_tokens", 100)
    seq = Sequence(0, list(prompt), len(prompt), SamplingParams(**params), eos_token_ids=frozenset([1]))
    sched.add(seq)
    out = sched.schedule()
    sched.update(out, [50])  # the prefill samples the first token
    return seq


def test_a_decode_with_drafts_is_one_verify_chunk_needing_logits_for_each():
    sched = scheduler()
    seq = running(sched, range(10, 16))  # 6 prompt tokens + 1 output: blocks 0-1
    seq.draft_token_ids = [51, 52, 53]
    out = sched.schedule()
    (scheduled,) = out.chunks
    chunk = scheduled.chunk
    assert (chunk.token_ids, chunk.start, chunk.num_drafts, chunk.num_logit_rows) == ([50, 51, 52, 53], 6, 3, 4)
    assert len(seq.block_table) == 3 and seq.num_computed == 10 and seq.draft_token_ids == []
    assert sched.schedule().chunks == []  # its drafts are being verified: no step until they are back


def test_rejected_drafts_roll_back_and_their_blocks_go_back_unnamed():
    sched = scheduler()
    seq = running(sched, range(10, 17))  # 7 prompt tokens + 1 output = 8 tokens, 2 full blocks' worth
    seq.draft_token_ids = [51, 52, 53, 54, 55]
    out = sched.schedule()  # positions 7..12: blocks 1, 2, 3
    assert len(seq.block_table) == 4
    blocks = list(seq.block_table)
    appended = sched.update(out, [[51, 99]])  # the first draft accepted, then the model's own token
    assert appended == [(seq, 0, 2)]
    assert seq.token_ids[-3:] == [50, 51, 99] and seq.num_computed == 9  # 50 and 51 computed; 99 is next
    assert seq.block_table == blocks[:3]  # 10 tokens: 3 blocks; the 4th held rejected drafts only
    assert sched.pool.num_used == 3
    named = dict(sched.pool._name_of)
    assert blocks[2] not in named  # positions 8-11 hold 51 (kept) and rejected drafts: not named
    assert blocks[1] in named  # positions 4-7 are all kept tokens
    out = sched.schedule()  # a plain decode of 99 at position 9, overwriting the rejected draft's K/V
    assert (out.chunks[0].chunk.token_ids, out.chunks[0].chunk.start) == ([99], 9)


def test_a_stop_among_the_accepted_drafts_ends_there():
    sched = scheduler()
    seq = running(sched, range(10, 16), stop_token_ids=(52,))
    seq.draft_token_ids = [51, 52, 53]
    out = sched.schedule()
    assert sched.update(out, [[51, 52, 53, 54]]) == [(seq, 0, 2)]
    assert seq.finish_reason == "stop" and seq.token_ids[-2:] == [51, 52]
    assert sched.pool.num_used == 0


def test_max_tokens_is_never_passed():
    sched = scheduler()
    seq = running(sched, range(10, 16), max_tokens=3)
    seq.draft_token_ids = [51, 52, 53]  # the engine core proposes at most max_tokens - done - 1; here a guard
    out = sched.schedule()
    assert sched.update(out, [[51, 52, 53, 54]]) == [(seq, 0, 2)]
    assert seq.finish_reason == "length" and seq.num_output_tokens == 3


def test_the_budget_cuts_drafts_and_preemption_drops_them():
    sched = scheduler(budget=3)
    seq = running(sched, [10, 11])
    seq.draft_token_ids = [51, 52, 53, 54]
    out = sched.schedule()
    assert out.chunks[0].chunk.token_ids == [50, 51, 52]
    sched.update(out, [[51, 52, 7]])
    assert seq.num_computed == 5 and len(seq.token_ids) == 6  # both drafts accepted, then 7
    tight = scheduler(num_blocks=2, caching=False)
    seq = running(tight, [10, 11, 12, 13, 14])  # 6 tokens in 2 blocks
    seq.draft_token_ids = [51, 52, 53]  # a third block is needed and there is none: it preempts itself
    out = tight.schedule()
    assert out.chunks == [] and out.preempted == [seq] and seq.draft_token_ids == []


# --- the layouts ----------------------------------------------------------------------------------

def test_layouts_give_a_logit_row_per_draft_and_one_more():
    chunks = [SeqChunk([5], 3, [0], True), SeqChunk([6, 7, 8], 0, [1], False),
              SeqChunk([9, 10, 11, 12], 4, [2, 3], True, num_drafts=3), SeqChunk([13, 14], 2, [4], True, num_drafts=1)]
    uploader = HostToDevice("cpu")
    _, grouped = grouped_layout(chunks, 4, uploader, {None})
    assert grouped.logit_rows.tolist() == [0, 4, 5, 6, 7, 8, 9]
    _, varlen = varlen_layout(chunks, 4, uploader, tile_tokens=2)
    assert varlen.logit_rows.tolist() == [0, 4, 5, 6, 7, 8, 9]
    assert varlen.positions.tolist() == [3, 0, 1, 2, 4, 5, 6, 7, 2, 3]
    # Two verify chunks of one length attend as one group, beside the decodes' and each prefill's.
    same = [SeqChunk([9, 10], 4, [2, 3], True, num_drafts=1), SeqChunk([13, 14], 2, [4], True, num_drafts=1)]
    _, layout = grouped_layout(same, 4, uploader, {None})
    assert len(layout.attention) == 1 and layout.attention[0].q_index.tolist() == [[0, 1], [2, 3]]


# --- the sampler ----------------------------------------------------------------------------------

def verify(logits, params, drafts, generator=None, history=(3, 4)):
    rows = [SamplingRow(params, generator, list(history) + list(drafts[:j]), j) for j in range(len(drafts) + 1)]
    return SampledOnDevice(logits, rows, [list(drafts)]).result()


def test_greedy_accepts_while_the_draft_is_the_argmax():
    logits = torch.full((4, 8), -1.0)
    for row, best in enumerate([5, 6, 2, 7]):
        logits[row, best] = 3.0
    greedy = SamplingParams(temperature=0)
    assert verify(logits, greedy, [5, 6, 1]).tokens(0) == [5, 6, 2]  # 1 rejected: the argmax 2 instead
    assert verify(logits, greedy, [5, 6, 2]).tokens(0) == [5, 6, 2, 7]  # all accepted, and the bonus token
    assert verify(logits, greedy, [0, 6, 2]).tokens(0) == [5]
    # Processors apply per position: a repetition penalty sees the drafts before its row.
    penalized = SamplingParams(temperature=0, repetition_penalty=100.0)
    logits[1, 4] = 2.9  # the runner-up of row 1, after 6
    assert verify(logits, penalized, [5, 6, 2], history=(3, 6)).tokens(0) == [5, 4]  # 6 was seen: penalised


def test_a_seeded_sequence_verifying_drafts_draws_what_it_draws_one_token_at_a_time():
    logits = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=5)
    one_at_a_time = make_generator(5, "cpu")
    alone = [SampledOnDevice(logits[j:j + 1], [SamplingRow(params, one_at_a_time)]).result().token_ids[0]
             for j in range(5)]
    for drafts in ([alone[0], alone[1], alone[2]], [alone[0], (alone[1] + 1) % 12, 0], [(alone[0] + 1) % 12, 0, 0]):
        generator = make_generator(5, "cpu")
        got = verify(logits[:4], params, drafts, generator).tokens(0)
        assert got == alone[:len(got)]
        # The generator is where one-token steps would have left it after len(got) tokens.
        following = SampledOnDevice(logits[len(got):len(got) + 1], [SamplingRow(params, generator)]).result()
        assert got + following.token_ids == alone[:len(got) + 1]


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at 1 - 0.001 (z = 3.09), by Wilson and Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: Counter, probs: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic over the outcomes with an expected count of at least 5 (the rest pooled)."""
    big = {k for k, p in probs.items() if p * n >= 5}
    stat = sum((counts[k] - probs[k] * n) ** 2 / (probs[k] * n) for k in big)
    rest_p, rest_c = sum(p for k, p in probs.items() if k not in big), n - sum(counts[k] for k in big)
    if rest_p * n >= 5:
        stat += (rest_c - rest_p * n) ** 2 / (rest_p * n)
        return stat, len(big)
    return stat, len(big) - 1


def test_verified_tokens_follow_the_model_distribution_whatever_the_draft():
    """Rejection sampling with a point-mass draft: over many seeds, the pair of tokens (first row's
    pick, then the second row's after an accepted draft) has the model's distribution, for a likely
    draft and an unlikely one."""
    logits = torch.tensor([[2.0, 1.5, 0.5, 0.0, -1.0], [0.0, 1.0, 2.0, 0.5, 0.2]])
    p0, p1 = logits.softmax(-1).tolist()
    params = SamplingParams(temperature=1.0)
    n = 3000
    for draft in (0, 3):
        pairs = Counter()
        for seed in range(n):
            tokens = verify(logits, params, [draft], make_generator(seed, "cpu")).tokens(0)
            pairs[tuple(tokens)] += 1
        # Outcomes: (t,) for t != draft; (draft, u) after an acceptance.
        probs = {(t,): p0[t] for t in range(5) if t != draft} | {(draft, u): p0[draft] * p1[u] for u in range(5)}
        stat, df = chi_square(pairs, probs, n)
        assert stat < chi_square_critical(df), (draft, stat, df, pairs)


# --- the engine -----------------------------------------------------------------------------------

class Core:
    """An EngineCore driven with token ids (no tokenizer): submit requests, wait for their tokens. On
    the CPU unless told otherwise (tests/gpu/test_speculative_gpu.py runs these checks on a GPU)."""

    def __init__(self, checkpoint, speculative=None, draft_cost=0.0, **config):
        """`draft_cost`: the cost of a draft the engine assumes (backend/speculative.py's r) instead of
        measuring it, so that which drafts are proposed does not vary with the machine's timings; 0: a
        sequence speculates while any of its drafts are accepted."""
        config.setdefault("max_num_batched_tokens", 32)
        config.setdefault("device", "cpu")
        self._done = threading.Condition()
        self.outputs: dict[int, list] = {}
        self.ended: dict[int, str] = {}
        self.core = EngineCore(EngineConfig(checkpoint=str(checkpoint), speculative_config=speculative, **config),
                               frozenset([1]), self._publish)
        if self.core._draft_control is not None:  # before any request
            self.core._draft_control.pinned_cost = draft_cost
        self._next_id = 0

    def _publish(self, deltas):
        with self._done:
            for request_id, delta in deltas:
                self.outputs.setdefault(request_id, []).append(delta)
                if delta.finish_reason is not None:
                    self.ended[request_id] = delta.finish_reason
            self._done.notify_all()

    def submit(self, requests):
        """[(prompt ids, params)] -> their request ids."""
        ids = []
        for prompt, params in requests:
            ids.append(self._next_id)
            self.core.add(self._next_id, list(prompt), params)
            self._next_id += 1
        return ids

    def wait_for(self, condition, timeout=300):
        """Until condition() holds (checked whenever deltas arrive)."""
        with self._done:
            assert self._done.wait_for(condition, timeout=timeout)

    def run(self, requests):
        """[(prompt ids, params)] submitted together -> each one's (token ids, logprobs, finish reason)."""
        ids = self.submit(requests)
        self.wait_for(lambda: all(i in self.ended for i in ids))
        results = []
        for i in ids:
            deltas = self.outputs.pop(i)
            logprobs = [lp for d in deltas for lp in (d.logprobs or [])]
            results.append(([t for d in deltas for t in d.token_ids], logprobs, self.ended.pop(i)))
        return results

    def stats(self):
        return self.core.stats()

    def close(self):
        self.core.shutdown()


def repeating_prompt(seed, length=24, vocab=512):
    """A random phrase said twice and begun a third time: what follows is in the prompt."""
    g = torch.Generator().manual_seed(seed)
    phrase = (torch.randint(3, vocab, (length,), generator=g)).tolist()
    return phrase + phrase + phrase[:5]


def plain_prompt(seed, length=30, vocab=512):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.8, top_k=40, seed=11, ignore_eos=True)


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3_text"])
def tiny_pair(request, tmp_path_factory):
    """A tiny random checkpoint of each family, served with speculation off and on."""
    path = write_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=3)
    off, on = Core(path), Core(path, NGRAM)
    yield path, off, on
    off.close()
    on.close()


def mixed_requests():
    prompts = [repeating_prompt(1), plain_prompt(2), repeating_prompt(3, length=40), plain_prompt(4, length=90)]
    params = [GREEDY, GREEDY, SEEDED, SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, logprobs=2)]
    params[1] = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, speculate=False)
    return list(zip(prompts, params))


class KnownAnswers:
    """A proposer that knows each prompt's output (from a run without speculation) and proposes it,
    with every third call's second draft wrong: random tiny models copy little from their prompts, and
    this way both accepting and rejecting are exercised, at every draft position."""

    def __init__(self, answers: dict, vocab: int):
        self.answers, self.vocab, self.calls = answers, vocab, 0

    def start(self, token_ids):
        return self.answers.get(tuple(token_ids))

    def propose(self, requests):
        return [self._answer(r.state, r.token_ids, r.max_tokens) for r in requests]

    def release(self, state):
        pass

    def _answer(self, state, token_ids, max_tokens):
        if state is None:
            return []
        self.calls += 1
        drafts = list(state[len(token_ids):len(token_ids) + max_tokens])
        if self.calls % 3 == 0 and len(drafts) > 1:
            drafts[1] = (drafts[1] + 1) % self.vocab
        return drafts


def run_proposing(core: Core, proposer, requests):
    saved, core.core._proposer = core.core._proposer, proposer
    try:
        return core.run(requests)
    finally:
        core.core._proposer = saved


def check_same(got, want):
    assert got[0] == want[0] and got[2] == want[2]
    # One logprob per token, the same (to rounding) as one token per step gives.
    assert [lp.token_id for lp in got[1]] == [lp.token_id for lp in want[1]]
    assert [lp.logprob for lp in got[1]] == pytest.approx([lp.logprob for lp in want[1]], abs=1e-4)
    assert [lp.top_ids for lp in got[1]] == [lp.top_ids for lp in want[1]]


def test_outputs_are_the_same_with_speculation_on_and_off_alone_and_mixed(tiny_pair):
    _, off, on = tiny_pair
    requests = mixed_requests()
    alone_off = [off.run([r])[0] for r in requests]
    assert all(r[2] == "length" for r in alone_off) and len(alone_off[3][1]) == 9
    before = on.stats().spec_decode
    for r, want in zip(requests, alone_off):
        check_same(on.run([r])[0], want)
    # Verify chunks beside plain decodes, prefill chunks (a budget of 32 tokens) and a sequence that does not speculate.
    for got, want in zip(on.run(requests), alone_off):
        check_same(got, want)
    assert on.stats().spec_decode.num_drafts > before.num_drafts
    answers = KnownAnswers({tuple(p): p + want[0] for (p, _), want in zip(requests, alone_off)}, vocab=512)
    before = on.stats().spec_decode
    for r, want in zip(requests, alone_off):
        check_same(run_proposing(on, answers, [r])[0], want)
    for got, want in zip(run_proposing(on, answers, requests), alone_off):
        check_same(got, want)
    stats = on.stats()
    accepted = [a - b for a, b in zip(stats.spec_decode.num_accepted_tokens_per_pos,
                                      before.num_accepted_tokens_per_pos + (0, 0, 0))]
    assert all(a > 0 for a in accepted)  # drafts accepted at every position
    assert stats.spec_decode.num_accepted_tokens < stats.spec_decode.num_draft_tokens  # and some rejected
    assert stats.kv_cache.used_blocks == 0 and off.stats().kv_cache.used_blocks == 0


def test_overlapped_steps_with_speculating_sequences_give_the_same_tokens(tiny_pair):
    """Async scheduling: a speculating sequence runs its steps one at a time, the others overlap again
    once it pauses or ends; a request that does not speculate never waits for one."""
    path, off, _ = tiny_pair
    overlapped = Core(path, NGRAM, async_scheduling="on")
    try:
        requests = mixed_requests()
        want = [off.run([r])[0] for r in requests]
        for got, w in zip(overlapped.run(requests), want):
            check_same(got, w)
        answers = KnownAnswers({tuple(p): p + w[0] for (p, _), w in zip(requests, want)}, vocab=512)
        for got, w in zip(run_proposing(overlapped, answers, requests), want):
            check_same(got, w)
        stats = overlapped.stats()
        assert stats.spec_decode.num_accepted_tokens > 0 and stats.kv_cache.used_blocks == 0
    finally:
        overlapped.close()


class WrongGuesses(KnownAnswers):
    """Proposes each prompt's known output with every token off by one: no draft is ever accepted."""

    def _answer(self, state, token_ids, max_tokens):
        return [] if state is None else [(t + 1) % self.vocab for t in state[len(token_ids):len(token_ids) + max_tokens]]


def test_drafts_that_do_not_pay_for_their_cost_pause_and_the_tokens_stay_the_same(tmp_path):
    """A draft costing half a sequence's share of a step (pinned): drafts never accepted are verified a
    few times, then the sequence pauses and later probes; drafts mostly accepted go on throughout. At a
    cost of a whole share nothing is proposed. The tokens are those without speculation every time."""
    path = write_checkpoint(tmp_path / "tiny", "gemma3_text", seed=3)
    off = Core(path)
    request = (plain_prompt(2), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    (want,) = off.run([request])
    off.close()
    answers = {tuple(request[0]): request[0] + want[0]}
    counts = {}
    for name, cost, proposer in (("wrong", 0.5, WrongGuesses(answers, 512)), ("right", 0.5, KnownAnswers(answers, 512)),
                                 ("costly", 1.0, KnownAnswers(answers, 512))):
        on = Core(path, NGRAM, draft_cost=cost)
        try:
            assert run_proposing(on, proposer, [request]) == [want]
            spec = on.stats().spec_decode
            counts[name] = (spec.num_drafts, spec.num_accepted_tokens)
        finally:
            on.close()
    drafts, accepted = counts["wrong"]
    assert accepted == 0 and 3 <= drafts <= 5  # a few verifies, a pause, a probe, a longer pause
    drafts, accepted = counts["right"]
    assert accepted >= 20 and drafts >= 10
    assert counts["costly"] == (0, 0)


def test_stop_ids_and_max_tokens_end_speculating_sequences_where_they_end_without(tiny_pair):
    _, off, on = tiny_pair
    prompt = repeating_prompt(5)
    (tokens, _, _), = off.run([(prompt, GREEDY)])
    for params in (SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(tokens[6],)),
                   SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, min_tokens=8, stop_token_ids=(tokens[6],)),
                   *(SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (1, 2, 3, 5, 7))):
        assert on.run([(prompt, params)]) == off.run([(prompt, params)])
    assert on.stats().kv_cache.used_blocks == 0


def test_a_seed_gives_the_same_tokens_with_speculation_on_or_off(tiny_pair):
    _, off, on = tiny_pair
    requests = [(repeating_prompt(s), SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True))
                for s in range(4)]
    want = off.run(requests)
    assert on.run(requests) == want
    assert [on.run([r])[0] for r in requests] == want
    answers = KnownAnswers({tuple(p): p + w[0] for (p, _), w in zip(requests, want)}, vocab=512)
    before = on.stats().spec_decode.num_accepted_tokens
    assert run_proposing(on, answers, requests) == want
    assert on.stats().spec_decode.num_accepted_tokens > before


def test_preempted_speculating_sequences_give_the_same_tokens(tiny_pair):
    path, off, _ = tiny_pair
    from backend.config import GemmaConfig
    from backend.kv_cache import bytes_per_block
    block_bytes = bytes_per_block(GemmaConfig.from_checkpoint(path), 16, torch.float32)
    tight = Core(path, NGRAM, kv_cache_bytes=7 * block_bytes)  # 112 tokens: three requests of ~80 cannot all fit
    try:
        requests = [(repeating_prompt(s, length=20), GREEDY) for s in range(3)] + \
                   [(repeating_prompt(9, length=20), SEEDED)]
        want = [off.run([r])[0] for r in requests]
        assert tight.run(requests) == want
        preempted = tight.stats().num_preemptions
        assert preempted > 0
        answers = KnownAnswers({tuple(p): p + w[0] for (p, _), w in zip(requests, want)}, vocab=512)
        assert run_proposing(tight, answers, requests) == want
        stats = tight.stats()
        assert stats.num_preemptions > preempted and stats.spec_decode.num_accepted_tokens > 0
        assert stats.kv_cache.used_blocks == 0
    finally:
        tight.close()


def test_sampled_outputs_have_the_model_distribution_with_speculation(tmp_path):
    check_sampled_distribution(tmp_path)


TINY4_NGRAM = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 2}


def check_sampled_distribution(tmp_path, identical=True, speculative=lambda path: TINY4_NGRAM, **config):
    """A 3-token continuation of a tiny-vocabulary model, drawn with seeds 0..N-1 with speculation
    on: the same tokens as with it off, seed for seed (`identical`: where both round alike), and the
    joint distribution of the tokens is the model's (computed with HF transformers), by a chi-square
    test at the 0.1% level. `speculative(checkpoint)`: the speculative_config (n-gram by default)."""
    vocab, n = 4, 1500
    path = write_checkpoint(tmp_path / "tiny4", "gemma3_text", seed=7, vocab_size=vocab)
    prompt = [2, 3, 0, 3, 0, 3, 0, 3]  # "3 0" recurs: drafts from the first token on
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=s, ignore_eos=True) for s in range(n)]
    # All n at once: beyond max_num_seqs + max_queue_size the engine would refuse them ("overloaded").
    config = dict(max_num_seqs=64, max_num_batched_tokens=512, max_queue_size=n, **config)
    on, off = Core(path, speculative(path), **config), Core(path, **config)
    try:
        with_speculation = [tuple(r[0]) for r in on.run([(prompt, p) for p in params])]
        assert on.stats().spec_decode.num_drafts > n / 2
        if identical:
            assert with_speculation == [tuple(r[0]) for r in off.run([(prompt, p) for p in params])]
    finally:
        on.close()
        off.close()
    model = hf_model("gemma3_text", seed=7, vocab_size=vocab)
    probs = {}
    with torch.no_grad():
        for t1 in range(vocab):
            for t2 in range(vocab):
                ids = torch.tensor([prompt + [t1, t2]])
                p = model(ids).logits[0, -3:].float().softmax(-1)
                for t3 in range(vocab):
                    probs[(t1, t2, t3)] = (p[0, t1] * p[1, t2] * p[2, t3]).item()
    stat, df = chi_square(Counter(with_speculation), probs, n)
    assert stat < chi_square_critical(df), (stat, df)


def test_the_packaged_model_gives_the_same_tokens_with_speculation(default_checkpoint):
    """The real Gemma 3 270M, greedy: an edit of a code snippet (much to look up) and free prose (little),
    alone and together; with speculation the edit takes fewer steps."""
    from backend.tokenizer import Tokenizer
    tokenizer = Tokenizer(default_checkpoint)
    code = "".join(f"def area_{i}(width, height):\n    return width * height * {i}\n\n" for i in range(4))
    prompts = [tokenizer.encode(f"Rewrite this code with `height` renamed to `h`:\n\n{code}Rewritten:\n\n"),
               tokenizer.encode("Write a short poem about the sea at night.")]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    off, on = Core(default_checkpoint, max_num_batched_tokens=512), Core(default_checkpoint, NGRAM, max_num_batched_tokens=512)
    try:
        want = [off.run([(p, params)])[0] for p in prompts]
        steps = on.stats().step_times.steps
        alone = [on.run([(p, params)])[0] for p in prompts]
        edit_steps = on.stats().step_times.steps - steps
        assert alone == want
        assert on.run([(p, params) for p in prompts]) == want
        assert on.stats().spec_decode.num_accepted_tokens > 5
        assert edit_steps < 2 * 20  # both alone: 40 steps without speculation
        assert on.stats().kv_cache.used_blocks == 0
    finally:
        off.close()
        on.close()


# --- the benchmark's pure parts -----------------------------------------------------------------------

def test_the_benchmark_reports_medians_and_each_method_over_off():
    from benchmarks import speculative as bench
    base = {"type": "speculative", "prompt_tokens": [500], "max_tokens": 8, "tokens_per_verify": None}
    records = [{**base, "rep": rep, "workload": "edit", "streams": 1, "speculation": label, "itl_ms": itl,
                "tokens_per_s": tok, "acceptance_rate": acc}
               for rep, label, itl, tok, acc in ((1, "off", 100.0, 10.0, None), (1, "ngram", 40.0, 24.0, 0.8),
                                                  (1, "draft_model", 80.0, 12.0, 0.5),
                                                  (2, "off", 110.0, 9.0, None), (2, "ngram", 50.0, 20.0, 0.6),
                                                  (2, "draft_model", 120.0, 8.0, 0.3))]
    rows = bench.table(records)
    on = next(r for r in rows if r["speculation"] == "ngram")
    assert (on["itl_ms"], on["tokens_per_s"], on["acceptance_rate"]) == (45.0, 22.0, pytest.approx(0.7))
    summary = bench.ratios(rows)
    assert summary["spec_edit_itl_speedup_1"] == pytest.approx(105 / 45)
    assert summary["spec_edit_tok_s_ratio_1"] == pytest.approx(22 / 9.5)
    assert summary["spec_draft_edit_itl_speedup_1"] == pytest.approx(105 / 100)
    assert summary["spec_draft_edit_acceptance_1"] == pytest.approx(0.4)
    assert bench.paired(records) == {"edit_1": [pytest.approx(2.4), pytest.approx(20 / 9)],
                                     "draft_edit_1": [pytest.approx(1.2), pytest.approx(8 / 9)]}
    table = bench.markdown(rows, summary)
    assert table.index("| off |") < table.index("| ngram |") < table.index("| draft_model |")
    assert "| edit | 1 | 500-500 | ngram | 45.0 | 22.00 | 0.70 | - | - | 2.33x | 2.32x |" in table
    assert "| edit | 1 | 500-500 | draft_model | 100.0 | 10.00 | 0.40 | - | - | 1.05x | 1.05x |" in table


def test_the_edit_workload_has_300_to_1000_token_prompts(default_checkpoint):
    from backend.tokenizer import Tokenizer
    from benchmarks.speculative import workload_prompts
    prompts = workload_prompts(Tokenizer(default_checkpoint))
    assert all(300 <= len(p) <= 1000 for p in prompts["edit"]) and len(prompts["edit"]) >= 8
    assert len(prompts["free"]) >= 8
