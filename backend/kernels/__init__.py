"""Triton (the kernel language) kernels of the GPU path; none of them is TransformerEngine code.

    online_softmax.py  the inner loop both attention kernels share, and the one merge of split partials
    rope_store.py      RoPE (Gemma 3's q/k norms first) and the K/V write into the paged cache
    decode.py          one new token per sequence against its cached context (decode-only steps)
    varlen.py          every row of a mixed step (prefill tiles and decodes) in one call per layer
    pointwise.py       residual add + RMSNorm, and GeGLU, between a layer's GEMMs

Each module defines its kernels on first use, so importing it needs no Triton; `available()` says
whether Triton is installed. Under TRITON_INTERPRET=1 they run on CPU tensors (the CPU test suite).
"""
from __future__ import annotations

import functools
import importlib.util

import torch


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the Triton compiler is installed (the GPU path then uses these kernels)."""
    return importlib.util.find_spec("triton") is not None


def pow2(n: int, at_least: int = 1) -> int:
    """The power of two >= n (and >= at_least): Triton block shapes are powers of two."""
    return max(at_least, 1 << (n - 1).bit_length())


def split_buffers(tiles: int, kv_heads: int, splits: int, rows: int, head_dim: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A split attention call's partial results [tiles, KV, splits, rows, D] and (max, denominator)
    [..., rows, 2], fp32, as online_softmax.merge_kernel reads them."""
    return (torch.empty((tiles, kv_heads, splits, rows, head_dim), dtype=torch.float32, device=device),
            torch.empty((tiles, kv_heads, splits, rows, 2), dtype=torch.float32, device=device))
