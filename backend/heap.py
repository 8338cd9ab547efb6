"""Keep Python's cyclic garbage collector off a serving process's hot path.

A started engine process holds ~250k Python objects (torch, transformers, the model's modules); a
Triton stub about as many. Every step allocates (chunks, layouts, deltas), and each time the
youngest generations overflow into the oldest, a full collection walks all of them: 98.6 and
106.3 ms on the CPU VM, one every ~11 s, in an engine process serving 256 sequences; a pause of the
engine loop, or of the responders, that lands on one step or one round at random. Frozen, those objects are never
walked again (they are not freed either: they live as long as the process anyway). vLLM's engine
core does the same after its start.

The young generation is collected when the tracked objects allocated and not yet freed pass its
threshold (700 by default). A step at 256 sequences allocates a few thousand and frees nearly all of
them by reference counting before the next (benchmarks/engine_host.py: not one collection in 8 s
with a threshold of 20,000), but its peak passes 700 twice a step: ~760 young collections a second
that found next to nothing, 4% of the engine process's time. So the threshold is raised past a
step's peak; cyclic garbage then waits for 20,000 net allocations, not 700.
"""
from __future__ import annotations

import contextlib
import gc

YOUNG_GENERATION_THRESHOLD = 20_000


def quiet_collector() -> None:
    """Collect what starting left behind, exempt every object alive now from later collections, and
    collect the young generation only past a step's allocations."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, old)


@contextlib.contextmanager
def collector_quieted():
    """quiet_collector() for a while, in a process that is not a server (a benchmark measuring a
    server's process): afterwards nothing is frozen and the thresholds are what they were."""
    threshold = gc.get_threshold()
    quiet_collector()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
