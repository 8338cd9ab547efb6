"""GPU micro-benchmark: one step's attention work for every layer, by each attention path.

    python3 -m benchmarks.attention_bench [--cases decode,varlen] [--batches 1,8,64] [--ctx 128] [--layers 18]
        [--programs-per-sm 2,4,8]

gemma-2b attention shapes (8 query heads, 1 KV head, head dim 256, bf16). Each path is captured in a
CUDA graph for all layers and replayed, so the times are GPU time without launch gaps, as in the
engine's graph decode. Needs CUDA and Triton; not TransformerEngine. One JSON line per case.

- decode (one line per batch size, every sequence at context --ctx): RoPE, the K/V write and
  attention of a decode-only step through each backend's `forward` (backend/attention/): the torch
  backend, and the kernel backend (`rope_and_store` + `decode_attention`); then `rope_and_store` +
  `varlen_attention` over the same step as a tile table, with the mixed steps' tiles (`varlen`:
  tile_rows(G) tokens, 64 rows) and one-token tiles (`varlen1`: G rows padded to 16), the latter
  also with decode_attention's split count (`varlen1_fixed`: one split per 256 keys).
- varlen: attention alone (queries already rotated, cache filled) of (a) 8 prompts of 1024 tokens,
  (b) 64 decodes with contexts 128..1024, (c) one 64-token prompt beside 63 such decodes: `varlen`
  (one call, tile_rows(G)-token tiles), `varlen1` (decodes in one-token tiles by a second call), `torch`
  (the torch backend's groups) and `current` (the kernel backend as the engine runs it: decode-only
  steps by decode_attention, others by `varlen`). Effective TFLOP/s counts 4 * heads * head_dim per
  visible (query, key) pair. `splits` is the `varlen` call's split over keys; --programs-per-sm sweeps
  the rule's target (kernels.varlen.PROGRAMS_PER_SM), one line per value and case.
"""
from __future__ import annotations

import argparse
import json

import torch

from backend.attention import FusedAttention, LayerAttention, StepContext, TorchAttention
from backend.attention.layout import Decodes, StepLayout, tile_table
from backend.batch import HostToDevice, SeqChunk
from backend.config import RopeSpec
from backend.kernels import varlen as kernels_varlen
from backend.kernels.decode import SPLIT_KEYS, decode_attention
from backend.kernels.rope_store import rope_and_store
from backend.kernels.varlen import num_splits, tile_rows, varlen_attention
from backend.params import blocks_for
from backend.rope import rope_cos_sin

HEADS, KV_HEADS, HEAD_DIM = 8, 1, 256
GROUP = HEADS // KV_HEADS
ROPE = RopeSpec(theta=10000.0)


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


class LayerCaches:
    """A KV cache per layer ([layers, 2, slots, KV, D]), read by the backends as kv_cache.layer(i)."""

    def __init__(self, caches: torch.Tensor):
        self.caches = caches

    def layer(self, index: int):
        return self.caches[index, 0], self.caches[index, 1]


def tiles_of(chunks: list[tuple[int, int]], tokens: int, device, seqs=None) -> torch.Tensor:
    """The tile table of `chunks` (new tokens, first position), rows in chunk order, `tokens` a tile;
    with `seqs`, only those chunks' tiles."""
    seqs = range(len(chunks)) if seqs is None else seqs
    q_starts = [sum(n for n, _ in chunks[:i]) for i in range(len(chunks))]
    flat = tile_table(seqs, [q_starts[i] for i in seqs], [chunks[i][0] for i in seqs], [chunks[i][1] for i in seqs],
                      tokens)
    return torch.tensor(flat, dtype=torch.int32, device=device).view(-1, 4)


