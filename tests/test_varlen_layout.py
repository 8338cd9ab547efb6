"""build_step's VarlenLayout (models with a varlen attention kernel): the same token rows, positions
and cache slots as the attention-group layout, block tables in chunk order, and tiles that cover
every row of every chunk exactly once; and the varlen kernel over it attends like the groups."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is first imported

from backend.batch import SeqChunk, build_step

BLOCK = 4


def chunks():
    # A fresh prompt, a chunk continuing a cached prefix across block boundaries, two decodes.
    return [SeqChunk(list(range(10, 17)), 0, [7, 2], True),
            SeqChunk(list(range(20, 29)), 6, [3, 9, 4, 11], False),
            SeqChunk([5], 12, [1, 8, 6, 0], True),
            SeqChunk([6], 0, [5], True)]


def test_varlen_layout_has_the_group_layouts_rows_positions_and_slots():
    ids_g, groups = build_step(chunks(), BLOCK, {None}, "cpu")
    ids_v, varlen = build_step(chunks(), BLOCK, {None}, "cpu", tile_rows=4)
    assert varlen.groups == [] and varlen.varlen is not None and groups.varlen is None
    assert torch.equal(ids_v, ids_g)
    assert torch.equal(varlen.positions, groups.positions)
    assert torch.equal(varlen.slot_mapping, groups.slot_mapping)
    assert torch.equal(varlen.logit_rows, groups.logit_rows)
    assert varlen.positions.tolist() == list(range(7)) + list(range(6, 15)) + [12, 0]
    # slot = block_table[pos // 4] * 4 + pos % 4: the second chunk's positions 6, 7 in block 9, 8 in block 4.
    assert varlen.slot_mapping[7:10].tolist() == [38, 39, 16]


def test_block_tables_are_padded_to_the_longest_context_in_chunk_order():
    _, layout = build_step(chunks(), BLOCK, {None}, "cpu", tile_rows=4)
    # Longest context: the second chunk's 15 positions -> 4 blocks.
    assert layout.varlen.block_tables.tolist() == [[7, 2, 0, 0], [3, 9, 4, 11], [1, 8, 6, 0], [5, 0, 0, 0]]
    assert layout.varlen.block_size == BLOCK


def test_tiles_split_chunks_into_tile_rows_and_cover_every_row_once():
    _, layout = build_step(chunks(), BLOCK, {None}, "cpu", tile_rows=4)
    tiles = layout.varlen.tiles.tolist()
    # (sequence row, first token row, rows, first position)
    assert tiles == [[0, 0, 4, 0], [0, 4, 3, 4], [1, 7, 4, 6], [1, 11, 4, 10], [1, 15, 1, 14], [2, 16, 1, 12],
                     [3, 17, 1, 0]]
    covered = [r for _, first, n, _ in tiles for r in range(first, first + n)]
    assert covered == list(range(18))
    for seq, first, n, pos in tiles:  # a tile's positions are its rows' positions
        assert layout.positions[first:first + n].tolist() == list(range(pos, pos + n))


def test_decode_only_steps_keep_the_batched_decode_group():
    decodes = [SeqChunk([5], 12, [1, 8, 6, 0], True), SeqChunk([6], 0, [5], True)]
    _, layout = build_step(decodes, BLOCK, {None}, "cpu", tile_rows=4)
    assert layout.varlen is None and len(layout.groups) == 1  # the decode graphs' layout


def test_varlen_kernel_on_the_layout_attends_like_the_groups():
    """The fused_varlen kernel (Triton's interpreter here) over build_step's VarlenLayout gives
    what the attention groups of the same step give (backend/te/attention.py's torch path)."""
    pytest.importorskip("triton")
    from backend.te import fused_varlen
    from backend.te.attention import StepContext, paged_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    kv_heads, group, D = 1, 8, 16
    k_cache, v_cache = (torch.randn(48, kv_heads, D, generator=gen).to(device) for _ in range(2))
    _, groups = build_step(chunks(), BLOCK, {None, 5}, device)
    _, varlen = build_step(chunks(), BLOCK, {None, 5}, device, tile_rows=fused_varlen.tile_rows(group))
    q = torch.randn(varlen.positions.shape[0], kv_heads * group, D, generator=gen).to(device)
    for window in (None, 5):
        want = paged_attention(q, k_cache, v_cache, StepContext(ropes={}, slot_mapping=groups.slot_mapping,
                               groups=groups.groups, positions=groups.positions), window, 0.25, None)
        got = paged_attention(q, k_cache, v_cache, StepContext(ropes={}, slot_mapping=varlen.slot_mapping,
                              groups=[], positions=varlen.positions, fused=True, varlen=varlen.varlen),
                              window, 0.25, None)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
