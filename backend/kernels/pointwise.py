"""The row-wise work between a layer's GEMMs as Triton kernels: residual add + RMSNorm, and GeGLU.

In a decode step each of these moves a few KB, so its cost is the kernel count, not the bytes. TE's
LayerNormLinear / LayerNormMLP run the RMSNorm as a kernel of its own (~7 us at batch 1 on an H200,
37 of them in a gemma-2b step: 0.26 ms of 2.0 ms), and the residual adds are two more kernels per
layer. `add_rms_norm` does the add and the next norm in one pass over the row:

    x_out = x + branch                      (Gemma 2/3: x + RMSNorm(branch) * (1 + w_branch))
    normed = RMSNorm(x_out) * (1 + w)

Numerics follow HF's Gemma: norms in fp32, their outputs rounded to the model dtype; the sum is
rounded to the model dtype before it is normalised, as HF adds in the model dtype.

`geglu`: tanh-GELU(first half) * second half of the fc1 output (TE's geglu), fp32 math, one rounding.

They run on CPU tensors under TRITON_INTERPRET=1, which is how the CPU suite checks them against
torch (tests/test_fused_pointwise.py). The TE layer's step (backend/te/layers.py) uses them.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm_kernel(x_ptr, branch_ptr, branch_w_ptr, w_ptr, x_out_ptr, normed_ptr, n, eps,
                            sx, sb, sxo, sn,
                            HAS_BRANCH: tl.constexpr, NORM_BRANCH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < n
        x = tl.load(x_ptr + row * sx + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_BRANCH:
            b = tl.load(branch_ptr + row * sb + cols, mask=inside, other=0.0).to(tl.float32)
            if NORM_BRANCH:  # Gemma 2/3's post-attention / post-MLP norm
                bw = tl.load(branch_w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
                b = b * tl.rsqrt(tl.sum(b * b, axis=0) / n + eps) * (1.0 + bw)
                b = b.to(x_out_ptr.dtype.element_ty).to(tl.float32)
            x_sum = (x + b).to(x_out_ptr.dtype.element_ty)
            tl.store(x_out_ptr + row * sxo + cols, x_sum, mask=inside)
            x = x_sum.to(tl.float32)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        y = x * tl.rsqrt(tl.sum(x * x, axis=0) / n + eps) * (1.0 + w)
        tl.store(normed_ptr + row * sn + cols, y.to(normed_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def geglu_kernel(h_ptr, out_ptr, n, sh, so, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < n
        gate = tl.load(h_ptr + row * sh + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * sh + n + cols, mask=inside, other=0.0).to(tl.float32)
        # tanh(u) = 1 - 2 / (exp(2u) + 1): exact at both ends (exp overflowing to inf gives 1).
        u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        tanh_u = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        out = 0.5 * gate * (1.0 + tanh_u) * up
        tl.store(out_ptr + row * so + cols, out.to(out_ptr.dtype.element_ty), mask=inside)

    return add_rms_norm_kernel, geglu_kernel


def _row_block(n: int) -> tuple[int, int]:
    """Whole-row block and warps: one program normalises one row."""
    import triton

    block = triton.next_power_of_2(n)
    return block, max(1, min(16, block // 256))


def add_rms_norm(x: torch.Tensor, branch: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                 branch_weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, branch: [T, hidden] -> (x + branch, or x where branch is None; its zero-centred RMSNorm).
    With branch_weight, the branch is itself RMS-normalised (scale 1 + branch_weight) before the add."""
    add_kernel, _ = _kernels()
    assert x.stride(1) == 1 and (branch is None or branch.stride(1) == 1), "rows must be contiguous"
    rows, n = x.shape
    normed = torch.empty_like(x)
    x_out = x if branch is None else torch.empty_like(x)
    if rows == 0:
        return x_out, normed
    block, warps = _row_block(n)
    has_branch = branch is not None
    add_kernel[(rows,)](
        x, branch if has_branch else x, branch_weight if branch_weight is not None else weight, weight, x_out, normed,
        n, eps, x.stride(0), branch.stride(0) if has_branch else 0, x_out.stride(0), normed.stride(0),
        HAS_BRANCH=has_branch, NORM_BRANCH=branch_weight is not None, BLOCK=block, num_warps=warps)
    return x_out, normed


def geglu(h: torch.Tensor) -> torch.Tensor:
    """h: [T, 2 * ffn] ([gate | up]) -> [T, ffn]: tanh-GELU(gate) * up."""
    _, geglu_kernel = _kernels()
    assert h.stride(1) == 1, "rows must be contiguous"
    rows, width = h.shape
    n = width // 2
    out = torch.empty(rows, n, dtype=h.dtype, device=h.device)
    if rows == 0:
        return out
    block = 1024
    geglu_kernel[(rows, -(-n // block))](h, out, n, h.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out