def case(batch: int, ctx: int, layers: int) -> dict:
    dev, dtype = "cuda", torch.bfloat16
    block_size = 16
    qkv = torch.randn(batch, KV_HEADS, GROUP + 2, HEAD_DIM, device=dev, dtype=dtype)
    q, k, v = qkv[:, :, :GROUP], qkv[:, :, GROUP], qkv[:, :, GROUP + 1]
    per_seq = blocks_for(ctx, block_size)
    cache = LayerCaches(torch.randn(layers, 2, batch * per_seq * block_size, KV_HEADS, HEAD_DIM, device=dev,
                                    dtype=dtype))
    chunks = [SeqChunk([0], ctx - 1, list(range(b * per_seq, (b + 1) * per_seq)), True) for b in range(batch)]
    scale = HEAD_DIM ** -0.5
    specs = [LayerAttention(i, None, ROPE, scale, None, 1e-6) for i in range(layers)]

    def backend_path(backend):
        _, layout = backend.build_step(chunks, block_size, HostToDevice(dev, pinned=False))
        step = StepContext(layout, {ROPE: rope_cos_sin(ROPE, HEAD_DIM, layout.positions, dtype)})
        return lambda: [backend.forward(spec, q, k, v, step, cache) for spec in specs]

    _, layout = FusedAttention(GROUP).build_step(chunks, block_size, HostToDevice(dev, pinned=False))
    cos, sin = rope_cos_sin(ROPE, HEAD_DIM, layout.positions, dtype)
    tables = torch.arange(batch * per_seq, device=dev, dtype=torch.int32).view(batch, per_seq)
    decodes = [(1, ctx - 1)] * batch

    def varlen_path(tokens: int, splits=None):
        tiles = tiles_of(decodes, tokens, dev)

        def run():
            for i in range(layers):
                k_cache, v_cache = cache.layer(i)
                qr = rope_and_store(q, k, v, cos, sin, k_cache, v_cache, layout.slot_mapping)
                varlen_attention(qr, k_cache, v_cache, tables, tiles, block_size, scale, None, None, splits=splits,
                                 tile_tokens=tokens)
        return run

    times = {"torch": graph_ms(backend_path(TorchAttention({None}))),
             "fused": graph_ms(backend_path(FusedAttention(GROUP))),
             "varlen": graph_ms(varlen_path(tile_rows(GROUP))), "varlen1": graph_ms(varlen_path(1)),
             "varlen1_fixed": graph_ms(varlen_path(1, splits=-(-ctx // SPLIT_KEYS)))}
    return dict(batch=batch, ctx=ctx, layers=layers, **{f"{name}_ms": round(ms, 4) for name, ms in times.items()},
                speedup=round(times["torch"] / times["fused"], 2),
                varlen1_vs_fused=round(times["varlen1"] / times["fused"], 3),
                varlen1_splits=num_splits(batch, KV_HEADS, torch.device(dev)), gpu=torch.cuda.get_device_name())


def varlen_paths(chunks: list[tuple[int, int]], layers: int, device: str = "cuda", block_size: int = 16) -> dict:
    """name -> a function running one step's attention for every layer (returning each layer's
    output), for the step whose chunks are (new tokens, first position): "varlen", "varlen1",
    "torch" and "current" (see the module doc). On the CPU (fp32, Triton's interpreter) the tests
    check that the paths agree."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [blocks_for(pos + n, block_size) for n, pos in chunks]
    tables = [list(range(sum(lens[:i]), sum(lens[:i + 1]))) for i in range(len(chunks))]
    num_slots = sum(lens) * block_size
    caches = torch.randn(layers, 2, num_slots, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    T = sum(n for n, _ in chunks)
    q = torch.randn(T, HEADS, HEAD_DIM, device=device, dtype=dtype)
    specs = [LayerAttention(i, None, ROPE, HEAD_DIM ** -0.5, None, 1e-6) for i in range(layers)]
    seq_chunks = [SeqChunk([0] * n, pos, table, False) for (n, pos), table in zip(chunks, tables)]
    block_tables = torch.tensor([t + [0] * (max(lens) - len(t)) for t in tables], dtype=torch.int32, device=device)
    tiles = tiles_of(chunks, tile_rows(GROUP), device)
    decode_rows = [i for i, (n, _) in enumerate(chunks) if n == 1]
    decode_tiles = tiles_of(chunks, 1, device, decode_rows)
    prefill_tiles = tiles_of(chunks, tile_rows(GROUP), device, [i for i, (n, _) in enumerate(chunks) if n > 1])

    def backend_path(backend):
        _, layout = backend.build_step(seq_chunks, block_size, HostToDevice(device, pinned=False))
        if isinstance(backend, FusedAttention):
            return lambda: [attend_fused(spec, layout) for spec in specs]
        return lambda: [TorchAttention.attend(spec, q, caches[spec.index, 0], caches[spec.index, 1], layout)
                        for spec in specs]

    def attend_fused(spec, layout: StepLayout):
        """The kernel backend's attention call alone (its forward first rotates and stores q/k/v)."""
        meta = layout.attention
        k_cache, v_cache = caches[spec.index, 0], caches[spec.index, 1]
        if isinstance(meta, Decodes):
            return decode_attention(q, k_cache, v_cache, meta.kv_slots, layout.positions, spec.scale, None, None)
        return varlen_attention(q, k_cache, v_cache, meta.block_tables, meta.tiles, block_size, spec.scale, None, None)

    def varlen():
        return [varlen_attention(q, caches[i, 0], caches[i, 1], block_tables, tiles, block_size, specs[i].scale, None,
                                 None) for i in range(layers)]

    def varlen1():
        outs = []
        for i in range(layers):
            out = varlen_attention(q, caches[i, 0], caches[i, 1], block_tables, decode_tiles, block_size,
                                   specs[i].scale, None, None, tile_tokens=1)
            if prefill_tiles.shape[0]:
                varlen_attention(q, caches[i, 0], caches[i, 1], block_tables, prefill_tiles, block_size, specs[i].scale,
                                 None, None, out=out)
            outs.append(out)
        return outs

    return dict(varlen=varlen, varlen1=varlen1, torch=backend_path(TorchAttention({None})),
                current=backend_path(FusedAttention(GROUP)))


def varlen_case(name: str, chunks: list[tuple[int, int]], layers: int) -> dict:
    pairs = sum(n * pos + n * (n + 1) // 2 for n, pos in chunks)  # visible (query, key) pairs, causal
    flops = 4 * HEADS * HEAD_DIM * pairs * layers
    times = {path: graph_ms(fn) for path, fn in varlen_paths(chunks, layers).items()}
    block_m = tile_rows(GROUP)
    tiles = sum(-(-n // block_m) for n, _ in chunks)
    return dict(case=name, tokens=sum(n for n, _ in chunks), sequences=len(chunks), layers=layers, tiles=tiles,
                programs_per_sm=kernels_varlen.PROGRAMS_PER_SM,
                splits=num_splits(tiles, KV_HEADS, torch.device("cuda")),
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
    p.add_argument("--programs-per-sm", default=str(kernels_varlen.PROGRAMS_PER_SM),
                   help="varlen: the split rule's programs per SM, comma-separated to sweep")
    args = p.parse_args()
    cases = args.cases.split(",")
    if "decode" in cases:
        for b in (int(x) for x in args.batches.split(",")):
            print(json.dumps(case(b, args.ctx, args.layers)), flush=True)
    if "varlen" in cases:
        for per_sm in (int(x) for x in args.programs_per_sm.split(",")):
            kernels_varlen.PROGRAMS_PER_SM = per_sm
            for name, chunks in varlen_cases():
                print(json.dumps(varlen_case(name, chunks, args.layers)), flush=True)


if __name__ == "__main__":
    main()
