"""TransformerEngine (TE) path for Gemma on NVIDIA GPUs.

Nothing here imports transformer_engine at module import: `te_available()` only looks for it, so
the CPU path (and `engine="torch"`) never loads TE. The TE code lives in:

    layers.py    TEGemmaDecoderLayer: te.pytorch.TransformerLayer for every Gemma family
    model.py     TEGemmaModel: embedding, TE layers, final norm, tied LM head; the engine's forward
    runner.py    load_te_model(): checkpoint -> TEGemmaModel on the GPU (bf16, optionally FP8)

Attention over the engine's paged cache is the model's attention backend (backend/attention/), the
Triton kernels it and the layers use are in backend/kernels/.

See docs/gpu.md for the design, TE's limits, and the measured numbers.
"""
from __future__ import annotations

import functools
import importlib.util


@functools.lru_cache(maxsize=1)
def te_available() -> bool:
    """True when CUDA is usable and transformer_engine's PyTorch bindings are installed.

    Looks for the package without importing it (importing TE loads CUDA libraries)."""
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    try:
        return importlib.util.find_spec("transformer_engine") is not None and \
            importlib.util.find_spec("transformer_engine.pytorch") is not None
    except (ImportError, ValueError):
        return False


def import_te():
    """`transformer_engine.pytorch`, imported on first use (GPU path only).

    Import it before torch runs any cuDNN op in the process (HF's attention on the GPU, a conv): on a
    machine with two cuDNN copies (torch's wheel and a system one), TE's cuDNN libraries then resolve
    against the copy torch already loaded and the import fails with an undefined symbol."""
    try:
        import transformer_engine.pytorch as te
    except (ImportError, OSError) as e:
        if "cudnn" not in str(e).lower():
            raise
        raise ImportError(f"transformer_engine could not load cuDNN ({e}). Import transformer_engine.pytorch "
                          "before torch runs any cuDNN op in this process (e.g. HF attention on the GPU), or "
                          "leave one cuDNN copy on the library path.") from e
    return te
