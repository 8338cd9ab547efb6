"""Logprobs and the OpenAI penalties through the real tritonserver, over raw gRPC tensors."""
from __future__ import annotations

import json
import math

PROMPT = "The quick brown fox"
GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_logprobs_output_matches_output_ids_streamed_or_not(server):
    sampling = json.dumps({"max_tokens": 8, "logprobs": 3, **GREEDY})
    whole = server.stream(PROMPT, sampling_parameters=sampling, exclude_input_in_output=True)
    streamed = server.stream(PROMPT, sampling_parameters=sampling, stream=True)
    assert streamed.responses > 1
    for result in (whole, streamed):
        assert [e["token_id"] for e in result.logprobs] == result.token_ids
        for entry in result.logprobs:
            assert set(entry) == {"token_id", "token", "logprob", "top_logprobs"}
            top = entry["top_logprobs"]
            assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
            # Greedy: the sampled token is the most likely one, with the same logprob.
            assert (top[0]["token_id"], top[0]["logprob"]) == (entry["token_id"], entry["logprob"])
            assert entry["logprob"] <= 0 and isinstance(entry["token"], str)
    assert streamed.logprobs == whole.logprobs


def test_logprobs_scalar_tensor_and_none_by_default(server):
    with_tensor = server.stream(PROMPT, sampling_parameters=json.dumps({"max_tokens": 4, **GREEDY}), logprobs=0,
                                exclude_input_in_output=True)
    assert [e["top_logprobs"] for e in with_tensor.logprobs] == [[]] * 4
    assert all(math.isfinite(e["logprob"]) for e in with_tensor.logprobs)
    plain = server.stream(PROMPT, sampling_parameters=json.dumps({"max_tokens": 4, **GREEDY}))
    assert plain.logprobs is None


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
