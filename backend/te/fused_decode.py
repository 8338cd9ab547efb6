"""Fused attention kernels for the GPU path, written in OpenAI Triton (the kernel language).

The plain-torch attention (attention.py) spends ~25 small kernels per layer on RoPE, the cache
write, the context gather, the score matmul, masking, softmax and the value matmul. At decode
batch sizes each kernel moves a few KB, so a step is bound by their count (docs/gpu.md). Two
kernels replace them:

- `rope_and_store`: RoPE on the step's queries and keys (fp32 math, one rounding; Gemma 3's q/k
  RMSNorm first) and the K/V write into the paged cache, for every token of the step (prefill rows
  too). Returns the rotated queries.
- `decode_attention`: one new token per sequence against its cached context, read through the
  sequence's slot list (build_step's decode layout: column j holds position j). The causal and
  sliding-window masks come from the query position; scores and softmax in fp32, optional tanh
  softcap (Gemma 2). One program per (sequence, KV head, context split) covers the KV head's G
  query heads, so a multi-query model reads each key once.

Context splits have a fixed size (SPLIT_KEYS), not a fixed count: a sequence's result does not
depend on how far its slot list was padded (graph buckets) or on the other sequences, so a CUDA
graph replay and an eager step give bitwise equal outputs. Splits past the context do no work; with
more than one split a second kernel merges the partial softmaxes.

The kernels run on CPU tensors under TRITON_INTERPRET=1, which is how the CPU test suite checks
them against the torch path (tests/test_fused_decode.py).
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch

SPLIT_KEYS = 256  # keys per context split: long contexts spread over more programs
BLOCK_KEYS = 32  # keys per inner iteration of a split


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the Triton compiler is installed (the GPU path then uses these kernels)."""
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=1)
def _kernels():
    """Compile-on-import is deferred: importing this module must not require Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                          slot_ptr, valid_ptr, q_norm_ptr, k_norm_ptr, eps, num_stored,
                          sq_t, sq_kv, sq_g, sk_t, sk_h, sv_t, sv_h, sc_t, sqo_t, sqo_h, skc_s, skc_h, svc_s, svc_h,
                          G: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                          HAS_VALID: tl.constexpr, QK_NORM: tl.constexpr):
        t = tl.program_id(0)
        kv = tl.program_id(1)
        d = tl.arange(0, BLOCK_HALF)
        dm = d < HALF
        cos1 = tl.load(cos_ptr + t * sc_t + d, mask=dm, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + t * sc_t + HALF + d, mask=dm, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + t * sc_t + d, mask=dm, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + t * sc_t + HALF + d, mask=dm, other=0.0).to(tl.float32)
        dtype = q_out_ptr.dtype.element_ty  # the model dtype, which HF's q/k norms return
        if QK_NORM:  # Gemma 3's zero-centred RMSNorm of each query and key head before RoPE
            q_scale1 = 1.0 + tl.load(q_norm_ptr + d, mask=dm, other=0.0).to(tl.float32)
            q_scale2 = 1.0 + tl.load(q_norm_ptr + HALF + d, mask=dm, other=0.0).to(tl.float32)
        for g in range(G):  # this KV group's query heads
            head = kv * G + g
            src = q_ptr + t * sq_t + kv * sq_kv + g * sq_g
            x1 = tl.load(src + d, mask=dm, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF + d, mask=dm, other=0.0).to(tl.float32)
            if QK_NORM:
                r = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
                x1, x2 = (x1 * r * q_scale1).to(dtype).to(tl.float32), (x2 * r * q_scale2).to(dtype).to(tl.float32)
            dst = q_out_ptr + t * sqo_t + head * sqo_h
            tl.store(dst + d, (x1 * cos1 - x2 * sin1).to(q_out_ptr.dtype.element_ty), mask=dm)
            tl.store(dst + HALF + d, (x2 * cos2 + x1 * sin2).to(q_out_ptr.dtype.element_ty), mask=dm)
        # Rows past num_stored (FP8 row padding) and invalid rows (graph batch padding) write nothing.
        store = t < num_stored
        if HAS_VALID:
            store = store & (tl.load(valid_ptr + t) != 0)
        if store:
            slot = tl.load(slot_ptr + t)
            src = k_ptr + t * sk_t + kv * sk_h
            x1 = tl.load(src + d, mask=dm, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF + d, mask=dm, other=0.0).to(tl.float32)
            if QK_NORM:
                r = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
                k_scale1 = 1.0 + tl.load(k_norm_ptr + d, mask=dm, other=0.0).to(tl.float32)
                k_scale2 = 1.0 + tl.load(k_norm_ptr + HALF + d, mask=dm, other=0.0).to(tl.float32)
                x1, x2 = (x1 * r * k_scale1).to(dtype).to(tl.float32), (x2 * r * k_scale2).to(dtype).to(tl.float32)
            dst = k_cache_ptr + slot * skc_s + kv * skc_h
            tl.store(dst + d, (x1 * cos1 - x2 * sin1).to(k_cache_ptr.dtype.element_ty), mask=dm)
            tl.store(dst + HALF + d, (x2 * cos2 + x1 * sin2).to(k_cache_ptr.dtype.element_ty), mask=dm)
            src = v_ptr + t * sv_t + kv * sv_h
            dst = v_cache_ptr + slot * svc_s + kv * svc_h
            tl.store(dst + d, tl.load(src + d, mask=dm).to(v_cache_ptr.dtype.element_ty), mask=dm)
            tl.store(dst + HALF + d, tl.load(src + HALF + d, mask=dm).to(v_cache_ptr.dtype.element_ty), mask=dm)

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
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N]
            if HAS_SOFTCAP:  # softcap * tanh(s / softcap), tanh from exp (no libdevice in the interpreter)
                s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            denom = denom * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + slots[:, None] * svc_s + kv * svc_h + d[None, :],
                        mask=live[:, None] & dm[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
            m = m_new
        if NUM_SPLITS == 1:
            out = acc / denom[:, None]
            tl.store(out_ptr + b * so_b + heads[:, None] * so_h + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=gm[:, None] & dm[None, :])
        else:  # partial results [B, H, NUM_SPLITS, D] and (max, denominator) [B, H, NUM_SPLITS, 2]
            row = (b * (tl.num_programs(1) * G) + heads) * NUM_SPLITS + split
            tl.store(part_ptr + row[:, None] * D + d[None, :], acc, mask=gm[:, None] & dm[None, :])
            tl.store(ml_ptr + row * 2, m, mask=gm)
            tl.store(ml_ptr + row * 2 + 1, denom, mask=gm)

    @triton.jit
    def merge_kernel(part_ptr, ml_ptr, out_ptr, so_b, so_h, H: tl.constexpr, D: tl.constexpr,
                     BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        sm = s < NUM_SPLITS
        row = (b * H + h) * NUM_SPLITS + s
        m = tl.load(ml_ptr + row * 2, mask=sm, other=float("-inf"))
        denom = tl.load(ml_ptr + row * 2 + 1, mask=sm, other=0.0)
        m_all = tl.max(m, 0)  # finite: the split holding the query's own position is never empty
        w = tl.where(sm & (denom > 0), tl.exp(m - m_all), 0.0)  # empty splits weigh exactly 0
        part = tl.load(part_ptr + row[:, None] * D + d[None, :], mask=sm[:, None] & (d[None, :] < D), other=0.0)
        out = tl.sum(part * w[:, None], 0) / tl.sum(denom * w, 0)
        tl.store(out_ptr + b * so_b + h * so_h + d, out.to(out_ptr.dtype.element_ty), mask=d < D)

    return rope_store_kernel, decode_kernel, merge_kernel


def _pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, 1 << (n - 1).bit_length())


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   row_valid: Optional[torch.Tensor] = None,
                   qk_norm: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None) -> torch.Tensor:
    """q [T, KV, G, D] (query heads grouped by KV head, as sliced from TE's fused QKV), k/v [T, KV, D]
    (any strides with a unit last stride), cos/sin [T, D] -> rotated q [T, KV * G, D]; rotated k and
    v are written at `slot_mapping` [T_real <= T] of the caches [slots, KV, D]. Rows with row_valid
    False are not written. qk_norm = (q weight [D], k weight [D], eps): Gemma 3's zero-centred RMSNorm
    of each query and key head before RoPE."""
    T, kv_heads, G, D = q.shape
    assert D % 2 == 0 and q.stride(3) == k.stride(2) == v.stride(2) == 1 and cos.stride(1) == 1
    q_out = torch.empty((T, kv_heads * G, D), dtype=q.dtype, device=q.device)
    if T == 0:
        return q_out
    rope_store, _, _ = _kernels()
    valid = row_valid if row_valid is not None else slot_mapping  # any pointer; unread without HAS_VALID
    q_norm, k_norm, eps = qk_norm if qk_norm is not None else (q, q, 0.0)  # unread without QK_NORM
    rope_store[(T, kv_heads)](
        q, k, v, cos, sin, q_out, k_cache, v_cache, slot_mapping, valid, q_norm, k_norm, eps, slot_mapping.shape[0],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        q_out.stride(0), q_out.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        G=G, HALF=D // 2, BLOCK_HALF=_pow2(D // 2), HAS_VALID=row_valid is not None, QK_NORM=qk_norm is not None)
    return q_out


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
    _, decode, merge = _kernels()
    num_splits = -(-kv_slots.shape[1] // SPLIT_KEYS)
    if num_splits > 1:
        part = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
        ml = torch.empty((B, H, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part = ml = out  # unused: the kernel writes the output directly
    G = H // kv_heads
    decode[(B, kv_heads, num_splits)](
        q, k_cache, v_cache, kv_slots, positions, out, part, ml,
        scale, softcap or 1.0, window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        kv_slots.stride(0), out.stride(0), out.stride(1),
        G=G, D=D, BLOCK_G=_pow2(G, 16), BLOCK_D=_pow2(D, 16), BLOCK_N=BLOCK_KEYS, SPLIT=SPLIT_KEYS,
        NUM_SPLITS=num_splits, HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # fp32 models: no TF32 rounding
    if num_splits > 1:
        merge[(B, H)](part, ml, out, out.stride(0), out.stride(1), H=H, D=D, BLOCK_D=_pow2(D, 16),
                      NUM_SPLITS=num_splits, BLOCK_S=_pow2(num_splits))
    return out
