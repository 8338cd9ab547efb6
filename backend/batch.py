"""Turn one engine step's work (which sequences, how many new tokens each) into model inputs:
flattened token ids, positions, KV slots and the attention groups with their masks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import AttentionGroup, StepLayout


@dataclass
class SeqChunk:
    """`token_ids` are the sequence's tokens at positions [start, start + len) this step."""
    token_ids: list[int]
    start: int
    block_table: list[int]
    needs_logits: bool


def build_step(chunks: list[SeqChunk], block_size: int, windows: set[int | None],
               device: torch.device) -> tuple[torch.Tensor, StepLayout]:
    """Decodes (one new token) share one batched attention group; each longer chunk gets its own."""
    token_ids, positions, slots, logit_rows = [], [], [], []
    decode_rows, decode_ctx, prefill_groups = [], [], []
    row = 0
    for chunk in chunks:
        n = len(chunk.token_ids)
        ctx = chunk.start + n
        ctx_slots = _slots(chunk.block_table, ctx, block_size)
        token_ids += chunk.token_ids
        positions += range(chunk.start, ctx)
        slots.append(ctx_slots[chunk.start:])
        if chunk.needs_logits:
            logit_rows.append(row + n - 1)
        if n == 1:
            decode_rows.append(row)
            decode_ctx.append(ctx_slots)
        else:
            prefill_groups.append(_group([list(range(row, row + n))], [ctx_slots], [chunk.start], windows, device))
        row += n
    groups = prefill_groups
    if decode_rows:
        groups.append(_group([[r] for r in decode_rows], decode_ctx,
                             [len(c) - 1 for c in decode_ctx], windows, device))
    layout = StepLayout(
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slot_mapping=torch.cat(slots).to(device),
        groups=groups,
        logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=device),
    )
    return torch.tensor(token_ids, dtype=torch.long, device=device), layout


def _slots(block_table: list[int], num_tokens: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions 0..num_tokens-1: block_table[p // block_size] * block_size + p % block_size."""
    blocks = torch.tensor(block_table[: -(-num_tokens // block_size)], dtype=torch.long)
    return (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:num_tokens]


def _group(q_rows: list[list[int]], ctx_slots: list[torch.Tensor], first_pos: list[int],
           windows: set[int | None], device) -> AttentionGroup:
    """q_rows[b]: step rows of sequence b's new tokens, at positions first_pos[b] + i;
    ctx_slots[b]: cache slots of its positions 0..ctx-1 (padded to the longest with slot 0, masked)."""
    max_ctx = max(len(s) for s in ctx_slots)
    kv_slots = torch.zeros(len(ctx_slots), max_ctx, dtype=torch.long)
    for row, s in zip(kv_slots, ctx_slots):
        row[: len(s)] = s
    kv_slots = kv_slots.to(device)
    ctx_len = torch.tensor([len(s) for s in ctx_slots], device=device)
    n = len(q_rows[0])
    q_pos = torch.tensor(first_pos, device=device)[:, None] + torch.arange(n, device=device)  # [B, n]
    k_pos = torch.arange(max_ctx, device=device)
    visible = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < ctx_len[:, None, None])
    masks = {}
    for window in windows:
        allowed = visible if window is None else visible & (k_pos[None, None, :] > q_pos[:, :, None] - window)
        masks[window] = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))
    return AttentionGroup(q_index=torch.tensor(q_rows, dtype=torch.long, device=device), kv_slots=kv_slots,
                          masks=masks)
