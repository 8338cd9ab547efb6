"""Speculative decoding's draft model (vLLM's method "draft_model"): a smaller checkpoint with the
target's vocabulary proposes each speculating sequence's next tokens, greedily, before the step.

The draft runs on the target's device in the target's dtype, through the same model and runner code
(backend/runner.py: `ModelRunner.logits`, CUDA graphs on a GPU), with a paged KV cache of its own.
Per step, for all the step's speculating sequences at once:
1. each sequence's draft cache is brought to its tokens: drafts it proposed last time and the target
   accepted stay (same token at the same position after the same prefix: the same K/V), the rest is
   rolled back (overwritten by the next forward), and its blocks cover its tokens and the drafts;
2. catch-up forwards compute every token the draft has not seen (the whole prompt the first time, the
   target's correction or bonus token after a verify, everything since a pause), at most
   max_num_batched_tokens tokens a forward; each sequence's last token gives its first draft;
3. one decode forward per further draft position, each fed the previous position's picks on the
   device; one copy brings all the drafts to the host.
Drafts are the draft model's argmax: a point-mass proposal, which the sampler's verification keeps
exact for greedy and sampled requests alike (backend/sampling.py).

The cache is sized so that it never runs dry while the target's does not: the target's blocks, and
for each running sequence its drafts' blocks and one partly filled block more. Sequences sharing a
cached prefix in the target hold one copy of it there but one each here; a sequence that finds no
blocks proposes nothing that step and starts its draft cache again later (its blocks go back).
A sequence's blocks also go back when it finishes or is preempted (`release`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence as Seq

import torch

from .batch import SeqChunk, fed_token
from .config import GemmaConfig
from .kv_cache import PagedKVCache, bytes_per_block
from .params import EngineConfig, blocks_for
from .runner import ModelRunner, StepModel
from .speculative import DraftRequest


def check_draft_checkpoint(path: Path, target: GemmaConfig, target_path: Path, max_model_len: int) -> None:
    """Refuse a draft the engine cannot use, naming why: no checkpoint at `path`, a vocabulary other than
    the target's, or fewer positions than max_model_len."""
    where = f"speculative_config: the draft model {str(path)!r}"
    if not path.is_dir():
        raise ValueError(f"{where} does not exist (a checkpoint directory on this machine is needed)")
    try:
        draft = GemmaConfig.from_checkpoint(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where} is not a Gemma checkpoint: {e}") from None
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"{where} has a vocabulary of {draft.vocab_size} tokens, the target one of "
                         f"{target.vocab_size}: a draft must share the target's tokenizer")
    if _vocabularies_differ(path, target_path):
        raise ValueError(f"{where} has a tokenizer whose vocabulary differs from the target's: a draft must "
                         f"share the target's tokenizer")
    if draft.max_position_embeddings < max_model_len:
        raise ValueError(f"{where} has {draft.max_position_embeddings} positions, fewer than max_model_len "
                         f"({max_model_len}): lower max_model_len to at most that, or use another draft")


def _vocabularies_differ(draft: Path, target: Path) -> bool:
    """Both have a tokenizer.json and their tokens (or ids) differ. A draft without one is judged by its
    vocabulary size alone, as vLLM does."""
    files = draft / "tokenizer.json", target / "tokenizer.json"
    if not all(f.is_file() for f in files):
        return False
    texts = [f.read_bytes() for f in files]
    return texts[0] != texts[1] and _vocabulary(texts[0]) != _vocabulary(texts[1])


def _vocabulary(text: bytes) -> tuple:
    """A tokenizer.json's tokens and their ids: the model's vocabulary and the added tokens."""
    spec = json.loads(text)
    vocab = spec["model"]["vocab"]
    tokens = vocab if isinstance(vocab, dict) else [entry[0] for entry in vocab]  # BPE: a dict; Unigram: pairs
    return tokens, sorted((t["id"], t["content"]) for t in spec.get("added_tokens", []))


@dataclass
class DraftCache:
    """One sequence's part of the draft's KV cache."""
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # positions whose K/V are in the draft's cache
    num_known: int = 0  # of those, the sequence's own tokens at the last proposal; `drafts` follow them
    drafts: list[int] = field(default_factory=list)  # drafts whose K/V were computed (all but the last)


