"""The packaged Gemma 3 270M GGUF (llama.cpp's format) -> an HF checkpoint directory, with the `gguf`
and `tokenizers` libraries alone.

transformers can load GGUF files too, but its import has changed between releases: under 5.17 it
turned this vocabulary into a character-level tokenizer without <bos> ("Hello" -> five letters),
and the server then generated garbage. So the checkpoint is written here from the file's own data;
under transformers 5.0.0, 5.17.0 and 5.24.0 the files came out byte for byte the same:

- weights: each tensor dequantised by `gguf.quants`, renamed to HF's names; llama.cpp stores Gemma's
  RMSNorm weights as 1 + w, HF (and the engine) as w;
- config.json: the file's hyper-parameters, plus the few Gemma 3 constants a GGUF does not record;
- tokenizer.json: Gemma's sentencepiece BPE rebuilt with the `tokenizers` library from the file's
  vocabulary and token types (the file has no merges: they follow from the vocabulary's order).

backend.self_check verifies the result; backend.default_model decides when to convert.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# What llama.cpp does not write into a Gemma 3 GGUF (its code knows these per model size), as
# google/gemma-3-270m's config.json has them. Other sizes differ (the 27B scales queries by 168), so
# this converter is for the 270M; the self-check would refuse anything else it made.
GEMMA3_270M_CONSTANTS = {"query_pre_attn_scalar": 256, "rope_local_base_freq": 10000.0,
                         "hidden_activation": "gelu_pytorch_tanh"}
GEMMA3_GLOBAL_LAYER_EVERY = 6  # five sliding-window layers, then one global one

_LAYER_TENSORS = {  # GGUF name in block i -> HF name in layer i
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}

# llama.cpp's token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, generation_config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json for the Gemma 3 GGUF at `gguf_path` into `out_dir`."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta.get("general.architecture") != "gemma3":
        raise ValueError(f"{gguf_path}: architecture {meta.get('general.architecture')!r}, expected 'gemma3'")
    tokens, token_types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]

    config = gemma3_config(meta, vocab_size=len(tokens))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    # Gemma 3 chat models end a turn with <end_of_turn> as well as <eos>; HF's own
    # generation_config for this model lists both.
    eos_ids = [config["eos_token_id"], tokens.index("<end_of_turn>")]
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos_ids,
                  "pad_token_id": config["pad_token_id"]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    write_tokenizer(out_dir, tokens, token_types, meta)
    write_weights(out_dir, reader, config["num_hidden_layers"])


def gemma3_config(meta: dict, vocab_size: int) -> dict:
    """config.json in the Hub's Gemma 3 spelling (legacy rope keys, which every transformers 5
    release reads), from the GGUF's `gemma3.*` metadata."""
    arch = "gemma3."
    layers = meta[arch + "block_count"]
    return {
        # The spelling transformers 4.55 wrote (google/gemma-3-270m's config.json); without a version
        # here transformers 5.17 takes the directory for an old Mistral tokenizer and warns.
        "transformers_version": "4.55.0",
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": vocab_size,
        "hidden_size": meta[arch + "embedding_length"],
        "intermediate_size": meta[arch + "feed_forward_length"],
        "num_hidden_layers": layers,
        "num_attention_heads": meta[arch + "attention.head_count"],
        "num_key_value_heads": meta[arch + "attention.head_count_kv"],
        "head_dim": meta[arch + "attention.key_length"],
        "max_position_embeddings": meta[arch + "context_length"],
        "rms_norm_eps": meta[arch + "attention.layer_norm_rms_epsilon"],
        "rope_theta": meta[arch + "rope.freq_base"],
        "rope_scaling": None,
        "sliding_window": meta[arch + "attention.sliding_window"],
        "layer_types": ["full_attention" if (i + 1) % GEMMA3_GLOBAL_LAYER_EVERY == 0 else "sliding_attention"
                        for i in range(layers)],
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta["tokenizer.ggml.padding_token_id"],
        "torch_dtype": "float32",
        **GEMMA3_270M_CONSTANTS,
    }


