"""Logprobs and the OpenAI penalties through the real tritonserver, over raw gRPC tensors."""
from __future__ import annotations

import json
import math

PROMPT = "The quick brown fox"
GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_logprobs_output_matches_output_ids_streamed_or_not(server):
    """The vLLM backend's layout: per token {id: {logprob, rank, decoded_token}}, the sampled one first."""
    sampling = json.dumps({"max_tokens": 8, "logprobs": 3, **GREEDY})
    whole = server.stream(PROMPT, sampling_parameters=sampling, exclude_input_in_output=True)
    streamed = server.stream(PROMPT, sampling_parameters=sampling, stream=True)
    assert streamed.responses > 1
    for result in (whole, streamed):
        assert [int(next(iter(position))) for position in result.logprobs] == result.token_ids
        for position in result.logprobs:
            # Greedy: the sampled token is the most likely one, so it is one of the 3 (rank 1).
            assert len(position) == 3 and sorted(e["rank"] for e in position.values()) == [1, 2, 3]
            by_rank = sorted(position.values(), key=lambda e: e["rank"])
            assert [e["logprob"] for e in by_rank] == sorted((e["logprob"] for e in by_rank), reverse=True)
            assert next(iter(position.values())) == by_rank[0]
            assert all(e["logprob"] <= 0 and isinstance(e["decoded_token"], str) for e in by_rank)
    assert streamed.logprobs == whole.logprobs


def test_logprobs_zero_is_the_sampled_token_alone_and_none_by_default(server):
    sampled = server.stream(PROMPT, sampling_parameters=json.dumps({"max_tokens": 4, "logprobs": 0, "top_k": 5,
                                                                    "temperature": 1.0, "ignore_eos": True}),
                            exclude_input_in_output=True)
    assert [len(position) for position in sampled.logprobs] == [1] * 4
    for position in sampled.logprobs:
        (entry,) = position.values()
        assert math.isfinite(entry["logprob"]) and 1 <= entry["rank"] <= 5  # top-k 5 drew it
    plain = server.stream(PROMPT, sampling_parameters=json.dumps({"max_tokens": 4, **GREEDY}))
    assert plain.logprobs is None  # the output holds 'null'



def test_penalties_steer_away_from_repeats(server):
    # Greedy, so the outputs are reproducible: the tiny random model's greedy text repeats tokens, and
    # sampled text from its near-flat distribution (262k tokens) hardly ever does, leaving nothing to penalise.
    def greedy(**tensors):
        return server.stream(PROMPT, sampling_parameters=json.dumps({"max_tokens": 24, **GREEDY}),
                             exclude_input_in_output=True, **tensors).token_ids

    plain = greedy()
    assert len(set(plain)) < len(plain)
    frequency, presence = greedy(frequency_penalty=2.0), greedy(presence_penalty=2.0)
    assert frequency != plain and presence != plain
    assert len(set(frequency)) > len(set(plain)) and len(set(presence)) > len(set(plain))
    as_json = server.stream(PROMPT, sampling_parameters=json.dumps({"max_tokens": 24, "frequency_penalty": 2.0,
                                                                     **GREEDY}), exclude_input_in_output=True)
    assert as_json.token_ids == frequency
