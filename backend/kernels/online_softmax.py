"""What the decode and varlen attention kernels share: one key block's online-softmax update, and
the kernel that merges the partial softmaxes of a split over keys.

A program holds ROWS query rows (tokens x the query heads of one KV head) and walks key blocks,
keeping per row the running maximum `m`, the denominator and the fp32 output accumulator. Split
over keys, each program stores its rows' (acc, m, denominator) at

    row = ((tile * KV + kv) * NUM_SPLITS + split) * ROWS + i

(a decode kernel's "tile" is its sequence), and `merge_kernel` rescales the slices to the largest
maximum and adds them up. A slice that saw no visible key of a row has denominator 0 and weighs
exactly 0; rows outside their tile are not read or written.

This module imports Triton: decode.py and varlen.py import it when they define their kernels.
"""
import triton
import triton.language as tl


@triton.jit
def online_softmax_block(q, k, v_ptrs, v_mask, visible, m, denom, acc, scale, softcap,
                         HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Rows q [ROWS, D] against one block of keys k [BLOCK_N, D], `visible` [ROWS or 1, BLOCK_N];
    the block's values are loaded here, after the scores, as a kernel would order it."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale  # [ROWS, BLOCK_N]
    if HAS_SOFTCAP:  # softcap * tanh(s / softcap), tanh from exp (no libdevice in the interpreter)
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    # A row with no visible key yet (early rows against late blocks, or a window's early blocks)
    # keeps m = -inf: subtract 0 instead, so its weights are exp(-inf) = 0, not NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_sub)
    p = tl.exp(s - m_sub[:, None])
    denom = denom * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
    return m_new, denom, acc

@triton.jit
def merge_kernel(part_ptr, ml_ptr, tiles_ptr, out_ptr, so_t, so_h,
                 G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, TILED: tl.constexpr):
    """Grid (tiles, KV heads). TILED: tile i's rows are (first row, rows) of the tile table
    (4 ints a tile); otherwise tile i is step row i, one token (a decode kernel's sequence)."""
    tile = tl.program_id(0)
    kv = tl.program_id(1)
    if TILED:
        first_row = tl.load(tiles_ptr + tile * 4 + 1)
        num_rows = tl.load(tiles_ptr + tile * 4 + 2)
    else:
        first_row = tile
        num_rows = 1
    i = tl.arange(0, ROWS)
    token = i // G
    heads = kv * G + i % G
    rows_ok = (i < BLOCK_M * G) & (token < num_rows)  # padding tiles: none
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    first = (tile * tl.num_programs(1) + kv) * NUM_SPLITS * ROWS + i  # split 0's rows
    m_all = tl.full([ROWS], float("-inf"), tl.float32)
    for split in range(NUM_SPLITS):
        m_all = tl.maximum(m_all, tl.load(ml_ptr + (first + split * ROWS) * 2, mask=rows_ok,
                                          other=float("-inf")))
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # rows not in the tile: no NaN
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    denom = tl.zeros([ROWS], tl.float32)
    for split in range(NUM_SPLITS):
        row = first + split * ROWS
        m = tl.load(ml_ptr + row * 2, mask=rows_ok, other=float("-inf"))
        part_denom = tl.load(ml_ptr + row * 2 + 1, mask=rows_ok, other=0.0)
        w = tl.where(part_denom > 0, tl.exp(m - m_all), 0.0)  # slices with no visible key weigh exactly 0
        acc += w[:, None] * tl.load(part_ptr + row[:, None] * D + d[None, :], mask=rows_ok[:, None] & dm[None, :],
                                    other=0.0)
        denom += w * part_denom
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(out_ptr + (first_row + token)[:, None] * so_t + heads[:, None] * so_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None] & dm[None, :])
