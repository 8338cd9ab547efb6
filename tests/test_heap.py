"""backend/heap.py: what a process made while starting stays out of later garbage collections."""
from __future__ import annotations

import gc

from backend.heap import freeze_startup_heap


def test_objects_alive_when_frozen_are_no_longer_walked_by_collections():
    startup = [[i] for i in range(20_000)]  # lists: objects the collector tracks
    try:
        freeze_startup_heap()
        walked = {id(o) for o in gc.get_objects()}  # every generation a collection walks
        assert not any(id(o) in walked for o in startup)
        assert gc.get_freeze_count() >= len(startup)
        made_later = [0]
        assert id(made_later) in {id(o) for o in gc.get_objects()}
    finally:
        gc.unfreeze()  # this test process is not a server: give pytest its collector back
