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

Adaptive, by cost (`Speculation`, `DraftControl`): before each proposal a sequence chooses how many
drafts to ask for, 0 (a pause) included, from what a draft has cost the engine's recent steps and how
often its own drafts have been accepted; the model of cost is above `best_num_drafts`. A paused
sequence runs as it would without speculation (no verify rows, no proposals and, on a GPU, overlapped
steps again: a speculating sequence runs its steps one at a time, engine_core.py); after its pause it
probes with a couple of drafts, so it can come back when its text turns repetitive, and pauses twice
as long if they fail again.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Protocol, Sequence as Seq

from .params import SpeculativeConfig

# Adaptivity (the model of cost is above `best_num_drafts`):
SEQ_DECAY = 0.7  # weight of a sequence's earlier draft outcomes at each verify step
ENGINE_DECAY = 0.98  # ... of the engine's (all sequences' verifies), the prior of a new sequence
PRIOR_WEIGHT = 2.0  # draft outcomes the engine's acceptance counts as in a new (or resuming) sequence
STEP_DECAY = 0.95  # weight of earlier steps in the fit of what a step costs (~20 steps remembered)
ROW_PRIOR = 0.2  # a verify row's cost in a sequence's share of a step, as the fit assumes before steps tell
PRIOR_STEPS = 2.0  # ... counted as this many steps (measured steps on the shared CPU vary up to 2x)
# The estimated cost of a draft is raised by this much before it is compared with its acceptance: the
# estimates are noisy, steps that verify cannot overlap the next on a GPU, and the bar is
# asymmetric (text with nothing to look up must not be slower; a few percent of gain may be left).
COST_MARGIN = 0.15
PROBE_DRAFTS = 2  # drafts of the proposal after a pause: enough to see them accepted, few rows if not
MAX_MISSES = 8  # lookups in a row that found nothing pause the sequence
FIRST_PAUSE = 16  # output tokens; doubled at each pause up to MAX_PAUSE
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
    draft_cost: Optional[float] = None  # now: a draft's estimated cost in shares of a step (best_num_drafts' r)

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


def best_num_drafts(acceptance: float, draft_cost: float, num_running: int, max_drafts: int) -> int:
    """How many drafts (0..max_drafts) a sequence should propose. The model of cost:

    A step without drafts costs each of its N decoding sequences a share s = T / N of its wall time
    T. A draft adds the time to propose it (p: ~0 for an n-gram lookup, about a forward of a draft
    model) and its verify row (v: a row through the model and the sampler); `draft_cost` is
    r = (p + v) / s, a draft's cost in shares of a step. If each draft is accepted with probability
    a (`acceptance`) once the one before it was, k drafts give the sequence E_k = 1 + a + ... + a^k
    tokens in the step, and the batch's tokens per second, over a step without them, become
    (N - 1 + E_k) / (N + k r). The k that maximises this is proposed. Since a^j falls with j, some
    k > 0 pays exactly when a > r: a draft must be accepted more often than it costs. r grows with the
    batch (s shrinks as T is shared), so what pays alone may not beside others."""
    best, best_gain = 0, 1.0
    expected = 1.0  # E_k
    for k in range(1, max_drafts + 1):
        expected += acceptance ** k
        gain = (num_running - 1 + expected) / (num_running + k * draft_cost)
        if gain > best_gain:
            best, best_gain = k, gain
    return best


@dataclass
class Acceptance:
    """Drafts accepted and rejections seen, older ones decayed. A verify step's drafts are accepted up
    to the first rejection, so with independent drafts the chance that a draft is accepted once the one
    before it was is accepted / (accepted + rejections) (the maximum-likelihood estimate)."""
    accepted: float = PRIOR_WEIGHT  # nothing seen yet: optimistic, so a new proposer is tried
    rejected: float = 0.0

    @property
    def rate(self) -> float:
        total = self.accepted + self.rejected
        return self.accepted / total if total else 1.0

    def add(self, num_drafts: int, num_accepted: int, decay: float) -> None:
        self.accepted = decay * self.accepted + num_accepted
        self.rejected = decay * self.rejected + (num_accepted < num_drafts)

    def weighing(self, weight: float) -> "Acceptance":
        """The same rate, counted as `weight` outcomes."""
        return Acceptance(weight * self.rate, weight * (1 - self.rate))


class StepCosts:
    """What the engine's decode steps cost, from its own timings, per number N of sequences decoding in
    a step (a step's time grows with N much more slowly than N, so each batch size has its own share s):
    a least-squares fit of each step's wall time less its proposer's, over N, as s + (D / N) v (D drafts
    verified), earlier steps weighing less (STEP_DECAY); and the proposer's seconds per draft. The
    steps alone rarely tell s from v (a sequence proposes the same number of drafts step after step),
    so the fit also counts PRIOR_STEPS steps' worth of v = ROW_PRIOR s; v is kept within [0, s] (a
    verify row costs no more than a sequence's decode row and its share of the step)."""

    def __init__(self) -> None:
        self._sums: dict[int, list[float]] = {}  # N -> decayed sums of 1, x, x^2, y, x y (x = D / N, y = W / N)
        self._propose = [0.0, 0.0]  # decayed proposer seconds, and drafts proposed

    def observe_step(self, num_seqs: int, num_drafts: int, seconds: float) -> None:
        x, y = num_drafts / num_seqs, seconds / num_seqs
        sums = self._sums.setdefault(num_seqs, [0.0] * 5)
        sums[:] = [STEP_DECAY * total + term for total, term in zip(sums, (1.0, x, x * x, y, x * y))]

    def observe_proposal(self, num_drafts: int, seconds: float) -> None:
        self._propose = [STEP_DECAY * self._propose[0] + seconds, STEP_DECAY * self._propose[1] + num_drafts]

    def fit(self, num_seqs: int) -> Optional[tuple[float, float]]:
        """(s, v) for steps of `num_seqs` sequences (the nearest batch size seen), seconds: a sequence's
        share of a step, a verify row; None before any decode step."""
        if not self._sums:
            return None
        n0, nx, nxx, ny, nxy = self._sums[min(self._sums, key=lambda n: (abs(n - num_seqs), n))]
        a, b, c = n0 + PRIOR_STEPS * ROW_PRIOR ** 2, nx - PRIOR_STEPS * ROW_PRIOR, nxx + PRIOR_STEPS  # normal equations
        det = a * c - b * b
        s, v = (c * ny - b * nxy) / det, (a * nxy - b * ny) / det
        s = max(s, 1e-9)
        return s, min(max(v, 0.0), s)

    @property
    def propose_s(self) -> Optional[float]:
        """The proposer's seconds per draft (None before it proposed any)."""
        seconds, drafts = self._propose
        return seconds / drafts if drafts else None

    def draft_cost(self, num_seqs: int) -> Optional[float]:
        """r = (p + v) / s at `num_seqs` sequences, or None before both a step and a proposal were seen."""
        fitted, p = self.fit(num_seqs), self.propose_s
        if fitted is None or p is None:
            return None
        s, v = fitted
        return (p + v) / s


