"""Keep Python's cyclic garbage collector off the objects a process made while starting.

A started engine process holds ~250k Python objects (torch, transformers, the model's modules); a
Triton stub about as many. Every step allocates (chunks, layouts, deltas), and each time the
youngest generations overflow into the oldest, a full collection walks all of them: 98.6 and
106.3 ms on the CPU VM, one every ~11 s, in an engine process serving 256 sequences; a pause of the
engine loop, or of the responders, that lands on one step or one round at random. Frozen, those objects are never
walked again (they are not freed either: they live as long as the process anyway). vLLM's engine
core does the same after its start.
"""
from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what starting left behind, then exempt every object alive now from later collections."""
    gc.collect()
    gc.freeze()
