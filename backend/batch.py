"""Turn one engine step's work (which sequences, how many new tokens each) into model inputs:
flattened token ids, positions, KV slots and the attention groups with their masks.

Only small integer tensors (block tables, start positions) are made on the host; slots and masks
are computed from them on the model's device, with a fixed number of tensor ops per group whatever
the batch size or context length.
"""
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
    token_ids, logit_rows, decodes, prefills = [], [], [], []
    for chunk in chunks:
        row, n = len(token_ids), len(chunk.token_ids)
        token_ids += chunk.token_ids
        if chunk.needs_logits:
            logit_rows.append(row + n - 1)
        (decodes if n == 1 else prefills).append((row, chunk))
    groups = [_group([p], block_size, windows, device) for p in prefills]
    if decodes:
        groups.append(_group(decodes, block_size, windows, device))

    positions = torch.empty(len(token_ids), dtype=torch.long, device=device)
    slot_mapping = torch.empty_like(positions)
    for group, (q_pos, new_slots) in groups:
        positions[group.q_index] = q_pos
        slot_mapping[group.q_index] = new_slots
    layout = StepLayout(positions=positions, slot_mapping=slot_mapping, groups=[g for g, _ in groups],
                        logit_rows=_tensor(logit_rows, device))
    return _tensor(token_ids, device), layout


def _tensor(values, device) -> torch.Tensor:
    # Made on the host, copied without waiting for queued device work.
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def _group(members: list[tuple[int, SeqChunk]], block_size: int, windows: set[int | None], device):
    """One attention group of sequences with the same number n of new tokens. Returns the group and,
    for its queries [B, n], their positions and the cache slots their K/V are written to."""
    n = len(members[0][1].token_ids)
    ctx_len = [c.start + n for _, c in members]
    num_blocks = -(-max(ctx_len) // block_size)
    tables = [(c.block_table + [0] * num_blocks)[:num_blocks] for _, c in members]
    block_table = _tensor(tables, device)  # [B, num_blocks], padded with block 0 (masked out)
    rows, starts, ctx = (_tensor(v, device) for v in ([r for r, _ in members], [c.start for _, c in members], ctx_len))

    max_ctx = max(ctx_len)
    offsets = torch.arange(block_size, device=device)
    kv_slots = (block_table[:, :, None] * block_size + offsets).flatten(1)[:, :max_ctx]  # [B, max_ctx]
    steps = torch.arange(n, device=device)
    q_pos = starts[:, None] + steps  # [B, n]
    k_pos = torch.arange(max_ctx, device=device)
    visible = (k_pos <= q_pos[:, :, None]) & (k_pos < ctx[:, None, None])  # causal, within the context
    masks = {}
    for window in windows:
        allowed = visible if window is None else visible & (k_pos > q_pos[:, :, None] - window)
        masks[window] = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))
    group = AttentionGroup(q_index=rows[:, None] + steps, kv_slots=kv_slots, masks=masks)
    return group, (q_pos, kv_slots.gather(1, q_pos))
