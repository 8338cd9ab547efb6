"""How often a layer-truncated copy of a model (backend/draft_checkpoint.py) would have its greedy drafts
accepted, for every truncation depth at once, from one forward pass per prompt.

    python -m benchmarks.draft_acceptance [--layers 2,4,6,9,12,15] [--max-tokens 64] [--checkpoint DIR]

The target continues each prompt of benchmarks/speculative.py's two workloads greedily (the engine,
EOS ignored); HF transformers then runs the target once over prompt + continuation with every
layer's hidden state. The N-layer draft's logits at a position are the hidden state after layer N
through the final norm and the LM head (what the truncated checkpoint computes), so its greedy pick
given the target's tokens so far is known at every position. A draft proposed after a verify sees
exactly those tokens (accepted drafts equal the target's), so this gives, per depth:
- `agreement`: the fraction of positions where the draft's pick is the target's next token (the
  probability that one greedy draft is accepted);
- per k, the tokens a verify step yields (1 + the drafts accepted, a run of agreements up to k,
  stepped through the continuation as the engine steps) and the acceptance rate of its drafts
  (the engine proposes fewer than k when accepted drafts fall short: speculative.py's adaptivity).
Greedy only: the `free` workload is sampled in the benchmark, where a draft is accepted with the
target's probability of it, at most the greedy agreement.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

import torch

from .stats import json_line
from .speculative import WORKLOADS, generate, workload_prompts

DEPTHS = (2, 4, 6, 9, 12, 15)
KS = (1, 2, 3, 4)


def simulate(agrees: list[bool], k: int) -> tuple[int, int, int]:
    """Verify steps over a continuation whose position i's draft is right when agrees[i]: (steps,
    drafts proposed, drafts accepted), each step proposing min(k, positions left - 1)."""
    steps = proposed = accepted = 0
    i = 0
    while i < len(agrees):
        drafts = min(k, len(agrees) - i - 1)
        run = 0
        while run < drafts and agrees[i + run]:
            run += 1
        steps, proposed, accepted = steps + 1, proposed + drafts, accepted + run
        i += run + 1
    return steps, proposed, accepted


@torch.no_grad()
def early_exit_picks(model, ids: list[int], depths: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Per depth N, the N-layer draft's greedy pick after each position of `ids`."""
    out = model(torch.tensor([ids]), output_hidden_states=True)
    picks = {}
    for n in depths:
        hidden = model.model.norm(out.hidden_states[n][0])  # hidden_states[n]: after layer n, before the norm
        logits = model.lm_head(hidden).float()
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        picks[n] = logits.argmax(dim=-1)
    picks[len(model.model.layers)] = out.logits[0].argmax(dim=-1)  # the target itself: checks the method
    return picks


def measure(checkpoint: Path, depths: tuple[int, ...], max_tokens: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from backend.loader import start_engine
    from backend.params import EngineConfig, SamplingParams
    engine = start_engine(EngineConfig(checkpoint=str(checkpoint)))
    try:
        prompts = workload_prompts(engine.tokenizer)
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        continuations = {w: generate(engine, prompts[w], [params] * len(prompts[w]))[1] for w in WORKLOADS}
    finally:
        engine.shutdown()
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    total = len(model.model.layers)
    records = []
    for workload in WORKLOADS:
        agrees: dict[int, list[list[bool]]] = {n: [] for n in depths + (total,)}
        for prompt, tokens in zip(prompts[workload], continuations[workload]):
            picks = early_exit_picks(model, prompt + tokens, depths)
            # The pick after position p predicts token p + 1: the continuation's tokens from the prompt's last on.
            target = torch.tensor(tokens)
            for n, pick in picks.items():
                agrees[n].append((pick[len(prompt) - 1:len(prompt) - 1 + len(tokens)] == target).tolist())
        for n in depths + (total,):
            flat = [a for seq in agrees[n] for a in seq]
            record = {"type": "draft_acceptance", "workload": workload, "layers": n, "of_layers": total,
                      "positions": len(flat), "agreement": sum(flat) / len(flat)}
            for k in KS:
                steps, proposed, accepted = (sum(x) for x in zip(*(simulate(seq, k) for seq in agrees[n])))
                record[f"tokens_per_verify_k{k}"] = (steps + accepted) / steps
                record[f"acceptance_k{k}"] = accepted / proposed
            records.append(record)
    return records


def markdown(records: list[dict]) -> str:
    lines = ["| workload | draft layers | agreement | " + " | ".join(f"k={k}: tokens / verify (acceptance)" for k in KS)
             + " |", "| --- | ---: | ---: | " + " | ".join("---:" for _ in KS) + " |"]
    for r in records:
        cells = " | ".join(f"{r[f'tokens_per_verify_k{k}']:.2f} ({r[f'acceptance_k{k}']:.2f})" for k in KS)
        lines.append(f"| {r['workload']} | {r['layers']} of {r['of_layers']} | {r['agreement']:.3f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description="Greedy acceptance of layer-truncated drafts (docs/benchmarks.md).")
    p.add_argument("--layers", default=",".join(map(str, DEPTHS)), help="draft depths, e.g. 2,4,6")
    p.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--checkpoint", type=Path, help="HF checkpoint with a tokenizer (default: the packaged 270M)")
    p.add_argument("--out", type=Path, help="JSON lines file")
    args = p.parse_args(argv)
    from backend.loader import resolve_checkpoint
    start = time.perf_counter()
    records = measure(resolve_checkpoint(args.checkpoint), tuple(int(n) for n in args.layers.split(",")),
                      args.max_tokens)
    print(markdown(records))
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.out:
        args.out.write_text("".join(json_line(r) + "\n" for r in records))
    return records


if __name__ == "__main__":
    main()
