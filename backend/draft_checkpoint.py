"""A layer-truncated copy of a checkpoint, to serve as the original's draft model (LayerSkip-style
self-drafting): its first N decoder layers, its final norm and its embedding (the tied LM head), with
the same tokenizer. Gemma 3 270M, the packaged model, has no smaller sibling; this gives it drafts.

    python -m backend.draft_checkpoint SRC DST --layers N

then `speculative_config` {"method": "draft_model", "model": "DST", "num_speculative_tokens": k}.
Safetensors in and out, never pickle. The copy's logits are the original's early exit: its hidden
state after layer N through the final norm and the LM head. A model trained without LayerSkip's
early-exit losses predicts worse from there; docs/benchmarks.md has what the 270M's copies accept.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from safetensors import safe_open
from safetensors.torch import save_file

from .default_model import cache_root

LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.")
# Files not copied as they are: the weights and config (written anew), and the packaged model's
# self-check stamp, which vouches for the original only (backend/self_check.py).
NOT_COPIED = re.compile(r"config\.json|model.*\.safetensors(\.index\.json)?|self_check\.json")


def write_draft_checkpoint(src: Path, dst: Path, num_layers: int) -> Path:
    """Write the first `num_layers` decoder layers of `src` (with its final norm, embedding and other
    files) as a checkpoint at `dst`, which must not exist. Returns `dst`."""
    config = json.loads((src / "config.json").read_text())
    total = config.get("num_hidden_layers")
    if not isinstance(total, int):
        raise ValueError(f"{src / 'config.json'} has no num_hidden_layers: not an HF decoder checkpoint")
    if not 1 <= num_layers < total:
        raise ValueError(f"--layers must be in [1, {total - 1}]: {src} has {total} decoder layers")
    if dst.exists():
        raise FileExistsError(f"{dst} exists: name a new directory")
    config["num_hidden_layers"] = num_layers
    if "layer_types" in config:  # Gemma 3: each layer's attention (sliding or global)
        config["layer_types"] = config["layer_types"][:num_layers]
    tensors = {}
    for file in _tensor_files(src):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():
                layer = LAYER_TENSOR.match(name)
                if layer is None or int(layer[1]) < num_layers:
                    tensors[name] = weights.get_tensor(name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed into place: a half-written draft is never found at `dst`.
    staging = Path(tempfile.mkdtemp(prefix=dst.name + ".", dir=dst.parent))
    try:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for path in src.iterdir():
            if path.is_file() and not NOT_COPIED.fullmatch(path.name):
                shutil.copy(path, staging / path.name)
        for path in staging.iterdir():
            path.chmod(0o644)  # safetensors and mkdtemp make them private; servers may run as another user
        staging.chmod(0o755)
        staging.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


def cached_draft_checkpoint(src: Path, num_layers: int) -> Path:
    """The `num_layers`-layer draft of `src` in the model cache (GEMMA_MODEL_CACHE), written the first
    time; named after the original's files, so a changed original gets a new draft."""
    files = [src / "config.json"] + _tensor_files(src)
    stamp = hashlib.sha256(repr([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode())
    dst = cache_root() / "drafts" / f"{src.name}-{num_layers}-layers-{stamp.hexdigest()[:12]}"
    if not (dst / "config.json").is_file():
        try:
            write_draft_checkpoint(src, dst, num_layers)
        except OSError:
            if not (dst / "config.json").is_file():  # else another process wrote it first: fine
                raise
    return dst


def _tensor_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return sorted({src / name for name in json.loads(index.read_text())["weight_map"].values()})
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    raise FileNotFoundError(f"{src}: no model.safetensors or model.safetensors.index.json (only safetensors "
                            f"checkpoints are read)")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Write a layer-truncated copy of a checkpoint as its draft model.")
    p.add_argument("src", type=Path, help="an HF Gemma checkpoint directory (safetensors)")
    p.add_argument("dst", type=Path, help="the draft's directory (must not exist)")
    p.add_argument("--layers", type=int, required=True, help="decoder layers to keep, from the first")
    args = p.parse_args(argv)
    try:
        print(write_draft_checkpoint(args.src, args.dst, args.layers))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
