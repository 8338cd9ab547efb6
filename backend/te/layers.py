"""TEGemmaDecoderLayer: one `te.pytorch.TransformerLayer` per Gemma layer, every family.

The constructor maps our GemmaConfig onto TE in one call (RMSNorm with zero-centred gamma, GeGLU,
fused QKV grouped per KV head, no biases, no dropout). The family differences are configuration:

    Gemma 1  the TransformerLayer as it is
    Gemma 2  + RMSNorm after attention and after the MLP (sandwich), per-layer sliding window,
             attention logit softcap, query scale from query_pre_attn_scalar
    Gemma 3  + RMS q/k norm before RoPE (TE's qk_norm_type="RMSNorm", switched to zero-centred gamma),
             local/global RoPE bases per layer, no softcap

Two ways to run a layer:
- `step(x, pending, ctx, kv_cache)`: the serving engine. TE's LayerNormLinear (QKV), Linear (proj),
  LayerNormMLP and RMSNorm modules of this layer, with attention over the engine's paged cache by the
  model's attention backend (backend/attention/). Fixed shapes, no host syncs: CUDA-graph capturable.
  With `fused_norms`, each residual add and the RMSNorm after it are one Triton kernel
  (backend/kernels/pointwise.py) and the GEMMs run on the same TE weights through cuBLAS, as TE's
  LayerNormLinear / LayerNormMLP do in bf16 after their norm; GeGLU is a Triton kernel too.
- `forward(...)`: TE's own attention (DotProductAttention through MultiheadAttention), called like
  an HF decoder layer or like a TransformerLayer (rotary_pos_emb, inference_params, masks), so the
  layer drops into HF `GemmaForCausalLM` (see `use_te_layers_in_hf`) or runs with TE's KV cache.

Weights come from `backend.weights.load_mapped_state` names (already TE's layouts); the load is
strict: every tensor used, every TE parameter filled, shapes checked.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import transformer_engine.pytorch as te

from backend.attention import AttentionBackend, LayerAttention, StepContext
from backend.config import GemmaConfig, RopeSpec
from backend.kernels.pointwise import add_rms_norm, geglu

# Our parameter names (backend.weights.load_mapped_state, per layer) -> this module's parameters.
TE_PARAM_NAMES = {
    "attn_norm.weight": "self_attention.layernorm_qkv.layer_norm_weight",
    "attn.qkv_weight": "self_attention.layernorm_qkv.weight",  # per KV group: its queries, key, value
    "attn.o_weight": "self_attention.proj.weight",
    "attn.q_norm.weight": "self_attention.q_norm.weight",
    "attn.k_norm.weight": "self_attention.k_norm.weight",
    "mlp_norm.weight": "layernorm_mlp.layer_norm_weight",
    "mlp.fc1_weight": "layernorm_mlp.fc1_weight",  # [gate; up]: TE's geglu applies GELU to the first half
    "mlp.fc2_weight": "layernorm_mlp.fc2_weight",
    "attn_out_norm.weight": "attn_out_norm.weight",
    "mlp_out_norm.weight": "mlp_out_norm.weight",
}

# Keyword arguments of HF decoder-layer calls that this layer does not use (see forward()).
_HF_IGNORED = ("position_embeddings", "past_key_value", "past_key_values", "cache", "output_attentions",
               "cache_position")


class Branch(NamedTuple):
    """A sublayer's output not yet added to the residual stream, and the RMSNorm that Gemma 2/3
    apply to it before the add (None: Gemma 1 adds it as it is)."""
    output: torch.Tensor
    norm: Optional[torch.nn.Module]

    def added_to(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.output if self.norm is None else self.norm(self.output))

    def rows(self, index: torch.Tensor | slice) -> "Branch":
        return Branch(self.output[index], self.norm)


def add_then_norm(x: torch.Tensor, pending: Optional[Branch], weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + pending, its zero-centred RMSNorm with `weight`) in one kernel (kernels/pointwise.py)."""
    if pending is None:
        return add_rms_norm(x, None, weight, eps)
    return add_rms_norm(x, pending.output, weight, eps, None if pending.norm is None else pending.norm.weight)


