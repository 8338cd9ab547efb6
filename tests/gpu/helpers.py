"""Shared pieces of the GPU tests: tiny checkpoints, an engine-like step driver, greedy comparison.

The driver schedules like backend.scheduler (sequences join at given steps, prompts are prefilled
in chunks next to other sequences' decodes, decodes are batched) and calls model(token_ids,
layout, kv_cache) exactly as the engine does, so the TE model is tested through the engine's
contract, including mixed prefill+decode steps (eager) and decode-only steps (CUDA graphs).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from backend.batch import HostToDevice, SeqChunk
from backend.kv_cache import PagedKVCache
from backend.te import te_available
from tests.tiny_models import hf_model

DEVICE = "cuda"
FAMILIES = ["gemma", "gemma2", "gemma3_text"]

requires_te = pytest.mark.skipif(not te_available(), reason="needs CUDA and TransformerEngine")


def report(**fields) -> None:
    """Append one JSON line of measured numbers to $GPU_TEST_REPORT (docs/gpu.md quotes them)."""
    path = os.environ.get("GPU_TEST_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")
    print(json.dumps(fields))


def tiny_hf(family: str, seed: int = 0, **config_kw):
    """A seeded tiny HF model (tests.tiny_models, fp32, CPU). The tiny Gemma 1's embedding dominates
    its residual stream and greedy decoding repeats one token; larger projections make it diverse."""
    model = hf_model(family, seed, **config_kw)
    if family == "gemma":
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def save_tiny(path: Path, family: str, seed: int = 0, **config_kw) -> Path:
    tiny_hf(family, seed, **config_kw).save_pretrained(path, safe_serialization=True)
    return path


def add_wordlevel_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer ("w0".."w{V-1}") so backend.engine.Engine can serve a tiny checkpoint
    without the real Gemma tokenizer (the GPU machine has no network and no GGUF). Like Gemma's, it
    puts its <bos> ("w2") first, which the engine's start check (backend/self_check.py) requires."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="w2 $A", special_tokens=[("w2", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w1", bos_token="w2",
                            unk_token="w3").save_pretrained(path)


def prompts_for(vocab_size: int, lengths, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab_size, (n,), generator=gen).tolist() for n in lengths]


@dataclass
class SeqRun:
    prompt: list[int]
    arrival: int  # step at which the sequence joins
    max_new: int
    block_table: list[int] = field(default_factory=list)
    computed: int = 0
    tokens: list[int] = field(default_factory=list)  # generated
    logits: list[torch.Tensor] = field(default_factory=list)  # the logits each token was chosen from

    @property
    def all_ids(self):
        return self.prompt + self.tokens

    @property
    def done(self):
        return len(self.tokens) >= self.max_new


def drive(model, cfg, prompts, max_new: int, dtype, arrivals=None, chunk: int = 7, block_size: int = 16,
          num_blocks: int = 256, attention=None) -> list[SeqRun]:
    """Greedy generation for `prompts` through model(token_ids, layout, kv_cache), continuous-
    batching style; returns each sequence's tokens and the logits they were chosen from. Steps
    are laid out by `attention` (default: the model's attention backend, or its graphs' model's)."""
    kv = PagedKVCache(cfg, num_blocks=num_blocks, block_size=block_size, dtype=dtype, device=DEVICE)
    attention = attention or getattr(model, "attention", None) or model.model.attention
    uploader = HostToDevice(DEVICE)
    seqs = [SeqRun(p, a, max_new) for p, a in zip(prompts, arrivals or [0] * len(prompts))]
    step = 0
    while not all(s.done for s in seqs):
        live = [s for s in seqs if s.arrival <= step and not s.done]
        work = []
        for s in live:
            if not s.block_table:
                s.block_table = kv.pool.allocate(kv.blocks_for(len(s.prompt) + max_new))
            pending = len(s.all_ids) - s.computed
            n = 1 if pending == 1 else min(pending, chunk)
            end = s.computed + n
            work.append((s, SeqChunk(s.all_ids[s.computed:end], s.computed, s.block_table, end == len(s.all_ids))))
        step += 1
        if not work:
            continue
        token_ids, layout = attention.build_step([c for _, c in work], block_size, uploader)
        logits = model(token_ids, layout, kv)
        rows = iter(range(logits.shape[0]))
        for s, c in work:
            s.computed += len(c.token_ids)
            if c.needs_logits:
                row = logits[next(rows)].float().cpu()
                s.logits.append(row)
                s.tokens.append(int(row.argmax()))
        for s in seqs:
            if s.done and s.block_table:
                kv.pool.release(s.block_table)  # finished sequences leave; their blocks are reused
                s.block_table = []
    return seqs


def greedy_agreement(ref: SeqRun, got: SeqRun, tie: float, what: str) -> int:
    """Number of leading tokens equal. A divergence is accepted only at a near-tie: the token
    `got` picked scores within `tie` of the reference's best logit at that step. After it the two
    continuations are different texts and are not compared further (as vLLM's tests do)."""
    for i, (a, b) in enumerate(zip(ref.tokens, got.tokens)):
        if a != b:
            gap = float(ref.logits[i].max() - ref.logits[i][b])
            assert gap < tie, (f"{what}: token {i} is {b}, which the reference scores {gap:.4g} below its "
                               f"choice {a} (only near-ties below {tie} may flip)")
            return i
    assert len(ref.tokens) == len(got.tokens)
    return len(ref.tokens)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())