class DraftModelProposer:
    """Greedy drafts from a draft model, batched across the step's speculating sequences."""

    def __init__(self, runner: ModelRunner, max_num_batched_tokens: int):
        self.runner, self.kv_cache = runner, runner.kv_cache
        self._pool, self._block_size = runner.kv_cache.pool, runner.kv_cache.block_size
        self._max_forward_tokens = max_num_batched_tokens

    def start(self, token_ids: Seq[int]) -> DraftCache:
        return DraftCache()

    def release(self, state: DraftCache) -> None:
        if state.block_table:
            self._pool.release(state.block_table)
        state.block_table, state.num_computed, state.num_known, state.drafts = [], 0, 0, []

    def propose(self, requests: Seq[DraftRequest]) -> list[list[int]]:
        drafting = []  # (request index, its state, tokens, drafts wanted) of those with blocks
        for i, r in enumerate(requests):
            self._roll_back(r.state, r.token_ids)
            if self._claim(r.state, len(r.token_ids) + r.max_tokens - 1):
                drafting.append((i, r.state, r.token_ids, r.max_tokens))
            else:
                self.release(r.state)
        proposals: list[list[int]] = [[] for _ in requests]
        if not drafting:
            return proposals
        picked = [[first] for first in self._catch_up(drafting)]  # per sequence, its picks on the device
        for j in range(1, max(wanted for *_, wanted in drafting)):
            active = [n for n, (*_, wanted) in enumerate(drafting) if wanted > j]
            # Draft j (0-based) goes at position len(tokens) + j - 1, fed from the device.
            chunks = [SeqChunk([fed_token(row)], len(drafting[n][2]) + j - 1, drafting[n][1].block_table,
                               needs_logits=True)
                      for row, n in enumerate(active)]
            picks = self.runner.logits(chunks, torch.stack([picked[n][-1] for n in active])).argmax(dim=-1)
            for row, n in enumerate(active):
                picked[n].append(picks[row])
        flat = torch.stack([pick for picks in picked for pick in picks]).tolist()  # the one copy to the host
        start = 0
        for (i, state, tokens, wanted), picks in zip(drafting, picked):
            proposals[i], start = flat[start:start + wanted], start + wanted
            state.num_known, state.drafts = len(tokens), proposals[i][:wanted - 1]
            state.num_computed = len(tokens) + wanted - 1
        return proposals

    def _roll_back(self, state: DraftCache, token_ids: Seq[int]) -> None:
        """Keep the K/V of the sequence's tokens: its own at the last proposal and the drafts the target
        accepted since; never its last token, whose logits give the first draft."""
        kept = state.num_known
        for draft in state.drafts:
            if kept == len(token_ids) or token_ids[kept] != draft:
                break
            kept += 1
        state.num_computed = min(state.num_computed, kept, len(token_ids) - 1)

    def _claim(self, state: DraftCache, num_positions: int) -> bool:
        """Blocks for the first `num_positions` positions exactly; False if the pool is short."""
        need = blocks_for(num_positions, self._block_size)
        table = state.block_table
        if len(table) > need:
            self._pool.release(table[need:])
            del table[need:]
        elif need > len(table):
            if need - len(table) > self._pool.num_free:
                return False
            table += self._pool.allocate(need - len(table))
        return True

    def _catch_up(self, drafting: list) -> list[torch.Tensor]:
        """Compute each sequence's tokens missing from the draft's cache, in forwards of at most
        max_num_batched_tokens tokens; each one's first draft (on the device) from its last token."""
        firsts: list[Optional[torch.Tensor]] = [None] * len(drafting)
        starts = [state.num_computed for _, state, _, _ in drafting]
        todo = list(range(len(drafting)))
        while todo:
            chunks, ending, budget = [], [], self._max_forward_tokens
            while todo and budget:
                n = todo[0]
                _, state, tokens, _ = drafting[n]
                end = min(len(tokens), starts[n] + budget)
                chunks.append(SeqChunk(list(tokens[starts[n]:end]), starts[n], state.block_table,
                                       needs_logits=end == len(tokens)))
                budget -= end - starts[n]
                starts[n] = end
                if end == len(tokens):
                    ending.append(todo.pop(0))
            picks = self.runner.logits(chunks).argmax(dim=-1)
            for row, n in enumerate(ending):
                firsts[n] = picks[row]
        return firsts


def draft_proposer(model: StepModel, config: EngineConfig, target_num_blocks: int, max_model_len: int
                   ) -> DraftModelProposer:
    """A proposer running `model` (loaded on the target's device, in its dtype), its KV cache sized as
    the module docstring says, its CUDA graphs captured."""
    size = config.block_size
    k = config.speculative().num_speculative_tokens
    num_blocks = target_num_blocks + config.max_num_seqs * (blocks_for(k, size) + 1)
    kv_cache = PagedKVCache.from_budget(model.cfg, num_blocks * bytes_per_block(model.cfg, size, model.dtype), size,
                                       model.dtype, model.device, enable_prefix_caching=False)
    runner = ModelRunner(model, kv_cache, config.max_num_seqs, config.max_num_batched_tokens, max_model_len,
                         config.cuda_graphs)
    runner.warm_up()
    return DraftModelProposer(runner, config.max_num_batched_tokens)
