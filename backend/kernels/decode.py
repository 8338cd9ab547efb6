"""Decode attention as one Triton kernel: one new token per sequence against its cached context.

Each sequence's context is read through its slot list (column j: the cache slot of position j, as
the attention layout lays out a decode-only step). The causal and sliding-window bounds come from the
query's position, so no mask tensor is built; scores and softmax in fp32 (online_softmax.py),
optional tanh softcap (Gemma 2). One program per (sequence, KV head, context split) covers the KV
head's G query heads as one [16, D] tile, so a multi-query model reads each key once.

Context splits have a fixed size (SPLIT_KEYS), not a fixed count: a sequence's result does not
depend on how far its slot list was padded (graph buckets) or on the other sequences, so a CUDA
graph replay and an eager step give bitwise equal outputs. Splits past the context do no work; with
more than one split the shared merge kernel adds up the partial softmaxes.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import pow2, split_buffers

SPLIT_KEYS = 256  # keys per context split: long contexts spread over more programs
BLOCK_KEYS = 32  # keys per inner iteration of a split


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    # A module global: Triton (and its interpreter, which re-executes the kernel's source) looks up
    # the functions a kernel calls among its module's globals, not in the enclosing scope.
    global online_softmax_block
    from .online_softmax import merge_kernel, online_softmax_block

    @triton.jit
    def decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, kv_slots_ptr, pos_ptr, out_ptr, part_ptr, ml_ptr,
                      scale, softcap, window,
                      sq_b, sq_h, skc_s, skc_h, svc_s, svc_h, sks_b, so_b, so_h,
                      G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
        b = tl.program_id(0)
        kv = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        gm = g < G
        dm = d < D
        pos = tl.load(pos_ptr + b)
        lo = split * SPLIT
        hi = tl.minimum(lo + SPLIT, pos + 1)  # causal: keys at positions 0..pos
        if HAS_WINDOW:  # key j visible iff pos - window < j
            lo = tl.maximum(lo, pos - window + 1)
        heads = kv * G + g
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=gm[:, None] & dm[None, :],
                    other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for start in range(lo - lo % BLOCK_N, hi, BLOCK_N):  # every block holds a visible key
            cols = start + tl.arange(0, BLOCK_N)
            live = (cols >= lo) & (cols < hi)
            slots = tl.load(kv_slots_ptr + b * sks_b + cols, mask=live, other=0)
            k = tl.load(k_cache_ptr + slots[:, None] * skc_s + kv * skc_h + d[None, :],
                        mask=live[:, None] & dm[None, :], other=0.0)
            m, denom, acc = online_softmax_block(
                q, k, v_cache_ptr + slots[:, None] * svc_s + kv * svc_h + d[None, :], live[:, None] & dm[None, :],
                live[None, :], m, denom, acc, scale, softcap, HAS_SOFTCAP, PRECISION)
        if NUM_SPLITS == 1:
            out = acc / denom[:, None]
            tl.store(out_ptr + b * so_b + heads[:, None] * so_h + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=gm[:, None] & dm[None, :])
        else:  # merge_kernel's layout: sequence b is tile b, its G heads the first rows of BLOCK_G
            row = ((b * tl.num_programs(1) + kv) * NUM_SPLITS + split) * BLOCK_G + g
            tl.store(part_ptr + row[:, None] * D + d[None, :], acc, mask=gm[:, None] & dm[None, :])
            tl.store(ml_ptr + row * 2, m, mask=gm)
            tl.store(ml_ptr + row * 2 + 1, denom, mask=gm)

    return decode_kernel, merge_kernel


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_slots: torch.Tensor,
                     positions: torch.Tensor, scale: float, softcap: Optional[float],
                     window: Optional[int]) -> torch.Tensor:
    """q [B, H, D] (one new token per sequence, at `positions` [B]); kv_slots [B, ctx] with column j
    the cache slot of position j (entries past a sequence's position are never read) -> [B, H, D]."""
    B, H, D = q.shape
    kv_heads = k_cache.shape[1]
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and kv_slots.stride(1) == 1
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    decode, merge = _kernel()
    G = H // kv_heads
    block_g, block_d = pow2(G, 16), pow2(D, 16)
    num_splits = -(-kv_slots.shape[1] // SPLIT_KEYS)
    part, ml = split_buffers(B, kv_heads, num_splits, block_g, D, q.device) if num_splits > 1 else (out, out)
    decode[(B, kv_heads, num_splits)](
        q, k_cache, v_cache, kv_slots, positions, out, part, ml,
        scale, softcap or 1.0, window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        kv_slots.stride(0), out.stride(0), out.stride(1),
        G=G, D=D, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=BLOCK_KEYS, SPLIT=SPLIT_KEYS,
        NUM_SPLITS=num_splits, HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # fp32 models: no TF32 rounding
    if num_splits > 1:
        merge[(B, kv_heads)](part, ml, part, out, out.stride(0), out.stride(1), G=G, D=D, BLOCK_M=1,
                             ROWS=block_g, BLOCK_D=block_d, NUM_SPLITS=num_splits, TILED=False)
    return out
