"""Attention by Triton kernels (backend/kernels/): the GPU path's backend where Triton is installed.

Per layer, two kernels replace the reference backend's ~25 small ones: `rope_and_store` (Gemma 3's
q/k norms, RoPE, the K/V write) and one attention call. A decode-only step is `Decodes` (no masks:
the kernel bounds each row by its position) and runs `decode_attention`; a step holding prefill
chunks is a `VarlenLayout` and runs `varlen_attention` once for every row, which lets the runner
capture mixed steps in CUDA graphs too (`tile_rows` set).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..batch import HostToDevice, SeqChunk
from ..kernels.decode import decode_attention
from ..kernels.rope_store import rope_and_store
from ..kernels.varlen import tile_rows, varlen_attention
from .interface import LayerAttention, StepContext
from .layout import Decodes, StepLayout, VarlenLayout, grouped_layout, varlen_layout


class FusedAttention:
    def __init__(self, queries_per_kv: int):
        self.tile_rows = tile_rows(queries_per_kv)  # tokens per varlen tile (MixedGraphs sizes its tables by it)

    def build_step(self, chunks: list[SeqChunk], block_size: int,
                   uploader: HostToDevice) -> tuple[torch.Tensor, StepLayout]:
        if all(len(c.token_ids) == 1 for c in chunks):
            return grouped_layout(chunks, block_size, uploader, windows=set())
        return varlen_layout(chunks, block_size, uploader, self.tile_rows)

    def decodes(self, kv_slots: torch.Tensor, positions: torch.Tensor) -> Decodes:
        return Decodes(kv_slots)

    def forward(self, layer: LayerAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepContext,
                kv_cache, qk_norm=None) -> torch.Tensor:
        """q [T, KV, G, D], k/v [T, KV, D] (before RoPE; strided views of a fused QKV output are
        fine) -> [T, H, D]. qk_norm: Gemma 3's (q norm, k norm) modules; their weights go to the
        kernel. Rows past the layout's (FP8 row padding) come out zero."""
        layout = step.layout
        cos, sin = step.ropes[layer.rope]
        k_slots, v_slots = kv_cache.layer(layer.index)
        norms = None if qk_norm is None else (qk_norm[0].weight, qk_norm[1].weight, layer.norm_eps)
        q = rope_and_store(q, k, v, cos, sin, k_slots, v_slots, layout.slot_mapping, layout.row_valid, norms)
        meta = layout.attention
        if isinstance(meta, VarlenLayout):  # rows in no tile (padding) come out zero
            return varlen_attention(q, k_slots, v_slots, meta.block_tables, meta.tiles, meta.block_size, layer.scale,
                                    layer.softcap, layer.window)
        T, B = q.shape[0], meta.kv_slots.shape[0]
        out = decode_attention(q[:B], k_slots, v_slots, meta.kv_slots, layout.positions[:B], layer.scale,
                               layer.softcap, layer.window)
        return out if B == T else F.pad(out, (0, 0, 0, 0, 0, T - B))
