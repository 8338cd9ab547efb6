"""Host work per decode step at many running sequences, with the startup heap walked by the garbage
collector and frozen (backend/heap.py), in one process, one engine, back to back.

    python -m benchmarks.host_step [--sequences 256] [--steps 40] [--checkpoint DIR]

The engine runs in this process (its core on a thread), the way the Triton stub hosts one with
GEMMA_ENGINE_PROCESS=0 and beside the same ~250k objects (torch, transformers, the tokenizer). N
greedy requests decode together; after a few warm-up steps the engine's own step phases
(backend/step_times.py) are read over `--steps` steps, every full (generation 2) garbage collection
that falls in that window is timed, and then one full collection is made and timed (the median of
three): the pause each of them costs every thread of the process. Then the same again after
`quiet_collector()`. How often full collections come depends on how many objects survive the
young generations (in an engine process at 256 sequences on the CPU VM: one every ~11 s). The host
phases (schedule, prepare, update) do not depend on the device, so the CPU shows what a GPU step
pays for them; the forward and sampling rows are the CPU's own. Without --checkpoint: a tiny
Gemma with the packaged model's tokenizer (tests/tiny_models.py), so the forward stays short.
Prints one JSON line per run, then their ratios.
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

HOST_PHASES = ("schedule_ms", "prepare_ms", "update_ms", "publish_ms")


class FullCollections:
    """Generation-2 collections while installed: how many and how long."""

    def __init__(self):
        self.pauses_ms: list[float] = []
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses_ms.append(1e3 * (time.perf_counter() - self._start))

    def __enter__(self) -> "FullCollections":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)


def measure(engine, sequences: int, warm_steps: int, steps: int) -> dict:
    """Per-step phases over `steps` steps with `sequences` requests decoding, and the full collections."""
    from backend.params import SamplingParams

    params = SamplingParams(max_tokens=warm_steps + steps + 8, temperature=0, ignore_eos=True)
    handles = [engine.submit(f"Request {i} says hello", params) for i in range(sequences)]
    start_steps = engine.stats().step_times.steps
    while engine.stats().step_times.steps < start_steps + warm_steps:
        time.sleep(0.005)
    with FullCollections() as collections:
        before, wall = engine.stats().step_times, time.perf_counter()
        while engine.stats().step_times.steps < before.steps + steps:
            time.sleep(0.005)
        window = engine.stats().step_times.since(before)
        wall = time.perf_counter() - wall
    for handle in handles:
        handle.result()
    per_step = window.per_step_ms()
    pauses = []
    for _ in range(3):  # what one full collection stops every thread of the process for, now
        started = time.perf_counter()
        gc.collect()
        pauses.append(1e3 * (time.perf_counter() - started))
    return {"sequences": sequences, "steps": window.steps,
            **{k: round(v, 3) for k, v in per_step.items() if k.endswith("_ms") and v},
            "host_ms": round(sum(per_step[k] for k in HOST_PHASES), 3),
            "wall_ms_per_step": round(1e3 * wall / window.steps, 2),
            "full_collections": len(collections.pauses_ms),  # those that fell in the window
            "full_collection_ms": [round(p, 1) for p in collections.pauses_ms],
            "one_full_collection_ms": round(sorted(pauses)[1], 2),
            "tracked_objects": len(gc.get_objects())}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=256)
    p.add_argument("--steps", type=int, default=40, help="measured steps per run")
    p.add_argument("--warm-steps", type=int, default=6)
    p.add_argument("--checkpoint", type=Path, help="default: a tiny Gemma with the packaged tokenizer")
    args = p.parse_args(argv)
    from backend.default_model import ensure_default_checkpoint
    from backend.heap import collector_quieted
    from backend.loader import start_engine
    from backend.params import EngineConfig

    checkpoint = args.checkpoint
    if checkpoint is None:
        from tests.tiny_models import write_checkpoint
        checkpoint = write_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "gemma",
                                      tokenizer_dir=ensure_default_checkpoint())
    engine = start_engine(EngineConfig(checkpoint=str(checkpoint), max_num_seqs=args.sequences,
                                       max_num_batched_tokens=max(512, 32 * args.sequences), kv_cache_bytes=1 << 28))
    try:
        runs = [{"heap": "as started", **measure(engine, args.sequences, args.warm_steps, args.steps)}]
        with collector_quieted():
            runs.append({"heap": "frozen", **measure(engine, args.sequences, args.warm_steps, args.steps)})
    finally:
        engine.shutdown()
    for run in runs:
        print(json.dumps(run), flush=True)
    walked, frozen = runs
    print(json.dumps({"host_ms_frozen_over_walked": round(frozen["host_ms"] / walked["host_ms"], 3),
                      "wall_per_step_frozen_over_walked": round(frozen["wall_ms_per_step"] / walked["wall_ms_per_step"], 3),
                      "full_collection_frozen_over_walked": round(frozen["one_full_collection_ms"]
                                                                  / walked["one_full_collection_ms"], 4)}))
    return runs


if __name__ == "__main__":
    main()
