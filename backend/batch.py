"""Turn one engine step's work (which sequences, how many new tokens each) into model inputs:
flattened token ids, positions, KV slots and the attention groups with their masks.

Only small integer arrays (token ids, block tables, start positions) are made on the host, and go
to the device in one copy (HostToDevice); slots and masks are computed from them on the model's
device, with a fixed number of tensor ops per group whatever the batch size or context length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import blocks_for
from .model import AttentionGroup, StepLayout, VarlenLayout


@dataclass
class SeqChunk:
    """`token_ids` are the sequence's tokens at positions [start, start + len) this step."""
    token_ids: list[int]
    start: int
    block_table: list[int]
    needs_logits: bool


class HostToDevice:
    """A step's small integer inputs, gathered into one host buffer (pinned on CUDA) and sent to the
    device in one copy. Each step takes a fresh buffer from torch's pinned-memory cache, which hands
    a buffer out again only once its copy is done: the next step is built while this one's copy may
    still be queued behind the step before."""

    def __init__(self, device: torch.device | str, pinned: bool = True):
        self.device = torch.device(device)
        self.pinned = pinned and self.device.type == "cuda"

    def upload(self, parts: list[list[int]]) -> list[torch.Tensor]:
        """Each list of ints as a 1-D long tensor on the device."""
        sizes = [len(p) for p in parts]
        flat = torch.tensor([v for p in parts for v in p], dtype=torch.long)
        if self.pinned:
            flat = flat.pin_memory()
        # Not pinned: the CPU (no copy at all), or a one-off layout.
        return list(flat.to(self.device, non_blocking=True).split(sizes))


