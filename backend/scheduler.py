"""Continuous batching: which sequences run this step, with how many tokens, and what the sampled
tokens do to them.

`schedule()` returns plain data (`SchedulerOutput`): the chunks to compute, each a sequence's next
tokens with its block table. `update()` takes the sampled tokens back, appends them and applies
every stop rule (EOS, stop ids, max_tokens; none before min_tokens) in one place. Knows no model,
no tokenizer and no thread: tested alone (tests/test_scheduler.py).

Steps may overlap (async scheduling, backend/engine.py): the next step is scheduled before the
current one's tokens are back. `schedule()` therefore counts a chunk's K/V as computed as soon as it
is scheduled (steps run in order on one device stream), and a sequence whose sampled token is still
in flight gets a decode of that token: a `fed_token` naming its row among the samples of the step in
flight (`sampled_row`), which the runner fills in on the device. A
sequence certain to stop at max_tokens gets no further step. `update()` later appends the tokens.

Speculative decoding: a sequence may carry draft tokens (`draft_token_ids`, proposed by the engine
core before `schedule()`: backend/speculative.py). Its decode is then a verify chunk, its last token
and the drafts, every one needing logits; `update()` takes the accepted drafts and the token after
them, rolls `num_computed` back to the tokens kept (the rejected drafts' K/V is overwritten later),
gives back the blocks that held only rejected drafts, and names no block holding any. A sequence
with drafts in flight gets no step until they are back (the engine core runs such steps one at a
time).

KV blocks are allocated as sequences grow. When the pool runs dry, the newest running sequence is
preempted: its blocks go back (full ones stay cached as a prefix), it rejoins the front of the
queue, and on resume its prompt and the tokens it had generated are computed again as a prefill,
so its output is what it would have been. Waiting sequences are admitted first come, first served;
with prefix caching a new sequence starts after the longest cached prefix of its tokens.
"""
from __future__ import annotations

import collections
import functools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence as Seq, Union

import torch

from .batch import SeqChunk, fed_token
from .kv_cache import BlockPool, block_hash
from .params import SamplingParams, blocks_for

if TYPE_CHECKING:
    from .grammar import Grammar
    from .speculative import Speculation

