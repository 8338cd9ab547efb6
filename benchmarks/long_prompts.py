"""Long prompts on the server and the in-process engine: where prefill, not decode, sets the pace.

    python -m benchmarks.long_prompts --checkpoint DIR [--engine te] [--dtype bfloat16] [--max-num-seqs 64]
                                      [--kv-cache-bytes N] [--prompt-tokens 1024] [--clients 64] [--out DIR]

Two measurements, each on the Triton server (gRPC) and on the same engine in-process, back to back:
- prefill throughput: bursts of 8 prompts of `--prompt-tokens` tokens asking for 1 token each;
  prompt tokens/s = the burst's prompt tokens / the time until its last first token (median of 3);
- a closed loop of `--clients` clients sending such prompts for 64 new tokens each (tokens/s, TTFT, ITL
  as benchmarks/serving.py reports them).
Every prompt is distinct from its first token on (seeded random words), so prefix caching cannot
skip any prefill. Writes OUT/long_prompts.jsonl and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from . import serving
from .stats import median

BURST = 8  # prompts per prefill burst
BURST_REPS = 3
NEW_TOKENS = 64


def distinct_prompts(tokenizer, count: int, num_tokens: int, seed: int) -> list[str]:
    """`count` texts of about `num_tokens` tokens each, different from their first word on."""
    rng = random.Random(seed)
    words = ("time person year way day thing man world life hand part child eye woman place work week case point "
             "government company number group problem fact river stone light garden music window paper market "
             "story table ocean mountain engine letter voice").split()
    prompts = []
    for i in range(count):
        text = f"{i} " + " ".join(rng.choice(words) for _ in range(num_tokens + 16))
        ids = tokenizer.encode(text)[:num_tokens]
        prompts.append(tokenizer.decode(ids))
    return prompts


def prefill_burst(target, prompts: list[str], num_prompt_tokens: int, time_limit_s: float) -> dict:
    """One burst: all prompts at once, one new token each; prompt tok/s up to the last first token."""
    record = serving.measure(target, "closed", prompts, 1, time_limit_s, concurrency=len(prompts),
                             num_requests=len(prompts))
    prompt_tokens = num_prompt_tokens * (record["requests"] - record["errors"])
    record.update(type="prefill", prompt_tokens=prompt_tokens,
                  prompt_tokens_per_s=prompt_tokens / record["wall_s"] if record["wall_s"] > 0 else None)
    return record


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--engine", default="auto", choices=("auto", "te", "torch"))
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-bytes", type=int, default=4 << 30)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=120)
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)

    from backend.loader import start_engine
    from backend.params import EngineConfig
    config = EngineConfig(checkpoint=str(args.checkpoint), engine=args.engine, dtype=args.dtype,
                          max_num_seqs=args.max_num_seqs, kv_cache_bytes=args.kv_cache_bytes)
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "long_prompts.jsonl").open("w")
    records: list[dict] = []

    def emit(record: dict) -> None:
        record = {**record, "prompt_tokens_each": args.prompt_tokens}
        records.append(record)
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(f"{record['type']} {record['system']}: {json.dumps({k: record.get(k) for k in ('prompt_tokens_per_s', 'tokens_per_s', 'ttft_ms', 'itl_ms', 'errors')})}", file=sys.stderr)

    engine = start_engine(config)
    server = serving.start_server(args.out / "long_prompts_server.log", config)
    try:
        targets = [serving.ServerTarget(server.grpc_url, timeout_s=args.time_limit), serving.EngineTarget(engine)]
        n_loop = args.clients * args.requests_per_client
        seed = 0
        for target in targets:  # warm-up, not recorded: a burst and a few long requests
            seed += 1
            serving.measure(target, "closed", distinct_prompts(engine.tokenizer, BURST, args.prompt_tokens, seed), 4,
                            args.time_limit, concurrency=BURST, num_requests=BURST)
        for rep in range(BURST_REPS):
            for target in (targets if rep % 2 == 0 else targets[::-1]):
                seed += 1
                prompts = distinct_prompts(engine.tokenizer, BURST, args.prompt_tokens, seed)
                emit({**prefill_burst(target, prompts, args.prompt_tokens, args.time_limit), "rep": rep})
        for target in targets:
            seed += 1
            prompts = distinct_prompts(engine.tokenizer, n_loop, args.prompt_tokens, seed)
            emit({**serving.measure(target, "closed", prompts, NEW_TOKENS, args.time_limit,
                                    concurrency=args.clients, num_requests=n_loop), "rep": 0})
        for target in targets:
            serving.close(target)
    finally:
        server.stop()
        engine.shutdown()
        log.close()
    print(markdown(records, args))
    return records


def markdown(records: list[dict], args) -> str:
    lines = [f"| {args.prompt_tokens}-token prompts | server | engine-direct | server / engine |", "| --- | ---: | ---: | ---: |"]

    def row(name, kind, pick):
        values = {s: median([pick(r) for r in records if r["type"] == kind and r["system"] == s and pick(r) is not None])
                  for s in ("server", "engine_direct")}
        ratio = values["server"] / values["engine_direct"] if values["server"] and values["engine_direct"] else None
        cells = ["-" if v is None else f"{v:,.1f}" for v in (values["server"], values["engine_direct"])]
        cells.append("-" if ratio is None else f"{ratio:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    row(f"prefill, bursts of {BURST}: prompt tok/s", "prefill", lambda r: r["prompt_tokens_per_s"])
    row(f"{args.clients} clients x {NEW_TOKENS} new tokens: tok/s", "server", lambda r: r["tokens_per_s"])
    row(f"{args.clients} clients: TTFT p50 ms", "server", lambda r: r["ttft_ms"]["p50"])
    row(f"{args.clients} clients: ITL p50 ms", "server", lambda r: r["itl_ms"]["p50"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
