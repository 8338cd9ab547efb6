"""The batched prefill + decode attention kernel (backend/kernels/varlen.py) against the torch
backend (attention groups with masks, backend/attention/reference.py): compiled on a GPU, run by
Triton's interpreter on CPU tensors elsewhere (CI)."""
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is first defined

pytest.importorskip("triton")

from backend.attention import LayerAttention, TorchAttention  # noqa: E402
from backend.attention.layout import tile_table  # noqa: E402
from backend.attention.reference import varlen_attention_torch  # noqa: E402
from backend.batch import HostToDevice, SeqChunk  # noqa: E402
from backend.config import RopeSpec  # noqa: E402
from backend.kernels import varlen as fused_varlen  # noqa: E402
from backend.kernels.varlen import num_splits, tile_rows, varlen_attention  # noqa: E402
from backend.params import blocks_for  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

# (new tokens, first position): prefills from position 0 and after a cached prefix (prefix caching,
# chunked prefill), decodes (one token) early and late; contexts past 64 keys take several key blocks.
MIXED = [(17, 0), (1, 9), (40, 60), (3, 0), (1, 130), (3, 21), (1, 0), (1, 75)]
PAD_ROWS = 3  # query rows in no tile (a graph bucket's padding)


class Step:
    """A mixed step's inputs: chunks' queries at consecutive rows (then padding rows), sequences'
    blocks scattered over the cache, block tables padded with another sequence's block (so a
    read past a sequence's length would show), the tile table padded with all-zero rows."""

    def __init__(self, chunks, kv_heads, group, D, block_size, dtype=torch.float32, seed=0, pad_tiles=2,
                 pad_tables=(1, 2)):
        gen = torch.Generator().manual_seed(seed)
        self.chunks, self.block_size = chunks, block_size
        lens = [blocks_for(pos + n, block_size) for n, pos in chunks]
        perm = torch.randperm(sum(lens) + 3, generator=gen).tolist()
        self.tables = [perm[sum(lens[:i]):sum(lens[:i + 1])] for i in range(len(chunks))]
        num_slots = (sum(lens) + 3) * block_size
        self.k_cache, self.v_cache = torch.randn(2, num_slots, kv_heads, D, generator=gen).to(DEVICE, dtype)
        T = sum(n for n, _ in chunks)
        self.q = torch.randn(T + PAD_ROWS, kv_heads * group, D, generator=gen).to(DEVICE, dtype)
        self.q_starts = [sum(n for n, _ in chunks[:i]) for i in range(len(chunks))]
        self.block_tables = self.padded_tables(*pad_tables)
        self.tiles = self.tile_tensor(pad_tiles)

    def padded_tables(self, extra_rows: int, extra_cols: int, dtype=torch.int32) -> torch.Tensor:
        width = max(map(len, self.tables)) + extra_cols
        foreign = self.tables[0][0]
        rows = [t + [foreign] * (width - len(t)) for t in self.tables] + [[foreign] * width] * extra_rows
        return torch.tensor(rows, dtype=dtype, device=DEVICE)

    def tile_tensor(self, pad_tiles: int, order=None, tile_tokens=None) -> torch.Tensor:
        G = self.q.shape[1] // self.k_cache.shape[1]
        flat = tile_table(range(len(self.chunks)), self.q_starts, [n for n, _ in self.chunks],
                          [p for _, p in self.chunks], tile_tokens or tile_rows(G))
        tiles = torch.tensor(flat, dtype=torch.int32).view(-1, 4)
        if order is not None:
            tiles = tiles[order(tiles.shape[0])]
        return torch.cat([tiles, torch.zeros(pad_tiles, 4, dtype=torch.int32)]).to(DEVICE)

    def torch_path(self, scale, softcap, window) -> torch.Tensor:
        """The torch backend's attention over its layout of the step (each prefill chunk alone,
        decodes together); rows past the step's tokens are zero."""
        seq_chunks = [SeqChunk(token_ids=[0] * n, start=pos, block_table=table, needs_logits=False)
                      for (n, pos), table in zip(self.chunks, self.tables)]
        _, layout = TorchAttention({window}).build_step(seq_chunks, self.block_size, HostToDevice(DEVICE, pinned=False))
        layer = LayerAttention(0, window, RopeSpec(theta=10000.0), scale, softcap, 1e-6)
        return TorchAttention.attend(layer, self.q, self.k_cache, self.v_cache, layout)

    def kernel(self, scale, softcap, window, **kw) -> torch.Tensor:
        args = dict(block_tables=self.block_tables, tiles=self.tiles, block_size=self.block_size, scale=scale,
                    softcap=softcap, window=window)
        return varlen_attention(self.q, self.k_cache, self.v_cache, **{**args, **kw})


