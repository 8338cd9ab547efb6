"""One attention interface, chosen when the model is built.

A backend lays out each step's scheduled chunks itself (`build_step` -> token ids and a
`layout.StepLayout` holding its own metadata) and runs one layer's attention of that step
(`forward`: RoPE, the K/V write and attention over the paged cache, for q/k/v straight from the QKV
projection). Two backends, one per module:

    reference.py  TorchAttention: plain torch, grouped layouts with masks (the reference model; any device)
    fused.py      FusedAttention: Triton kernels (backend/kernels/), decode and varlen layouts (GPU)

The runner asks the model's backend for the step's layout, and the CUDA graphs of decode steps ask it
for the fixed-shape decode metadata (`decodes`); `tile_rows` says whether mixed steps are one kernel
call (and so graph-capturable).
"""
from __future__ import annotations

from ..config import GemmaConfig
from ..kernels import available as kernels_available
from .fused import FusedAttention
from .interface import AttentionBackend, LayerAttention, StepContext
from .reference import TorchAttention

__all__ = ["AttentionBackend", "FusedAttention", "LayerAttention", "StepContext", "TorchAttention",
           "attention_backend"]


def attention_backend(cfg: GemmaConfig, kernels: bool) -> AttentionBackend:
    """The Triton kernels' backend where asked for and Triton is installed, else the reference's."""
    if kernels and kernels_available():
        return FusedAttention(cfg.queries_per_kv)
    return TorchAttention({layer.sliding_window for layer in cfg.layers})
