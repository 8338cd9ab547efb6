"""TEGemmaModel: the engine's model contract, computed with TransformerEngine layers on the GPU.

    forward(token_ids [T], layout: StepLayout, kv_cache: PagedKVCache) -> fp32 logits [S, vocab]

Same contract and math as backend.model.GemmaModel (the reference): embedding scaled by
sqrt(hidden) in the model dtype, TEGemmaDecoderLayer.step per layer (TE GEMMs/norms/MLP, attention
over the paged cache; each layer's MLP output is added by the norm after it), the last layer's MLP
output added and the final zero-centred RMSNorm on the rows that need logits, tied LM head in the
model dtype, optional final softcap, fp32 logits.

Attention is the backend chosen when the model is built (`self.attention`, backend/attention/):
Triton kernels where Triton is installed, else plain torch. Every call runs eagerly; the engine's
runner replays decode-only steps (and, with the kernels, mixed steps) from CUDA graphs of this
forward (backend/graphs.py). With fp8=True the TE GEMMs run in FP8 (Hopper) with FP8 weights (the
LM head stays in the model dtype); FP8 GEMMs need a multiple of 8 rows, so steps pad the token rows
(`row_multiple`: graph buckets are multiples of 8).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from backend.attention import StepContext, attention_backend
from backend.attention.layout import StepLayout
from backend.config import GemmaConfig
from backend.model import float_logits
from backend.rope import rope_cos_sin

from . import import_te
from .layers import TEGemmaDecoderLayer, add_then_norm, strict_copy

FP8_ROWS = 8  # TE's FP8 GEMMs need the product of leading dims divisible by 8


def make_fp8_recipe(name: str):
    """"delayed" (the default): TE's amax-history recipe: each GEMM input is cast with a scale from
    earlier amaxes, no extra pass (gemma-2b decode 1.13-1.26x faster than bf16, top-1 1.00; docs/gpu.md);
    "current": per-tensor current scaling (an amax pass per input: slower than bf16 in decode steps);
    "block": 1x128 / 128x128 block scaling (Hopper, closer to bf16)."""
    from transformer_engine.common import recipe

    if name == "current":
        return recipe.Float8CurrentScaling()
    if name == "block":
        return recipe.Float8BlockScaling()
    if name == "delayed":
        return recipe.DelayedScaling()
    raise ValueError(f"fp8 recipe must be current, block or delayed, not {name!r}")


class TEGemmaModel(nn.Module):
    def __init__(self, cfg: GemmaConfig, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cuda",
                 fp8: bool = False, fp8_recipe: str = "delayed", fused: bool = True, fp8_lm_head: bool = False,
                 fused_norms: bool = True):
        super().__init__()
        te = import_te()
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device))
        self.fp8 = fp8
        self.fp8_recipe = make_fp8_recipe(fp8_recipe) if fp8 else None
        # RoPE + K/V write and attention as Triton kernels (backend/attention/fused.py) where Triton is
        # installed; otherwise the plain-torch backend. With the kernels a mixed step's attention is
        # one varlen kernel call per layer, which lets the runner capture mixed steps in CUDA graphs too.
        self.attention = attention_backend(cfg, kernels=fused)
        self.fused = self.attention.tile_rows is not None
        # Residual adds with the RMSNorm after each, and GeGLU, as Triton kernels (kernels/pointwise.py).
        # Not with FP8: there TE's LayerNormLinear / LayerNormMLP write the norm's output in FP8 for
        # their GEMMs in the same kernel, which a separate norm would cost an extra cast.
        self.fused_norms = fused_norms and self.fused and not fp8
        # FP8 weights: TE modules created here hold only FP8 copies of their GEMM weights (quantized
        # when the checkpoint is copied in), so a decode step reads half the bytes.
        # Built without autograd: FP8 weights then get no transposed (backward-only) copy.
        with te.quantized_model_init(enabled=fp8, recipe=self.fp8_recipe), torch.no_grad():
            self.layers = nn.ModuleList(TEGemmaDecoderLayer(cfg, i, dtype=dtype, device=device,
                                                            attention=self.attention, fused_norms=self.fused_norms)
                                        for i in range(cfg.num_layers))
        # The tied LM head is the largest single weight (1.07 GB of gemma-2b's 5 GB in bf16); as an FP8
        # copy of the embedding it reads half that per step, at the cost of FP8 logits.
        self.lm_head = None
        if fp8 and fp8_lm_head:
            with te.quantized_model_init(enabled=True, recipe=self.fp8_recipe), torch.no_grad():
                self.lm_head = te.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, params_dtype=dtype, device=device)
        self.final_norm = te.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, zero_centered_gamma=True,
                                     device=device, dtype=dtype)
        self.rope_specs = sorted({layer.rope for layer in cfg.layers}, key=lambda s: (s.theta, s.linear_factor))
        # sqrt(hidden) rounded to the model dtype, as HF multiplies by a tensor of that dtype.
        self.embed_scale = float(torch.tensor(cfg.hidden_size ** 0.5, dtype=dtype))
        self.row_multiple = FP8_ROWS if fp8 else 1

    # --- weights ----------------------------------------------------------------------------------

    def load_reference_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load `backend.weights.load_mapped_state` output (reference names and layouts), strictly:
        every tensor lands in a TE parameter of the same shape and every parameter is filled."""
        per_layer: list[dict] = [{} for _ in self.layers]
        top = {}
        for name, tensor in state.items():
            if name.startswith("layers."):
                _, idx, rest = name.split(".", 2)
                if not idx.isdigit() or int(idx) >= len(self.layers):
                    raise KeyError(f"checkpoint tensor {name!r} names no layer of this model")
                per_layer[int(idx)][rest] = tensor
            else:
                top[name] = tensor
        if set(top) != {"embed", "final_norm.weight"}:
            raise KeyError(f"top-level tensors {sorted(top)}; expected ['embed', 'final_norm.weight']")
        for layer, layer_state in zip(self.layers, per_layer):
            layer.load_reference_state(layer_state)
        strict_copy(self.final_norm, {"weight": top["final_norm.weight"]}, "final_norm")
        if tuple(self.embed.shape) != tuple(top["embed"].shape):
            raise ValueError(f"embed is {tuple(self.embed.shape)}, the checkpoint's {tuple(top['embed'].shape)}")
        with torch.no_grad():
            self.embed.copy_(top["embed"].to(device=self.device, dtype=self.dtype))
        if self.lm_head is not None:
            strict_copy(self.lm_head, {"weight": top["embed"]}, "lm_head")

    # --- engine contract --------------------------------------------------------------------------

    def autocast(self):
        if not self.fp8:
            return contextlib.nullcontext()
        return import_te().autocast(enabled=True, recipe=self.fp8_recipe)

    @torch.no_grad()
    def forward(self, token_ids: torch.Tensor, layout: StepLayout, kv_cache,
                logits_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """token_ids: [T] -> float32 logits for `layout.logit_rows` (every row if None), written into
        `logits_out` where given (backend/graphs.py's one buffer for all its graphs)."""
        if self.device.type == "cuda" and torch.cuda.current_device() != self.device.index:
            torch.cuda.set_device(self.device)  # the engine thread starts on device 0
        with self.autocast():
            return self._forward(token_ids, layout, kv_cache, logits_out)

    def _forward(self, token_ids: torch.Tensor, layout: StepLayout, kv_cache,
                 logits_out: Optional[torch.Tensor]) -> torch.Tensor:
        T = token_ids.shape[0]
        padded_rows = (-T) % self.row_multiple
        positions = layout.positions
        x = self.embed_tokens(token_ids)
        if padded_rows:  # zero rows: RMSNorm keeps them zero, attention skips them, no cache writes
            x = F.pad(x, (0, 0, 0, padded_rows))
            positions = F.pad(positions, (0, padded_rows))
        ctx = StepContext(layout, self.ropes(positions))
        pending = None  # each layer's MLP output, added to x by the norm after it
        for layer in self.layers:
            x, pending = layer.step(x, pending, ctx, kv_cache)
        if layout.logit_rows is not None and layout.logit_rows.numel() == 0:  # a chunk not ending its prompt
            return torch.empty(0, self.cfg.vocab_size, device=x.device)  # (TE's RMSNorm rejects 0 rows)
        rows = slice(T) if layout.logit_rows is None else layout.logit_rows
        x, pending = x[rows], pending.rows(rows)
        if self.fused_norms:
            return self.logits(add_then_norm(x, pending, self.final_norm.weight, self.cfg.rms_norm_eps)[1], logits_out)
        return self.logits(self.final_norm(pending.added_to(x)), logits_out)

    # --- pieces ------------------------------------------------------------------------------------

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.embed) * self.embed_scale

    def ropes(self, positions: torch.Tensor) -> dict:
        return {s: rope_cos_sin(s, self.cfg.head_dim, positions, self.dtype) for s in self.rope_specs}

    def logits(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.lm_head is None:
            logits = F.linear(hidden, self.embed)
        else:  # FP8 GEMM rows: a multiple of FP8_ROWS
            rows = hidden.shape[0]
            logits = self.lm_head(F.pad(hidden, (0, 0, 0, (-rows) % FP8_ROWS)))[:rows]
        return float_logits(logits, self.cfg.final_softcap, out)

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one decode step must read: every layer's parameters plus the LM head
        (the embedding lookup reads only a few rows)."""
        total = 0
        for p in self.layers.parameters():
            data = getattr(p, "_data", None)  # Float8Tensor: 1 byte per element
            total += p.numel() * (1 if data is not None else p.element_size())
        head = self.lm_head.weight.numel() if self.lm_head is not None else self.embed.numel() * self.embed.element_size()
        return total + head + self.final_norm.weight.numel() * self.final_norm.weight.element_size()
