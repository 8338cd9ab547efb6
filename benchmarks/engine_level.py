"""Engine level: our engine against HF `generate` on the same weights and dtype, in one process.

For each batch size b the same b prompts (token ids, so both sides do identical work) go to:
- `engine`: submitted together, continuous batching decodes them in one step each;
- `hf_sequential`: HF `generate` on one request after another (b=1 is the single-stream baseline);
- `hf_batched`: one HF `generate` on all b, left-padded.
Every request generates exactly `max_tokens` tokens (greedy, EOS ignored). Each repetition runs every
(system, b) once, each engine run next to its HF baselines, and odd repetitions run in reverse order, so
on a noisy machine the baseline and the candidate see the same conditions; results are medians over
repetitions, and `paired_ratios` gives the per-repetition ratios as well.
"""
from __future__ import annotations

import queue
import time
from typing import Callable, Iterator

import torch

from .stats import Timeline, batch_metrics, median, ratio

# Eight prompts of 6 to 22 tokens (Gemma 3 tokenizer, with BOS): b requests use the first b.
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest,",
    "Explain in simple terms why the sky is blue during the day and red at sunset.",
    "A haiku about the sea:",
    "The three most important things to know about photosynthesis are",
    "Translate to German: The weather is nice today, so we are going for a walk in the park.",
    "List of prime numbers: 2, 3, 5, 7,",
]
BATCH_SIZES = (1, 4, 8)


class _ArrivalStreamer:
    """HF streamer that notes when each generated step's tokens reach the host (the first `put` is
    the prompt). Quacks like transformers' BaseStreamer: generate only calls put() and end()."""

    def __init__(self, timelines: list[Timeline]):
        self.timelines, self._prompt_seen = timelines, False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        now = time.perf_counter()
        for t in self.timelines:
            t.arrivals.append((now, 1))

    def end(self) -> None:
        pass


def load_hf(checkpoint, dtype: torch.dtype, device: torch.device) -> "torch.nn.Module":
    """The HF model of `checkpoint` in the engine's dtype, on the engine's device."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # generation-config notices on every call
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()


def hf_generate(model, prompts: list[list[int]], max_tokens: int, pad_id: int) -> list[Timeline]:
    """One HF `generate` call on `prompts` (left-padded when several); one timeline per prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    start = time.perf_counter()
    timelines = [Timeline(start) for _ in prompts]
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                       do_sample=False, pad_token_id=pad_id, streamer=_ArrivalStreamer(timelines))
    return timelines


def engine_generate(engine, prompts: list[list[int]], max_tokens: int, timeout_s: float = 600) -> list[Timeline]:
    """Submit all `prompts` at once; one timeline per request, stamped when the engine thread reports
    new tokens (read, as a server's responder reads them, by one consumer thread)."""
    from backend.params import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ready: queue.SimpleQueue = queue.SimpleQueue()  # (time, handle, timeline) from the engine thread

    timelines = []
    for p in prompts:
        timelines.append(Timeline(time.perf_counter()))
        engine.submit(p, params, on_ready=lambda handle, t=timelines[-1]: ready.put((time.perf_counter(), handle, t)))
    deadline = time.monotonic() + timeout_s
    pending = len(prompts)
    while pending:
        try:
            stamp, handle, timeline = ready.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            raise TimeoutError(f"engine did not finish {len(prompts)} requests in {timeout_s} s") from None
        out = handle.poll()
        if out is None:
            continue
        if out.token_ids:
            timeline.arrivals.append((stamp, len(out.token_ids)))
        if out.finish_reason is not None:
            pending -= 1
            if out.finish_reason not in ("length", "stop"):
                timeline.error = out.error or out.finish_reason
    failed = [t.error for t in timelines if t.error]
    if failed:
        raise RuntimeError(f"engine requests failed: {failed}")
    return timelines


def _wall(timelines: list[Timeline]) -> float:
    return max(t.end for t in timelines) - min(t.start for t in timelines)


