"""CUDA graphs of engine steps: decode-only steps of any step model, one graph per (batch bucket,
context bucket); and, for models with a varlen attention kernel, mixed steps (prefill chunks beside
decodes), one graph per token-count bucket.

A decode step launches a few hundred small kernels (18 layers x norms, GEMMs, RoPE, cache writes,
attention) whose work at small batch is shorter than their launch cost; replaying a captured graph
removes the launch gaps. Graphs need fixed shapes and addresses, so each bucket owns static input
buffers; a step copies its inputs into them (device-to-device, no host sync) and replays.

`DecodeGraphs(model)` is called like the model: a decode-only step within the buckets replays a
graph, any other step runs the model eagerly. What is captured is the model's own forward on a
fixed-shape decode layout (`Decodes`: row b is sequence b; `row_valid` marks the padding rows),
whose attention metadata the model's attention backend makes (`decodes`), so the reference model
and the TransformerEngine model share this code.

Padding a batch of B decodes up to its bucket Bb: rows B..Bb-1 write no K/V (the fused kernel skips
them; the torch path gives them row 0's slot and row 0's K/V, identical duplicate writes), attend
over slot 0 only, and their logits are dropped. The context is padded to a power-of-two bucket C:
columns past a sequence's length point at slot 0 and are never attended to. Attention takes the
visible keys from the positions inside the graph (the kernel directly, the torch backend through
masks built there: layout.decode_masks), which is exact for decodes (a decode-only layout holds a
sequence's context as its positions 0..ctx-1).

The engine captures every reachable bucket when it starts (`capture_all`); a bucket still missing
is captured the first time it is needed (the capture's warm-up runs the real step, so it writes the
same K/V the replay writes). Graphs share one memory pool, and the graphs of a set write their fp32
logits into one buffer of the set's most rows (the model's `logits_out`): each replay's logits are
copied out before the next replay. A logits output per graph stayed allocated with it: with 256
sequences, an 8,192-token max_model_len and Gemma's 262k vocabulary, 133 decode graphs and 16 mixed
ones held ~14 GB (an H100, 2026-12-06), outside gpu_memory_utilization's share.

Mixed steps (`MixedGraphs`): without a graph, a step holding a prefill chunk ran eagerly, a few
hundred kernel launches from Python (~20 ms for gemma-2b), and every decode in the batch waited for
it. With a VarlenLayout (the kernel backend's, `tile_rows` set) attention is one kernel per layer whose inputs
have fixed shapes: the step's T tokens padded to a bucket Tb, the tile table to the most tiles Tb
tokens can make, the block tables to every sequence and the longest context. Only Tb varies, so a
mixed step costs a replay plus the copies into the bucket's buffers. Padding rows write no K/V
(row_valid), belong to no tile (zero attention output) and their logits are dropped; padding tiles
have no rows and do nothing.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from .attention.layout import Decodes, StepLayout, VarlenLayout
from .params import blocks_for

BF16_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
MIN_CTX_BUCKET = 128


def _ctx_bucket(ctx: int) -> int:
    return max(MIN_CTX_BUCKET, 1 << (ctx - 1).bit_length())


def token_buckets(top: int) -> tuple[int, ...]:
    """Token counts of mixed-step graphs up to `top`: multiples of 16 (FP8 GEMM rows), spaced by at
    most a quarter of their size above 64, so padding wastes little (e.g. 257 tokens run as 320)."""
    buckets, b = [], 16
    while True:
        buckets.append(b)
        if b >= top:
            return tuple(buckets)
        b += max(16, 1 << (b.bit_length() - 3))


def _bucket(n: int, buckets: tuple[int, ...]) -> Optional[int]:
    for b in buckets:
        if b >= n:
            return b
    return None


@dataclass
class _DecodeEntry:
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


class _GraphSet:
    """What decode and mixed graphs share: entries by key, one memory pool, capture on first need,
    and falling back to eager steps (with a warning) if a capture fails."""

    def __init__(self, model, max_logit_rows: int):
        self.model = model
        self.device = model.device
        self.entries: dict[tuple, object] = {}
        self.pool = None
        self.cache_ptr: Optional[int] = None
        self.disabled: Optional[str] = None  # why capture failed; steps then run eagerly
        # Every graph's output: the first rows of this buffer (outside the graph pool, on the current stream).
        self._logits = torch.empty(max_logit_rows, model.cfg.vocab_size, dtype=torch.float32, device=self.device)

    def __call__(self, token_ids: torch.Tensor, layout: StepLayout, kv_cache) -> torch.Tensor:
        """The model's forward: replayed from a graph where one fits, else eager."""
        if self.can_run(token_ids, layout):
            return self.run(token_ids, layout, kv_cache)
        return self.model(token_ids, layout, kv_cache)

    def _ready(self, key: tuple, kv_cache) -> bool:
        """Capture the bucket's graph if it has none yet. A failed capture disables graphs (steps
        then run eagerly) with a warning saying why, rather than failing requests."""
        entry = self._entry(key, kv_cache)
        if entry.graph is None and not self.disabled:
            try:
                self._capture(entry, kv_cache)
            except Exception as exc:  # noqa: BLE001 - keep serving, eagerly, and say why
                self.disabled = f"{type(exc).__name__}: {exc}"
                del self.entries[key]
                warnings.warn(f"CUDA graph capture failed, {self.kind} steps run eagerly: {self.disabled}")
        return entry.graph is not None

    def _entry(self, key: tuple, kv_cache):
        if self.cache_ptr != kv_cache.slots.data_ptr():  # graphs bake in the cache's address
            # Dropping every graph of the shared pool frees the pool: later captures need a new one
            # (reusing the old handle trips the caching allocator's use_count assertion).
            self.entries.clear()
            self.pool = None
            self.cache_ptr = kv_cache.slots.data_ptr()
        if key not in self.entries:
            self.entries[key] = self._new_entry(*key)
        return self.entries[key]

    def _capture(self, entry, kv_cache) -> None:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
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

    def _replay(self, key: tuple, token_ids: torch.Tensor, layout: StepLayout, kv_cache) -> Optional[torch.Tensor]:
        """The captured step's logits buffer after a replay with this step's inputs; None when the
        bucket could not be captured (the caller runs the step eagerly)."""
        entry = self._entry(key, kv_cache)
        self._load(entry, token_ids, layout)
        if not self._ready(key, kv_cache):
            return None
        entry.graph.replay()
        entry.replays += 1
        return entry.logits


