"""Speculative decoding: guessing a sequence's next tokens so that one step can verify several.

Before a step, the engine core asks the proposer for each speculating sequence's drafts (its guess
of the tokens that follow); the scheduler gives that sequence a verify chunk (its last token and the
drafts, all needing logits), the sampler accepts the longest prefix of drafts that the model's own
choice agrees with and adds the model's next token after it (backend/sampling.py), and the scheduler
rolls back the K/V of what was rejected. The output is what the sequence would have generated one
token per step; only the number of steps changes.

A proposer is one small interface (`Proposer`): `start` a sequence's state when it is added,
`propose` drafts for a step's speculating sequences at once (each a `DraftRequest`: its state, its
tokens so far, how many drafts at most), `release` what a state holds when its sequence finishes or is
preempted. Two are built:
- `NgramProposer` (vLLM's method "ngram", prompt lookup): the tokens that followed the most recent
  earlier occurrence of the sequence's last n tokens, the longest n in [prompt_lookup_min,
  prompt_lookup_max] that occurs, on the host from the token ids. Edits, summaries that quote, code that
  repeats its identifiers: the output copies spans of the context, and the spans are found here.
- `DraftModelProposer` (vLLM's "draft_model", backend/draft_model.py): a smaller checkpoint with the
  same vocabulary, run by the same runner code with a KV cache of its own, proposes greedily, all the
  step's sequences in one batch per draft position.
An EAGLE-style head fits the same interface: a draft model whose forward also reads the target's
hidden states, which the runner would hand over with the tokens of the step just verified.

Adaptive (`Speculation`): each sequence tracks how many of its drafts a verify step accepts, and
which fraction of them (exponential averages). It proposes one more than the average accepted, up to
num_speculative_tokens, so drafts that keep failing cost fewer verify rows; and a sequence whose
drafts stay unrewarding, or whose lookups keep finding nothing, pauses speculating for a while
(doubling each time), so text with nothing to look up runs as it would without speculation: no
verify rows to compute and, on a GPU, overlapped steps again (a speculating sequence runs its steps
one at a time: engine_core.py). What counts as unrewarding grows with the batch: alone, a sequence's
step costs about the same with a few more rows, so any accepted draft is a gain; beside others, its
rejected drafts' rows add to a step every sequence waits for.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Protocol, Sequence as Seq

from .params import SpeculativeConfig

# Adaptivity: exponential averages of the drafts accepted per verify step and of the fraction of its
# drafts accepted, after at least MIN_VERIFIES steps. Below ACCEPT_FLOOR accepted a step, or below
# rate_floor(running sequences) accepted a draft (or after MAX_MISSES lookups in a row that found
# nothing), the sequence stops proposing for `pause` output tokens, FIRST_PAUSE at first, doubled each
# time up to MAX_PAUSE. Measured on the 2-core CPU, Gemma 3 270M at context 500: a verify step of 1 + 2
# tokens costs ~1.2-1.4x a decode step alone, 1.4x for 8 sequences at once (1 + 4 tokens: 1.5x and
# 1.9x); alone it yields 1 + the accepted drafts, so half a token accepted a step about pays for it.
# With 8 sequences, drafts accepted at a rate of 0.37-0.44 (the sampled "free" workload of
# benchmarks/speculative.py) made the runs 0.84-0.92x as fast, at 0.84-0.92 (the edit workload)
# 1.0-1.5x: a verify row costs a forward row and, for a sampled request, a sampler row (softmax and
# top-p over 262k logits: 8 sampled sequences verifying 1-4 drafts took 510 ms a step to sample
# where 8 decodes took 348, on a loaded machine), and 8 sequences finish together only when the
# slowest does. RATE_FLOOR * (1 - 1/running) is 0 alone and 0.53 for 8. The floors are the CPU's;
# on a GPU at small batch a verify step should cost about what a decode step does (not measured yet).
ACCEPT_EMA = 0.5  # weight of the newest verify step
ACCEPT_FLOOR = 0.5
RATE_FLOOR = 0.6
MIN_VERIFIES = 3
MAX_MISSES = 8
FIRST_PAUSE = 16
MAX_PAUSE = 256
# Occurrences of the last prompt_lookup_min tokens examined per lookup, most recent first: bounds a
# lookup's cost in text where a short n-gram recurs thousands of times.
MAX_CANDIDATES = 16


@dataclass(frozen=True)
class SpecDecodeStats:
    """Since the engine started (engine.stats().spec_decode), with vLLM's spec_decode_* meanings: a
    draft is one sequence's proposal verified in one step."""
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: tuple[int, ...] = ()  # [i]: drafts whose i-th token (0-based) was accepted

    def plus(self, num_draft_tokens: int, num_accepted: int, positions: int) -> "SpecDecodeStats":
        per_pos = list(self.num_accepted_tokens_per_pos) + [0] * (positions - len(self.num_accepted_tokens_per_pos))
        for i in range(num_accepted):
            per_pos[i] += 1
        return replace(self, num_drafts=self.num_drafts + 1, num_draft_tokens=self.num_draft_tokens + num_draft_tokens,
                       num_accepted_tokens=self.num_accepted_tokens + num_accepted,
                       num_accepted_tokens_per_pos=tuple(per_pos))

    @property
    def acceptance_rate(self) -> Optional[float]:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None


