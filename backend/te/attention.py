"""Attention over the engine's paged KV cache, in plain torch (no TE needed, CPU-testable).

TE's own KV cache (InferenceParams + PagedKVCacheManager) owns page allocation and advances every
cached sequence by exactly one token per step, which cannot express our scheduler's chunked
prefill next to decodes (see docs/gpu.md). So the TE model computes its projections, norms and
MLP with TE modules and attends here, reading and writing `backend.kv_cache.PagedKVCache` slots
exactly as the reference model does. Every op is a fixed-shape tensor op, so a decode step can be
captured in a CUDA graph.

Where Triton is installed (`StepContext.fused`), RoPE + the K/V write and decode attention run as
fused kernels instead (fused_decode.py), and a step holding prefill chunks attends in one varlen
kernel call per layer (fused_varlen.py, `StepContext.varlen`); the groups below remain the path
without Triton.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from backend.model import AttentionGroup, VarlenLayout

from . import fused_decode, fused_varlen


@dataclass
class StepContext:
    """What every layer of one step shares: RoPE tables, where to write K/V, who attends to what."""
    ropes: dict  # RopeSpec -> (cos [T, D], sin [T, D])
    slot_mapping: torch.Tensor  # [T_real] cache slot of each real token
    groups: list[AttentionGroup]  # q_index None: one query per row, row b of kv_slots (graph decode)
    positions: torch.Tensor  # [T] position of each row's token
    # Graph decode only: [T] bool, False for padding rows (they write no K/V of their own; write_kv
    # gives them row 0's, the fused kernel skips them).
    row_valid: Optional[torch.Tensor] = None
    padded: bool = False  # rows beyond the groups exist (FP8 row padding): zero their attention output
    fused: bool = False  # RoPE + K/V write and decode attention by the Triton kernels (fused_decode.py)
    fused_norms: bool = False  # residual add + RMSNorm, GeGLU by Triton kernels (fused_pointwise.py)
    varlen: Optional[VarlenLayout] = None  # instead of groups: every row in one fused_varlen kernel call


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           softcap: Optional[float]) -> torch.Tensor:
    """q: [B, n, H, D]; k, v: [B, ctx, KV, D]; mask: [B, n, ctx] additive -> [B, n, H, D].

    Grouped-query without repeating K/V: each KV head's H/KV query heads and n tokens form the rows
    of one [B, KV] batch of matrix products (no broadcast batch dims, which torch.matmul would
    materialise H/KV times over). Scores and softmax in fp32 as in HF; the tanh softcap (Gemma 2)
    is applied before the mask."""
    B, n, H, D = q.shape
    kv_heads, ctx = k.shape[2], k.shape[1]
    group = H // kv_heads
    q = q.reshape(B, n, kv_heads, group, D).permute(0, 2, 3, 1, 4).reshape(B, kv_heads, group * n, D)
    k = k.to(q.dtype).transpose(1, 2)  # [B, KV, ctx, D]
    v = v.to(q.dtype).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(2, 3)).float() * scale  # [B, KV, G*n, ctx]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(B, kv_heads, group, n, ctx) + mask[:, None, None]
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(B, kv_heads, group * n, ctx)
    out = torch.matmul(probs, v)  # [B, KV, G*n, D]
    return out.view(B, kv_heads, group, n, D).permute(0, 3, 1, 2, 4).reshape(B, n, H, D)


def attend_sdpa(q, k, v, mask, scale: float):
    """Prefill chunks without softcap: torch SDPA (memory-efficient kernel takes the float mask)."""
    B, n, H, D = q.shape
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2),
        attn_mask=mask[:, None].to(q.dtype), scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def paged_attention(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, ctx: StepContext,
                    window: Optional[int], scale: float, softcap: Optional[float]) -> torch.Tensor:
    """q: [T, H, D] -> [T, H, D]: each group's queries against its sequences' cached context."""
    if ctx.varlen is not None:  # rows in no tile (padding) come out zero
        v = ctx.varlen
        return fused_varlen.varlen_attention(q, k_slots, v_slots, v.block_tables, v.tiles, v.block_size, scale,
                                             softcap, window)
    if len(ctx.groups) == 1 and ctx.groups[0].q_index is None:  # graph decode: row b is sequence b
        g = ctx.groups[0]
        if ctx.fused:
            return fused_decode.decode_attention(q, k_slots, v_slots, g.kv_slots, ctx.positions, scale, softcap,
                                                 window)
        out = attend(q[:, None], k_slots[g.kv_slots], v_slots[g.kv_slots], g.masks[window], scale, softcap)
        return out[:, 0]
    out = torch.zeros_like(q) if ctx.padded else torch.empty_like(q)
    for g in ctx.groups:
        if ctx.fused and g.q_index.shape[1] == 1:
            rows = g.q_index[:, 0]
            out[rows] = fused_decode.decode_attention(q[rows], k_slots, v_slots, g.kv_slots, ctx.positions[rows],
                                                      scale, softcap, window)
            continue
        qg, kg, vg, mask = q[g.q_index], k_slots[g.kv_slots], v_slots[g.kv_slots], g.masks[window]
        if qg.shape[1] > 1 and softcap is None and q.is_cuda:
            out[g.q_index] = attend_sdpa(qg, kg, vg, mask, scale)
        else:
            out[g.q_index] = attend(qg, kg, vg, mask, scale, softcap)
    return out