@dataclass
class Speculation:
    """One sequence's speculation: its proposer's state, how its drafts have fared, its pauses."""
    state: object  # the proposer's (NgramProposer: a NgramIndex)
    max_drafts: int  # num_speculative_tokens
    acceptance: Acceptance = field(default_factory=Acceptance)
    misses: int = 0  # lookups in a row that proposed nothing
    paused_until: int = 0  # proposes again once the sequence has this many output tokens
    pause: int = FIRST_PAUSE
    probing: bool = False  # its next proposal follows a pause

    def active(self, num_output_tokens: int) -> bool:
        return num_output_tokens >= self.paused_until

    def plan(self, draft_cost: Optional[float], num_running: int, num_output_tokens: int,
             hopeless: bool = False) -> int:
        """Drafts to propose now, by `best_num_drafts` (`draft_cost` None: not measured yet, propose all it
        may); 0 pauses the sequence. After a pause it probes with PROBE_DRAFTS. Where no draft could pay
        even if every one were accepted (`hopeless`: proposing one costs a whole share, a draft model
        about as slow as the target, or one that must first catch up on what it missed) the pause is
        the longest, MAX_PAUSE: its probes are rare, and they measure the cost again."""
        if draft_cost is None:
            return self.max_drafts
        if self.probing:
            self.probing = False
            return min(PROBE_DRAFTS, self.max_drafts)
        k = best_num_drafts(self.acceptance.rate, draft_cost, num_running, self.max_drafts)
        if not k:
            self._pause(num_output_tokens, longest=hopeless)
        return k

    def record_miss(self, num_output_tokens: int) -> None:
        self.misses += 1
        if self.misses >= MAX_MISSES:
            self._pause(num_output_tokens)

    def record_verify(self, num_drafts: int, num_accepted: int) -> None:
        """A verify step of `num_drafts` drafts accepted `num_accepted`."""
        self.misses = 0
        self.acceptance.add(num_drafts, num_accepted, SEQ_DECAY)

    def _pause(self, num_output_tokens: int, longest: bool = False) -> None:
        self.pause = MAX_PAUSE if longest else self.pause
        self.paused_until = num_output_tokens + self.pause
        self.pause = min(2 * self.pause, MAX_PAUSE)
        # The probe after the pause weighs as much as what came before it.
        self.misses, self.probing, self.acceptance = 0, True, self.acceptance.weighing(PRIOR_WEIGHT)


class DraftControl:
    """The engine's side of adaptivity, for its one proposer: what a draft costs (`StepCosts`, from the
    engine's timings) and how often the proposer's drafts are accepted (all sequences' verifies), the
    starting point of each new sequence: a proposer that cannot pay here leaves new sequences paused
    from their first token. `pinned_cost`, when set, replaces the measured r (tests: step timings
    vary from run to run, and the choice of drafts must not)."""

    def __init__(self, max_drafts: int, pinned_cost: Optional[float] = None):
        self.max_drafts, self.pinned_cost = max_drafts, pinned_cost
        self.costs = StepCosts()
        self.acceptance = Acceptance()

    def start(self, state: object) -> Speculation:
        return Speculation(state, self.max_drafts, self.acceptance.weighing(PRIOR_WEIGHT))

    def draft_cost(self, num_running: int) -> Optional[float]:
        """r with COST_MARGIN at `num_running` sequences, or the pinned one."""
        if self.pinned_cost is not None:
            return self.pinned_cost
        measured = self.costs.draft_cost(num_running)
        return None if measured is None else measured * (1 + COST_MARGIN)

    def plan(self, speculation: Speculation, num_running: int, num_output_tokens: int) -> int:
        """The drafts `speculation`'s sequence proposes now (Speculation.plan), hopeless where proposing
        a draft alone costs a whole share (pinned: where r >= 1)."""
        draft_cost, fitted, p = self.draft_cost(num_running), self.costs.fit(num_running), self.costs.propose_s
        if self.pinned_cost is not None:
            hopeless = self.pinned_cost >= 1
        else:
            hopeless = fitted is not None and p is not None and p * (1 + COST_MARGIN) >= fitted[0]
        return speculation.plan(draft_cost, num_running, num_output_tokens, hopeless)

    def record_verify(self, speculation: Speculation, num_drafts: int, num_accepted: int) -> None:
        speculation.record_verify(num_drafts, num_accepted)
        self.acceptance.add(num_drafts, num_accepted, ENGINE_DECAY)


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