def run(engine, hf_model, max_tokens: int, reps: int, batch_sizes=BATCH_SIZES, single_pairs: int = 1,
        progress: Callable[[str], None] = lambda s: None) -> Iterator[dict]:
    """Yield one record per (repetition, system, batch size), after a short warm-up.

    A repetition is a list of small runs placed so that each engine run sits next to its baselines:
    for each b, HF's sequential requests up to b (request i is run once and reused by every larger b),
    then the engine on b requests, then HF batched on b. Single-stream runs are short and the noisiest,
    so `single_pairs` > 1 adds more (engine b=1, HF b=1) pairs, recorded with `pair` 1, 2, ...
    Odd repetitions run the list backwards."""
    sizes = sorted(batch_sizes)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS[:sizes[-1]]]
    pad_id = engine.tokenizer.hf_tokenizer.pad_token_id or 0

    def hf(n):
        return lambda: hf_generate(hf_model, prompts[:n], max_tokens, pad_id)

    def ours(n):
        return lambda: engine_generate(engine, prompts[:n], max_tokens)

    units, done = [], 0  # (label, key, callable)
    for b in sizes:
        units += [(f"HF request {i + 1}", ("hf_request", i),
                   lambda i=i: hf_generate(hf_model, [prompts[i]], max_tokens, pad_id)) for i in range(done, b)]
        units.append((f"engine b={b}", ("engine", b), ours(b)))
        if b > 1:
            units.append((f"HF batched b={b}", ("hf_batched", b), hf(b)))
        if b == 1:
            for k in range(1, single_pairs):
                units += [(f"engine b=1 (pair {k + 1})", ("engine_pair", k), ours(1)),
                          (f"HF b=1 (pair {k + 1})", ("hf_pair", k), hf(1))]
        done = b

    progress("engine level: warm-up (engine and HF, single and batched)")
    engine_generate(engine, prompts[:1], 4)
    engine_generate(engine, prompts, 4)
    hf_generate(hf_model, prompts[:1], 4, pad_id)
    hf_generate(hf_model, prompts, 4, pad_id)
    for rep in range(reps):
        results = {}
        for label, key, unit in (units if rep % 2 == 0 else units[::-1]):
            progress(f"engine level: rep {rep + 1}/{reps}: {label}, {max_tokens} tokens each")
            results[key] = unit()
        measured = []  # (system, b, pair, timelines, wall or None, requests decoded per step)
        for b in sizes:
            runs = [results[("hf_request", i)] for i in range(b)]
            measured += [("engine", b, 0, results[("engine", b)], None, b),
                         ("hf_sequential", b, 0, [t for r in runs for t in r], sum(_wall(r) for r in runs), 1)]
            if b > 1:
                measured.append(("hf_batched", b, 0, results[("hf_batched", b)], None, b))
        for k in range(1, single_pairs if 1 in sizes else 1):
            measured += [("engine", 1, k, results[("engine_pair", k)], None, 1),
                         ("hf_sequential", 1, k, results[("hf_pair", k)], None, 1)]
        for system, b, pair, timelines, wall, in_flight in measured:
            yield {"type": "engine", "system": system, "batch_size": b, "rep": rep, "pair": pair,
                   "max_tokens": max_tokens,
                   **batch_metrics(timelines, wall if wall is not None else _wall(timelines), in_flight)}


def table(records: list[dict]) -> list[dict]:
    """Medians over all runs per (system, batch size)."""
    keys = sorted({(r["system"], r["batch_size"]) for r in records})
    rows = []
    for system, b in keys:
        mine = [r for r in records if (r["system"], r["batch_size"]) == (system, b)]
        row = {"system": system, "batch_size": b, "runs": len(mine)}
        for metric in ("total_tok_s", "decode_tok_s", "step_ms", "ttft_ms"):
            row[metric] = median([r[metric] for r in mine if r[metric] is not None])
        rows.append(row)
    return rows


def ratios(rows: list[dict], batch_sizes=BATCH_SIZES) -> dict:
    """The goals' ratios from the median table: single-stream decode, and total tok/s at the largest b
    against HF running the requests one after another; plus every b against both HF baselines."""
    def get(system, b, metric):
        return next((r[metric] for r in rows if r["system"] == system and r["batch_size"] == b), None)
    top = max(batch_sizes)
    out = {
        "engine_vs_hf_single": ratio(get("engine", 1, "decode_tok_s"), get("hf_sequential", 1, "decode_tok_s")),
        "engine_vs_hf_single_total": ratio(get("engine", 1, "total_tok_s"), get("hf_sequential", 1, "total_tok_s")),
        "engine_vs_hf_concurrent": ratio(get("engine", top, "total_tok_s"), get("hf_sequential", top, "total_tok_s")),
        "engine_vs_hf_batched": ratio(get("engine", top, "total_tok_s"), get("hf_batched", top, "total_tok_s")),
    }
    out["engine_vs_hf_by_batch"] = {
        str(b): {"vs_sequential": ratio(get("engine", b, "total_tok_s"), get("hf_sequential", b, "total_tok_s")),
                 "vs_batched": ratio(get("engine", b, "total_tok_s"), get("hf_batched", b, "total_tok_s"))}
        for b in batch_sizes}
    return out


def paired_ratios(records: list[dict], batch_sizes=BATCH_SIZES) -> dict:
    """The two goal ratios for each engine run and the baseline run next to it (same repetition and
    pair), and their median: a check on the ratio of medians when the machine's load drifts."""
    def get(system, b, key, metric):
        return next((r[metric] for r in records
                     if (r["system"], r["batch_size"], r["rep"], r.get("pair", 0)) == (system, b, *key)), None)
    top = max(batch_sizes)
    out = {}
    for name, b, metric in (("engine_vs_hf_single", 1, "decode_tok_s"),
                            ("engine_vs_hf_concurrent", top, "total_tok_s")):
        keys = sorted({(r["rep"], r.get("pair", 0)) for r in records if r["batch_size"] == b})
        pairs = [ratio(get("engine", b, key, metric), get("hf_sequential", b, key, metric)) for key in keys]
        out[name] = {"pairs": pairs, "median": median([x for x in pairs if x is not None])}
    return out
