"""The engine's step timing (backend/step_times.py): every step is counted once, its phases add up
to no more than the wall time the engine spent, and prefill-holding steps are told apart."""
import time

from backend.loader import start_engine
from backend.params import EngineConfig, SamplingParams
from backend.step_times import StepTimes


def test_phases_are_counted_per_step_and_fit_in_the_wall_time(servable_checkpoint):
    engine = start_engine(EngineConfig(checkpoint=str(servable_checkpoint), max_num_batched_tokens=16))
    try:
        before = engine.stats().step_times
        start = time.perf_counter()
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        # A 40-token prompt in 16-token chunks beside a running request: mixed and decode-only steps.
        first = engine.submit("one two three", params)
        second = engine.submit(" ".join(["word"] * 40), params)
        first.result(), second.result()
        wall = time.perf_counter() - start
        times = engine.stats().step_times.since(before)
    finally:
        engine.shutdown()
    assert times.steps >= 6 + 2 and 1 <= times.mixed_steps < times.steps
    phases = times.schedule_s + times.prepare_s + times.forward_s + times.sample_s + times.wait_s + times.update_s \
        + times.publish_s
    assert 0 < phases <= wall and times.publish_s > 0
    assert times.gpu_forward_s == 0  # CPU: no device timing
    per_step = times.per_step_ms()
    assert per_step["steps"] == times.steps and abs(per_step["forward_ms"] - 1e3 * times.forward_s / times.steps) < 1e-9


def test_since_subtracts_every_field():
    later = StepTimes(steps=5, mixed_steps=2, schedule_s=1.0, prepare_s=2.0, forward_s=3.0, sample_s=4.0, wait_s=7.0,
                      update_s=5.0, gpu_forward_s=6.0, publish_s=8.0)
    earlier = StepTimes(steps=1, mixed_steps=1, schedule_s=0.5, prepare_s=0.5, forward_s=0.5, sample_s=0.5, wait_s=0.5,
                        update_s=0.5, gpu_forward_s=0.5, publish_s=0.5)
    assert later.since(earlier) == StepTimes(4, 1, 0.5, 1.5, 2.5, 3.5, 6.5, 4.5, 5.5, publish_s=7.5)