class DecodeGraphs(_GraphSet):
    kind = "decode"

    def __init__(self, model, max_batch: int = 256):
        buckets = tuple(b for b in BF16_BUCKETS if b % model.row_multiple == 0)
        self.buckets = tuple(b for b in buckets if b <= max(max_batch, buckets[0]))
        super().__init__(model, max_logit_rows=self.buckets[-1])  # a decode graph's logits: a row per bucket row
        self.max_ctx = _ctx_bucket(model.cfg.max_position_embeddings)

    def can_run(self, token_ids: torch.Tensor, layout: StepLayout) -> bool:
        """Decode-only steps (one new token per sequence) within the buckets."""
        if self.disabled or not isinstance(layout.attention, Decodes):
            return False
        batch, ctx = layout.attention.kv_slots.shape
        return batch == token_ids.shape[0] and batch <= self.buckets[-1] and ctx <= self.max_ctx

    def capture_all(self, kv_cache, max_batch: int, max_len: int) -> None:
        """Capture every bucket that steps of up to `max_batch` sequences and `max_len` tokens can
        reach, before serving, so no request pays for a capture. The captures' warm-up steps have
        no valid rows: the fused kernels write no K/V (the torch path writes slot 0, which every
        sequence overwrites before reading)."""
        top_batch = _bucket(max_batch, self.buckets) or self.buckets[-1]
        top_ctx = min(_ctx_bucket(max_len), self.max_ctx)
        for batch in (b for b in self.buckets if b <= top_batch):
            ctx = MIN_CTX_BUCKET
            while ctx <= top_ctx and self._ready((batch, ctx), kv_cache):
                ctx *= 2

    def run(self, token_ids: torch.Tensor, layout: StepLayout, kv_cache) -> torch.Tensor:
        batch, ctx = token_ids.shape[0], layout.attention.kv_slots.shape[1]
        logits = self._replay((_bucket(batch, self.buckets), _ctx_bucket(ctx)), token_ids, layout, kv_cache)
        if logits is None:
            return self.model(token_ids, layout, kv_cache)
        return logits.index_select(0, layout.logit_rows)

    def _new_entry(self, batch: int, ctx: int) -> _DecodeEntry:
        dev = self.device
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=dev)  # noqa: E731
        return _DecodeEntry(batch=batch, ctx=ctx, tokens=zeros(batch), positions=zeros(batch), slots=zeros(batch),
                            num_valid=zeros(()), row_ids=torch.arange(batch, device=dev), kv_slots=zeros(batch, ctx))

    @staticmethod
    def _load(entry: _DecodeEntry, token_ids: torch.Tensor, layout: StepLayout) -> None:
        """Copy this step's inputs into the bucket's buffers (device to device, no host sync)."""
        b = token_ids.shape[0]
        kv_slots = layout.attention.kv_slots
        entry.tokens[:b].copy_(token_ids)
        entry.positions[:b].copy_(layout.positions)
        entry.slots[:b].copy_(layout.slot_mapping)
        if b < entry.batch:
            entry.slots[b:].copy_(layout.slot_mapping[:1].expand(entry.batch - b))
            entry.positions[b:].zero_()
        entry.num_valid.fill_(b)
        entry.kv_slots.zero_()
        entry.kv_slots[:b, :kv_slots.shape[1]].copy_(kv_slots)

    def _body(self, entry: _DecodeEntry, kv_cache) -> torch.Tensor:
        layout = StepLayout(positions=entry.positions, slot_mapping=entry.slots, logit_rows=None,
                            attention=self.model.attention.decodes(entry.kv_slots, entry.positions),
                            row_valid=entry.row_ids < entry.num_valid)
        return self.model(entry.tokens, layout, kv_cache, logits_out=self._logits[:entry.batch])


