"""SamplingParams validation, and the sampler against HF transformers' logits processors."""
import dataclasses
import math

import pytest
import torch
from gemma_protocol import SAMPLING_FIELDS
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from backend.errors import InvalidRequestError
from backend.sampling import SamplingParams, SamplingRow, make_generator, process_logits, sample

VOCAB = 1000
EOS = 7


def random_logits(batch=4, vocab=VOCAB, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def rows_for(params, batch, **row_fields):
    return [SamplingRow(params, **row_fields) for _ in range(batch)]


# --- SamplingParams ---------------------------------------------------------------------------

def test_fields_and_defaults_are_the_protocol_table():
    """The engine owns SamplingParams; the wire contract documents the same fields and defaults."""
    fields = dataclasses.fields(SamplingParams)
    assert [f.name for f in fields] == [f.key for f in SAMPLING_FIELDS]
    assert all(f.default == s.default for f, s in zip(fields, SAMPLING_FIELDS))


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("min_tokens", -1), ("min_tokens", 65), ("temperature", -0.5),
    ("temperature", math.nan), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
    ("repetition_penalty", 0.0), ("seed", -1), ("seed", 2**64), ("stop", ("",)),
    ("stop", tuple(str(i) for i in range(17))), ("stop_token_ids", (-3,)),
])
def test_out_of_range_values_name_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=f"'{field}'"):
        SamplingParams(**{field: value})


def test_edge_values_are_accepted():
    SamplingParams(max_tokens=1, min_tokens=1, temperature=0.0, top_p=1.0, seed=2**64 - 1,
                   stop=tuple("abcdefghijklmnop"))


def test_lists_are_stored_as_tuples():
    params = SamplingParams(stop=["x"], stop_token_ids=[5])
    assert params.stop == ("x",) and params.stop_token_ids == (5,)
    hash(params)


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
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
