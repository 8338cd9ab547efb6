"""CUDA graphs for decode-only steps: one graph per (batch bucket, context bucket).

A decode step launches a few hundred small kernels (18 layers x norms, GEMMs, RoPE, cache writes,
attention) whose work at small batch is shorter than their launch cost; replaying a captured graph
removes the launch gaps. Graphs need fixed shapes and addresses, so each bucket owns static input
buffers; a step copies its inputs into them (device-to-device, no host sync) and replays.

Padding a batch of B decodes up to its bucket Bb: rows B..Bb-1 repeat row 0's cache slot and are
given row 0's K/V (identical duplicate writes), attend over slot 0 only, and their logits are
dropped. The context is padded to a power-of-two bucket C: columns past a sequence's length point
at slot 0 and are masked. Masks are derived inside the graph from the positions, which is exact
for decodes (build_step lays a decode's context out as its positions 0..ctx-1).

Graphs are captured lazily the first time a bucket is needed (the capture's warm-up runs the real
step, so it writes the same K/V the replay writes) and share one memory pool; each replay's logits
are copied out before the next replay.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from backend.model import AttentionGroup, StepLayout

from .attention import StepContext, decode_masks

BF16_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
MIN_CTX_BUCKET = 128


def _bucket(n: int, buckets: tuple[int, ...]) -> Optional[int]:
    for b in buckets:
        if b >= n:
            return b
    return None


@dataclass
class _Entry:
    batch: int
    ctx: int
    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    num_valid: torch.Tensor
    row_ids: torch.Tensor
    kv_slots: torch.Tensor
    graph: Optional[torch.cuda.CUDAGraph] = None
    logits: Optional[torch.Tensor] = None
    replays: int = field(default=0)


class DecodeGraphs:
    def __init__(self, model, max_batch: int = 256):
        self.model = model
        buckets = BF16_BUCKETS if not model.fp8 else tuple(b for b in BF16_BUCKETS if b % 8 == 0)
        self.buckets = tuple(b for b in buckets if b <= max(max_batch, buckets[0]))
        self.max_ctx = max(MIN_CTX_BUCKET, 1 << (model.cfg.max_position_embeddings - 1).bit_length())
        self.entries: dict[tuple[int, int], _Entry] = {}
        self.pool = None
        self.cache_ptr: Optional[int] = None
        self.disabled: Optional[str] = None  # why capture failed; decode steps then run eagerly

    def can_run(self, token_ids: torch.Tensor, layout: StepLayout) -> bool:
        """Decode-only steps (one attention group, one new token per sequence) within the buckets."""
        if self.disabled or len(layout.groups) != 1:
            return False
        group = layout.groups[0]
        batch, n = group.q_index.shape
        return (n == 1 and batch == token_ids.shape[0] and batch <= self.buckets[-1]
                and group.kv_slots.shape[1] <= self.max_ctx)

    def run(self, token_ids: torch.Tensor, layout: StepLayout, kv_cache) -> torch.Tensor:
        if self.cache_ptr != kv_cache.slots.data_ptr():  # graphs bake in the cache's address
            # Dropping every graph of the shared pool frees the pool: later captures need a new one
            # (reusing the old handle trips the caching allocator's use_count assertion).
            self.entries.clear()
            self.pool = None
            self.cache_ptr = kv_cache.slots.data_ptr()
        group = layout.groups[0]
        batch, ctx = token_ids.shape[0], group.kv_slots.shape[1]
        key = (_bucket(batch, self.buckets), max(MIN_CTX_BUCKET, 1 << (ctx - 1).bit_length()))
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = self._new_entry(*key)
        self._load(entry, token_ids, layout)
        if entry.graph is None:
            try:
                self._capture(entry, kv_cache)
            except Exception as exc:  # keep serving, eagerly, and say why
                self.disabled = f"{type(exc).__name__}: {exc}"
                del self.entries[key]
                warnings.warn(f"CUDA graph capture failed, decode steps run eagerly: {self.disabled}")
                with self.model.autocast():
                    return self.model.forward_eager(token_ids, layout, kv_cache)
        entry.graph.replay()
        entry.replays += 1
        return entry.logits.index_select(0, layout.logit_rows)

    def _new_entry(self, batch: int, ctx: int) -> _Entry:
        dev = self.model.device
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=dev)  # noqa: E731
        return _Entry(batch=batch, ctx=ctx, tokens=zeros(batch), positions=zeros(batch), slots=zeros(batch),
                      num_valid=zeros(()), row_ids=torch.arange(batch, device=dev), kv_slots=zeros(batch, ctx))

    @staticmethod
    def _load(entry: _Entry, token_ids: torch.Tensor, layout: StepLayout) -> None:
        """Copy this step's inputs into the bucket's buffers (device to device, no host sync)."""
        b = token_ids.shape[0]
        kv_slots = layout.groups[0].kv_slots
        entry.tokens[:b].copy_(token_ids)
        entry.positions[:b].copy_(layout.positions)
        entry.slots[:b].copy_(layout.slot_mapping)
        if b < entry.batch:
            entry.slots[b:].copy_(layout.slot_mapping[:1].expand(entry.batch - b))
            entry.positions[b:].zero_()
        entry.num_valid.fill_(b)
        entry.kv_slots.zero_()
        entry.kv_slots[:b, :kv_slots.shape[1]].copy_(kv_slots)

    def _body(self, entry: _Entry, kv_cache) -> torch.Tensor:
        model = self.model
        x = model.embed_tokens(entry.tokens)
        group = AttentionGroup(q_index=None, kv_slots=entry.kv_slots,
                               masks=decode_masks(entry.positions, entry.ctx, model.windows))
        ctx = StepContext(ropes=model.ropes(entry.positions), slot_mapping=entry.slots, groups=[group],
                          row_valid=entry.row_ids < entry.num_valid)
        for layer in model.layers:
            x = layer.step(x, ctx, kv_cache)
        return model.logits(model.final_norm(x))

    def _capture(self, entry: _Entry, kv_cache) -> None:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with self.model.autocast():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: lazy TE/cuBLAS setup stays out of the graph
                for _ in range(2):
                    self._body(entry, kv_cache)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                entry.logits = self._body(entry, kv_cache)
        entry.graph = graph
