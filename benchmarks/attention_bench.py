"""GPU micro-benchmark: one decode step's attention work for every layer, torch path vs fused kernels.

    python3 -m benchmarks.attention_bench [--batches 1,8,64] [--ctx 128] [--layers 18]

gemma-2b attention shapes (8 query heads, 1 KV head, head dim 256, bf16). Per layer, the torch path
(backend/te/attention.py: RoPE, K/V write, gather, matmuls, softmax) and the fused path
(backend/te/fused_decode.py: rope_and_store + decode_attention) are each captured in a CUDA graph
for all layers and replayed, so the times are GPU time without launch gaps, as in the engine's
graph decode. Needs CUDA and Triton; not TransformerEngine. One JSON line per batch size.
"""
from __future__ import annotations

import argparse
import json

import torch

from backend.batch import decode_masks
from backend.config import RopeSpec
from backend.model import AttentionGroup, apply_rope, rope_cos_sin, write_kv
from backend.te.attention import StepContext, paged_attention
from backend.te.fused_decode import rope_and_store

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--layers", type=int, default=18)
    args = p.parse_args()
    for b in (int(x) for x in args.batches.split(",")):
        print(json.dumps(case(b, args.ctx, args.layers)), flush=True)


if __name__ == "__main__":
    main()