@dataclass(eq=False)
class Sequence:
    request_id: int
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    generator: Optional[torch.Generator] = None  # None: the global RNG (unseeded requests)
    eos_token_ids: frozenset[int] = frozenset()
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # names of the full blocks of token_ids so far
    num_computed: int = 0  # tokens whose K/V are in the cache, or computed by a step already scheduled
    num_in_flight: int = 0  # tokens sampled by scheduled steps, not yet appended to token_ids
    sampled_row: int = 0  # its (first) logit row in the last step scheduled that samples for it
    num_cached_prompt_tokens: int = 0  # of the prompt, found in the prefix cache at first admission
    num_preemptions: int = 0
    finish_reason: Optional[str] = None
    grammar: Optional["Grammar"] = None  # its structured-outputs matcher, advanced by the engine core
    speculation: Optional["Speculation"] = None  # speculative decoding's state (None: it does not speculate)
    draft_token_ids: list[int] = field(default_factory=list)  # proposed for the next step (schedule() takes them)
    num_drafts_in_flight: int = 0  # drafts of the scheduled step being verified
    # time.monotonic() when it was queued, first admitted to a step, and given its first token: its
    # RequestPhases, which its last delta carries
    queued_at: float = field(default_factory=time.monotonic)
    admitted_at: Optional[float] = None
    first_token_at: Optional[float] = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        """Known tokens and those still in flight."""
        return len(self.token_ids) + self.num_in_flight

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V are not computed yet: one for a decode, more for a prefill."""
        return self.num_tokens - self.num_computed

    @property
    def stops_in_flight(self) -> bool:
        """The tokens in flight reach max_tokens: this sequence needs no further step."""
        return self.num_in_flight > 0 and self.num_tokens - self.num_prompt_tokens >= self.params.max_tokens


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 3x, and a step makes 256 of them
class ScheduledChunk:
    seq: Sequence
    chunk: SeqChunk  # its tokens computed this step; needs_logits: it reaches the last token
    num_output_tokens: int  # generated before the token this chunk samples (in-flight ones included)

    @property
    def needs_logits(self) -> bool:
        return self.chunk.needs_logits


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]  # sent back to the queue this step
    feeds_in_flight: bool = False  # a chunk decodes a token the step in flight is sampling (a fed_token)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.chunk.token_ids) for c in self.chunks)

    @functools.cached_property  # the runner, the update and the engine core each ask, every step
    def samplers(self) -> list[ScheduledChunk]:
        """The chunks that need logits, in order: the i-th has the i-th sampled entry."""
        return [c for c in self.chunks if c.chunk.needs_logits]


@dataclass(frozen=True)
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, found cached


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order: the last is the first preempted
        self.prefix_cache = PrefixCacheStats()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    # --- one step ---------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Running sequences first (decodes, then prefill chunks), oldest first, then admissions,
        within the step's token budget."""
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        gone: set[Sequence] = set()  # preempted by this loop (a set: `in self.running` made a step O(n^2))
        budget = self.max_num_batched_tokens
        by_kind = sorted(self.running, key=lambda s: s.num_pending > 1)  # stable: decodes first, each oldest first
        for seq in by_kind:
            if budget == 0:
                break
            if seq in gone or seq.stops_in_flight or seq.num_drafts_in_flight:
                continue  # preempted earlier in this loop, done, or its drafts are still being verified
            pending = seq.num_pending
            n = min(pending, budget)
            # A decode with drafts verifies them: the budget may cut some.
            drafts = seq.draft_token_ids[:budget - 1] if seq.draft_token_ids and pending == 1 \
                and not seq.num_in_flight else ()
            n += len(drafts)
            # Most decodes fit the blocks they hold (one step in block_size needs a new one).
            if seq.num_computed + n > len(seq.block_table) * self.block_size:
                victims = self._grow(seq, seq.num_computed + n)
                preempted += victims
                gone.update(victims)
                for victim in victims:  # a newer decode may already hold a chunk of this step
                    budget += sum(len(c.chunk.token_ids) for c in chunks if c.seq is victim)
                    chunks = [c for c in chunks if c.seq is not victim]
                if seq in victims:
                    continue
            budget -= n
            chunks.append(self._chunk(seq, n, drafts))
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            # A sequence preempted with a token in flight waits for it (first come, first served).
            if seq.num_in_flight or not self._admit(seq, budget):
                break  # first come, first served: a big request does not starve behind small ones
            self.waiting.popleft()
            self.running.append(seq)
            n = min(seq.num_pending, budget)
            budget -= n
            chunks.append(self._chunk(seq, n))
        row, feeds_in_flight = 0, False
        for scheduled in chunks:  # the step's K/V count as computed; its samples are in flight
            seq, chunk = scheduled.seq, scheduled.chunk
            feeds_in_flight = feeds_in_flight or chunk.token_ids[-1] < 0
            seq.num_computed = chunk.start + len(chunk.token_ids)
            seq.num_drafts_in_flight = chunk.num_drafts
            if chunk.needs_logits:  # (read by the next schedule(), after every chunk of this one is made)
                seq.num_in_flight += 1
                seq.sampled_row = row
                row += chunk.num_logit_rows
        for seq in self.running:  # drafts are proposed for one step only
            if seq.draft_token_ids:
                seq.draft_token_ids = []
        return SchedulerOutput(chunks, preempted, feeds_in_flight)

    def update(self, output: SchedulerOutput, sampled: Seq[Union[int, Seq[int]]]) -> list[tuple[Sequence, int, int]]:
        """Apply a computed step: append each sampled token (sampled[i] for the i-th chunk that
        needs logits; for a verify chunk, the list of its accepted drafts and the token after them),
        name the blocks now full for prefix reuse, and finish sequences that reached a stop (a stop
        among a verify chunk's tokens drops those after it). Sequences finished meanwhile (cancelled,
        or failed by their own step) are left alone; a preempted one keeps its tokens (they are
        valid). Returns (sequence, i, n) for each sequence that got the first n tokens of sampled[i]."""
        appended, stops, now = [], {}, time.monotonic()
        for i, scheduled in enumerate(output.samplers):
            seq = scheduled.seq
            seq.num_in_flight -= 1
            seq.num_drafts_in_flight = 0
            if seq.finish_reason is not None:
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
            tokens = [sampled[i]] if isinstance(sampled[i], int) else sampled[i]
            n = 0
            for token in tokens:
                seq.token_ids.append(token)
                n += 1
                reason = stop_reason(seq, token)
                if reason is not None:
                    stops[seq] = reason
                    break
            appended.append((seq, i, n))
            if scheduled.chunk.num_drafts:
                self._drop_rejected(seq)
        for scheduled in output.chunks:
            seq = scheduled.seq
            if seq.finish_reason is None and seq.block_table:  # running: not finished, not preempted
                self._name_full_blocks(seq, first=scheduled.chunk.start // self.block_size)
        for seq, reason in stops.items():
            self.finish(seq, reason)
        return appended

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence finished and give its blocks back (running or still waiting)."""
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    # --- blocks -----------------------------------------------------------------------------------

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Give a waiting sequence its cached prefix and the blocks of its first chunk."""
        first_time = seq.num_preemptions == 0
        self._extend_hashes(seq, len(seq.token_ids))
        # At least the last token is computed: its logits give the next token.
        reusable = (len(seq.token_ids) - 1) // self.block_size
        cached = self.pool.cached_prefix(seq.block_hashes[:reusable])
        n = min(len(seq.token_ids) - len(cached) * self.block_size, budget)
        needed = blocks_for(len(cached) * self.block_size + n, self.block_size) - len(cached)
        if needed > self.pool.num_free:
            self.pool.release(cached)
            return False
        seq.block_table = cached + self.pool.allocate(needed)
        seq.num_computed = len(cached) * self.block_size
        if first_time:
            seq.admitted_at = time.monotonic()
            seq.num_cached_prompt_tokens = seq.num_computed
            self.prefix_cache = PrefixCacheStats(self.prefix_cache.queries + seq.num_prompt_tokens,
                                                 self.prefix_cache.hits + seq.num_computed)
        return True

    def _grow(self, seq: Sequence, num_tokens: int) -> list[Sequence]:
        """Blocks for `seq`'s first `num_tokens` tokens, preempting the newest running sequences
        while the pool is short (`seq` itself, if it is the newest). Returns those preempted."""
        needed = blocks_for(num_tokens, self.block_size) - len(seq.block_table)
        victims = []
        while needed > self.pool.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            victims.append(victim)
            if victim is seq:
                return victims
        if needed > 0:
            seq.block_table += self.pool.allocate(needed)
        return victims

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.draft_token_ids = []
        self._release(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _drop_rejected(self, seq: Sequence) -> None:
        """After a verify chunk: only the K/V of the tokens kept counts as computed (every token but
        the newest, which the next step computes), and blocks past the one that position needs go
        back; they held rejected drafts only and were never named."""
        seq.num_computed = min(seq.num_computed, len(seq.token_ids) - 1)
        if seq.block_table:  # not preempted
            keep = blocks_for(len(seq.token_ids), self.block_size)
            if len(seq.block_table) > keep:
                self.pool.release(seq.block_table[keep:])
                del seq.block_table[keep:]

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.pool.release(seq.block_table)
            seq.block_table = []

    def _chunk(self, seq: Sequence, n: int, drafts: Seq[int] = ()) -> ScheduledChunk:
        """The next n tokens of `seq` from num_computed; with drafts, its last token and the drafts."""
        start, num_tokens = seq.num_computed, seq.num_tokens
        end = start + n - len(drafts)
        token_ids = seq.token_ids[start:end]
        if end - start > len(token_ids):  # a decode of the token in flight (one step is in flight at most)
            token_ids.append(fed_token(seq.sampled_row))
        if drafts:
            token_ids += drafts
        return ScheduledChunk(seq, SeqChunk(token_ids, start, list(seq.block_table), end == num_tokens, len(drafts)),
                              num_tokens - seq.num_prompt_tokens)

    def _extend_hashes(self, seq: Sequence, num_tokens: int) -> None:
        """Name every full block among the first `num_tokens` tokens (names depend on tokens only)."""
        size = self.block_size
        for i in range(len(seq.block_hashes), num_tokens // size):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(block_hash(parent, seq.token_ids[i * size:(i + 1) * size]))

    def _name_full_blocks(self, seq: Sequence, first: int) -> None:
        """Name the blocks from index `first` on that are now full and computed (or computed by a
        step already scheduled: it runs before any step that could read them)."""
        if not self.pool.enable_prefix_caching:
            return
        known = min(seq.num_computed, len(seq.token_ids))  # a name needs the block's tokens
        full = known // self.block_size
        if full <= first and len(seq.block_hashes) >= full:  # most steps: no block filled up
            return
        self._extend_hashes(seq, known)
        for i in range(first, full):
            self.pool.name(seq.block_table[i], seq.block_hashes[i])


def stop_reason(seq: Sequence, token: int) -> Optional[str]:
    """Why `seq` ends with the `token` just appended, or None. Every token-level stop rule is here
    (stop strings are text and are checked where the text is made: backend/outputs.py)."""
    params = seq.params
    may_stop = seq.num_output_tokens >= params.min_tokens  # the sampler kept EOS and stop ids out before
    if may_stop and (token in params.stop_token_ids or (token in seq.eos_token_ids and not params.ignore_eos)):
        return "stop"
    if seq.num_output_tokens >= params.max_tokens:
        return "length"
    return None
