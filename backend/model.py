"""Reference Gemma 1/2/3 decoder in plain PyTorch, reading and writing a paged KV cache.

The math is HF transformers' (our correctness oracle), written where it happens: RMSNorm
`x * (1 + w)` in fp32, embeddings scaled by sqrt(hidden) in the model dtype, tanh-GELU GeGLU with the
gate first, query scaling per family, optional logit softcapping, per-layer sliding windows and
RoPE bases. Parameter layouts are TransformerEngine's (fused QKV grouped per KV head, fc1 = [gate; up],
raw norm weights for zero-centred gamma) so both paths load the same mapped tensors.

One forward call runs one engine step: the new tokens of every scheduled sequence, flattened.
Linear layers see all of them at once; attention is the plain-torch backend's (attention/reference.py:
batched for single-token decodes, per sequence for prefill chunks).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import LayerAttention, StepContext, TorchAttention
from .attention.layout import StepLayout
from .config import GemmaConfig
from .rope import rope_cos_sin


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


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int, backend: TorchAttention):
        super().__init__()
        self.cfg = cfg
        self.spec = LayerAttention.of(cfg, layer_idx)
        self.backend = backend
        qkv_rows = cfg.num_kv_heads * (cfg.queries_per_kv + 2) * cfg.head_dim
        # TE's fused QKV layout: for each KV group, its query heads, then its key, then its value.
        self.qkv_weight = nn.Parameter(torch.empty(qkv_rows, cfg.hidden_size))
        self.o_weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.num_heads * cfg.head_dim))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, step: StepContext, kv_cache):
        cfg = self.cfg
        T = x.shape[0]
        qkv = linear(x, self.qkv_weight).view(T, cfg.num_kv_heads, cfg.queries_per_kv + 2, cfg.head_dim)
        q, k, v = qkv[:, :, :cfg.queries_per_kv], qkv[:, :, cfg.queries_per_kv], qkv[:, :, cfg.queries_per_kv + 1]
        qk_norm = (self.q_norm, self.k_norm) if cfg.qk_norm else None
        out = self.backend.forward(self.spec, q, k, v, step, kv_cache, qk_norm)
        return linear(out.reshape(T, -1), self.o_weight)


class MLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.fc1_weight = nn.Parameter(torch.empty(2 * cfg.intermediate_size, cfg.hidden_size))  # [gate; up]
        self.fc2_weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.intermediate_size))

    def forward(self, x):
        gate, up = linear(x, self.fc1_weight).chunk(2, dim=-1)
        return linear(F.gelu(gate, approximate="tanh") * up, self.fc2_weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int, backend: TorchAttention):
        super().__init__()
        self.sandwich = cfg.sandwich_norms
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_idx, backend)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        if self.sandwich:
            self.attn_out_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.mlp_out_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, step: StepContext, kv_cache):
        h = self.attn(self.attn_norm(x), step, kv_cache)
        x = x + (self.attn_out_norm(h) if self.sandwich else h)
        h = self.mlp(self.mlp_norm(x))
        return x + (self.mlp_out_norm(h) if self.sandwich else h)


class GemmaModel(nn.Module):
    row_multiple = 1  # any number of token rows per step (graphs.py buckets by this)

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        # The reference attends in plain torch on any device: it is the oracle of the kernels too.
        self.attention = TorchAttention({layer.sliding_window for layer in cfg.layers})
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.attention) for i in range(cfg.num_layers))
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
    def forward(self, token_ids: torch.Tensor, layout: StepLayout, kv_cache,
                logits_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """token_ids: [T] -> float32 logits [S, vocab] for `layout.logit_rows` (written into
        `logits_out` where given: backend/graphs.py's one buffer for all its graphs)."""
        dtype = self.embed.dtype
        x = F.embedding(token_ids, self.embed) * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=dtype)
        step = StepContext(layout, {s: rope_cos_sin(s, self.cfg.head_dim, layout.positions, dtype)
                                    for s in self.rope_specs})
        for layer in self.layers:
            x = layer(x, step, kv_cache)
        x = self.final_norm(x if layout.logit_rows is None else x[layout.logit_rows])
        return self.logits(x, logits_out)

    def logits(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return float_logits(linear(hidden, self.embed if self.lm_head_packed is None else self.lm_head_packed),
                            self.cfg.final_softcap, out)


def float_logits(logits: torch.Tensor, softcap: Optional[float], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The LM head's output as float32 logits, softcapped where the family does (Gemma 2), in `out` if
    given (as many kernels either way: the cast is a copy into it, the softcap in place)."""
    if out is None:
        out = logits.float()
    else:
        out.copy_(logits)
    if softcap is not None:
        out.div_(softcap).tanh_().mul_(softcap)
    return out


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
