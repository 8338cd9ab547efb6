"""What a structured-outputs constraint costs at a given load (issue #26): output tokens/s of JSON-schema
requests against the same requests unconstrained, one engine, back to back.

    python -m benchmarks.structured_cost [--checkpoint DIR] [--streams 64] [--max-num-seqs 64]
                                         [--requests 128] [--max-tokens 128] [--reps 2] [--out FILE]

Requests cycle through benchmarks/structured_cases.py's JSON cases (prompt and schema), greedy, with
`--streams` of them in flight (a closed loop). Each rep runs them constrained, then unconstrained with
each request's max_tokens set to what its constrained run generated and EOS ignored, so both runs
decode the same tokens per request; the first rep's constrained run compiles every schema cold (the
tokenizer index is built before timing starts), later ones hit the engine's cache. On a GPU the
engine is the default one (TransformerEngine, bf16, CUDA graphs, async scheduling: a batch holding
a constrained sequence runs its steps one at a time, docs/structured-outputs.md); the random
gemma-2b-shaped checkpoint with the Gemma 3 tokenizer (benchmarks/random_checkpoint.py --tokenizer)
gives the issue's shapes. benchmarks/structured_validity.py runs the CPU table (8 streams) beside
its validity checks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

from .stats import json_line
from .structured_cases import JSON_CASES
from .structured_validity import closed_loop


def run(engine, requests: int, max_tokens: int, streams: int, reps: int, progress) -> list[dict]:
    from backend.params import SamplingParams, StructuredOutputs

    cases = [JSON_CASES[i % len(JSON_CASES)] for i in range(requests)]
    constrained = [(case.prompt, SamplingParams(max_tokens=min(case.max_tokens, max_tokens), temperature=0,
                                                structured_outputs=StructuredOutputs(json=case.schema)))
                   for case in cases]
    closed_loop(engine, [(p, dataclasses.replace(s, structured_outputs=StructuredOutputs(json_object=True)))
                         for p, s in constrained[:1]], 1)  # builds the tokenizer's index: not a compile
    records = []
    for rep in range(reps):
        wall, outs = closed_loop(engine, constrained, streams)
        tokens = [o.num_output_tokens for o in outs]
        records.append({"type": "cost", "rep": rep, "system": "constrained", "streams": streams,
                        "requests": len(outs), "output_tokens": sum(tokens), "wall_s": round(wall, 3),
                        "tok_s": round(sum(tokens) / wall, 1),
                        "finish_reasons": {r: sum(o.finish_reason == r for o in outs)
                                           for r in sorted({o.finish_reason for o in outs})}})
        free = [(prompt, dataclasses.replace(params, structured_outputs=None, ignore_eos=True, max_tokens=n))
                for (prompt, params), n in zip(constrained, tokens)]
        wall, outs = closed_loop(engine, free, streams)
        records.append({"type": "cost", "rep": rep, "system": "unconstrained", "streams": streams,
                        "requests": len(outs), "output_tokens": sum(o.num_output_tokens for o in outs),
                        "wall_s": round(wall, 3), "tok_s": round(sum(o.num_output_tokens for o in outs) / wall, 1)})
        records.append({"type": "ratio", "rep": rep, "constrained_over_unconstrained":
                        round(records[-2]["tok_s"] / records[-1]["tok_s"], 3)})
        progress(f"rep {rep}: constrained {records[-3]['tok_s']:.0f} tok/s, unconstrained "
                 f"{records[-2]['tok_s']:.0f} tok/s, ratio {records[-1]['constrained_over_unconstrained']:.3f}")
    return records


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: the packaged Gemma 3 270M")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default: --streams")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128, help="cap on each case's own max_tokens")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--kv-cache-bytes", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON lines (default: stdout only)")
    args = parser.parse_args(argv)

    from backend.loader import start_engine
    from backend.params import EngineConfig

    config = EngineConfig(checkpoint=args.checkpoint, max_num_seqs=args.max_num_seqs or args.streams,
                          **({} if args.kv_cache_bytes is None else {"kv_cache_bytes": args.kv_cache_bytes}))
    engine = start_engine(config)
    try:
        records = run(engine, args.requests, args.max_tokens, args.streams, args.reps,
                      lambda message: print(message, file=sys.stderr, flush=True))
        device = str(engine.device)
    finally:
        engine.shutdown()
    if device.startswith("cuda"):
        import torch
        device = torch.cuda.get_device_name()
    lines = [json_line({**r, "device": device, "checkpoint": args.checkpoint or "packaged Gemma 3 270M"})
             for r in records]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(line + "\n" for line in lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
