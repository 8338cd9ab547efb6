"""The packaged model's conversion (backend.gguf_checkpoint, backend.default_model): the tokenizer
built from a GGUF vocabulary, a fresh conversion under the installed transformers passing its
self-check, and a failed one leaving nothing behind."""
import filecmp
import json
from pathlib import Path

import pytest

from backend import default_model, self_check
from backend.gguf_checkpoint import bpe_merges, gemma_tokenizer
from backend.self_check import SelfCheckError
from tests.broken_checkpoints import CONFIG_517, checkpoint_like, tokenizer_517

NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6


def test_merges_follow_the_vocabulary_order_longer_left_part_first():
    pieces = ["a", "b", "c", "ab", "bc", "abc", "\u2581", "\u2581a"]
    assert bpe_merges(pieces) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc"), ("\u2581", "a")]


def test_tokenizer_from_a_gguf_style_vocabulary():
    # A miniature of the packaged GGUF's vocabulary: specials, a user-defined newline run, a space
    # run spelled with real spaces (as llama.cpp writes it), byte tokens, and pieces in merge order.
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "\n\n", "  ",
              *[f"<0x{b:02X}>" for b in range(256)],
              "\u2581", "H", "e", "l", "o", "w", "r", "d", "He", "ll", "Hell", "Hello", "\u2581w", "or", "\u2581wor",
              "ld", "\u2581world"]
    types = [CONTROL] * 5 + [USER_DEFINED] * 2 + [BYTE] * 256 + [NORMAL] * (len(tokens) - 263)
    tokenizer = gemma_tokenizer(tokens, types, bos_id=2, unk_id=3)
    vocab = tokenizer.get_vocab()
    encode = lambda text: [tokenizer.id_to_token(i) for i in tokenizer.encode(text).ids]  # noqa: E731
    assert encode("Hello world") == ["<bos>", "Hello", "\u2581world"]
    assert encode("<start_of_turn>Hello\n\n") == ["<bos>", "<start_of_turn>", "Hello", "\n\n"]
    assert vocab["\u2581\u2581"] == 6 and encode("  He") == ["<bos>", "\u2581\u2581", "He"]  # a space run: merged
    assert encode("é") == ["<bos>", "<0xC3>", "<0xA9>"]  # byte fallback
    assert tokenizer.decode(tokenizer.encode("Hello world é").ids) == "Hello world é"


def test_a_failed_conversion_leaves_nothing_and_says_what_to_install(tmp_path, monkeypatch, default_checkpoint):
    # An earlier release's unchecked conversion is in the cache; converting again produces what
    # transformers 5.17 produced. Neither may be served.
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path))
    checkpoint_like(default_checkpoint, tmp_path / default_model.CHECKPOINT_NAME, {self_check.STAMP: None})

    def convert_like_transformers_517(out_dir: Path) -> None:
        out_dir.rmdir()
        checkpoint_like(default_checkpoint, out_dir, {"tokenizer.json": tokenizer_517(default_checkpoint),
                                                      "tokenizer_config.json": CONFIG_517, self_check.STAMP: None})

    monkeypatch.setattr(default_model, "_convert_gguf", convert_like_transformers_517)
    with pytest.raises(SelfCheckError) as refused:
        default_model.ensure_default_checkpoint()
    message = str(refused.value)
    assert "packaged Gemma 3 270M" in message and "failed its self-check and was discarded" in message
    installed = self_check.installed_versions()["transformers"]
    assert f"transformers {installed}" in message and "pip install 'transformers==" in message
    assert list(tmp_path.iterdir()) == []  # neither the old directory nor the half-trusted new one


@pytest.mark.slow
def test_a_fresh_conversion_under_the_installed_transformers_passes(tmp_path, monkeypatch, default_checkpoint):
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path))
    path = default_model.ensure_default_checkpoint()
    assert path == tmp_path / default_model.CHECKPOINT_NAME and self_check.is_verified(path)
    stamp = json.loads((path / self_check.STAMP).read_text())
    assert stamp["checked_with"] == self_check.installed_versions()
    # The same files as the cached conversion, whichever transformers made that one: nothing here
    # depends on it (checked byte for byte under transformers 5.0.0, 5.17.0 and 5.24.0).
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json",
                 "generation_config.json"):
        assert filecmp.cmp(path / name, default_checkpoint / name, shallow=False), name
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    assert sorted(p.name for p in tmp_path.iterdir()) == [default_model.CHECKPOINT_NAME, "gguf"]
