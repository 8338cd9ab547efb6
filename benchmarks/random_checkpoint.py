"""Random gemma-2b-shaped checkpoints: the GPU benchmarks' model (the shapes set the speed, not the values).

    python -m benchmarks.random_checkpoint --out DIR [--tokenizer TOKDIR] [--layers 18] [--device cuda]

gemma-2b is a Gemma 1 model: hidden 2048, intermediate 16384, 18 layers, 8 heads, 1 KV head, head
dim 256, vocabulary 256000. Weights are initialised on `--device` in bfloat16 (seed 0) and saved as
safetensors. With --tokenizer (a directory holding tokenizer.json and tokenizer_config.json, e.g. the
packaged Gemma 3 270M's) the checkpoint gets those files, so the engine and the Triton server can
load it, and that tokenizer's vocabulary size, so every token id it produces has an embedding row.
For the Gemma 3 tokenizer that is 262144, 2.4% more than gemma-2b's 256000: the tied embedding /
LM head is 1.07 GB instead of 1.05 GB in bf16, and a decode step reads 5.04 GB of weights instead of
5.01 GB (+0.5%).

The saved generation config has no EOS, so HF `generate` on it never stops early. The engine still
takes EOS from the tokenizer: benchmarks that need every request to run to max_tokens ask for
`ignore_eos` (benchmarks/serving.py, engine_level.py).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

GEMMA_2B_VOCAB = 256000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def gemma_2b_config(layers: int = 18, vocab_size: int = GEMMA_2B_VOCAB, **overrides):
    """gemma-2b's GemmaConfig; `overrides` (e.g. a smaller hidden_size) are for tests."""
    from transformers import GemmaConfig

    shape = dict(vocab_size=vocab_size, hidden_size=2048, intermediate_size=16384, num_hidden_layers=layers,
                 num_attention_heads=8, num_key_value_heads=1, head_dim=256, max_position_embeddings=8192,
                 rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return GemmaConfig(**(shape | overrides))


def tokenizer_vocab_size(tokenizer_dir: Path) -> int:
    """The number of ids the engine's tokenizer can produce (added tokens included)."""
    from backend.tokenizer import Tokenizer

    return Tokenizer(tokenizer_dir).vocab_size


def make_checkpoint(path: Path, config, device: str = "cuda", tokenizer_dir: Path | None = None):
    """Random weights for `config`, initialised on `device` in bf16, saved to `path` as safetensors
    (with the tokenizer files of `tokenizer_dir`, if given). Returns the HF model, still on `device`."""
    from transformers import GemmaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: gemma-2b in fp32 would be 10 GB
    try:
        with torch.device(device):
            hf = GemmaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    hf.eval()
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.save_pretrained(path, safe_serialization=True)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            shutil.copy(Path(tokenizer_dir) / name, Path(path) / name)
    return hf


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--tokenizer", type=Path, help="directory with tokenizer.json and tokenizer_config.json")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to initialise the weights (default: cuda when available)")
    args = p.parse_args(argv)
    vocab = tokenizer_vocab_size(args.tokenizer) if args.tokenizer else GEMMA_2B_VOCAB
    t0 = time.perf_counter()
    hf = make_checkpoint(args.out, gemma_2b_config(args.layers, vocab), args.device, args.tokenizer)
    params = sum(p.numel() for p in hf.parameters())
    print(f"wrote {args.out}: gemma-2b shapes, {args.layers} layers, vocab {vocab}, {params / 1e9:.2f}B parameters, "
          f"bf16, {time.perf_counter() - t0:.0f} s", flush=True)
    return args.out


if __name__ == "__main__":
    main()