def rope_freqs(spec: RopeSpec, head_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """TE's rotary_pos_emb ([S, 1, 1, D] fp32 angles, halves repeated) for `positions` [S];
    same inverse frequencies (and linear scaling) as backend.model.rope_cos_sin."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (spec.theta ** exponent) / spec.linear_factor
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


def _first(out):
    """TE modules built with return_bias=True return (output, empty bias)."""
    return out[0] if isinstance(out, tuple) else out


def set_softmax_scale(dpa, scale: float) -> None:
    """DotProductAttention takes softmax_scale only in its constructor, which MultiheadAttention does
    not expose; Gemma 2/3 scale by query_pre_attn_scalar**-0.5, not head_dim**-0.5. The scale is read
    at call time from these attributes (TE 2.20 backends.py), so set it on the module and backends."""
    dpa.softmax_scale = scale
    for name in ("flash_attention", "fused_attention", "unfused_attention"):
        backend = getattr(dpa, name, None)
        if backend is not None:
            backend.softmax_scale = scale


class TEGemmaDecoderLayer(te.TransformerLayer):
    # HF transformers >= 4.54 decoder layers return the hidden states; older ones a 1-tuple.
    # use_te_layers_in_hf() sets this from the installed version.
    return_tuple: bool = False
    _warned_kwargs: bool = False

    def __init__(self, cfg: GemmaConfig, layer_idx: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cuda", attn_input_format: str = "bshd",
                 attention: Optional[AttentionBackend] = None, fused_norms: bool = False):
        """`attention` (the model's backend) and `fused_norms` (add + RMSNorm and GeGLU by Triton
        kernels) serve `step`; `forward` uses TE's own attention and norms."""
        spec = cfg.layers[layer_idx]
        # HF/our window W: key j visible from query i iff i - W < j <= i; TE: [i - w0, i + w1].
        window = None if spec.sliding_window is None else (spec.sliding_window - 1, 0)
        super().__init__(
            hidden_size=cfg.hidden_size,
            ffn_hidden_size=cfg.intermediate_size,
            num_attention_heads=cfg.num_heads,
            num_gqa_groups=cfg.num_kv_heads,
            kv_channels=cfg.head_dim,
            layernorm_epsilon=cfg.rms_norm_eps,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            layer_number=layer_idx + 1,
            self_attn_mask_type="causal",
            window_size=window,
            softcap=cfg.attn_softcap or 0.0,
            bias=False,
            fuse_qkv_params=True,
            qkv_weight_interleaved=True,  # [KV groups, queries + k + v, head_dim] rows
            zero_centered_gamma=True,  # Gemma's RMSNorm scales by (1 + w): raw checkpoint weights
            normalization="RMSNorm",
            activation="geglu",  # tanh-GELU(first half) * second half
            attn_input_format=attn_input_format,
            params_dtype=dtype,
            device=device,
            qk_norm_type="RMSNorm" if cfg.qk_norm else None,
            qk_norm_eps=cfg.rms_norm_eps,
            qk_norm_before_rope=True,  # Gemma 3 normalises q and k before RoPE
        )
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.rope_spec = spec.rope
        self.attention_backend = attention
        self.attention_spec = LayerAttention.of(cfg, layer_idx)
        self.fused_norms = fused_norms
        set_softmax_scale(self.self_attention.core_attention, cfg.query_scale)
        if cfg.qk_norm:
            # MultiheadAttention builds its q/k RMSNorms without zero-centred gamma; Gemma 3's are
            # (1 + w) like every other Gemma norm. The flag is read at call time by the norm op.
            for norm in (self.self_attention.q_norm, self.self_attention.k_norm):
                assert hasattr(norm, "zero_centered_gamma"), type(norm)
                norm.zero_centered_gamma = True
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            norm = functools.partial(te.RMSNorm, cfg.hidden_size, eps=cfg.rms_norm_eps,
                                     zero_centered_gamma=True, device=device, dtype=dtype)
            self.attn_out_norm = norm()
            self.mlp_out_norm = norm()
        self._rope_cache: dict = {}

    # --- weights ----------------------------------------------------------------------------------

    def load_reference_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy this layer's tensors (our names without the `layers.{i}.` prefix) into TE's
        parameters. Strict: unknown names, unfilled parameters and shape mismatches are errors."""
        unknown = sorted(set(state) - set(TE_PARAM_NAMES))
        if unknown:
            raise KeyError(f"layer {self.layer_idx}: no TE parameter for {unknown}")
        strict_copy(self, {TE_PARAM_NAMES[name]: t for name, t in state.items()}, f"layer {self.layer_idx}")

    # --- serving engine path ----------------------------------------------------------------------

    def step(self, x: torch.Tensor, pending: Optional[Branch], ctx: StepContext,
             kv_cache) -> tuple[torch.Tensor, Branch]:
        """x: [T, hidden] (the step's flattened tokens), the residual stream without `pending`, the
        previous layer's MLP output (None before the first layer). Returns the stream after this
        layer's attention and this layer's MLP output: each residual add is left to the norm that
        follows it, so that `fused_norms` can do both in one kernel."""
        cfg = self.cfg
        T = x.shape[0]
        attn = self.self_attention
        group = cfg.queries_per_kv
        x, qkv = self._norm_then_linear(x, pending, attn.layernorm_qkv)
        qkv = qkv.view(T, cfg.num_kv_heads, group + 2, cfg.head_dim)
        qk_norm = (attn.q_norm, attn.k_norm) if cfg.qk_norm else None
        out = self.attention_backend.forward(self.attention_spec, qkv[:, :, :group], qkv[:, :, group],
                                             qkv[:, :, group + 1], ctx, kv_cache, qk_norm)
        h = _first(attn.proj(out.reshape(T, cfg.num_heads * cfg.head_dim)))
        x, h = self._norm_then_mlp(x, Branch(h, self.attn_out_norm if self.sandwich else None))
        return x, Branch(h, self.mlp_out_norm if self.sandwich else None)

    def _norm_then_linear(self, x, pending: Optional[Branch], module):
        """(x + pending, TE LayerNormLinear `module` applied to it)."""
        if not self.fused_norms:
            x = x if pending is None else pending.added_to(x)
            return x, _first(module(x))
        x, normed = add_then_norm(x, pending, module.layer_norm_weight, self.cfg.rms_norm_eps)
        return x, F.linear(normed, module.weight)

    def _norm_then_mlp(self, x, pending: Branch):
        """(x + pending, TE LayerNormMLP applied to it)."""
        mlp = self.layernorm_mlp
        if not self.fused_norms:
            x = pending.added_to(x)
            return x, _first(mlp(x))
        x, normed = add_then_norm(x, pending, mlp.layer_norm_weight, self.cfg.rms_norm_eps)
        return x, F.linear(geglu(F.linear(normed, mlp.fc1_weight)), mlp.fc2_weight)

    # --- TE attention path: HF drop-in, or TransformerLayer-style with TE's KV cache ----------------

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                self_attn_mask_type: Optional[str] = None, rotary_pos_emb: Optional[torch.Tensor] = None,
                inference_params=None, position_ids: Optional[torch.Tensor] = None, use_cache: bool = False,
                **kwargs):
        """hidden_states in attn_input_format ("bshd": [batch, seq, hidden], as HF passes them).

        HF arguments: position_ids give the RoPE positions (the first row: TE applies one table to
        the whole batch); HF's position_embeddings, cache, cache_position and output_attentions are
        dropped: TE computes RoPE itself, and KV caching is TE's (inference_params) or the engine's.
        An HF call with use_cache=True is refused rather than silently attending without the past.
        `attention_mask` may be HF's (bool, True = attend; or additive float) or TE's (bool, True =
        masked out, with self_attn_mask_type given)."""
        unknown = set(kwargs) - set(_HF_IGNORED)
        if unknown and not self._warned_kwargs:
            warnings.warn(f"TEGemmaDecoderLayer ignores the arguments {sorted(unknown)}")
            self._warned_kwargs = True
        if use_cache and kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("past_key_value"))) is not None:
            raise ValueError("TEGemmaDecoderLayer does not fill HF's KV cache: generate with use_cache=False, "
                             "or pass TE inference_params")
        if self_attn_mask_type is None:
            self_attn_mask_type, attention_mask = self._te_mask(attention_mask)
        if rotary_pos_emb is None:
            rotary_pos_emb = self._rope(hidden_states, position_ids, inference_params)
        if not self.sandwich:
            out = super().forward(hidden_states, attention_mask=attention_mask,
                                  self_attn_mask_type=self_attn_mask_type, rotary_pos_emb=rotary_pos_emb,
                                  inference_params=inference_params)
        else:
            h = _first(self.self_attention(
                hidden_states, attention_mask=attention_mask, attn_mask_type=self_attn_mask_type,
                window_size=self.window_size, rotary_pos_emb=rotary_pos_emb, inference_params=inference_params,
                softcap=self.softcap))
            x = hidden_states + self.attn_out_norm(h)
            out = x + self.mlp_out_norm(_first(self.layernorm_mlp(x)))
        return (out,) if self.return_tuple else out

    @staticmethod
    def _te_mask(attention_mask):
        if attention_mask is None:
            return "causal", None
        if attention_mask.dtype == torch.bool:  # HF sdpa/flex style: True = may attend
            return "arbitrary", ~attention_mask
        return "arbitrary", attention_mask < 0  # HF eager style: additive, large negative = masked

    def _rope(self, hidden_states, position_ids, inference_params):
        if inference_params is not None:  # TE offsets the table by each sequence's cached length
            length, positions = inference_params.max_sequence_length, None
        elif position_ids is not None:
            length, positions = None, position_ids.reshape(-1, position_ids.shape[-1])[0]
        else:
            length, positions = hidden_states.shape[1 if self.attn_input_format == "bshd" else 0], None
        if positions is not None:
            return rope_freqs(self.rope_spec, self.cfg.head_dim, positions)
        key = (length, hidden_states.device)
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_freqs(self.rope_spec, self.cfg.head_dim,
                                               torch.arange(length, device=hidden_states.device))
        return self._rope_cache[key]


def strict_copy(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy `tensors` (module parameter name -> tensor) into `module`'s parameters, all or nothing.
    Empty placeholder parameters (TE's bias=False stand-ins) are not expected to be filled."""
    params = {n: p for n, p in module.named_parameters() if p.numel() > 0}
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise KeyError(f"{where}: TE parameters without a checkpoint tensor: {missing}; "
                       f"tensors without a TE parameter: {extra}")
    for name, tensor in tensors.items():
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{where}: {name} is {tuple(params[name].shape)}, "
                             f"the checkpoint tensor is {tuple(tensor.shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            param = params[name]
            # A Float8Tensor parameter (FP8 weights) quantizes on copy_.
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))


