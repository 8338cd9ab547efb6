"""Load a checkpoint into the TransformerEngine model (what backend.engine calls for engine="te").

    model = load_te_model(path, torch.bfloat16, "cuda", fp8=False)
    logits = model(token_ids, layout, kv_cache)   # backend.model.GemmaModel's contract
    graphs = DecodeGraphs(model)                   # backend/graphs.py: the same call, decode steps replayed

Importing this module does not import TransformerEngine; calling load_te_model does.
"""
from __future__ import annotations

from pathlib import Path

import torch

from backend.config import GemmaConfig
from backend.memory import free_memory_bytes
from backend.weights import check_weights_fit, load_mapped_state

from . import import_te, te_available


def load_te_model(path: str | Path, dtype: torch.dtype, device: torch.device | str, fp8: bool = False,
                  fp8_recipe: str = "delayed", fused: bool = True, fp8_lm_head: bool = False, fused_norms: bool = True):
    """Build TEGemmaModel from an HF Gemma checkpoint directory (strict safetensors loading).

    fp8: FP8 GEMMs and FP8 weights (Hopper or newer; the LM head stays in `dtype` unless fp8_lm_head).
    fused: RoPE, K/V writes and attention in Triton kernels (when Triton is installed).
    fused_norms: with fused and without fp8, residual add + RMSNorm and GeGLU in Triton kernels too."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"the TransformerEngine model runs on CUDA devices, not {device}")
    if not te_available():
        raise RuntimeError("TransformerEngine is not importable or CUDA is unavailable; use engine='torch'")
    import_te()  # its first import, with a clear error if cuDNN is in the way
    from .model import TEGemmaModel

    if fp8:
        import transformer_engine.pytorch as te

        ok, why = te.is_fp8_available(return_reason=True)
        if not ok:
            raise RuntimeError(f"fp8=True but this GPU cannot run TE FP8: {why}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    if not fp8:  # FP8 weights take about half of `dtype`'s bytes: too loose a bound to refuse a start with
        check_weights_fit(path, dtype, device, free_memory_bytes(device))
    cfg = GemmaConfig.from_checkpoint(path)
    state = load_mapped_state(path, cfg, dtype)
    model = TEGemmaModel(cfg, dtype=dtype, device=device, fp8=fp8, fp8_recipe=fp8_recipe, fused=fused,
                         fp8_lm_head=fp8_lm_head, fused_norms=fused_norms)
    model.load_reference_state(state)
    del state
    model.eval()
    return model
