"""What a request returns: `Delta` per streamed response, `Completion` for a whole generation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class Logprob:
    token_id: int
    token: str  # the token's text alone (a byte of a longer character shows as U+FFFD)
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs(Logprob):
    """A generated token's logprob and the most likely tokens at its position, best first: the
    model's raw distribution, before temperature, top-k/top-p and penalties. `rank` is the token's
    place in that distribution (1: the most likely), None when the server does not send it."""
    top_logprobs: Tuple[Logprob, ...] = ()
    rank: Optional[int] = None


@dataclass(frozen=True)
class Delta:
    """One streamed piece of a completion.

    `finish_reason` is None until the last delta ("stop", "length" or "cancelled"). `token_ids` and
    the token counts are empty/None when the server does not send those optional outputs.
    `num_output_tokens` counts this delta's tokens (a whole generation's delta: all of them);
    `num_cached_tokens`: prompt tokens the server found in its prefix cache.
    `logprobs`: with the `logprobs` sampling parameter, one per token id (an EOS too); else None.
    """
    text: str
    token_ids: Tuple[int, ...] = ()
    finish_reason: Optional[str] = None
    num_input_tokens: Optional[int] = None
    num_output_tokens: Optional[int] = None
    logprobs: Optional[Tuple[TokenLogprobs, ...]] = None
    num_cached_tokens: Optional[int] = None


@dataclass(frozen=True)
class Completion:
    """A whole generation (the prompt is never included). `num_output_tokens` counts all of it."""
    text: str
    finish_reason: Optional[str]
    num_input_tokens: Optional[int]
    num_output_tokens: Optional[int]
    token_ids: Tuple[int, ...] = ()
    logprobs: Optional[Tuple[TokenLogprobs, ...]] = None  # as Delta's
    num_cached_tokens: Optional[int] = None  # as Delta's


class CompletionBuilder:
    """Folds deltas into a `Completion`; the sync and async clients share it."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason: Optional[str] = None
        self.num_input_tokens: Optional[int] = None
        self.num_output_tokens: Optional[int] = None  # the sum of the deltas' counts
        self.num_cached_tokens: Optional[int] = None
        self.logprobs: Optional[list[TokenLogprobs]] = None

    def add(self, delta: Delta) -> None:
        self.parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(delta.logprobs)
        self.finish_reason = delta.finish_reason or self.finish_reason
        if delta.num_input_tokens is not None:
            self.num_input_tokens = delta.num_input_tokens
        if delta.num_output_tokens is not None:
            self.num_output_tokens = (self.num_output_tokens or 0) + delta.num_output_tokens
        if delta.num_cached_tokens is not None:
            self.num_cached_tokens = delta.num_cached_tokens

    def build(self) -> Completion:
        num_output = self.num_output_tokens
        if num_output is None and self.token_ids:
            num_output = len(self.token_ids)
        return Completion("".join(self.parts), self.finish_reason, self.num_input_tokens,
                          num_output, tuple(self.token_ids),
                          None if self.logprobs is None else tuple(self.logprobs), self.num_cached_tokens)
