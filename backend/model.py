"""Reference Gemma 1/2/3 decoder in plain PyTorch, reading and writing a paged KV cache.

The math is HF transformers' (our correctness oracle), written where it happens: RMSNorm
`x * (1 + w)` in fp32, embeddings scaled by sqrt(hidden) in the model dtype, tanh-GELU GeGLU with the
gate first, query scaling per family, optional logit softcapping, per-layer sliding windows and
RoPE bases. Parameter layouts are TransformerEngine's (fused QKV grouped per KV head, fc1 = [gate; up],
raw norm weights for zero-centred gamma) so both paths load the same mapped tensors.

One forward call runs one engine step: the new tokens of every scheduled sequence, flattened.
Linear layers see all of them at once; attention runs batched for single-token decodes and per
sequence for prefill chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import GemmaConfig, RopeSpec


@dataclass
class AttentionGroup:
    """Sequences whose attention is computed together: `q_index` rows of the flattened tokens
    attend to cache slots `kv_slots`; masks[window] is additive, one per distinct sliding window."""
    q_index: Optional[torch.Tensor]  # [B, n] rows of the step's tokens; None: row b is sequence b's one token
    kv_slots: torch.Tensor  # [B, ctx] flat cache slots of each sequence's context (padded)
    masks: dict[int | None, torch.Tensor]  # window -> [B, n, ctx] additive mask


@dataclass
class VarlenLayout:
    """Every chunk of a step attends in one kernel call per layer (models with a varlen attention
    kernel, backend/te/fused_varlen.py): chunk i's rows read its context through block_tables[i]."""
    block_tables: torch.Tensor  # [S, W] cache blocks of each scheduled sequence, in chunk order
    tiles: torch.Tensor  # [N, 4] int32 (sequence row, first token row, rows, first position); rows 0: padding
    block_size: int


@dataclass
class StepLayout:
    """Where the step's flattened tokens sit: their positions, cache slots, attention groups, and
    which rows need logits (the last token of each sequence that samples this step)."""
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    groups: list[AttentionGroup]
    logit_rows: Optional[torch.Tensor]  # [S]; None: every row (a graph-captured decode step)
    # Fixed-shape graph steps (graphs.py) only: False for padding rows, which must not write K/V.
    row_valid: Optional[torch.Tensor] = None
    varlen: Optional[VarlenLayout] = None  # set instead of groups for models with varlen attention


