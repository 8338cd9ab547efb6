"""serving/tensors.py: each output's values become an array of its type, and values that recur share
one tensor."""
from __future__ import annotations

import numpy as np
import pytest

from serving import tensors
from serving.tensors import TensorCache, output_array


def counting_cache():
    made = []

    def make(name, array):
        made.append((name, array))
        return (name, array.tolist())

    return TensorCache(make), made


def test_each_output_gets_its_own_type_and_texts_go_as_utf8():
    assert output_array("text_output", ["é"]).tolist() == ["é".encode()]
    assert output_array("num_output_tokens", [3]).dtype == np.uint32
    assert output_array("output_ids", [5, 6]).dtype == np.int32
    assert output_array("cumulative_logprob", [-0.5]).dtype == np.float32


def test_a_recurring_value_is_made_into_a_tensor_once_per_output():
    cache, made = counting_cache()
    assert cache("num_output_tokens", [1]) is cache("num_output_tokens", [1])
    assert cache("finish_reason", ["None"]) is cache("finish_reason", ["None"])
    cache("num_input_tokens", [1])  # the same value of another output is another tensor
    assert [name for name, _ in made] == ["num_output_tokens", "finish_reason", "num_input_tokens"]


@pytest.mark.parametrize("name, values", [
    ("cumulative_logprob", [-0.5]),  # a float sum rarely recurs
    ("output_log_probs", [[-0.5, -1.0]]),
    ("text_output", ["a text longer than sixteen characters"]),
    ("text_output", ["", " a"]),  # one element per choice
])
def test_values_that_rarely_recur_get_a_new_tensor_each_time(name, values):
    cache, made = counting_cache()
    assert cache(name, values) == cache(name, values)
    assert len(made) == 2


def test_a_full_cache_starts_again_empty(monkeypatch):
    monkeypatch.setattr(tensors, "TENSOR_CACHE_SIZE", 2)
    cache, made = counting_cache()
    for value in (1, 2, 3, 1):
        cache("output_ids", [value])
    assert [array.tolist() for _, array in made] == [[1], [2], [3], [1]]
