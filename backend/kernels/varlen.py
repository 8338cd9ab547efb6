"""Attention for every row of a mixed engine step in one kernel call: prefill chunks of any length
and decodes, over the paged KV cache addressed through per-sequence block tables.

The step's work is described by a table of tiles, 4 ints each: (sequence row of the block tables,
first query row of the step's flattened tokens, number of rows, position of the first row). The host
splits each chunk into tiles of `tile_rows(G)` tokens (`backend.attention.layout.tile_table`); a decode is a
one-row tile.
One program per (tile, KV head) takes the tile's tokens times the KV head's G query heads as the
rows of its matrix products (a multi-query model reads each key block once per tile), walks the
sequence's key blocks from the tile's lowest visible key to its last position, finds each key's
cache slot through the block table, and keeps an online softmax in fp32 (causal and sliding-window
masks per row, optional tanh softcap as in Gemma 2).

Split over keys: a step of decodes has one tile per sequence, too few programs for the GPU, each
walking its whole context. Each tile's key range is then cut into `splits` contiguous slices (whole
key blocks, from the tile's own bounds), one program each, and a second kernel merges the slices'
partial softmaxes (fp32) per row (online_softmax.py, shared with decode.py). The count comes from the tile table's
length and the SM count alone, never from tensor values, so a graph bucket has one fixed count.

Every input has a fixed shape chosen by the caller (tiles padded with all-zero rows, which do
nothing; block tables padded with rows and columns that are never read) and the kernel reads its
loop bounds from the tile table on the device: a whole mixed step can be captured in a CUDA graph
keyed by its token count. A row's result depends only on its own tile and the split count, so for
a given count padding changes no bit (padding tiles add to the table's length, which picks the count:
an eager step and a graph bucket's replay of it may round differently).

`backend.attention.reference.varlen_attention_torch` is the same contract in plain torch (tests).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import pow2, split_buffers

# Rows (tokens x query heads) per tile: 64, the M of one Hopper warpgroup MMA. A decode tile uses G
# of them whatever the size, so more rows waste more work on decodes; fewer rows reuse each key block
# for fewer queries in long prefills. Built for sm_90 (gemma-2b, bf16, 8 warps) the kernel takes 141
# registers a thread at 64 rows and 222 at 128, no spills (with 4 warps, 128 rows spill).
TILE_ROWS = 64
KEY_BLOCK_BYTES = 16 * 1024  # one key block of the cache per loop iteration (and as much of values)
# Splits over keys: enough (tile, KV head, split) programs for PROGRAMS_PER_SM of them per SM. One
# 8-warp program fills an SM's registers (gemma-2b: 146 a thread, two would need 75k of 64k). A slice
# costs its rows' partial results, written and read back once (a decode: G x D fp32, 8 KB for
# gemma-2b), and the merge a second kernel, so more splits are not free. Measured on the H200
# (benchmarks.attention_bench --cases varlen --programs-per-sm 1,2,4,8; gemma-2b, 18 layers):
# one 64-token prompt beside 63 decodes 0.86 / 0.84 / 1.01 / 1.39 ms (unsplit 1.31), 64 decodes
# 0.68 / 0.74 / 0.83 / 1.02 ms (unsplit 1.30), 8 x 1024-token prefill 5.4 ms at 1-4 (one split) and
# 6.8 at 8. 2 per SM is best for the mixed step, the case this kernel is for (decode-only steps
# keep decode.py). MAX_SPLITS bounds the merge's loop when a step has only a few tiles.
# Prefill-heavy steps have enough tiles and keep one split: no partial buffers, the output written
# directly. The partial buffers hold fewer than 2 x PROGRAMS_PER_SM x SMs tiles' rows.
PROGRAMS_PER_SM = 2
MAX_SPLITS = 16
# Off the GPU (Triton's interpreter, tests) programs run one at a time: a few "SMs" keep small steps
# split, so the tests take the split path by default, without hundreds of programs.
INTERPRETER_SMS = 16


def tile_rows(queries_per_kv: int) -> int:
    """Query tokens per tile (the kernel's BLOCK_M): the largest power of two with tokens x G <= 64,
    at least 1 (G = 8: 8 tokens; G = 5: 8 tokens, 40 of 64 rows used; G = 1: 64)."""
    return 1 << (max(1, TILE_ROWS // queries_per_kv).bit_length() - 1)


def num_splits(num_tiles: int, kv_heads: int, device: torch.device) -> int:
    """Splits over keys for a tile table of `num_tiles` rows (padding included): static per graph bucket."""
    sms = _cuda_sms(device) if device.type == "cuda" else INTERPRETER_SMS
    return max(1, min(MAX_SPLITS, -(-PROGRAMS_PER_SM * sms // max(1, num_tiles * kv_heads))))


@functools.lru_cache(maxsize=None)
def _cuda_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=1)
def _kernel():
    """Deferred like decode.py's: importing this module must not require Triton."""
    import triton
    import triton.language as tl

    # A module global: Triton (and its interpreter, which re-executes the kernel's source) looks up
    # the functions a kernel calls among its module's globals, not in the enclosing scope.
    global online_softmax_block
    from .online_softmax import merge_kernel, online_softmax_block

    @triton.jit
    def varlen_kernel(q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, tiles_ptr, out_ptr, part_ptr, ml_ptr,
                      scale, softcap, window,
                      sq_t, sq_h, skc_s, skc_h, svc_s, svc_h, sbt_s, so_t, so_h,
                      G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      NUM_SPLITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      PRECISION: tl.constexpr):
        # Last tile first: a chunk's last tiles see the most keys, and padding tiles sit at the end,
        # so the long programs start early and the empty ones fill the gaps.
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
        kv = tl.program_id(1)
        split = tl.program_id(2)
        seq = tl.load(tiles_ptr + tile * 4)
        first_row = tl.load(tiles_ptr + tile * 4 + 1)
        num_rows = tl.load(tiles_ptr + tile * 4 + 2)
        first_pos = tl.load(tiles_ptr + tile * 4 + 3)
        i = tl.arange(0, ROWS)  # row i: the tile's token i // G, query head i % G of this KV head
        token = i // G
        heads = kv * G + i % G
        rows_ok = (i < BLOCK_M * G) & (token < num_rows)
        q_pos = first_pos + token
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        q = tl.load(q_ptr + (first_row + token)[:, None] * sq_t + heads[:, None] * sq_h + d[None, :],
                    mask=rows_ok[:, None] & dm[None, :], other=0.0)
        hi = tl.where(num_rows > 0, first_pos + num_rows, 0)  # causal: the last row sees keys 0..hi-1
        lo = hi * 0
        if HAS_WINDOW:  # key j is in row p's window iff p - window < j; the first row sees the lowest
            lo = tl.maximum(first_pos - window + 1, 0)
        # This split's slice of the tile's key blocks: the first `per_split` blocks from the one
        # holding lo go to split 0, and so on; late splits of a short range get none.
        first = lo - lo % BLOCK_N
        per_split = ((hi - first + BLOCK_N - 1) // BLOCK_N + NUM_SPLITS - 1) // NUM_SPLITS
        split_lo = first + split * per_split * BLOCK_N
        split_hi = tl.minimum(split_lo + per_split * BLOCK_N, hi)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        denom = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
        for start in range(split_lo, split_hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)  # key positions
            live = (cols >= lo) & (cols < hi)  # never reads the block table past the sequence
            blocks = tl.load(tables_ptr + seq * sbt_s + cols // BLOCK_SIZE, mask=live, other=0)
            slots = blocks.to(tl.int64) * BLOCK_SIZE + cols % BLOCK_SIZE
            k = tl.load(k_cache_ptr + slots[:, None] * skc_s + kv * skc_h + d[None, :],
                        mask=live[:, None] & dm[None, :], other=0.0)
            visible = live[None, :] & (cols[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (cols[None, :] > q_pos[:, None] - window)
            m, denom, acc = online_softmax_block(
                q, k, v_cache_ptr + slots[:, None] * svc_s + kv * svc_h + d[None, :], live[:, None] & dm[None, :],
                visible, m, denom, acc, scale, softcap, HAS_SOFTCAP, PRECISION)
        if NUM_SPLITS == 1:
            out = acc / tl.where(denom > 0, denom, 1.0)[:, None]  # a real row always sees its own key
            tl.store(out_ptr + (first_row + token)[:, None] * so_t + heads[:, None] * so_h + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None] & dm[None, :])
        else:  # partial results [tiles, KV, NUM_SPLITS, ROWS, D] and (max, denominator) [..., ROWS, 2]
            row = ((tile * tl.num_programs(1) + kv) * NUM_SPLITS + split) * ROWS + i
            tl.store(part_ptr + row[:, None] * D + d[None, :], acc, mask=rows_ok[:, None] & dm[None, :])
            tl.store(ml_ptr + row * 2, m, mask=rows_ok)
            tl.store(ml_ptr + row * 2 + 1, denom, mask=rows_ok)

    return varlen_kernel, merge_kernel


def varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     tiles: torch.Tensor, block_size: int, scale: float, softcap: Optional[float],
                     window: Optional[int], out: Optional[torch.Tensor] = None,
                     splits: Optional[int] = None, tile_tokens: Optional[int] = None) -> torch.Tensor:
    """q [T, H, D] (RoPE applied; padding rows allowed), k_cache/v_cache [slots, KV, D] with slot =
    block * block_size + offset, block_tables [S, W] int32/int64, tiles [N, 4] int32 from
    layout.tile_table(..., tile_tokens) (all-zero rows do nothing) -> out [T, H, D]. Row r of tile
    (b, r0, n, p0) is the query at position p0 + r - r0 of sequence b and attends to its keys at
    positions max(0, p - window + 1)..p. Rows in no tile come out zero, or, given `out`, keep its
    values there (a second call with other tiles adds its rows). `splits` over keys: default
    num_splits(N, KV, device). `tile_tokens`: the tiles' most tokens, default tile_rows(H // KV); 1
    makes a kernel of G rows (padded to 16) for tables of decodes. No host sync, no shape from tensor
    values: CUDA-graph capturable."""
    T, H, D = q.shape
    kv_heads = k_cache.shape[1]
    G = H // kv_heads
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and block_tables.stride(1) == 1
    assert tiles.dtype == torch.int32 and tiles.shape[1] == 4 and tiles.is_contiguous()
    out = torch.zeros_like(q) if out is None else out
    if tiles.shape[0] == 0 or T == 0:
        return out
    block_m = tile_tokens or tile_rows(G)
    rows = pow2(block_m * G, 16)  # tl.dot needs at least 16 rows
    block_d = pow2(D, 16)
    block_n = max(16, min(64, KEY_BLOCK_BYTES // (block_d * k_cache.element_size())))
    num_tiles = tiles.shape[0]
    splits = splits or num_splits(num_tiles, kv_heads, q.device)
    # With one split the kernel writes the output directly: no partial buffers.
    part, ml = split_buffers(num_tiles, kv_heads, splits, rows, D, q.device) if splits > 1 else (out, out)
    # A [64, 256] fp32 accumulator over 8 warps is 64 registers a thread (sm_90, gemma-2b: 141 in
    # all before the split, 146 with it, the merge 108; with 4 warps, 245). fp32 inputs with D = 256
    # (no tensor cores) take 182 unsplit but spill storing split partials (255 and ~900 bytes).
    num_warps = 8 if rows * block_d >= 64 * 256 else 4
    varlen, merge = _kernel()
    varlen[(num_tiles, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, tiles, out, part, ml,
        scale, softcap or 1.0, window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=G, D=D, BLOCK_M=block_m, ROWS=rows, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        NUM_SPLITS=splits, HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 models: no TF32 rounding
        num_warps=num_warps)
    if splits > 1:
        merge[(num_tiles, kv_heads)](part, ml, tiles, out, out.stride(0), out.stride(1), G=G, D=D, BLOCK_M=block_m,
                                     ROWS=rows, BLOCK_D=block_d, NUM_SPLITS=splits, TILED=True, num_warps=num_warps)
    return out
