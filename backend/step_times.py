"""Where the engine thread's steps spend their time, summed since the engine started.

Under load the engine delivers tokens more slowly than its decode step alone would allow; these sums
split each step into its phases so a benchmark can say which one (benchmarks/run.py reports them per
step for the in-process engine). Host phases are wall-clock on the engine thread; on a GPU the
forward is also timed on the device (CUDA events). With steps overlapped (async scheduling), the
host phases of one step run while the GPU computes the one before, and `wait_s` is the time the
engine thread had nothing left to do but wait for a step's tokens: small when the GPU is the
bottleneck, zero when the host is.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class StepTimes:
    steps: int = 0
    mixed_steps: int = 0  # steps holding a prefill chunk (the rest are decode-only)
    schedule_s: float = 0.0  # Scheduler.schedule
    prepare_s: float = 0.0  # build_step: the layout and its one host-to-device copy
    forward_s: float = 0.0  # launching the forward: a graph replay (with its input copies) or eager
    sample_s: float = 0.0  # launching the sampler and the copy of its ids to the host
    wait_s: float = 0.0  # waiting for a step's sampled ids to reach the host
    update_s: float = 0.0  # Scheduler.update and each request's delta made
    gpu_forward_s: float = 0.0  # the forward on the device (CUDA events); 0 on CPU
    propose_s: float = 0.0  # speculative decoding's proposer, before schedule (a draft model's forwards)
    publish_s: float = 0.0  # the deltas handed over (an engine process pickles them onto the pipe to its parent)

    def since(self, earlier: "StepTimes") -> "StepTimes":
        """The times of the steps taken after `earlier` (a copy taken then)."""
        return StepTimes(**{f.name: getattr(self, f.name) - getattr(earlier, f.name)
                            for f in dataclasses.fields(self)})

    def per_step_ms(self) -> dict:
        """Mean milliseconds per step of each phase, and the step counts."""
        n = max(self.steps, 1)
        return {"steps": self.steps, "mixed_steps": self.mixed_steps,
                **{f.name[:-2] + "_ms": 1e3 * getattr(self, f.name) / n for f in dataclasses.fields(self)
                   if f.name.endswith("_s")}}
