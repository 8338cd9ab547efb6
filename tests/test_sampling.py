"""SamplingParams validation, and the sampler against HF transformers' logits processors."""
import dataclasses
import math

import pytest
import torch
from gemma_protocol import SAMPLING_FIELDS, SERVING_KEYS
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from backend.errors import InvalidRequestError
from backend.sampling import (NonFiniteLogitsError, SampledOnDevice, SamplingParams, SamplingRow, early_stops,
                              make_generator, process_logits, sample, sample_with_logprobs)

VOCAB = 1000
EOS = 7


def random_logits(batch=4, vocab=VOCAB, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def rows_for(params, batch, **row_fields):
    return [SamplingRow(params, **row_fields) for _ in range(batch)]


# --- SamplingParams ---------------------------------------------------------------------------

def test_fields_and_defaults_are_the_protocol_table():
    """The engine owns SamplingParams; the wire contract documents the same fields and defaults, less
    the keys served before the engine (n) and the bad words' tokens, which the request side fills in."""
    fields = [f for f in dataclasses.fields(SamplingParams) if f.name != "bad_words_token_ids"]
    protocol = [f for f in SAMPLING_FIELDS if f.key not in SERVING_KEYS]
    assert [f.name for f in fields] == [f.key for f in protocol]
    assert all(f.default == s.default for f, s in zip(fields, protocol))


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("min_tokens", -1), ("min_tokens", 17), ("temperature", -0.5),
    ("temperature", math.nan), ("top_k", -2), ("top_p", 0.0), ("top_p", 1.5),
    ("temperature", 100.5), ("temperature", 1e300), ("temperature", math.inf),
    ("repetition_penalty", 0.0), ("repetition_penalty", 1e-300), ("repetition_penalty", 1e300),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("frequency_penalty", math.nan),
    ("frequency_penalty", -3.0), ("logprobs", -1), ("logprobs", 21),
    ("seed", -1), ("seed", 2**64), ("stop", ("",)),
    ("stop", tuple(str(i) for i in range(17))), ("stop_token_ids", (-3,)),
    ("bad_words", ("",)), ("bad_words", (" \n",)), ("bad_words", tuple(str(i) for i in range(17))),
])
def test_out_of_range_values_name_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=f"'{field}'"):
        SamplingParams(**{field: value})


def test_edge_values_are_accepted():
    SamplingParams(max_tokens=1, min_tokens=1, temperature=0.0, top_p=1.0, seed=2**64 - 1,
                   stop=tuple("abcdefghijklmnop"))
    SamplingParams(temperature=100.0, repetition_penalty=0.01, top_p=1e-300)
    SamplingParams(repetition_penalty=100.0)


def test_lists_are_stored_as_tuples():
    params = SamplingParams(stop=["x"], stop_token_ids=[5], bad_words=["y"], bad_words_token_ids=[[1, 2], [3]])
    assert params.stop == ("x",) and params.stop_token_ids == (5,)
    assert params.bad_words == ("y",) and params.bad_words_token_ids == ((1, 2), (3,))
    hash(params)


def test_vllm_defaults():
    assert SamplingParams().max_tokens == 16
    assert SamplingParams(top_k=-1).top_k == 0 == SamplingParams().top_k  # -1: keep all, as in vLLM


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-40).greedy and SamplingParams(temperature=1e-320).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    assert SamplingParams(temperature=0.8, top_k=1).greedy
    assert not SamplingParams(temperature=0.8, top_k=2).greedy


# --- the sampler --------------------------------------------------------------------------------

def test_greedy_is_argmax_in_any_dtype():
    logits = random_logits()
    greedy = rows_for(SamplingParams(temperature=0), 4)
    assert sample(logits, greedy) == logits.argmax(-1).tolist()
    assert sample(logits.to(torch.bfloat16), greedy) == logits.to(torch.bfloat16).argmax(-1).tolist()