CASES = [  # kv_heads, queries per KV head, softcap, window
    (1, 8, None, None),  # multi-query (gemma-2b)
    (2, 4, 50.0, None),  # grouped-query with Gemma 2's softcap
    (2, 1, None, 5),  # multi-head with a sliding window
    (1, 5, None, 12),  # Gemma 3 style: 5 queries per KV head (not a power of two), window
]


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("kv_heads,group,softcap,window", CASES)
def test_matches_torch_path(kv_heads, group, softcap, window, block_size):
    step = Step(MIXED, kv_heads, group, 16, block_size)
    assert num_splits(step.tiles.shape[0], kv_heads, step.q.device) > 1  # off the GPU too: the split path
    want = step.torch_path(0.3, softcap, window)
    # The kernel's tanh comes from exp (1 - 2 / (exp(2x) + 1)): near 0 it is off by ~6e-8 absolute,
    # which the softcap scales to ~3e-6 in the scores; without softcap, 2e-6.
    tolerance = dict(atol=1e-5 if softcap else 2e-6, rtol=1e-5)
    torch.testing.assert_close(step.kernel(0.3, softcap, window), want, **tolerance)
    torch.testing.assert_close(varlen_attention_torch(step.q, step.k_cache, step.v_cache, step.block_tables,
                                                      step.tiles, step.block_size, 0.3, softcap, window),
                               want, atol=2e-6, rtol=1e-5)
    assert not step.kernel(0.3, softcap, window)[-PAD_ROWS:].any()  # padding rows: zero


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("kv_heads,group,softcap,window", CASES[1:3])
def test_small_key_blocks(monkeypatch, kv_heads, group, softcap, window, splits):
    """16-key blocks: many blocks per tile, rows with no visible key in a block (early rows of a
    tile against its last block; a window's first blocks for late rows) must stay finite; split
    over keys, some rows see no key in a whole split."""
    monkeypatch.setattr(fused_varlen, "KEY_BLOCK_BYTES", 16 * 16 * 4)
    step = Step(MIXED, kv_heads, group, 16, 4, seed=1)
    torch.testing.assert_close(step.kernel(0.3, softcap, window, splits=splits),
                               step.torch_path(0.3, softcap, window), atol=1e-5 if softcap else 2e-6, rtol=1e-5)


# A decode with a long context (10 blocks of 16 keys), short ones (fewer blocks than splits: empty
# splits), prefill tiles whose window starts past their first key block.
LONG_AND_SHORT = [(1, 159), (1, 2), (9, 0), (20, 30), (1, 40)]


@pytest.mark.parametrize("splits,window", [(2, None), (4, 7), (7, None), (16, 20)])
def test_splits_match_torch_path(monkeypatch, splits, window):
    monkeypatch.setattr(fused_varlen, "KEY_BLOCK_BYTES", 16 * 16 * 4)
    step = Step(LONG_AND_SHORT, 1, 4, 16, 4, seed=6)
    got = step.kernel(0.3, None, window, splits=splits)
    torch.testing.assert_close(got, step.torch_path(0.3, None, window), atol=2e-6, rtol=1e-5)
    assert not got[-PAD_ROWS:].any()  # padding rows: zero, padding tiles merge nothing


def test_split_count_from_tiles_and_sms(monkeypatch):
    """2 programs an SM (an H200's 132 SMs), at most 16 splits; enough tiles: one."""
    monkeypatch.setattr(fused_varlen, "INTERPRETER_SMS", 132)
    cpu = torch.device("cpu")
    assert [num_splits(n, 1, cpu) for n in (1, 33, 64, 72, 264, 527, 528, 4096)] == [16, 8, 5, 4, 1, 1, 1, 1]
    assert num_splits(36, 2, cpu) == num_splits(72, 1, cpu)  # programs count KV heads


# Triton 3.6's interpreter multiplies bf16 operands of tl.dot as their raw 16-bit patterns (it stores
# bf16 as uint16 and hands them to numpy.matmul), so bf16 is checked compiled only.
@pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE != "cuda", reason="interpreter: bf16 tl.dot")),
    torch.float16])
def test_half_precision_matches_torch_path(dtype):
    """bf16/fp16 inputs: both paths round the probabilities to the input dtype before the value
    product and the output once; they differ by the online softmax's rescaling order."""
    step = Step(MIXED, 2, 4, 32, 16, dtype=dtype, seed=2)
    got, want = step.kernel(0.2, 50.0, 12), step.torch_path(0.2, 50.0, 12)
    assert got.dtype == dtype
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-2  # about 2.5 / 10 ulps at 1.0
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("splits", [1, 5])
def test_padding_changes_no_bit(splits):
    """A graph bucket pads the tile table (all-zero rows), the block tables (rows and columns) and
    the query rows; the tiles may come in any order. Real rows must come out bitwise equal for a
    given split count (the default count follows the table's length)."""
    step = Step(MIXED, 1, 8, 16, 4, seed=3, pad_tiles=0, pad_tables=(0, 0))
    narrow = step.kernel(0.3, None, 12, splits=splits)
    wide_tables = step.padded_tables(5, 9, dtype=torch.int64)
    shuffled = step.tile_tensor(7, order=lambda n: torch.randperm(n, generator=torch.Generator().manual_seed(0)))
    out = torch.zeros_like(step.q)
    wide = step.kernel(0.3, None, 12, block_tables=wide_tables, tiles=shuffled, out=out, splits=splits)
    assert wide.data_ptr() == out.data_ptr()
    assert torch.equal(wide, narrow)  # padding rows included: zero in both


