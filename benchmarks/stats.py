"""The arithmetic of the benchmarks, kept pure (no torch, no clocks) so tests can check it on known inputs.

A generation is a `Timeline`: when it started and when each batch of its tokens arrived. Everything
reported - time to first token, inter-token latency, tokens/s - is computed from timelines here.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence


@dataclass
class Timeline:
    """One request: `start` (s), then `arrivals` = (time, tokens) per delivery, in order.

    A delivery may hold several tokens (a streamed delta that waited for a whole UTF-8 character);
    `error` is set when the request failed, with whatever arrived before.
    """
    start: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.arrivals)

    @property
    def end(self) -> float:
        return self.arrivals[-1][0] if self.arrivals else self.start

    @property
    def ttft(self) -> Optional[float]:
        """Seconds from start to the first token (None if none arrived)."""
        return self.arrivals[0][0] - self.start if self.arrivals else None

    def inter_token(self) -> list[float]:
        """Per-token gaps after the first token: a delivery of k tokens after a gap g counts as k
        gaps of g/k, so a batched delivery neither hides nor inflates its tokens."""
        gaps = []
        for (t0, _), (t1, n) in zip(self.arrivals, self.arrivals[1:]):
            gaps.extend([(t1 - t0) / n] * n)
        return gaps


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100), linear between order statistics (numpy's default); None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return None
    rank = q / 100 * (len(xs) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def median(values: Sequence[float]) -> Optional[float]:
    return percentile(values, 50)


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def distribution(values: Sequence[float], scale: float = 1.0) -> dict[str, Optional[float]]:
    """p50/p90/p99/mean/n of `values`, each multiplied by `scale` (1e3: seconds -> ms)."""
    def scaled(x):
        return None if x is None else x * scale
    return {"p50": scaled(percentile(values, 50)), "p90": scaled(percentile(values, 90)),
            "p99": scaled(percentile(values, 99)),
            "mean": scaled(sum(values) / len(values)) if values else None, "n": len(values)}


def summarize_requests(timelines: Sequence[Timeline], wall_s: float) -> dict[str, Any]:
    """What a load run reports: request counts, errors, output tokens/s over `wall_s`, and TTFT and
    inter-token latency distributions in ms (failed requests count as errors, not in latencies)."""
    ok = [t for t in timelines if t.error is None]
    errors: dict[str, int] = {}
    for t in timelines:
        if t.error is not None:
            errors[t.error] = errors.get(t.error, 0) + 1
    tokens = sum(t.num_tokens for t in timelines)
    return {
        "requests": len(timelines), "errors": sum(errors.values()), "error_kinds": errors,
        "output_tokens": tokens, "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_ms": distribution([t.ttft for t in ok if t.ttft is not None], 1e3),
        "itl_ms": distribution([g for t in ok for g in t.inter_token()], 1e3),
    }


def batch_metrics(timelines: Sequence[Timeline], wall_s: float, in_flight: int) -> dict[str, Any]:
    """Engine-level numbers for requests run together (or one after another, `wall_s` summed):
    total tokens/s, median TTFT, median per-step (inter-token) latency, and decode tokens/s =
    `in_flight` (requests decoded per step) / median step latency, which leaves prefill out."""
    steps = [g for t in timelines for g in t.inter_token()]
    step = median(steps)
    tokens = sum(t.num_tokens for t in timelines)
    ttft = median([t.ttft for t in timelines if t.ttft is not None])
    return {
        "output_tokens": tokens, "wall_s": wall_s,
        "total_tok_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_ms": None if ttft is None else ttft * 1e3,
        "step_ms": None if step is None else step * 1e3,
        "decode_tok_s": in_flight / step if step else None,
    }


def poisson_arrivals(rate_per_s: float, count: int, seed: int) -> list[float]:
    """`count` arrival offsets (s, from 0) of a Poisson process at `rate_per_s`; same seed, same list."""
    import random
    if rate_per_s <= 0:
        raise ValueError("rate must be > 0")
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate_per_s)
        times.append(t)
    return times


def _rounded(value: Any, digits: int) -> Any:
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def json_line(record: dict[str, Any], digits: int = 4) -> str:
    """One record as one line of JSON: floats rounded, NaN/inf as null, no newline inside."""
    return json.dumps(_rounded(record, digits), separators=(", ", ": "), allow_nan=False)


def read_json_lines(lines: Iterable[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.strip()]


def read_json_files(paths: Iterable[Path], missing_ok: bool = False) -> list[dict[str, Any]]:
    """The records of JSON-lines files, in order; a line cut short (a killed writer) is skipped, and
    with `missing_ok` a file that does not exist."""
    records = []
    for path in map(Path, paths):
        if missing_ok and not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