def test_top_k_1_is_greedy_even_with_temperature():
    logits = random_logits()
    rows = rows_for(SamplingParams(temperature=5.0, top_k=1), 4, generator=make_generator(0, "cpu"))
    assert sample(logits, rows) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 50, 1.0), (0.7, 0, 0.9), (1.3, 20, 0.5), (0.5, 0, 0.05), (2.0, 5, 0.999),
])
def test_warping_matches_hf(temperature, top_k, top_p):
    logits = random_logits(batch=8)
    rows = rows_for(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), 8)
    expected = logits / temperature
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    torch.testing.assert_close(process_logits(logits, rows), expected, rtol=0, atol=0)


@pytest.mark.parametrize("spread, top_p", [(4.0, 0.9), (0.05, 0.9), (1.0, 0.3)])
def test_top_p_over_a_large_vocabulary_matches_hf(spread, top_p):
    # A peaked distribution has its nucleus among the top candidates; a flat one (spread 0.05)
    # needs the whole vocabulary ranked.
    logits = random_logits(batch=3, vocab=20000) * spread
    rows = rows_for(SamplingParams(top_p=top_p), 3)
    torch.testing.assert_close(process_logits(logits, rows), TopPLogitsWarper(top_p)(None, logits), rtol=0, atol=0)


def test_mixed_batch_warps_each_row_with_its_own_params():
    logits = random_logits(batch=3)
    params = [SamplingParams(top_k=3), SamplingParams(temperature=0), SamplingParams(top_p=0.5)]
    scores = process_logits(logits, [SamplingRow(p) for p in params])
    torch.testing.assert_close(scores[0], TopKLogitsWarper(3)(None, logits[:1])[0])
    torch.testing.assert_close(scores[1], logits[1])
    torch.testing.assert_close(scores[2], TopPLogitsWarper(0.5)(None, logits[2:])[0])


def test_repetition_penalty_matches_hf():
    logits = random_logits(batch=2)
    seen = torch.tensor([[3, 5, 5, 900, 17, 3], [0, 1, 2, 3, 4, 999]])
    params = SamplingParams(temperature=0, repetition_penalty=1.3)
    rows = [SamplingRow(params, seen_token_ids=seen[0]), SamplingRow(params, seen_token_ids=seen[1].tolist())]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    torch.testing.assert_close(process_logits(logits, rows), expected, rtol=0, atol=0)
    assert sample(logits, rows) == expected.argmax(-1).tolist()


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = random_logits(batch=3)
    # Prompt [1, 2], then generated 5, 5, 9, 5: counts 5 -> 3, 9 -> 1; the prompt is not penalised.
    seen = [1, 2, 5, 5, 9, 5]
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), SamplingParams(),
              SamplingParams(presence_penalty=-2.0)]
    rows = [SamplingRow(p, seen_token_ids=torch.tensor(seen) if i else seen, num_output_tokens=4)
            for i, p in enumerate(params)]
    expected = logits.clone()
    expected[0, 5] -= 0.5 + 0.25 * 3
    expected[0, 9] -= 0.5 + 0.25 * 1
    expected[2, 5] += 2.0
    expected[2, 9] += 2.0
    torch.testing.assert_close(process_logits(logits, rows), expected, rtol=0, atol=1e-6)  # temperature 1


def test_occurrence_penalties_apply_before_temperature_and_steer_greedy():
    logits = torch.zeros(1, VOCAB)
    logits[0, 3], logits[0, 4] = 2.0, 1.5
    seen = [0, 3, 3]  # one prompt token, then 3 twice
    greedy = SamplingParams(temperature=0, frequency_penalty=0.3)
    assert sample(logits, [SamplingRow(greedy, seen_token_ids=seen, num_output_tokens=2)]) == [4]  # 2 - 0.6 < 1.5
    assert sample(logits, [SamplingRow(greedy, seen_token_ids=seen, num_output_tokens=0)]) == [3]  # prompt only
    warm = SamplingParams(temperature=0.5, presence_penalty=1.0)
    scores = process_logits(logits, [SamplingRow(warm, seen_token_ids=seen, num_output_tokens=2)])
    assert scores[0, 3].item() == pytest.approx((2.0 - 1.0) / 0.5)


