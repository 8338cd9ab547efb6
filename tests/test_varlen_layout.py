"""The attention backends' step layouts: the kernel backend's VarlenLayout has the same token rows,
positions and cache slots as the torch backend's grouped layout, block tables in chunk order, and
tiles that cover every row of every chunk exactly once; decode-only steps are `Decodes` in both; and
the varlen kernel over its layout attends like the groups."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is first imported

from backend.attention import FusedAttention, LayerAttention, TorchAttention  # noqa: E402
from backend.attention.layout import AttentionGroup, Decodes, VarlenLayout  # noqa: E402
from backend.batch import HostToDevice, SeqChunk  # noqa: E402
from backend.config import RopeSpec  # noqa: E402

BLOCK = 4
CPU = HostToDevice("cpu")


def chunks():
    # A fresh prompt, a chunk continuing a cached prefix across block boundaries, two decodes.
    return [SeqChunk(list(range(10, 17)), 0, [7, 2], True),
            SeqChunk(list(range(20, 29)), 6, [3, 9, 4, 11], False),
            SeqChunk([5], 12, [1, 8, 6, 0], True),
            SeqChunk([6], 0, [5], True)]


def kernel_backend(tile_rows=4):
    backend = FusedAttention(queries_per_kv=16)
    backend.tile_rows = tile_rows
    return backend


def test_varlen_layout_has_the_group_layouts_rows_positions_and_slots():
    ids_g, groups = TorchAttention({None}).build_step(chunks(), BLOCK, CPU)
    ids_v, varlen = kernel_backend().build_step(chunks(), BLOCK, CPU)
    assert isinstance(varlen.attention, VarlenLayout)
    assert all(isinstance(g, AttentionGroup) for g in groups.attention)
    assert torch.equal(ids_v, ids_g)
    assert torch.equal(varlen.positions, groups.positions)
    assert torch.equal(varlen.slot_mapping, groups.slot_mapping)
    assert torch.equal(varlen.logit_rows, groups.logit_rows)
    assert varlen.positions.tolist() == list(range(7)) + list(range(6, 15)) + [12, 0]
    # slot = block_table[pos // 4] * 4 + pos % 4: the second chunk's positions 6, 7 in block 9, 8 in block 4.
    assert varlen.slot_mapping[7:10].tolist() == [38, 39, 16]


def test_block_tables_are_padded_to_the_longest_context_in_chunk_order():
    _, layout = kernel_backend().build_step(chunks(), BLOCK, CPU)
    # Longest context: the second chunk's 15 positions -> 4 blocks.
    assert layout.attention.block_tables.tolist() == [[7, 2, 0, 0], [3, 9, 4, 11], [1, 8, 6, 0], [5, 0, 0, 0]]
    assert layout.attention.block_size == BLOCK


def test_tiles_split_chunks_into_tile_rows_and_cover_every_row_once():
    _, layout = kernel_backend().build_step(chunks(), BLOCK, CPU)
    tiles = layout.attention.tiles.tolist()
    # (sequence row, first token row, rows, first position)
    assert tiles == [[0, 0, 4, 0], [0, 4, 3, 4], [1, 7, 4, 6], [1, 11, 4, 10], [1, 15, 1, 14], [2, 16, 1, 12],
                     [3, 17, 1, 0]]
    covered = [r for _, first, n, _ in tiles for r in range(first, first + n)]
    assert covered == list(range(18))
    for seq, first, n, pos in tiles:  # a tile's positions are its rows' positions
        assert layout.positions[first:first + n].tolist() == list(range(pos, pos + n))


@pytest.mark.parametrize("backend", [TorchAttention({None, 5}), kernel_backend()], ids=["torch", "kernels"])
def test_decode_only_steps_are_decodes_in_sequence_order(backend):
    decodes = [SeqChunk([5], 12, [1, 8, 6, 0], True), SeqChunk([6], 0, [5], True)]
    _, layout = backend.build_step(decodes, BLOCK, CPU)
    assert isinstance(layout.attention, Decodes)  # the decode graphs' layout
    assert layout.positions.tolist() == [12, 0] and layout.slot_mapping.tolist() == [0, 20]
    assert layout.attention.kv_slots[:, 0].tolist() == [4, 20]
    # Masks only for the torch backend (the kernel bounds rows by their positions).
    assert set(layout.attention.masks) == ({None, 5} if isinstance(backend, TorchAttention) else set())


def test_a_model_gets_the_kernel_backend_only_where_asked_and_triton_is_there(monkeypatch):
    from backend import attention
    from tests.tiny_models import hf_config
    from backend.config import GemmaConfig

    cfg = GemmaConfig.from_hf(hf_config("gemma3_text"))
    monkeypatch.setattr(attention, "kernels_available", lambda: True)
    assert isinstance(attention.attention_backend(cfg, kernels=True), FusedAttention)
    assert attention.attention_backend(cfg, kernels=True).tile_rows == 32  # 2 queries per KV head: 32 x 2 rows
    assert isinstance(attention.attention_backend(cfg, kernels=False), TorchAttention)
    monkeypatch.setattr(attention, "kernels_available", lambda: False)
    backend = attention.attention_backend(cfg, kernels=True)
    assert isinstance(backend, TorchAttention) and backend.tile_rows is None
    assert backend.windows == {None, 8}


def test_varlen_kernel_on_the_layout_attends_like_the_groups():
    """The varlen kernel (Triton's interpreter here) over the kernel backend's layout gives what
    the torch backend's groups of the same step give."""
    pytest.importorskip("triton")
    from backend.kernels.varlen import varlen_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    kv_heads, group, D = 1, 8, 16
    k_cache, v_cache = (torch.randn(48, kv_heads, D, generator=gen).to(device) for _ in range(2))
    up = HostToDevice(device, pinned=False)
    _, groups = TorchAttention({None, 5}).build_step(chunks(), BLOCK, up)
    _, varlen = FusedAttention(group).build_step(chunks(), BLOCK, up)
    q = torch.randn(varlen.positions.shape[0], kv_heads * group, D, generator=gen).to(device)
    for window in (None, 5):
        layer = LayerAttention(0, window, RopeSpec(theta=10000.0), 0.25, None, 1e-6)
        want = TorchAttention.attend(layer, q, k_cache, v_cache, groups)
        meta = varlen.attention
        got = varlen_attention(q, k_cache, v_cache, meta.block_tables, meta.tiles, meta.block_size, 0.25, None, window)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
