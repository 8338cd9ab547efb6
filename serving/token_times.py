"""When a request's tokens went out: its time to first token and inter-token gaps, for the metrics.

Plain arithmetic on the times the Triton model passes in, so it is tested without a server or a clock.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TokenTimes:
    submitted: float  # time.monotonic() when the request was submitted
    ttft_s: Optional[float] = None
    inter_token_s: list[float] = field(default_factory=list)
    last_token_at: Optional[float] = None

    def note(self, count: int, now: float) -> None:
        """`count` tokens go out at `now`. A gap g before k tokens counts as k inter-token gaps of g/k
        (as benchmarks/stats.py's Timeline counts them), so merged responses hide no tokens; the
        first k tokens are the first token and k - 1 gaps of nothing."""
        if self.last_token_at is None:
            self.ttft_s = now - self.submitted
            self.inter_token_s.extend([0.0] * (count - 1))
        else:
            self.inter_token_s.extend([(now - self.last_token_at) / count] * count)
        self.last_token_at = now