def test_a_second_call_adds_its_tiles_rows():
    """Decode tiles of one token and prefill tiles in two calls into one output (attention_bench's
    "varlen1" path): each call writes only its tiles' rows."""
    step = Step(MIXED, 1, 8, 16, 4, seed=8, pad_tiles=0)
    decodes = [i for i, (n, _) in enumerate(MIXED) if n == 1]
    flat = step.tile_tensor(0, tile_tokens=1)
    tiles = [t for t in flat.tolist() if t[0] in decodes]
    out = step.kernel(0.3, None, None, tiles=torch.tensor(tiles, dtype=torch.int32, device=DEVICE), tile_tokens=1)
    prefill = [t for t in step.tile_tensor(0).tolist() if t[0] not in decodes]
    step.kernel(0.3, None, None, tiles=torch.tensor(prefill, dtype=torch.int32, device=DEVICE), out=out)
    torch.testing.assert_close(out, step.torch_path(0.3, None, None), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("chunks", [MIXED[1::2], MIXED])
def test_one_token_tiles_match_torch_path(chunks):
    """tile_tokens=1: a kernel of G rows (padded to 16) takes one token a tile, the tables of
    decodes it is measured on (benchmarks/attention_bench.py), and prefill chunks token by token."""
    step = Step(chunks, 1, 8, 16, 4, seed=7)
    step.tiles = step.tile_tensor(2, tile_tokens=1)
    got = step.kernel(0.3, None, 12, tile_tokens=1)
    torch.testing.assert_close(got, step.torch_path(0.3, None, 12), atol=2e-6, rtol=1e-5)
    assert not got[-PAD_ROWS:].any()


def test_tile_table_splits_chunks():
    # A 17-token prefill at 0, a decode at position 9, an 8-token chunk after a 100-token prefix.
    assert tile_table([0, 1, 2], [0, 17, 18], [17, 1, 8], [0, 9, 100], 8) == [
        0, 0, 8, 0, 0, 8, 8, 8, 0, 16, 1, 16,
        1, 17, 1, 9,
        2, 18, 8, 100]
    assert tile_table([4], [2], [3], [7], 1) == [4, 2, 1, 7, 4, 3, 1, 8, 4, 4, 1, 9]
    assert tile_table([0, 1], [0, 0], [0, 2], [5, 5], 8) == [1, 0, 2, 5]  # no tokens, no tile
    assert tile_table([], [], [], [], 8) == []


def test_tile_rows_fill_64_rows():
    assert [tile_rows(g) for g in (1, 2, 4, 5, 8, 16, 64, 100)] == [64, 32, 16, 8, 8, 4, 1, 1]


def test_no_tiles_gives_zeros():
    step = Step([(3, 0)], 1, 2, 16, 4, pad_tiles=0)
    assert not varlen_attention(step.q, step.k_cache, step.v_cache, step.block_tables, step.tiles[:0], 4, 0.3,
                                None, None).any()


@pytest.mark.parametrize("chunks", [[(5, 0), (1, 7), (1, 20)], [(1, 3), (1, 30)]])
def test_benchmark_paths_agree(chunks):
    """benchmarks/attention_bench.py's varlen case times the same attention three ways."""
    from benchmarks.attention_bench import varlen_paths

    outputs = {name: fn()[0] for name, fn in varlen_paths(chunks, layers=1, device=DEVICE).items()}
    tolerance = dict(atol=2e-2, rtol=2e-2) if DEVICE == "cuda" else dict(atol=2e-6, rtol=1e-5)  # bf16 on GPUs
    torch.testing.assert_close(outputs["varlen"], outputs["torch"], **tolerance)
    torch.testing.assert_close(outputs["varlen"], outputs["current"], **tolerance)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("softcap,window", [(None, None), (50.0, 512)])
def test_gemma_2b_step_matches_torch_path(softcap, window):
    """gemma-2b attention (8 query heads, 1 KV head, head dim 256, bf16): 8 prompts of 1024 tokens
    and 56 decodes with 100-1000 cached tokens in one step."""
    contexts = torch.randint(100, 1000, (56,), generator=torch.Generator().manual_seed(4)).tolist()
    chunks = [(1024, 0)] * 8 + [(1, c) for c in contexts]
    step = Step(chunks, 1, 8, 256, 16, dtype=torch.bfloat16, seed=5)
    got, want = step.kernel(256 ** -0.5, softcap, window), step.torch_path(256 ** -0.5, softcap, window)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