def test_repetition_penalty_only_touches_its_own_rows():
    logits = random_logits(batch=3)
    seen = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams(), SamplingParams(repetition_penalty=0.5)]
    rows = [SamplingRow(p, seen_token_ids=ids) for p, ids in zip(params, seen)]
    scores = process_logits(logits, rows)
    torch.testing.assert_close(scores[0], RepetitionPenaltyLogitsProcessor(2.0)(seen[:1], logits[:1].clone())[0])
    torch.testing.assert_close(scores[1], logits[1])
    torch.testing.assert_close(scores[2], RepetitionPenaltyLogitsProcessor(0.5)(seen[2:], logits[2:].clone())[0])


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 100.0
    logits[0, 42] = 90.0
    logits[0, 10] = 80.0
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(42,))
    row = SamplingRow(params, eos_token_ids=frozenset({EOS}), num_output_tokens=1)
    assert sample(logits, [row]) == [10]
    row.num_output_tokens = 2
    assert sample(logits, [row]) == [EOS]


def test_ignore_eos_does_not_mask_eos():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 100.0
    row = SamplingRow(SamplingParams(temperature=0, ignore_eos=True), eos_token_ids=frozenset({EOS}))
    assert sample(logits, [row]) == [EOS]


def test_seeded_row_ignores_the_rest_of_the_batch():
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def run(batch, neighbour_seed):
        mine = make_generator(params.seed, "cpu")
        neighbours = [make_generator(neighbour_seed + j, "cpu") for j in range(batch - 1)]
        tokens = []
        for step in range(20):
            logits = random_logits(batch=batch, seed=step)
            logits[0] = random_logits(batch=1, seed=100 + step)[0]  # our row sees the same logits
            rows = [SamplingRow(params, generator=mine)]
            rows += [SamplingRow(SamplingParams(top_k=k % 7), generator=g) for k, g in enumerate(neighbours)]
            rows += rows_for(SamplingParams(), 2)  # unseeded rows use the global RNG
            logits = torch.cat([logits, random_logits(batch=2, seed=step + 50)])
            tokens.append(sample(logits, rows)[0])
        return tokens

    alone = run(batch=1, neighbour_seed=0)
    assert run(batch=5, neighbour_seed=7) == alone
    assert run(batch=9, neighbour_seed=99) == alone


def test_different_seeds_differ():
    logits = torch.zeros(1, VOCAB)  # uniform: 20 draws from two seeds almost surely differ
    draws = {seed: [sample(logits, [SamplingRow(SamplingParams(), generator=g)])[0] for _ in range(20)]
             for seed, g in ((s, make_generator(s, "cpu")) for s in (1, 2))}
    assert draws[1] != draws[2]


def test_unseeded_generators_differ():
    assert make_generator(None, "cpu").initial_seed() != make_generator(None, "cpu").initial_seed()


@pytest.mark.parametrize("seeded", [True, False])
def test_draws_follow_the_distribution(seeded):
    probs = torch.tensor([0.2, 0.3, 0.5])
    n = 2000
    torch.manual_seed(0)  # unseeded rows draw from the global RNG; keep the test deterministic
    generator = make_generator(0, "cpu") if seeded else None
    rows = [SamplingRow(SamplingParams(temperature=1.0), generator=generator) for _ in range(n)]
    tokens = torch.tensor(sample(probs.log().expand(n, 3), rows))
    frequencies = torch.bincount(tokens, minlength=3) / n
    torch.testing.assert_close(frequencies, probs, rtol=0, atol=0.04)


def test_sampled_tokens_stay_inside_top_k():
    logits = random_logits(batch=1)
    allowed = set(logits[0].topk(5).indices.tolist())
    row = SamplingRow(SamplingParams(temperature=2.0, top_k=5), generator=make_generator(3, "cpu"))
    assert {sample(logits, [row])[0] for _ in range(200)} <= allowed


# --- degenerate parameters and logits: never a token the model did not rank ----------------------

