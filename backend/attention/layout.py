"""Where one step's flattened tokens sit, and what attention needs to know about them.

`StepLayout` is what every backend's `build_step` returns and every model's forward takes: each
token's position and cache slot, which rows need logits, and the backend's own metadata in
`attention`, one of
- `Decodes`: a decode-only step, row b is sequence b; its context through a slot list (both backends,
  and the fixed-shape layout that CUDA graphs of decode steps capture);
- a list of `AttentionGroup`s: the reference backend's mixed step (each prefill chunk alone, the
  decodes together), with additive masks;
- `VarlenLayout`: the kernel backend's mixed step, every chunk in one kernel call per layer.

Only small integer arrays (token ids, block tables, start positions) are made on the host and go to
the device in one copy (batch.HostToDevice); slots and masks of the grouped layouts are computed from
them on the device, with a fixed number of tensor ops per group whatever the batch size or context.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from ..batch import HostToDevice, SeqChunk
from ..params import blocks_for


@dataclass
class Decodes:
    """One new token per sequence, row b of the step is sequence b."""
    kv_slots: torch.Tensor  # [B, ctx] cache slot of each sequence's position j (padded: never attended)
    masks: dict = field(default_factory=dict)  # window -> [B, 1, ctx] additive; empty for the kernels


@dataclass
class AttentionGroup:
    """Sequences whose attention is computed together: `q_index` rows of the flattened tokens
    attend to cache slots `kv_slots`; masks[window] is additive, one per distinct sliding window."""
    q_index: torch.Tensor  # [B, n] rows of the step's tokens
    kv_slots: torch.Tensor  # [B, ctx] flat cache slots of each sequence's context (padded)
    masks: dict[int | None, torch.Tensor]  # window -> [B, n, ctx] additive mask


@dataclass
class VarlenLayout:
    """Every chunk of a step attends in one kernel call per layer (backend/kernels/varlen.py):
    chunk i's rows read its context through block_tables[i]."""
    block_tables: torch.Tensor  # [S, W] cache blocks of each scheduled sequence, in chunk order
    tiles: torch.Tensor  # [N, 4] int32 (sequence row, first token row, rows, first position); rows 0: padding
    block_size: int


AttentionMetadata = Union[Decodes, list[AttentionGroup], VarlenLayout]


@dataclass
class StepLayout:
    """Where the step's flattened tokens sit: their positions, cache slots, which rows need logits
    (the last token of each sequence that samples this step, and every draft of a verify chunk with
    the token before them), and the attention backend's metadata."""
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    # [L] the rows whose logits the model returns, in order: each sampling chunk's last row, and a
    # verify chunk's last 1 + num_drafts rows; None: every row (a graph-captured decode step)
    logit_rows: Optional[torch.Tensor]
    attention: AttentionMetadata
    # Fixed-shape graph steps (graphs.py) only: False for padding rows, which must not write K/V.
    row_valid: Optional[torch.Tensor] = None


