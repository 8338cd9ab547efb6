"""Checkpoints that must not be served, built at test time from the real converted default model."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, normalizers, processors


def checkpoint_like(src: Path, out: Path, replace: dict) -> Path:
    """`out` with links to the files of `src`, except those in `replace`: name -> text, a function
    that writes the file, or None (left out)."""
    out.mkdir()
    for f in src.iterdir():
        if f.name not in replace:
            (out / f.name).symlink_to(f)
    for name, content in replace.items():
        if callable(content):
            content(out / name)
        elif content is not None:
            (out / name).write_text(content)
    return out


# What transformers 5.17 saved for the packaged GGUF: a Unigram model over Gemma's vocabulary, no
# <bos> template, and tokenizer_class GemmaTokenizer, which transformers 5 loads as a BPE without
# merges, i.e. one piece per character.
CONFIG_517 = json.dumps({"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
                         "unk_token": "<unk>", "pad_token": "<pad>"})


def tokenizer_517(default_checkpoint: Path, template: str = "$A"):
    """A writer of the tokenizer.json transformers 5.17 made (pair it with CONFIG_517); `template`
    is its post-processor (5.17's added nothing)."""
    def write(path: Path) -> None:
        vocab = json.loads((default_checkpoint / "tokenizer.json").read_text())["model"]["vocab"]
        raw = RawTokenizer(models.Unigram([(piece, 0.0) for piece in sorted(vocab, key=vocab.get)], unk_id=3,
                                          byte_fallback=True))
        raw.normalizer = normalizers.Replace(" ", "\u2581")
        raw.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<bos>", 2)])
        raw.save(str(path))
    return write


def real_tokenizer(default_checkpoint: Path, template: str):
    """A writer of the real tokenizer.json with another post-processor template."""
    def write(path: Path) -> None:
        raw = RawTokenizer.from_file(str(default_checkpoint / "tokenizer.json"))
        raw.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<bos>", 2)])
        raw.save(str(path))
    return write