@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-40), SamplingParams(temperature=1e-320),
    SamplingParams(top_p=1e-300), SamplingParams(top_p=1e-300, top_k=3, temperature=5.0),
    SamplingParams(temperature=1e-5, top_p=1e-45),
])
def test_degenerate_parameters_give_the_top_token(params):
    logits = random_logits(batch=4)
    rows = rows_for(params, 4, generator=make_generator(0, "cpu"))
    assert sample(logits, rows) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("penalty", [0.01, 100.0])
def test_extreme_allowed_penalties_keep_scores_finite(penalty):
    logits = random_logits(batch=2) * 30  # Gemma's logits reach a few tens
    seen = torch.arange(0, VOCAB, 2)
    rows = rows_for(SamplingParams(repetition_penalty=penalty, temperature=1e-5), 2, seen_token_ids=seen)
    assert torch.isfinite(process_logits(logits, rows)).all()
    assert len(sample(logits, rows)) == 2


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=1),
                                    SamplingParams(temperature=0, repetition_penalty=1.2)])
def test_non_finite_logits_fail_their_row_only(bad_value, params):
    logits = random_logits(batch=3)
    logits[1, 17] = bad_value
    rows = [SamplingRow(params, generator=make_generator(7, "cpu"), seen_token_ids=[1, 2]) for _ in range(3)]
    with pytest.raises(NonFiniteLogitsError) as info:
        sample(logits, rows)
    assert info.value.rows == [1]
    # The other rows' tokens are what they would have been without the bad row.
    clean = torch.cat([logits[:1], logits[2:]])
    fresh = [SamplingRow(params, generator=make_generator(7, "cpu"), seen_token_ids=[1, 2]) for _ in range(2)]
    expected = sample(clean, fresh)
    assert [info.value.token_ids[0], info.value.token_ids[2]] == expected


def test_greedy_takes_the_first_of_equal_best_scores_as_argmax_does():
    """Ties go to the lowest token id (torch.argmax's rule, so HF's greedy), with or without a penalty."""
    logits = random_logits(batch=2)
    logits[:, [9, 300, 900]] = logits.max() + 1.0
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.2)):
        assert sample(logits, rows_for(params, 2)) == [9, 9] == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("params, plainly", [
    (SamplingParams(temperature=0), True), (SamplingParams(temperature=0.7, top_k=1, ignore_eos=True), True),
    (SamplingParams(temperature=0.7), False), (SamplingParams(temperature=0, logprobs=0), False),
    (SamplingParams(temperature=0, min_tokens=1), True), (SamplingParams(temperature=0, repetition_penalty=1.1), False),
    (SamplingParams(temperature=0, bad_words_token_ids=((5,),)), False)])
def test_only_greedy_rows_that_nothing_else_touches_sample_plainly(params, plainly):
    assert params.samples_plainly is plainly


def test_plain_rows_are_sampled_as_their_sampling_rows_would_be():
    """Rows given as None (every row samples plainly: the engine's greedy steady state) get what their
    SamplingRows would get: the argmax, ties to the lowest id, a non-finite row failed alone."""
    logits = random_logits(batch=5)
    logits[3, [9, 300]] = logits.max() + 1.0
    logits[1, 17] = math.nan
    logits[4] = -math.inf
    full = SampledOnDevice(logits, rows_for(SamplingParams(temperature=0), 5)).result()
    plain = SampledOnDevice(logits, None).result()
    assert plain.token_ids == full.token_ids and plain.token_ids[3] == 9
    assert plain.failed_rows == full.failed_rows == (1, 4)
    assert plain.logprobs == [None] * 5


