"""serving/token_times.py: the time to first token and the inter-token gaps the metrics get."""
from __future__ import annotations

from serving.token_times import TokenTimes


def test_the_first_tokens_count_as_the_first_token_and_gaps_of_nothing():
    times = TokenTimes(submitted=10.0)
    times.note(3, now=10.5)
    assert times.ttft_s == 0.5 and times.inter_token_s == [0.0, 0.0]


def test_a_gap_before_several_tokens_is_shared_among_them():
    times = TokenTimes(submitted=0.0)
    times.note(1, now=1.0)
    times.note(2, now=1.5)
    times.note(1, now=1.75)
    assert times.ttft_s == 1.0 and times.inter_token_s == [0.25, 0.25, 0.25]
