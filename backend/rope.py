"""Rotary position embeddings as HF Gemma computes them (every model and attention backend uses these)."""
from __future__ import annotations

import torch

from .config import RopeSpec


def rope_cos_sin(spec: RopeSpec, head_dim: int, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin for `positions` ([T] -> [T, head_dim]), computed in fp32 as HF does."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (spec.theta ** exponent) / spec.linear_factor
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotate-half RoPE as in HF Gemma."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