def test_plain_rows_under_min_tokens_are_sampled_as_their_sampling_rows_would_be():
    """min_tokens on the plain path (its early stops written into the logits in place): the tokens
    its SamplingRows get from a float copy, EOS and stop ids out only until min_tokens, and a row
    with every token banned failed alone."""
    logits = random_logits(batch=4, vocab=64)
    top = logits.max()
    logits[:, EOS] = top + 2.0  # every row's argmax is EOS, then 42 (a stop id of two of them)
    logits[:, 42] = top + 1.0
    everything = tuple(range(64))
    rows = [SamplingRow(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(42,)), num_output_tokens=1),
            SamplingRow(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(42,)), num_output_tokens=3),
            SamplingRow(SamplingParams(temperature=0, min_tokens=2), num_output_tokens=0),
            SamplingRow(SamplingParams(temperature=0, min_tokens=1, stop_token_ids=everything))]
    for row in rows:
        row.eos_token_ids = frozenset({EOS})
    full = SampledOnDevice(logits.clone(), rows).result()
    under = {i: early_stops(r.params, r.num_output_tokens, r.eos_token_ids) for i, r in enumerate(rows)
             if r.num_output_tokens < r.params.min_tokens}
    plain = SampledOnDevice(logits.clone(), None, early_stops=under).result()
    assert set(under) == {0, 2, 3}
    assert plain.token_ids[:3] == full.token_ids[:3]
    assert plain.token_ids[0] not in (EOS, 42) and plain.token_ids[1] == EOS and plain.token_ids[2] == 42
    assert plain.failed_rows == full.failed_rows == (3,)


def test_minus_infinity_only_rules_tokens_out():
    logits = random_logits(batch=2)
    logits[:, :500] = -math.inf
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)):
        rows = rows_for(params, 2, generator=make_generator(3, "cpu"))
        assert all(t >= 500 for t in sample(logits, rows))


def test_a_row_with_every_token_masked_is_an_error_not_token_0():
    logits = random_logits(batch=2, vocab=8)
    everything = tuple(range(8))
    rows = [SamplingRow(SamplingParams(temperature=0, min_tokens=1, stop_token_ids=everything)),
            SamplingRow(SamplingParams(temperature=0))]
    with pytest.raises(NonFiniteLogitsError) as info:
        sample(logits, rows)
    assert info.value.rows == [0] and info.value.token_ids[1] == logits[1].argmax().item()


