"""`usage` from the server's per-response counts (gateway/responses.py's Usage), no server needed."""
from __future__ import annotations

from gemma_client import Delta

from gateway.responses import Usage
from gateway.sampling import ChoiceRequest


def choices(prompts: list[int]) -> list[ChoiceRequest]:
    """One ChoiceRequest per choice; `prompts[k]` is choice k's prompt index."""
    return [ChoiceRequest(k, p, f"prompt {p}", {}) for k, p in enumerate(prompts)]


def test_each_choice_output_is_the_sum_of_its_responses_and_a_prompt_counts_once():
    usage = Usage(choices([0, 0]))
    for index, counts in ((0, (1, 1, 2)), (1, (3,)), (0, (1,)), (1, (0,))):  # the last: a final response
        for count in counts:
            usage.add(index, Delta("x", num_input_tokens=7, num_output_tokens=count))
    assert usage.body() == {"prompt_tokens": 7, "completion_tokens": 8, "total_tokens": 15}


def test_cached_tokens_are_each_prompts_fewest_over_its_choices():
    usage = Usage(choices([0, 0, 1]))
    for index, prompt_tokens, cached in ((0, 40, 0), (1, 40, 32), (2, 50, 48)):
        usage.add(index, Delta("x", num_input_tokens=prompt_tokens, num_output_tokens=2, num_cached_tokens=cached))
    assert usage.body() == {"prompt_tokens": 90, "completion_tokens": 6, "total_tokens": 96,
                            "prompt_tokens_details": {"cached_tokens": 48}}
