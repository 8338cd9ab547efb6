"""Attention over the engine's paged KV cache in plain torch: the reference backend.

The reference model always attends here, and the TransformerEngine model does where Triton is not
installed. The math is HF Gemma's, written where it happens: SDPA with an additive mask, or, with
Gemma 2's softcap (which SDPA has no hook for), scores capped by tanh before the mask and a softmax in
fp32. Grouped-query heads are never repeated: each KV head's query heads and tokens form the rows of
one matrix product (torch.matmul with a broadcast batch dim would copy the keys G times over).

A decode-only step is one batched call over every sequence's gathered context (`Decodes`); a step
with prefill chunks attends group by group (`AttentionGroup`: each chunk alone, the decodes
together). Every op has a fixed shape per layout, so a decode step can be captured in a CUDA graph
(graphs.py), with its masks rebuilt from the positions inside the graph.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
import torch.nn.functional as F

from ..batch import HostToDevice, SeqChunk
from ..params import blocks_for
from ..rope import apply_rope
from .interface import LayerAttention, StepContext
from .layout import Decodes, StepLayout, decode_masks, grouped_layout


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           softcap: Optional[float]) -> torch.Tensor:
    """q: [B, n, H, D]; k, v: [B, ctx, KV, D]; mask: [B, n, ctx] additive -> [B, n, H, D]."""
    q, k, v = q.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2)
    mask = mask[:, None].to(q.dtype)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)
    B, H, n, D = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(B, kv_heads, H // kv_heads * n, D)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, KV, G*n, ctx]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(B, H, n, -1) + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(B, kv_heads, H // kv_heads * n, -1), v)
    return out.view(B, H, n, D).transpose(1, 2)


def write_kv(k_slots: torch.Tensor, v_slots: torch.Tensor, slot_mapping: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, row_valid: Optional[torch.Tensor] = None) -> None:
    """Store the step's keys/values ([T, KV, D]) at their cache slots.

    With `row_valid` (fixed-shape graph steps), padding rows carry row 0's slot and are given row
    0's values, so the duplicate writes are identical and no other slot is touched."""
    n = slot_mapping.shape[0]
    k, v = k[:n], v[:n]
    if row_valid is not None:
        keep = row_valid[:n, None, None]
        k = torch.where(keep, k, k[:1])
        v = torch.where(keep, v, v[:1])
    k_slots.index_copy_(0, slot_mapping, k.to(k_slots.dtype))
    v_slots.index_copy_(0, slot_mapping, v.to(v_slots.dtype))


class TorchAttention:
    """The reference backend: grouped layouts with masks, RoPE, cache writes and attention in torch."""
    tile_rows = None  # no varlen kernel: steps with prefill chunks run eagerly, group by group

    def __init__(self, windows: set[int | None]):
        self.windows = windows

    def build_step(self, chunks: list[SeqChunk], block_size: int,
                   uploader: HostToDevice) -> tuple[torch.Tensor, StepLayout]:
        return grouped_layout(chunks, block_size, uploader, self.windows)

    def decodes(self, kv_slots: torch.Tensor, positions: torch.Tensor) -> Decodes:
        """A graph's fixed-shape decode step: masks from the positions, built inside the graph."""
        return Decodes(kv_slots, decode_masks(positions, kv_slots.shape[1], self.windows))

    def forward(self, layer: LayerAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepContext,
                kv_cache, qk_norm=None) -> torch.Tensor:
        """q [T, KV, G, D], k/v [T, KV, D] (before RoPE) -> [T, H, D]. qk_norm: Gemma 3's (q norm, k
        norm) modules, applied per head before RoPE."""
        T, kv_heads, group, head_dim = q.shape
        q = q.reshape(T, kv_heads * group, head_dim)
        if qk_norm is not None:
            q, k = qk_norm[0](q), qk_norm[1](k)
        cos, sin = step.ropes[layer.rope]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        layout = step.layout
        k_slots, v_slots = kv_cache.layer(layer.index)
        write_kv(k_slots, v_slots, layout.slot_mapping, k, v, layout.row_valid)
        return self.attend(layer, q, k_slots, v_slots, layout)

    @staticmethod
    def attend(layer: LayerAttention, q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor,
               layout: StepLayout) -> torch.Tensor:
        """q [T, H, D] (RoPE applied) against the cache. Rows past the layout's (FP8 row padding)
        come out zero."""
        T = q.shape[0]
        meta = layout.attention
        if isinstance(meta, Decodes):
            B = meta.kv_slots.shape[0]
            out = attend(q[:B].view(B, 1, *q.shape[1:]), k_slots[meta.kv_slots], v_slots[meta.kv_slots],
                         meta.masks[layer.window], layer.scale, layer.softcap)[:, 0]
            return out if B == T else F.pad(out, (0, 0, 0, 0, 0, T - B))
        if len(meta) == 1 and meta[0].q_index.numel() == T:  # one prefill chunk (or verify chunks): no scatter
            g = meta[0]
            return attend(q.view(*g.q_index.shape, *q.shape[1:]), k_slots[g.kv_slots], v_slots[g.kv_slots],
                          g.masks[layer.window], layer.scale, layer.softcap).reshape(q.shape)
        out = torch.zeros_like(q) if T > layout.slot_mapping.shape[0] else torch.empty_like(q)
        for g in meta:
            out[g.q_index] = attend(q[g.q_index], k_slots[g.kv_slots], v_slots[g.kv_slots], g.masks[layer.window],
                                    layer.scale, layer.softcap)
        return out


def varlen_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, tiles: torch.Tensor, block_size: int, scale: float,
                           softcap: Optional[float], window: Optional[int],
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """kernels.varlen.varlen_attention's contract in plain torch, one sequence at a time (the kernel
    tests' oracle). Reads the tiles on the host: not for CUDA graphs."""
    out = torch.zeros_like(q) if out is None else out.zero_()
    spans = defaultdict(list)  # sequence row -> its tiles' (first row, rows, first position)
    for seq, first_row, num_rows, first_pos in tiles.tolist():
        if num_rows:
            spans[seq].append((first_row, num_rows, first_pos))
    for seq, seq_spans in spans.items():
        rows = torch.cat([torch.arange(r, r + n) for r, n, _ in seq_spans]).to(q.device)
        positions = torch.cat([torch.arange(p, p + n) for _, n, p in seq_spans]).to(q.device)
        ctx = max(p + n for _, n, p in seq_spans)
        table = block_tables[seq, :blocks_for(ctx, block_size)].long()
        slots = (table[:, None] * block_size + torch.arange(block_size, device=q.device)).flatten()[:ctx]
        mask = decode_masks(positions, ctx, [window])[window].view(1, -1, ctx)  # [1, rows, ctx]
        out[rows] = attend(q[rows][None], k_cache[slots][None], v_cache[slots][None], mask, scale,
                           softcap)[0].to(out.dtype)
    return out