def test_random_hostile_parameters_only_ever_pick_kept_tokens():
    """Whatever the parameters, the token drawn is one the warps kept (a finite processed score)."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        values = torch.rand(4, generator=generator).tolist()
        params = SamplingParams(temperature=[0.0, 1e-30, 1e-5, 100.0][trial % 4], top_p=max(values[0] ** 20, 1e-300),
                                top_k=int(values[1] * 5), repetition_penalty=0.01 + values[2] * 99.99)
        logits = random_logits(batch=2, vocab=50, seed=trial) * 10
        rows = rows_for(params, 2, generator=make_generator(trial, "cpu"), seen_token_ids=[0, 1, 41])
        kept = process_logits(logits, rows) > -math.inf
        tokens = sample(logits, rows)
        assert all(kept[i, t] for i, t in enumerate(tokens)), params


# --- logprobs ---------------------------------------------------------------------------------

def test_logprobs_are_log_softmax_of_the_raw_logits_with_top_k_best_first():
    logits = random_logits(batch=3)
    # Sampling warps (temperature, top-k, penalties) do not change the reported distribution.
    params = [SamplingParams(logprobs=5, temperature=0.3, top_k=4, presence_penalty=1.0),
              SamplingParams(),
              SamplingParams(logprobs=0, temperature=0)]
    rows = [SamplingRow(p, seen_token_ids=[1, 2], num_output_tokens=1) for p in params]
    out = sample_with_logprobs(logits, rows)
    expected = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None
    for i in (0, 2):
        lp = out.logprobs[i]
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(expected[i, lp.token_id].item(), abs=1e-5)
        assert lp.rank == 1 + (expected[i] > expected[i, lp.token_id]).sum().item()
    top = out.logprobs[0]
    values, ids = expected[0].topk(5)
    assert list(top.top_ids) == ids.tolist()
    assert top.top_logprobs == pytest.approx(values.tolist(), abs=1e-5)
    assert list(top.top_logprobs) == sorted(top.top_logprobs, reverse=True)
    assert out.logprobs[2].top_ids == () and out.logprobs[2].top_logprobs == ()
    assert out.logprobs[2].token_id == logits[2].argmax().item()  # greedy: the top-1 token


def test_greedy_token_is_top_1_with_its_logprob():
    logits = random_logits(batch=2, seed=3)
    out = sample_with_logprobs(logits, rows_for(SamplingParams(temperature=0, logprobs=20), 2))
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.top_ids[0] == token and lp.top_logprobs[0] == lp.logprob and lp.rank == 1
        assert len(lp.top_ids) == 20


def test_rank_counts_the_tokens_strictly_more_likely_than_the_sampled_one():
    # At temperature 100 the draws are nearly uniform, so most land outside the top 11. Ties share a rank.
    logits = torch.zeros(6, VOCAB)
    logits[:, 10:20] = 5.0
    logits[:, 20] = 9.0
    rows = rows_for(SamplingParams(temperature=100.0, logprobs=1), 6, generator=make_generator(5, "cpu"))
    out = sample_with_logprobs(logits, rows)
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.rank == (1 if token == 20 else 2 if 10 <= token < 20 else 12)
    assert {lp.rank for lp in out.logprobs} - {1, 2} and all(lp.top_ids == (20,) for lp in out.logprobs)


def test_rows_without_logprobs_cost_nothing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("log_softmax ran for a batch where no row asked for logprobs")
    monkeypatch.setattr(torch, "log_softmax", fail)
    logits = random_logits(batch=2)
    assert sample_with_logprobs(logits, rows_for(SamplingParams(), 2)).logprobs == [None, None]
    assert sample_with_logprobs(logits, rows_for(SamplingParams(temperature=0), 2)).logprobs == [None, None]


# --- bad words ----------------------------------------------------------------------------------

def banning(*sequences, **params):
    return SamplingParams(bad_words=("w",), bad_words_token_ids=sequences, **params)


def test_a_one_token_bad_word_is_never_picked_greedy_or_sampled():
    logits = random_logits(batch=2)
    best, second = logits.topk(2).indices.T.tolist()
    greedy = [SamplingRow(banning((token,), temperature=0)) for token in best]
    assert sample(logits, greedy) == second
    peaked = torch.zeros(1, VOCAB)
    peaked[0, 3] = 8.0  # ~97% of the mass, never drawn once banned
    row = SamplingRow(banning((3,), temperature=1.0), generator=make_generator(0, "cpu"))
    assert 3 not in [sample(peaked, [row])[0] for _ in range(50)]


def test_a_longer_bad_word_bans_its_last_token_only_after_the_rest_was_generated():
    logits = torch.zeros(1, VOCAB)
    logits[0, 9] = 5.0
    params = banning((4, 5, 9), temperature=0)

    def pick(seen, num_output_tokens):
        return sample(logits, [SamplingRow(params, seen_token_ids=seen, num_output_tokens=num_output_tokens)])[0]

    assert pick([1, 2, 4, 5], num_output_tokens=2) != 9
    assert pick(torch.tensor([1, 2, 4, 5]), num_output_tokens=2) != 9  # the history as a tensor too
    assert pick([1, 2, 5, 5], num_output_tokens=2) == 9  # not the word's prefix
    assert pick([1, 2, 4, 5], num_output_tokens=1) == 9  # 4 was the prompt's: only output counts (vLLM)
    assert pick([4, 5], num_output_tokens=0) == 9


def test_bad_words_act_before_penalties_and_leave_logprobs_raw():
    logits = random_logits(batch=1)
    best = logits.argmax(-1).item()
    params = banning((best,), temperature=0, logprobs=2, repetition_penalty=1.5)
    row = SamplingRow(params, seen_token_ids=[best])
    assert process_logits(logits, [row])[0, best] == -math.inf
    lp = sample_with_logprobs(logits, [row]).logprobs[0]
    assert lp.token_id != best and lp.top_ids[0] == best and lp.rank >= 2


def test_only_bad_words_of_several_tokens_need_the_token_history():
    assert not banning((3,), (4,)).reads_token_history
    assert banning((3,), (4, 5)).reads_token_history
