"""Strict loading of HF Gemma checkpoints (safetensors only) into the reference model's layout.

Every checkpoint tensor must be used and every parameter filled, with the right shape; anything else
is an error that names the tensor. The mapping produces TransformerEngine's layouts (fused QKV per
KV group, fc1 = [gate; up]), so the TE path consumes the same mapped dict.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from .config import GemmaConfig
from .memory import free_memory_bytes


class CheckpointError(ValueError):
    pass


class CheckpointReader:
    """Lazy access to the tensors of a single-file or sharded safetensors checkpoint."""

    def __init__(self, path: str | Path):
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                  "(only safetensors checkpoints are loaded; pickled .bin files are refused)")
        self._handles = [safe_open(str(path / f), framework="pt") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}
        self.unused = set(self._where)

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        tensor = self._where[name].get_tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        self.unused.discard(name)
        return tensor

    def num_elements(self) -> int:
        """Elements of the tensors the model loads, from the files' headers (nothing is read). A saved
        lm_head.weight is a copy of the tied embedding (every Gemma ties them; load_mapped_state) and
        takes no memory of its own."""
        return sum(math.prod(handle.get_slice(name).get_shape()) for name, handle in self._where.items()
                   if name != "lm_head.weight")


def check_weights_fit(path: str | Path, dtype: torch.dtype, device: torch.device, free: int) -> None:
    """Before the weights are loaded onto a GPU with `free` bytes free: a checkpoint whose weights (as
    `dtype`) take more fails with a message naming both, not with CUDA's out-of-memory traceback
    halfway through the load. The host needs no such check: PagedKVCache.from_budget checks what is
    available after the weights are in."""
    weights = CheckpointReader(path).num_elements() * torch.empty((), dtype=dtype).element_size()
    if weights > free:
        raise CheckpointError(f"the weights of {path} take {weights} bytes ({weights / 2**30:.2f} GiB) as "
                              f"{str(dtype).removeprefix('torch.')} but only {free} bytes ({free / 2**30:.2f} GiB) "
                              f"are free on {device}; free the GPU (nvidia-smi lists what holds it) or serve a "
                              f"smaller checkpoint")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: GemmaConfig) -> torch.Tensor:
    """[q; k; v] rows regrouped per KV head: (its queries, its key, its value) - TE's fused layout,
    correct for multi-query and grouped-query models alike."""
    hidden = q.shape[1]
    q = q.view(cfg.num_kv_heads, cfg.queries_per_kv, cfg.head_dim, hidden)
    k = k.view(cfg.num_kv_heads, 1, cfg.head_dim, hidden)
    v = v.view(cfg.num_kv_heads, 1, cfg.head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def load_mapped_state(path: str | Path, cfg: GemmaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read an HF checkpoint and return the reference model's state dict, in `dtype`."""
    reader = CheckpointReader(path)
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size

    def take(name, *shape):
        return reader.take(name, shape).to(dtype)

    state = {"embed": take("model.embed_tokens.weight", cfg.vocab_size, H),
             "final_norm.weight": take("model.norm.weight", H)}
    # HF Gemma 1 calls its pre-MLP norm "post_attention_layernorm"; Gemma 2/3 use that name for the
    # norm applied to the attention output and have a separate "pre_feedforward_layernorm".
    norm_names = {"attn_norm": "input_layernorm"}
    if cfg.sandwich_norms:
        norm_names |= {"attn_out_norm": "post_attention_layernorm", "mlp_norm": "pre_feedforward_layernorm",
                       "mlp_out_norm": "post_feedforward_layernorm"}
    else:
        norm_names |= {"mlp_norm": "post_attention_layernorm"}
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        q = take(hf + "self_attn.q_proj.weight", cfg.num_heads * D, H)
        k = take(hf + "self_attn.k_proj.weight", cfg.num_kv_heads * D, H)
        v = take(hf + "self_attn.v_proj.weight", cfg.num_kv_heads * D, H)
        state[ours + "attn.qkv_weight"] = fuse_qkv(q, k, v, cfg)
        state[ours + "attn.o_weight"] = take(hf + "self_attn.o_proj.weight", H, cfg.num_heads * D)
        if cfg.qk_norm:
            state[ours + "attn.q_norm.weight"] = take(hf + "self_attn.q_norm.weight", D)
            state[ours + "attn.k_norm.weight"] = take(hf + "self_attn.k_norm.weight", D)
        gate = take(hf + "mlp.gate_proj.weight", I, H)
        up = take(hf + "mlp.up_proj.weight", I, H)
        state[ours + "mlp.fc1_weight"] = torch.cat([gate, up], dim=0)
        state[ours + "mlp.fc2_weight"] = take(hf + "mlp.down_proj.weight", H, I)
        for our_norm, hf_norm in norm_names.items():
            state[ours + our_norm + ".weight"] = take(hf + hf_norm + ".weight", H)

    if "lm_head.weight" in reader.unused:
        if not cfg.tie_word_embeddings:
            raise CheckpointError("untied lm_head.weight is not supported (every Gemma ties it)")
        reader.take("lm_head.weight", (cfg.vocab_size, H))  # a saved copy of the tied embedding
    elif not cfg.tie_word_embeddings:
        raise CheckpointError("config says tie_word_embeddings=false but every Gemma ties them")
    if reader.unused:
        raise CheckpointError(f"checkpoint has tensors the model does not use: {sorted(reader.unused)[:10]}")
    return state


def load_reference_model(path: str | Path, dtype: torch.dtype, device: torch.device | str):
    """Build the plain-PyTorch model from a checkpoint directory; returns (model, config)."""
    from .model import GemmaModel

    device = torch.device(device)
    if device.type == "cuda":
        check_weights_fit(path, dtype, device, free_memory_bytes(device))
    cfg = GemmaConfig.from_checkpoint(path)
    state = load_mapped_state(path, cfg, dtype)
    with torch.device("meta"):
        model = GemmaModel(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval(), cfg
