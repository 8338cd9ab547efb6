"""backend/heap.py: what a process made while starting stays out of later garbage collections, and
a step's short-lived allocations trigger none."""
from __future__ import annotations

import gc

import pytest

from backend.heap import quiet_collector


@pytest.fixture
def restored_collector():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()  # this test process is not a server: give pytest its collector back
    gc.set_threshold(*threshold)


def test_objects_alive_when_frozen_are_no_longer_walked_by_collections(restored_collector):
    startup = [[i] for i in range(20_000)]  # lists: objects the collector tracks
    quiet_collector()
    walked = {id(o) for o in gc.get_objects()}  # every generation a collection walks
    assert not any(id(o) in walked for o in startup)
    assert gc.get_freeze_count() >= len(startup)
    made_later = [0]
    assert id(made_later) in {id(o) for o in gc.get_objects()}


def _collections_during_steps(steps: int, objects_per_step: int) -> int:
    """Young collections while each 'step' allocates objects_per_step lists and frees them all."""
    collections = []

    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        for _ in range(steps):
            made = [[i] for i in range(objects_per_step)]
            del made
    finally:
        gc.callbacks.remove(count)
    return len(collections)


def test_a_steps_short_lived_allocations_no_longer_trigger_collections(restored_collector):
    gc.set_threshold(700, 10, 10)  # Python's default
    assert _collections_during_steps(100, 3_000) >= 100  # a step's peak passes 700: collections each step
    quiet_collector()
    assert _collections_during_steps(100, 3_000) == 0