def hf_layer_state(hf_layer, cfg: GemmaConfig) -> dict[str, torch.Tensor]:
    """An HF Gemma decoder layer's weights under our names (the layout load_mapped_state produces)."""
    from backend.weights import fuse_qkv

    sd = {k: v.detach() for k, v in hf_layer.state_dict().items()}
    state = {
        "attn.qkv_weight": fuse_qkv(sd.pop("self_attn.q_proj.weight"), sd.pop("self_attn.k_proj.weight"),
                                    sd.pop("self_attn.v_proj.weight"), cfg),
        "attn.o_weight": sd.pop("self_attn.o_proj.weight"),
        "mlp.fc1_weight": torch.cat([sd.pop("mlp.gate_proj.weight"), sd.pop("mlp.up_proj.weight")]),
        "mlp.fc2_weight": sd.pop("mlp.down_proj.weight"),
        "attn_norm.weight": sd.pop("input_layernorm.weight"),
    }
    if cfg.qk_norm:
        state["attn.q_norm.weight"] = sd.pop("self_attn.q_norm.weight")
        state["attn.k_norm.weight"] = sd.pop("self_attn.k_norm.weight")
    if cfg.sandwich_norms:
        state["attn_out_norm.weight"] = sd.pop("post_attention_layernorm.weight")
        state["mlp_norm.weight"] = sd.pop("pre_feedforward_layernorm.weight")
        state["mlp_out_norm.weight"] = sd.pop("post_feedforward_layernorm.weight")
    else:
        state["mlp_norm.weight"] = sd.pop("post_attention_layernorm.weight")
    if sd:
        raise KeyError(f"HF layer tensors not mapped: {sorted(sd)}")
    return state


def use_te_layers_in_hf(hf_model) -> None:
    """Replace every decoder layer of an HF Gemma model (GemmaForCausalLM, ...) in place with a
    TEGemmaDecoderLayer holding the same weights, on the model's device and dtype.
    Generate with use_cache=False: the TE layers do not fill HF's KV cache."""
    import transformers
    from packaging.version import Version

    cfg = GemmaConfig.from_hf(hf_model.config)
    layers = hf_model.model.layers
    returns_tuple = Version(transformers.__version__) < Version("4.54")
    for i, hf_layer in enumerate(layers):
        weight = hf_layer.self_attn.o_proj.weight
        layer = TEGemmaDecoderLayer(cfg, i, dtype=weight.dtype, device=weight.device)
        layer.return_tuple = returns_tuple
        layer.load_reference_state(hf_layer_state(hf_layer, cfg))
        layers[i] = layer.eval()
