"""One model config for every Gemma family, built from a checkpoint's config.json.

transformers parses config.json (it normalises legacy keys such as `rope_theta` /
`rope_local_base_freq` into per-layer-type `rope_parameters`); this module turns that into plain
data the model reads. The family differences are fields here, not separate model classes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("gemma", "gemma2", "gemma3_text")


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    linear_factor: float = 1.0  # "linear" rope scaling divides the inverse frequencies by this


@dataclass(frozen=True)
class LayerSpec:
    sliding_window: int | None  # None: global attention
    rope: RopeSpec


@dataclass(frozen=True)
class GemmaConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    query_scale: float  # multiplies q·k (Gemma 1: head_dim**-0.5; 2/3: query_pre_attn_scalar**-0.5)
    attn_softcap: float | None
    final_softcap: float | None
    layers: tuple[LayerSpec, ...]
    sandwich_norms: bool  # Gemma 2/3: extra norms after attention and around the MLP
    qk_norm: bool  # Gemma 3: RMSNorm on each q and k head
    tie_word_embeddings: bool = True

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf) -> "GemmaConfig":
        family = hf.model_type
        if family not in FAMILIES:
            raise ValueError(f"unsupported model_type {family!r}; supported: {FAMILIES}")
        layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
        rope_params = hf.rope_parameters
        layers = tuple(
            LayerSpec(
                sliding_window=hf.sliding_window if kind == "sliding_attention" else None,
                rope=_rope_spec(rope_params[kind] if family == "gemma3_text" else rope_params),
            )
            for kind in layer_types
        )
        scalar = getattr(hf, "query_pre_attn_scalar", None) if family != "gemma" else None
        return cls(
            family=family,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads,
            head_dim=hf.head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            query_scale=(scalar or hf.head_dim) ** -0.5,
            attn_softcap=getattr(hf, "attn_logit_softcapping", None),
            final_softcap=getattr(hf, "final_logit_softcapping", None),
            layers=layers,
            sandwich_norms=family != "gemma",
            qk_norm=family == "gemma3_text",
            tie_word_embeddings=getattr(hf, "tie_word_embeddings", True),
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "GemmaConfig":
        from transformers import AutoConfig

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not an HF checkpoint directory")
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"{path}: unsupported model_type {model_type!r}; supported: {FAMILIES}")
        return cls.from_hf(AutoConfig.from_pretrained(str(path)))


def _rope_spec(params: dict) -> RopeSpec:
    kind = params.get("rope_type", "default")
    if kind == "default":
        return RopeSpec(theta=float(params["rope_theta"]))
    if kind == "linear":
        return RopeSpec(theta=float(params["rope_theta"]), linear_factor=float(params["factor"]))
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear)")
