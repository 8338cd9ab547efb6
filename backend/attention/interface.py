"""The attention interface every backend implements, and the per-layer and per-step data it takes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from ..batch import HostToDevice, SeqChunk
from ..config import GemmaConfig, RopeSpec
from .layout import Decodes, StepLayout


@dataclass(frozen=True)
class LayerAttention:
    """One layer's attention constants."""
    index: int
    window: Optional[int]  # sliding window (keys within the last `window` positions), None: global
    rope: RopeSpec
    scale: float
    softcap: Optional[float]
    norm_eps: float  # Gemma 3's q/k norms

    @classmethod
    def of(cls, cfg: GemmaConfig, index: int) -> "LayerAttention":
        spec = cfg.layers[index]
        return cls(index, spec.sliding_window, spec.rope, cfg.query_scale, cfg.attn_softcap, cfg.rms_norm_eps)


@dataclass
class StepContext:
    """What every layer of one step shares: the layout and its RoPE tables."""
    layout: StepLayout
    ropes: dict  # RopeSpec -> (cos [T, D], sin [T, D])


class AttentionBackend(Protocol):
    # Tokens per tile when a step with prefill chunks attends in one varlen kernel call per layer
    # (graphs.MixedGraphs captures such steps); None: those steps run eagerly.
    tile_rows: Optional[int]

    def build_step(self, chunks: list[SeqChunk], block_size: int,
                   uploader: HostToDevice) -> tuple[torch.Tensor, StepLayout]: ...

    def decodes(self, kv_slots: torch.Tensor, positions: torch.Tensor) -> Decodes: ...

    def forward(self, layer: LayerAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                step: StepContext, kv_cache, qk_norm=None) -> torch.Tensor: ...