def write_weights(out_dir: Path, reader, num_layers: int) -> None:
    """model.safetensors in float32 with HF names; the tied lm_head is not stored."""
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    names = {f"{gguf}.weight": f"{hf}.weight" for gguf, hf in _TOP_TENSORS.items()}
    names |= {f"blk.{i}.{gguf}.weight": f"model.layers.{i}.{hf}.weight"
              for i in range(num_layers) for gguf, hf in _LAYER_TENSORS.items()}
    state = {}
    for tensor in reader.tensors:
        if tensor.name not in names:
            raise ValueError(f"GGUF tensor {tensor.name!r} has no place in a Gemma 3 checkpoint")
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if tensor.name.endswith("norm.weight"):
            weight = weight - np.float32(1.0)  # llama.cpp stores Gemma's zero-centred norms as 1 + w
        state[names[tensor.name]] = np.ascontiguousarray(weight)
    missing = sorted(set(names.values()) - set(state))
    if missing:
        raise ValueError(f"the GGUF lacks tensors a Gemma 3 checkpoint needs: {missing[:5]}")
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def gemma_tokenizer(tokens: list[str], token_types: list[int], bos_id: int, unk_id: int):
    """Gemma's tokenizer as a `tokenizers.Tokenizer`: byte-fallback BPE over the vocabulary, spaces
    written as "▁", <bos> prepended, control tokens special, user-defined ones (newline and tab
    runs, HTML tags) matched whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    # The file spells the runs of 2..31 spaces with real spaces; Gemma's pieces spell them "▁".
    pieces = ["\u2581" * len(t) if t.strip(" ") == "" else t for t in tokens]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ValueError("the GGUF vocabulary spells two tokens the same")
    tokenizer = Tokenizer(BPE(vocab, bpe_merges(pieces), unk_token=pieces[unk_id], fuse_unk=True,
                              byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                           decoders.Fuse()])
    bos = pieces[bos_id]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                  for p, kind in zip(pieces, token_types) if kind == _CONTROL])
    # Space runs are left to the BPE merges: as added tokens they would only match literal "▁▁".
    tokenizer.add_tokens([AddedToken(p, special=False, normalized=False)
                          for p, t, kind in zip(pieces, tokens, token_types) if kind == _USER_DEFINED and p == t])
    return tokenizer


def bpe_merges(pieces: list[str]) -> list[tuple[str, str]]:
    """Every way to build a piece from two others, best first.

    The GGUF has no merge list, and Gemma's piece scores do not follow its merge order; the order of
    the vocabulary does. A piece that two splits can build lists the longer left part first. (This
    is transformers 5.24's list for the packaged GGUF, merge for merge: 514,906 of them.)"""
    known = set(pieces)
    merges = []
    for piece in pieces:
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in known and right in known:
                merges.append((left, right))
    return merges


def write_tokenizer(out_dir: Path, tokens: list[str], token_types: list[int], meta: dict) -> None:
    ids = {name: meta[f"tokenizer.ggml.{key}"] for name, key in
           (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id"))}
    if not meta.get("tokenizer.ggml.add_bos_token", True) or meta.get("tokenizer.ggml.add_eos_token", False):
        raise ValueError("expected a GGUF whose tokenizer adds <bos> and no <eos>, as Gemma's does")
    tokenizer = gemma_tokenizer(tokens, token_types, ids["bos"], ids["unk"])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    # The generic class: transformers then runs tokenizer.json as written. Its GemmaTokenizer class
    # rebuilds a BPE from the file's vocabulary and merges instead (how 5.17's merge-less output
    # became character-level), so that class would put transformers' release back in the loop.
    config = {f"{name}_token": tokens[i] for name, i in ids.items()}
    config |= {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
