"""Continuous batching: which sequences run this step and with how many tokens.

Each step, waiting requests are admitted first-come-first-served while there is a free slot and the
KV pool can reserve blocks for prompt + max_tokens (so running sequences never run out of cache).
Every running sequence then contributes its pending tokens: one for a decode, a chunk of its prompt
for a prefill, within a per-step token budget (decodes first, so prefills never stall streams).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .batch import SeqChunk
from .kv_cache import PagedKVCache
from .sampling import SamplingParams


@dataclass(eq=False)
class Sequence:
    request_id: int
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    generator: Optional[torch.Generator]  # None: the global RNG (unseeded requests)
    text_stream: object  # backend.tokenizer.TextStream
    on_output: Callable
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    cancel_requested: bool = False
    finish_reason: Optional[str] = None
    pending_token_ids: list[int] = field(default_factory=list)  # generated, not yet reported

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def reserved_tokens(self) -> int:
        return self.num_prompt_tokens + self.params.max_tokens


class Scheduler:
    def __init__(self, kv_cache: PagedKVCache, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> None:
        pool = self.kv_cache.pool
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            needed = self.kv_cache.blocks_for(seq.reserved_tokens)
            if needed > pool.num_free:
                break  # wait for blocks; FCFS keeps a big request from starving behind small ones
            self.waiting.popleft()
            seq.block_table = pool.allocate(needed)
            self.running.append(seq)

    def schedule(self) -> list[tuple[Sequence, SeqChunk]]:
        """Pick this step's work; a sequence samples a token when its chunk reaches its last token."""
        work, budget = [], self.max_num_batched_tokens
        decodes = [s for s in self.running if len(s.token_ids) - s.num_computed == 1]
        prefills = [s for s in self.running if len(s.token_ids) - s.num_computed > 1]
        for seq in decodes + prefills:
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if n <= 0:
                break
            budget -= n
            end = seq.num_computed + n
            work.append((seq, SeqChunk(seq.token_ids[seq.num_computed:end], seq.num_computed,
                                       seq.block_table, needs_logits=end == len(seq.token_ids))))
        return work

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence finished and give its blocks back (running or still waiting)."""
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.kv_cache.pool.release(seq.block_table)
            seq.block_table = []