def grouped_layout(chunks: list[SeqChunk], block_size: int, uploader: HostToDevice,
                   windows: set[int | None]) -> tuple[torch.Tensor, StepLayout]:
    """Decodes (one new token) share one batched group, verify chunks of the same length another,
    each prefill chunk gets its own; a decode-only step is `Decodes`. Masks for each of `windows`
    (none: the kernels need none)."""
    if all(len(chunk.token_ids) == 1 for chunk in chunks):
        return _decodes_layout(chunks, block_size, uploader, windows)
    token_ids, logit_rows, decodes, prefills = [], [], [], []
    verifies: dict[int, list] = {}  # verify chunks (speculative decoding) of the same length attend together
    for chunk in chunks:
        row, n = len(token_ids), len(chunk.token_ids)
        token_ids += chunk.token_ids
        logit_rows.extend(range(row + n - chunk.num_logit_rows, row + n))
        (decodes if n == 1 else verifies.setdefault(n, []) if chunk.num_drafts else prefills).append((row, chunk))
    members = [[p] for p in prefills] + list(verifies.values()) + ([decodes] if decodes else [])
    # Host side: per group, its block tables (padded with block 0, masked out), rows, starts, lengths.
    parts, shapes = [token_ids, logit_rows], []
    for group in members:
        n = len(group[0][1].token_ids)
        ctx_len = [c.start + n for _, c in group]
        num_blocks = -(-max(ctx_len) // block_size)
        parts += [_flat_block_tables([c for _, c in group], num_blocks), [r for r, _ in group],
                  [c.start for _, c in group], ctx_len]
        shapes.append((len(group), num_blocks, n, max(ctx_len)))
    on_device = uploader.upload(parts)

    device_ids, device_rows, tables_etc = on_device[0], on_device[1], on_device[2:]
    groups = [_group(*tables_etc[4 * i:4 * i + 4], *shape, block_size, windows) for i, shape in enumerate(shapes)]
    positions = torch.empty(len(token_ids), dtype=torch.long, device=device_ids.device)
    slot_mapping = torch.empty_like(positions)
    for group, (q_pos, new_slots) in groups:
        positions[group.q_index] = q_pos
        slot_mapping[group.q_index] = new_slots
    return device_ids, StepLayout(positions=positions, slot_mapping=slot_mapping, logit_rows=device_rows,
                                  attention=[g for g, _ in groups])


def _decodes_layout(chunks: list[SeqChunk], block_size: int, uploader: HostToDevice,
                    windows: set[int | None]) -> tuple[torch.Tensor, StepLayout]:
    """A step of one-token chunks (the steady state of decoding): one group, row b is chunk b, so no
    scatter; built in one pass per list, since at 256 sequences this step's host time is what the GPU
    waits for."""
    starts = [chunk.start for chunk in chunks]
    max_ctx = max(starts) + 1
    num_blocks = -(-max_ctx // block_size)
    device_ids, device_rows, device_tables, device_starts = uploader.upload(
        [[chunk.token_ids[0] for chunk in chunks], [i for i, chunk in enumerate(chunks) if chunk.needs_logits],
         _flat_block_tables(chunks, num_blocks), starts])
    group, (q_pos, new_slots) = _group(device_tables, None, device_starts,
                                       device_starts + 1 if windows else None, len(chunks), num_blocks,
                                       1, max_ctx, block_size, windows)
    return device_ids, StepLayout(positions=q_pos[:, 0], slot_mapping=new_slots[:, 0], logit_rows=device_rows,
                                  attention=Decodes(group.kv_slots, group.masks))


def _flat_block_tables(chunks: list[SeqChunk], num_blocks: int) -> list[int]:
    """Each chunk's block table cut or padded (with block 0, never attended) to `num_blocks`, one after
    another."""
    tables: list[int] = []
    for chunk in chunks:
        table = chunk.block_table
        tables += table[:num_blocks]
        if len(table) < num_blocks:
            tables += [0] * (num_blocks - len(table))
    return tables


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
    masks = {}
    if windows:
        k_pos = torch.arange(max_ctx, device=device)
        visible = (k_pos <= q_pos[:, :, None]) & (k_pos < ctx[:, None, None])  # causal, within the context
        masks = _window_masks(visible, q_pos[:, :, None], k_pos, windows)
    q_index = None if rows is None else rows[:, None] + steps  # None: a decodes layout's rows are its sequences
    group = AttentionGroup(q_index=q_index, kv_slots=kv_slots, masks=masks)
    return group, (q_pos, kv_slots.gather(1, q_pos))


def decode_masks(positions: torch.Tensor, ctx_len: int, windows) -> dict:
    """Additive masks [B, 1, ctx_len] for one new token per sequence at `positions` [B], whose
    context is the sequence's own slots for positions 0..ctx_len-1 (the decode layout)."""
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


def varlen_layout(chunks: list[SeqChunk], block_size: int, uploader: HostToDevice,
                  tile_tokens: int) -> tuple[torch.Tensor, StepLayout]:
    """Positions and cache slots of every token are laid out on the host (a range per cache block),
    the block tables padded to the longest context, and each chunk split into tiles of `tile_tokens`
    tokens; all of it goes to the device in one copy."""
    token_ids, logit_rows, positions, slots, q_starts = [], [], [], [], []
    width = blocks_for(max(c.start + len(c.token_ids) for c in chunks), block_size)
    for chunk in chunks:
        row, n, start = len(token_ids), len(chunk.token_ids), chunk.start
        q_starts.append(row)
        token_ids += chunk.token_ids
        if n == 1:  # a decode (most of a step's chunks at many sequences): one position, one slot
            if chunk.needs_logits:
                logit_rows.append(row)
            positions.append(start)
            slots.append(chunk.block_table[start // block_size] * block_size + start % block_size)
            continue
        logit_rows.extend(range(row + n - chunk.num_logit_rows, row + n))
        positions.extend(range(start, start + n))
        pos = start
        while pos < start + n:  # one run of consecutive slots per cache block
            block = pos // block_size
            end = min(start + n, (block + 1) * block_size)
            base = (chunk.block_table[block] - block) * block_size
            slots.extend(range(base + pos, base + end))
            pos = end
    tiles = tile_table(range(len(chunks)), q_starts, [len(c.token_ids) for c in chunks], [c.start for c in chunks],
                       tile_tokens)
    device_ids, device_rows, pos, slot_mapping, block_tables, device_tiles = uploader.upload(
        [token_ids, logit_rows, positions, slots, _flat_block_tables(chunks, width), tiles])
    varlen = VarlenLayout(block_tables=block_tables.view(len(chunks), width),
                          tiles=device_tiles.view(-1, 4).to(torch.int32), block_size=block_size)
    return device_ids, StepLayout(positions=pos, slot_mapping=slot_mapping, logit_rows=device_rows, attention=varlen)


def tile_table(seq_rows, q_starts, q_lens, pos_starts, block_m: int) -> list[int]:
    """Chunk i (block-table row seq_rows[i]; q_lens[i] new tokens at rows q_starts[i].. of the step,
    positions pos_starts[i]..) as ceil(q_lens[i] / block_m) tiles, flattened: 4 ints per tile,
    (seq_row, first_q_row, num_rows, first_position). A decode is a chunk of length 1."""
    flat = []
    for seq, row, length, pos in zip(seq_rows, q_starts, q_lens, pos_starts):
        if 0 < length <= block_m:  # one tile (every decode)
            flat += (seq, row, length, pos)
            continue
        for offset in range(0, length, block_m):
            flat += [seq, row + offset, min(block_m, length - offset), pos + offset]
    return flat
