"""GPU micro-benchmark: one step's attention work for every layer, torch path vs fused kernels.

    python3 -m benchmarks.attention_bench [--cases decode,varlen] [--batches 1,8,64] [--ctx 128] [--layers 18]
        [--programs-per-sm 2,4,8]

gemma-2b attention shapes (8 query heads, 1 KV head, head dim 256, bf16). Each path is captured in a
CUDA graph for all layers and replayed, so the times are GPU time without launch gaps, as in the
engine's graph decode. Needs CUDA and Triton; not TransformerEngine. One JSON line per case.

- decode (one line per batch size): the torch path (backend/te/attention.py: RoPE, K/V write,
  gather, matmuls, softmax) vs the fused path (backend/te/fused_decode.py: rope_and_store +
  decode_attention).
- varlen: attention alone (queries already rotated, cache filled) of (a) 8 prompts of 1024 tokens,
  (b) 64 decodes with contexts 128..1024, (c) one 64-token prompt beside 63 such decodes, by
  fused_varlen.varlen_attention (one call per layer) vs the torch path (paged_attention over
  build_step's groups: one SDPA/matmul chain per prefill chunk, one for the decodes) and the current
  fused path (the same with decode groups on decode_attention; decode-only steps as the graphs run
  them). Effective TFLOP/s counts 4 * heads * head_dim per visible (query, key) pair. `splits` is
  the kernel's split over keys for the case's tile count; --programs-per-sm sweeps the rule's target
  (fused_varlen.PROGRAMS_PER_SM), one line per value and case.
"""
from __future__ import annotations

import argparse
import json

import torch

from backend.batch import SeqChunk, build_step, decode_masks, tile_table
from backend.config import RopeSpec
from backend.kv_cache import blocks_for
from backend.model import AttentionGroup, apply_rope, rope_cos_sin, write_kv
from backend.te import fused_varlen
from backend.te.attention import StepContext, paged_attention
from backend.te.fused_decode import rope_and_store
from backend.te.fused_varlen import num_splits, tile_rows, varlen_attention

HEADS, KV_HEADS, HEAD_DIM = 8, 1, 256


