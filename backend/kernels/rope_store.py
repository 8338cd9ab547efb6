"""RoPE and the K/V write of every token of a step, as one Triton kernel (the kernel language).

The plain-torch path spends several small kernels per layer on Gemma 3's q/k norms, the rotation
of q and k and the two cache writes; at decode batch sizes each moves a few KB, so their count is
the cost (docs/gpu.md). `rope_and_store` does all of it in one pass: q/k RMSNorm (Gemma 3), RoPE in
fp32 with the model-dtype cos/sin tables (one rounding instead of four), K and V written at each
token's cache slot. It reads q/k/v as strided views of TE's fused QKV output (no copies). Rows past
the stored tokens (FP8 row padding) and invalid rows (graph batch padding) write nothing.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import pow2


@functools.lru_cache(maxsize=1)
def _kernel():
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

    return rope_store_kernel


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
    rope_store = _kernel()
    valid = row_valid if row_valid is not None else slot_mapping  # any pointer; unread without HAS_VALID
    q_norm, k_norm, eps = qk_norm if qk_norm is not None else (q, q, 0.0)  # unread without QK_NORM
    rope_store[(T, kv_heads)](
        q, k, v, cos, sin, q_out, k_cache, v_cache, slot_mapping, valid, q_norm, k_norm, eps, slot_mapping.shape[0],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        q_out.stride(0), q_out.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        G=G, HALF=D // 2, BLOCK_HALF=pow2(D // 2), HAS_VALID=row_valid is not None, QK_NORM=qk_norm is not None)
    return q_out

