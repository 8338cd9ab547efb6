"""serving/send_order.py: each stream once a round, first tokens first."""
from __future__ import annotations

from serving.send_order import send_order


def test_each_stream_is_served_once_with_its_handle_in_arrival_order():
    notices = [("a", "h1"), ("b", "h2"), ("a", "h1"), ("c", "h3"), ("b", "h2")]
    assert send_order(notices, has_started=lambda key: True) == [("a", "h1"), ("b", "h2"), ("c", "h3")]


def test_streams_waiting_for_their_first_token_go_before_those_already_flowing():
    notices = [("flowing-1", 1), ("new-1", 2), ("flowing-2", 3), ("new-2", 4), ("flowing-1", 1)]
    order = send_order(notices, has_started=lambda key: key.startswith("flowing"))
    assert [key for key, _ in order] == ["new-1", "new-2", "flowing-1", "flowing-2"]


def test_a_round_with_nothing_ready_serves_nothing():
    assert send_order([], has_started=lambda key: True) == []