@dataclass
class Speculation:
    """One sequence's speculation: its proposer's state and how its drafts have fared."""
    state: object  # the proposer's (NgramProposer: a NgramIndex)
    max_drafts: int  # num_speculative_tokens
    accepted_avg: float = -1.0  # drafts accepted per verify step, exponentially averaged (at first: all of them)
    rate_avg: float = 1.0  # the fraction of a verify step's drafts accepted, exponentially averaged
    num_verifies: int = 0
    misses: int = 0  # lookups in a row that proposed nothing
    paused_until: int = 0  # proposes again once the sequence has this many output tokens
    pause: int = FIRST_PAUSE

    def __post_init__(self) -> None:
        self.accepted_avg = float(self.max_drafts)

    def active(self, num_output_tokens: int) -> bool:
        return num_output_tokens >= self.paused_until

    @property
    def num_drafts(self) -> int:
        """Drafts to propose next: one more than the average accepted (rounded), within
        num_speculative_tokens; a sequence whose drafts are all accepted proposes more."""
        return max(1, min(self.max_drafts, round(self.accepted_avg) + 1))

    def record_miss(self, num_output_tokens: int) -> None:
        self.misses += 1
        if self.misses >= MAX_MISSES:
            self._pause(num_output_tokens)

    def record_verify(self, num_drafts: int, num_accepted: int, num_output_tokens: int, num_running: int = 1) -> None:
        """A verify step of `num_drafts` drafts accepted `num_accepted`, in a batch of `num_running` sequences."""
        self.misses = 0
        self.num_verifies += 1
        self.accepted_avg += ACCEPT_EMA * (num_accepted - self.accepted_avg)
        self.rate_avg += ACCEPT_EMA * (num_accepted / num_drafts - self.rate_avg)
        if self.num_verifies >= MIN_VERIFIES and (self.accepted_avg < ACCEPT_FLOOR
                                                  or self.rate_avg < rate_floor(num_running)):
            self._pause(num_output_tokens)

    def _pause(self, num_output_tokens: int) -> None:
        self.paused_until = num_output_tokens + self.pause
        self.pause = min(2 * self.pause, MAX_PAUSE)
        # Back on probation: a few verifies decide again.
        self.misses, self.num_verifies, self.accepted_avg, self.rate_avg = 0, 0, float(self.max_drafts), 1.0


def rate_floor(num_running: int) -> float:
    """The fraction of drafts a sequence must have accepted to keep speculating beside `num_running` - 1 others."""
    return RATE_FLOOR * (1 - 1 / max(num_running, 1))


@dataclass(frozen=True)
class DraftRequest:
    """One speculating sequence's ask for drafts."""
    state: object  # what the proposer's `start` made for it
    token_ids: Seq[int]  # its tokens so far (they only grow between calls)
    max_tokens: int  # drafts it can use at most (>= 1)


class Proposer(Protocol):
    def start(self, token_ids: Seq[int]) -> object:
        """A new sequence's proposer state (its prompt's tokens so far)."""

    def propose(self, requests: Seq[DraftRequest]) -> list[list[int]]:
        """Each request's guesses of the tokens after its `token_ids`, at most `max_tokens`; [] when
        there is nothing to propose."""

    def release(self, state: object) -> None:
        """The sequence finished, or was preempted (it may propose again later, from its tokens then):
        free what its state holds."""


@dataclass
class NgramIndex:
    """Where each n-gram of prompt_lookup_min tokens ended in a sequence, indexed as it grows."""
    ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    num_indexed: int = 0  # n-grams ending before this position are in `ends`


class NgramProposer:
    """Prompt lookup over the sequence's own tokens (prompt and output), on the host."""

    def __init__(self, config: SpeculativeConfig):
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max

    def start(self, token_ids: Seq[int]) -> NgramIndex:
        return NgramIndex()

    def propose(self, requests: Seq[DraftRequest]) -> list[list[int]]:
        return [self.lookup(r.state, r.token_ids, r.max_tokens) for r in requests]

    def release(self, state: NgramIndex) -> None:
        """Nothing to free: the index is host memory that goes with the sequence, and stays valid
        across a preemption (the sequence's tokens do not change)."""

    def lookup(self, state: NgramIndex, token_ids: Seq[int], max_tokens: int) -> list[int]:
        """At most `max_tokens` tokens that followed the longest recent match of the sequence's last tokens."""
        n, length = self.min_n, len(token_ids)
        if length <= n or max_tokens < 1:
            return []
        # Index every n-gram that ends before the last token: those are the earlier occurrences.
        ends = state.ends
        for end in range(max(state.num_indexed, n - 1), length - 1):
            ends.setdefault(tuple(token_ids[end - n + 1:end + 1]), []).append(end)
        state.num_indexed = length - 1
        found = ends.get(tuple(token_ids[length - n:]))
        if not found:
            return []
        best, best_len = -1, 0
        for end in reversed(found[-MAX_CANDIDATES:]):  # most recent first: a tie keeps the most recent
            matched = n
            while (matched < self.max_n and end - matched >= 0
                   and token_ids[end - matched] == token_ids[length - 1 - matched]):
                matched += 1
            if matched > best_len:
                best, best_len = end, matched
                if matched == self.max_n:
                    break
        return list(token_ids[best + 1:best + 1 + max_tokens])