@dataclass
class _MixedEntry:
    tokens: torch.Tensor  # [Tb]
    positions: torch.Tensor  # [Tb]
    slots: torch.Tensor  # [Tb]
    num_valid: torch.Tensor  # () the step's real tokens
    row_ids: torch.Tensor  # [Tb] arange
    tiles: torch.Tensor  # [Nb, 4]: the most tiles Tb tokens of up to max_seqs sequences make
    block_tables: torch.Tensor  # [max_seqs, blocks of max_len]
    logit_rows: torch.Tensor  # [min(Tb, max_logit_rows)]
    graph: Optional[torch.cuda.CUDAGraph] = None
    logits: Optional[torch.Tensor] = None
    replays: int = field(default=0)


class MixedGraphs(_GraphSet):
    """Steps with a VarlenLayout (models whose attention backend takes one, `tile_rows` set): one graph per
    token bucket, for steps of up to `max_seqs` sequences, `max_tokens` tokens and `max_len` positions,
    with up to `max_logit_rows` logit rows (default one per sequence; speculative decoding's verify
    chunks need 1 + k each: they are chunks like any other, k + 1 query rows in the varlen kernel)."""
    kind = "mixed"

    def __init__(self, model, block_size: int, max_seqs: int, max_tokens: int, max_len: int,
                 max_logit_rows: Optional[int] = None):
        self.block_size, self.max_seqs = block_size, max_seqs
        self.max_logit_rows = max_seqs if max_logit_rows is None else max_logit_rows
        self.width = blocks_for(max_len, block_size)
        self.buckets = token_buckets(max_tokens)
        super().__init__(model, max_logit_rows=min(self.buckets[-1], self.max_logit_rows))

    def can_run(self, token_ids: torch.Tensor, layout: StepLayout) -> bool:
        varlen = layout.attention
        if self.disabled or not isinstance(varlen, VarlenLayout):
            return False
        seqs, width = varlen.block_tables.shape
        return (token_ids.shape[0] <= self.buckets[-1] and seqs <= self.max_seqs and width <= self.width
                and varlen.block_size == self.block_size and layout.logit_rows.numel() <= self.max_logit_rows)

    def capture_all(self, kv_cache) -> None:
        """Capture every bucket before serving. The captures' warm-up steps have no tiles and no
        valid rows: they attend to nothing and write no K/V."""
        for tokens in self.buckets:
            if not self._ready((tokens,), kv_cache):
                return

    def run(self, token_ids: torch.Tensor, layout: StepLayout, kv_cache) -> torch.Tensor:
        logits = self._replay((_bucket(token_ids.shape[0], self.buckets),), token_ids, layout, kv_cache)
        if logits is None:
            return self.model(token_ids, layout, kv_cache)
        return logits[:layout.logit_rows.numel()].clone()

    def _new_entry(self, tokens: int) -> _MixedEntry:
        dev = self.device
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=dev)  # noqa: E731
        # Each sequence's chunk ends in at most one partial tile.
        tiles = tokens // self.model.attention.tile_rows + min(tokens, self.max_seqs)
        rows = min(tokens, self.max_logit_rows)
        return _MixedEntry(tokens=zeros(tokens), positions=zeros(tokens), slots=zeros(tokens), num_valid=zeros(()),
                           row_ids=torch.arange(tokens, device=dev), tiles=zeros(tiles, 4).to(torch.int32),
                           block_tables=zeros(self.max_seqs, self.width), logit_rows=zeros(rows))

    @staticmethod
    def _load(entry: _MixedEntry, token_ids: torch.Tensor, layout: StepLayout) -> None:
        """Copy this step's inputs into the bucket's buffers (device to device, no host sync).
        Stale entries past the step's own are harmless: padding rows are invalid, padding tiles are
        zeroed, block-table rows and columns past the step's are never read, and the logits of
        logit rows past the step's are dropped."""
        t = token_ids.shape[0]
        varlen = layout.attention
        entry.tokens[:t].copy_(token_ids)
        entry.positions[:t].copy_(layout.positions)
        entry.slots[:t].copy_(layout.slot_mapping)
        entry.num_valid.fill_(t)
        num_tiles = varlen.tiles.shape[0]
        entry.tiles[:num_tiles].copy_(varlen.tiles)
        entry.tiles[num_tiles:].zero_()
        seqs, width = varlen.block_tables.shape
        entry.block_tables[:seqs, :width].copy_(varlen.block_tables)
        entry.logit_rows[:layout.logit_rows.numel()].copy_(layout.logit_rows)

    def _body(self, entry: _MixedEntry, kv_cache) -> torch.Tensor:
        varlen = VarlenLayout(block_tables=entry.block_tables, tiles=entry.tiles, block_size=self.block_size)
        layout = StepLayout(positions=entry.positions, slot_mapping=entry.slots, logit_rows=entry.logit_rows,
                            attention=varlen, row_valid=entry.row_ids < entry.num_valid)
        return self.model(entry.tokens, layout, kv_cache, logits_out=self._logits[:entry.logit_rows.numel()])
