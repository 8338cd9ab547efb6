"""Seeded tiny HF Gemma checkpoints of each family, written as real safetensors directories."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

GEMMA_VOCAB = 262144  # the real Gemma 3 tokenizer's vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def hf_config(family: str, vocab_size: int = 512, **overrides):
    from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6, pad_token_id=0,
                  bos_token_id=2, eos_token_id=1)
    if family == "gemma":  # multi-head like gemma-7b
        cls, kw = GemmaConfig, dict(num_hidden_layers=3, num_key_value_heads=4)
    elif family == "gemma2":  # multi-query like gemma-2b-class, with both softcaps
        cls, kw = Gemma2Config, dict(num_hidden_layers=4, num_key_value_heads=1, sliding_window=8,
                                     query_pre_attn_scalar=24, attn_logit_softcapping=50.0,
                                     final_logit_softcapping=30.0)
    elif family == "gemma3_text":  # grouped-query, 5 local : 1 global
        cls, kw = Gemma3TextConfig, dict(num_hidden_layers=6, num_key_value_heads=2, sliding_window=8,
                                         query_pre_attn_scalar=24)
    else:
        raise ValueError(family)
    return cls(**(common | kw | overrides))


def hf_model(family: str, seed: int = 0, **config_kw):
    """A random HF model whose norm weights are random too (zeros would hide a missing `1 + w`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **config_kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return model


def write_checkpoint(out: Path, family: str, seed: int = 0, tokenizer_dir: Path | None = None, **config_kw) -> Path:
    """Save a tiny model; with `tokenizer_dir` (a real Gemma checkpoint) it gets that tokenizer and
    the Gemma vocabulary size, so the engine can serve it end to end."""
    if tokenizer_dir is not None:
        config_kw.setdefault("vocab_size", GEMMA_VOCAB)
    model = hf_model(family, seed, **config_kw)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy(Path(tokenizer_dir) / name, out / name)
    return out