def graph_ms(fn, reps: int = 50) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def case(batch: int, ctx: int, layers: int) -> dict:
    dev, dtype = "cuda", torch.bfloat16
    group = HEADS // KV_HEADS
    qkv = torch.randn(batch, KV_HEADS, group + 2, HEAD_DIM, device=dev, dtype=dtype)
    q, k, v = qkv[:, :, :group], qkv[:, :, group], qkv[:, :, group + 1]
    slots_per_seq = ctx + 1
    caches = torch.randn(layers, 2, batch * slots_per_seq, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
    kv_slots = (torch.arange(batch, device=dev)[:, None] * slots_per_seq + torch.arange(ctx, device=dev))
    positions = torch.full((batch,), ctx - 1, device=dev)
    slot_mapping = kv_slots[:, -1].contiguous()
    cos, sin = rope_cos_sin(RopeSpec(theta=10000.0), HEAD_DIM, positions, dtype)
    masks = decode_masks(positions, ctx, [None])
    scale = HEAD_DIM ** -0.5

    def torch_path():
        ctx_ = StepContext(ropes={}, slot_mapping=slot_mapping, positions=positions,
                           groups=[AttentionGroup(q_index=None, kv_slots=kv_slots, masks=masks)])
        for layer in range(layers):
            qr, kr = apply_rope(q.reshape(batch, HEADS, HEAD_DIM), cos, sin), apply_rope(k, cos, sin)
            write_kv(caches[layer, 0], caches[layer, 1], slot_mapping, kr, v)
            paged_attention(qr, caches[layer, 0], caches[layer, 1], ctx_, None, scale, None)

    def fused_path():
        ctx_ = StepContext(ropes={}, slot_mapping=slot_mapping, positions=positions, fused=True,
                           groups=[AttentionGroup(q_index=None, kv_slots=kv_slots, masks={})])
        for layer in range(layers):
            qr = rope_and_store(q, k, v, cos, sin, caches[layer, 0], caches[layer, 1], slot_mapping)
            paged_attention(qr, caches[layer, 0], caches[layer, 1], ctx_, None, scale, None)

    t_torch, t_fused = graph_ms(torch_path), graph_ms(fused_path)
    return dict(batch=batch, ctx=ctx, layers=layers, torch_ms=round(t_torch, 4), fused_ms=round(t_fused, 4),
                speedup=round(t_torch / t_fused, 2), gpu=torch.cuda.get_device_name())


def varlen_paths(chunks: list[tuple[int, int]], layers: int, device: str = "cuda", block_size: int = 16) -> dict:
    """name -> a function running one step's attention for every layer (returning each layer's
    output), for the step whose chunks are (new tokens, first position): "varlen", "torch" and
    "current" (see the module doc). On the CPU (fp32, Triton's interpreter) the tests check that the
    paths agree."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [blocks_for(pos + n, block_size) for n, pos in chunks]
    tables = [list(range(sum(lens[:i]), sum(lens[:i + 1]))) for i in range(len(chunks))]
    num_slots = sum(lens) * block_size
    caches = torch.randn(layers, 2, num_slots, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    T = sum(n for n, _ in chunks)
    q = torch.randn(T, HEADS, HEAD_DIM, device=device, dtype=dtype)
    scale = HEAD_DIM ** -0.5
    _, layout = build_step([SeqChunk([0] * n, pos, table, False) for (n, pos), table in zip(chunks, tables)],
                           block_size, {None}, device)
    groups = layout.groups
    if all(n == 1 for n, _ in chunks):  # decode-only: one group, row b is sequence b (graphs.py's layout)
        groups = [AttentionGroup(q_index=None, kv_slots=groups[0].kv_slots, masks=groups[0].masks)]
    block_tables = torch.tensor([t + [0] * (max(lens) - len(t)) for t in tables], dtype=torch.int32, device=device)
    q_starts = [sum(n for n, _ in chunks[:i]) for i in range(len(chunks))]
    tiles = torch.tensor(tile_table(range(len(chunks)), q_starts, [n for n, _ in chunks], [p for _, p in chunks],
                                    tile_rows(HEADS // KV_HEADS)), dtype=torch.int32, device=device).view(-1, 4)

    def torch_paths(fused: bool):
        ctx = StepContext(ropes={}, slot_mapping=layout.slot_mapping, groups=groups, positions=layout.positions,
                          fused=fused)
        return lambda: [paged_attention(q, caches[layer, 0], caches[layer, 1], ctx, None, scale, None)
                        for layer in range(layers)]

    def varlen():
        return [varlen_attention(q, caches[layer, 0], caches[layer, 1], block_tables, tiles, block_size, scale, None,
                                 None) for layer in range(layers)]

    return dict(varlen=varlen, torch=torch_paths(False), current=torch_paths(True))


def varlen_case(name: str, chunks: list[tuple[int, int]], layers: int) -> dict:
    pairs = sum(n * pos + n * (n + 1) // 2 for n, pos in chunks)  # visible (query, key) pairs, causal
    flops = 4 * HEADS * HEAD_DIM * pairs * layers
    times = {path: graph_ms(fn) for path, fn in varlen_paths(chunks, layers).items()}
    block_m = tile_rows(HEADS // KV_HEADS)
    tiles = sum(-(-n // block_m) for n, _ in chunks)
    return dict(case=name, tokens=sum(n for n, _ in chunks), sequences=len(chunks), layers=layers, tiles=tiles,
                programs_per_sm=fused_varlen.PROGRAMS_PER_SM, splits=num_splits(tiles, KV_HEADS, torch.device("cuda")),
                **{f"{path}_ms": round(ms, 4) for path, ms in times.items()},
                **{f"{path}_tflops": round(flops / ms / 1e9, 1) for path, ms in times.items()},
                speedup_vs_current=round(times["current"] / times["varlen"], 2), gpu=torch.cuda.get_device_name())


def varlen_cases() -> list[tuple[str, list[tuple[int, int]]]]:
    """(name, chunks): a decode with context c is one new token at position c - 1."""
    decodes = [(1, 128 + (1024 - 128) * i // 63 - 1) for i in range(64)]
    return [("prefill_8x1024", [(1024, 0)] * 8),
            ("decode_64_ctx128-1024", decodes),
            ("mixed_64prefill_63decodes", [(64, 0)] + decodes[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="decode,varlen", help="decode, varlen or both")
    p.add_argument("--batches", default="1,8,64", help="decode case batch sizes")
    p.add_argument("--ctx", type=int, default=128, help="decode case context")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--programs-per-sm", default=str(fused_varlen.PROGRAMS_PER_SM),
                   help="varlen: the split rule's programs per SM, comma-separated to sweep")
    args = p.parse_args()
    cases = args.cases.split(",")
    if "decode" in cases:
        for b in (int(x) for x in args.batches.split(",")):
            print(json.dumps(case(b, args.ctx, args.layers)), flush=True)
    if "varlen" in cases:
        for per_sm in (int(x) for x in args.programs_per_sm.split(",")):
            fused_varlen.PROGRAMS_PER_SM = per_sm
            for name, chunks in varlen_cases():
                print(json.dumps(varlen_case(name, chunks, args.layers)), flush=True)


if __name__ == "__main__":
    main()