def build_step(chunks: list[SeqChunk], block_size: int, windows: set[int | None],
               device: torch.device | str, uploader: HostToDevice | None = None,
               tile_rows: int | None = None) -> tuple[torch.Tensor, StepLayout]:
    """Decodes (one new token) share one batched attention group; each longer chunk gets its own.
    With `tile_rows` (the model has a varlen attention kernel taking that many tokens per tile), a
    step holding any longer chunk gets a VarlenLayout instead: one attention call for all of it."""
    # Without a persistent uploader, no pinned buffer: pinning memory costs more than the copy it speeds.
    uploader = uploader or HostToDevice(device, pinned=False)
    if tile_rows is not None and any(len(c.token_ids) > 1 for c in chunks):
        return _build_varlen_step(chunks, block_size, uploader, tile_rows)
    token_ids, logit_rows, decodes, prefills = [], [], [], []
    for chunk in chunks:
        row, n = len(token_ids), len(chunk.token_ids)
        token_ids += chunk.token_ids
        if chunk.needs_logits:
            logit_rows.append(row + n - 1)
        (decodes if n == 1 else prefills).append((row, chunk))
    members = [[p] for p in prefills] + ([decodes] if decodes else [])
    # Host side: per group, its block tables (padded with block 0, masked out), rows, starts, lengths.
    parts, shapes = [token_ids, logit_rows], []
    for group in members:
        n = len(group[0][1].token_ids)
        ctx_len = [c.start + n for _, c in group]
        num_blocks = -(-max(ctx_len) // block_size)
        tables = [(c.block_table + [0] * num_blocks)[:num_blocks] for _, c in group]
        parts += [[b for t in tables for b in t], [r for r, _ in group], [c.start for _, c in group], ctx_len]
        shapes.append((len(group), num_blocks, n, max(ctx_len)))
    on_device = uploader.upload(parts)

    device_ids, device_rows, tables_etc = on_device[0], on_device[1], on_device[2:]
    groups = [_group(*tables_etc[4 * i:4 * i + 4], *shape, block_size, windows) for i, shape in enumerate(shapes)]
    positions = torch.empty(len(token_ids), dtype=torch.long, device=device_ids.device)
    slot_mapping = torch.empty_like(positions)
    for group, (q_pos, new_slots) in groups:
        positions[group.q_index] = q_pos
        slot_mapping[group.q_index] = new_slots
    layout = StepLayout(positions=positions, slot_mapping=slot_mapping, groups=[g for g, _ in groups],
                        logit_rows=device_rows)
    return device_ids, layout


def _build_varlen_step(chunks: list[SeqChunk], block_size: int, uploader: HostToDevice,
                       tile_rows: int) -> tuple[torch.Tensor, StepLayout]:
    """Positions and cache slots of every token are laid out on the host (a range per cache block),
    the block tables padded to the longest context, and each chunk split into tiles of `tile_rows`
    tokens; all of it goes to the device in one copy."""
    token_ids, logit_rows, positions, slots, q_starts = [], [], [], [], []
    width = max(blocks_for(c.start + len(c.token_ids), block_size) for c in chunks)
    tables = []
    for seq_row, chunk in enumerate(chunks):
        row, n, start = len(token_ids), len(chunk.token_ids), chunk.start
        q_starts.append(row)
        token_ids += chunk.token_ids
        if chunk.needs_logits:
            logit_rows.append(row + n - 1)
        positions.extend(range(start, start + n))
        pos = start
        while pos < start + n:  # one run of consecutive slots per cache block
            block = pos // block_size
            end = min(start + n, (block + 1) * block_size)
            base = (chunk.block_table[block] - block) * block_size
            slots.extend(range(base + pos, base + end))
            pos = end
        tables += (chunk.block_table + [0] * width)[:width]
    tiles = tile_table(range(len(chunks)), q_starts, [len(c.token_ids) for c in chunks], [c.start for c in chunks],
                       tile_rows)
    device_ids, device_rows, pos, slot_mapping, block_tables, device_tiles = uploader.upload(
        [token_ids, logit_rows, positions, slots, tables, tiles])
    varlen = VarlenLayout(block_tables=block_tables.view(len(chunks), width),
                          tiles=device_tiles.view(-1, 4).to(torch.int32), block_size=block_size)
    return device_ids, StepLayout(positions=pos, slot_mapping=slot_mapping, groups=[], logit_rows=device_rows,
                                  varlen=varlen)


def tile_table(seq_rows, q_starts, q_lens, pos_starts, block_m: int) -> list[int]:
    """Chunk i (block-table row seq_rows[i]; q_lens[i] new tokens at rows q_starts[i].. of the step,
    positions pos_starts[i]..) as ceil(q_lens[i] / block_m) tiles, flattened: 4 ints per tile,
    (seq_row, first_q_row, num_rows, first_position). A decode is a chunk of length 1."""
    flat = []
    for seq, row, length, pos in zip(seq_rows, q_starts, q_lens, pos_starts):
        for offset in range(0, length, block_m):
            flat += [seq, row + offset, min(block_m, length - offset), pos + offset]
    return flat


def _group(tables, rows, starts, ctx, batch: int, num_blocks: int, n: int, max_ctx: int, block_size: int,
           windows: set[int | None]):
    """One attention group of `batch` sequences with the same number n of new tokens, from its
    device tensors. Returns the group and, for its queries [B, n], their positions and the cache
    slots their K/V are written to."""
    device = tables.device
    block_table = tables.view(batch, num_blocks)
    offsets = torch.arange(block_size, device=device)
    kv_slots = (block_table[:, :, None] * block_size + offsets).flatten(1)[:, :max_ctx]  # [B, max_ctx]
    steps = torch.arange(n, device=device)
    q_pos = starts[:, None] + steps  # [B, n]
    k_pos = torch.arange(max_ctx, device=device)
    visible = (k_pos <= q_pos[:, :, None]) & (k_pos < ctx[:, None, None])  # causal, within the context
    group = AttentionGroup(q_index=rows[:, None] + steps, kv_slots=kv_slots,
                           masks=_window_masks(visible, q_pos[:, :, None], k_pos, windows))
    return group, (q_pos, kv_slots.gather(1, q_pos))


def decode_masks(positions: torch.Tensor, ctx_len: int, windows) -> dict:
    """Additive masks [B, 1, ctx_len] for one new token per sequence at `positions` [B], whose
    context is the sequence's own slots for positions 0..ctx_len-1 (build_step's decode layout)."""
    k_pos = torch.arange(ctx_len, device=positions.device)
    q_pos = positions[:, None, None]
    return _window_masks(k_pos <= q_pos, q_pos, k_pos, windows)


def _window_masks(visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, windows) -> dict:
    """window -> additive mask (0 or -inf) of `visible` keys, also within the sliding window if any
    (key j is in query i's window W iff i - W < j)."""
    masks = {}
    for window in windows:
        allowed = visible if window is None else visible & (k_pos > q_pos - window)
        masks[window] = torch.zeros(allowed.shape, device=visible.device).masked_fill_(~allowed, float("-inf"))
    return masks