def write_kv(k_slots: torch.Tensor, v_slots: torch.Tensor, slot_mapping: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, row_valid: Optional[torch.Tensor] = None) -> None:
    """Store the step's keys/values ([T, KV, D]) at their cache slots.

    With `row_valid` (fixed-shape graph steps), padding rows carry row 0's slot and are given row
    0's values, so the duplicate writes are identical and no other slot is touched."""
    n = slot_mapping.shape[0]
    k, v = k[:n], v[:n]
    if row_valid is not None:
        keep = row_valid[:n, None, None]
        k = torch.where(keep, k, k[:1])
        v = torch.where(keep, v, v[:1])
    k_slots.index_copy_(0, slot_mapping, k.to(k_slots.dtype))
    v_slots.index_copy_(0, slot_mapping, v.to(v_slots.dtype))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T; a weight prepacked by `prepare_for_cpu` runs on oneDNN's kernel."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # raw: the scale is (1 + weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF: x * rsqrt(mean(x^2) + eps) * (1 + w), all in fp32; one fused kernel does the same.
        return F.rms_norm(x.float(), self.weight.shape, 1.0 + self.weight.float(), self.eps).type_as(x)


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


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.window = cfg.layers[layer_idx].sliding_window
        qkv_rows = cfg.num_kv_heads * (cfg.queries_per_kv + 2) * cfg.head_dim
        # TE's fused QKV layout: for each KV group, its query heads, then its key, then its value.
        self.qkv_weight = nn.Parameter(torch.empty(qkv_rows, cfg.hidden_size))
        self.o_weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.num_heads * cfg.head_dim))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, layout: StepLayout, rope: tuple[torch.Tensor, torch.Tensor], kv_cache):
        cfg = self.cfg
        T = x.shape[0]
        qkv = linear(x, self.qkv_weight).view(T, cfg.num_kv_heads, cfg.queries_per_kv + 2, cfg.head_dim)
        q = qkv[:, :, : cfg.queries_per_kv].reshape(T, cfg.num_heads, cfg.head_dim)
        k = qkv[:, :, cfg.queries_per_kv]
        v = qkv[:, :, cfg.queries_per_kv + 1]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        k_slots, v_slots = kv_cache.layer(self.layer_idx)
        write_kv(k_slots, v_slots, layout.slot_mapping, k, v, layout.row_valid)

        if len(layout.groups) == 1:  # the common all-decode (or single-prefill) step: no scatter
            group = layout.groups[0]
            rows = (T, 1) if group.q_index is None else group.q_index.shape
            out = self._attend(q.view(*rows, *q.shape[1:]), k_slots[group.kv_slots],
                               v_slots[group.kv_slots], group.masks[self.window])
        else:
            out = torch.empty_like(q)
            for group in layout.groups:
                out[group.q_index] = self._attend(q[group.q_index], k_slots[group.kv_slots],
                                                  v_slots[group.kv_slots], group.masks[self.window])
        return linear(out.reshape(T, -1), self.o_weight)

    def _attend(self, q, k, v, mask):
        """q: [B, n, H, D]; k, v: [B, ctx, KV, D]; mask: [B, n, ctx] additive -> [B, n, H, D]."""
        cfg = self.cfg
        q, k, v = q.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2)
        mask = mask[:, None].to(q.dtype)
        if cfg.attn_softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=cfg.query_scale, enable_gqa=True)
            return out.transpose(1, 2)
        # Gemma 2 caps the scores with tanh before the mask; SDPA has no hook for that.
        B, H, n, D = q.shape
        q = q.reshape(B, cfg.num_kv_heads, cfg.queries_per_kv * n, D)
        scores = torch.matmul(q, k.transpose(-1, -2)) * cfg.query_scale  # [B, KV, G*n, ctx]
        scores = torch.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
        scores = scores.view(B, H, n, -1) + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs.view(B, cfg.num_kv_heads, cfg.queries_per_kv * n, -1), v)
        return out.view(B, H, n, D).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.fc1_weight = nn.Parameter(torch.empty(2 * cfg.intermediate_size, cfg.hidden_size))  # [gate; up]
        self.fc2_weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.intermediate_size))

    def forward(self, x):
        gate, up = linear(x, self.fc1_weight).chunk(2, dim=-1)
        return linear(F.gelu(gate, approximate="tanh") * up, self.fc2_weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.sandwich = cfg.sandwich_norms
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        if self.sandwich:
            self.attn_out_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.mlp_out_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, layout, rope, kv_cache):
        h = self.attn(self.attn_norm(x), layout, rope, kv_cache)
        x = x + (self.attn_out_norm(h) if self.sandwich else h)
        h = self.mlp(self.mlp_norm(x))
        return x + (self.mlp_out_norm(h) if self.sandwich else h)


class GemmaModel(nn.Module):
    row_multiple = 1  # any number of token rows per step (graphs.py buckets by this)
    tile_rows = None  # no varlen attention kernel: steps attend by groups

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope_specs = sorted({layer.rope for layer in cfg.layers}, key=lambda s: (s.theta, s.linear_factor))
        # A CPU copy of the tied embedding prepacked for the LM head (see prepare_for_cpu).
        self.lm_head_packed: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, layout: StepLayout, kv_cache) -> torch.Tensor:
        """token_ids: [T] -> float32 logits [S, vocab] for `layout.logit_rows`."""
        dtype = self.embed.dtype
        x = F.embedding(token_ids, self.embed) * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=dtype)
        ropes = {s: rope_cos_sin(s, self.cfg.head_dim, layout.positions, dtype) for s in self.rope_specs}
        for layer, spec in zip(self.layers, self.cfg.layers):
            x = layer(x, layout, ropes[spec.rope], kv_cache)
        x = self.final_norm(x if layout.logit_rows is None else x[layout.logit_rows])
        return self.logits(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.embed if self.lm_head_packed is None else self.lm_head_packed)
        logits = logits.float()
        if self.cfg.final_softcap is not None:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits


@torch.no_grad()
def prepare_for_cpu(model: GemmaModel, expected_rows: int = 8) -> GemmaModel:
    """Reorder the weights for oneDNN's CPU matmuls (same values and dtype; the LM head becomes a
    second copy of the embedding). MKL reads [out, in] weights slowly when few rows multiply them.
    Measured on a 2-core AMD EPYC, fp32, Gemma 3 270M LM head: MKL 57 / 123 ms for 1 / 8 rows on one
    thread, prepacked 48 / 50 ms; on two threads prepacked 26 ms for 1 row, the memory-bandwidth floor
    (a sum over the same tensor also takes 27 ms).
    """
    if not torch.backends.mkldnn.is_available():
        return model
    for module in model.modules():
        for name in ("qkv_weight", "o_weight", "fc1_weight", "fc2_weight"):
            if name in module._parameters:
                packed = torch.ops.mkldnn._reorder_linear_weight(module._parameters.pop(name).data, expected_rows)
                setattr(module, name, packed)
    model.lm_head_packed = torch.ops.mkldnn._reorder_linear_weight(model.embed.data, expected_rows)
    return model
