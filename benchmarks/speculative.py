"""Speculative decoding off, with n-gram prompt lookup, and with a draft model: inter-token latency,
tokens/s, acceptance.

    python -m benchmarks.speculative [--max-tokens N] [--reps R] [--streams 1,8] [--speculative-config JSON]
                                     [--draft-layers N] [--draft-tokens K]
                                     [--checkpoint DIR] [--engine auto|te|torch] [--fp8] [--out FILE]

Two workloads a user would recognise, as chat turns to the packaged Gemma 3 270M (EOS ignored,
`max_tokens` tokens each):
- `edit`: "rewrite this code with one change" and "summarise, quoting the text" on 300-1,000-token
  inputs, greedy: the answer copies long spans of the prompt, which prompt lookup finds;
- `free`: short requests for new prose, sampled (temperature 1, top-p 0.95, a seed per request):
  nothing to look up, what speculation must not slow. (Greedy, the 270M soon repeats itself, which
  prompt lookup finds too: sampling keeps the text new.)
Each is run with 1 stream (its prompts one after another) and with 8 streams (8 requests at once),
three ways: `off` and `ngram` in one engine (its speculative_config the n-gram one; "off" is the
per-request opt-out `speculate=False`, which takes exactly the path of an engine without
speculation), and `draft_model` in a second engine whose draft is the checkpoint's first
`--draft-layers` layers (backend/draft_checkpoint.py, written once into the model cache; 0: no such
rows). Prefix caching is off so the second run of a prompt computes its prefill again. The order of
the three reverses in every other repetition; rows are medians over repetitions. The outputs are the
same every way, greedy and seeded (checked here for every request).

Per row: inter-token latency (a request's decode time per token after its first, mean over requests),
tokens/s (every request's output tokens over the run's wall time, prefills included), and with
speculation the acceptance rate (accepted / proposed draft tokens), the tokens a verify step yields
and the engine's estimate of a draft's cost after the run (r of backend/speculative.py's
best_num_drafts, in shares of a step: a sequence speculates while its acceptance beats it).
`make bench` runs this as its `speculative` level (benchmarks/run.py); docs/benchmarks.md has the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import queue
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from .stats import Timeline, json_line, median, ratio

SPECULATIVE_CONFIG = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
# The draft model's rows: the checkpoint's first DRAFT_LAYERS layers proposing up to DRAFT_TOKENS tokens
# (the layer count with the best measured trade of agreement against cost: docs/benchmarks.md).
DRAFT_LAYERS = 12
DRAFT_TOKENS = 2
METHODS = ("off", "ngram", "draft_model")  # the table's rows per workload and streams, in this order
# Ratio keys per method: the n-gram ones keep the names make bench's summary has always had.
KEY_PREFIX = {"ngram": "spec", "draft_model": "spec_draft"}
STREAMS = (1, 8)
WORKLOADS = ("edit", "free")
SAMPLING = {"edit": {"temperature": 0.0}, "free": {"temperature": 1.0, "top_p": 0.95}}  # + a seed per request

_FUNCTIONS = [
    ("parse_line", "line", "Split one CSV line into fields, honouring quoted commas.",
     ["fields = []", "current = ''", "quoted = False", "for char in line:",
      "    if char == '\"':", "        quoted = not quoted", "    elif char == ',' and not quoted:",
      "        fields.append(current)", "        current = ''", "    else:", "        current += char",
      "fields.append(current)", "return fields"]),
    ("load_table", "path", "Read a CSV file into a list of rows, skipping blank lines.",
     ["rows = []", "with open(path, encoding='utf-8') as handle:", "    for line in handle:",
      "        line = line.rstrip('\\n')", "        if not line.strip():", "            continue",
      "        rows.append(parse_line(line))", "return rows"]),
    ("column_totals", "rows", "Sum every numeric column of the rows after the header.",
     ["header, *body = rows", "totals = {name: 0.0 for name in header}", "for row in body:",
      "    for name, value in zip(header, row):", "        try:", "            totals[name] += float(value)",
      "        except ValueError:", "            pass", "return totals"]),
    ("format_report", "totals", "Format the totals as an aligned two-column report.",
     ["width = max(len(name) for name in totals)", "lines = []", "for name, total in sorted(totals.items()):",
      "    lines.append(f'{name.ljust(width)}  {total:12.2f}')", "return '\\n'.join(lines)"]),
    ("main", "argv", "Print the report of the CSV file named on the command line.",
     ["if len(argv) != 2:", "    print('usage: report FILE')", "    return 2", "rows = load_table(argv[1])",
      "print(format_report(column_totals(rows)))", "return 0"]),
]

_ARTICLE = [
    "The town council voted on Tuesday to reopen the old railway bridge to cyclists and pedestrians.",
    "The bridge, built in 1897, has been closed since a flood damaged two of its stone piers in 2019.",
    "Engineers found that the piers could be repaired for a third of the cost of a new crossing.",
    "Work will begin in March and is expected to take eleven months, weather permitting.",
    "During the repairs, a ferry will carry cyclists across the river every twenty minutes.",
    "Local shop owners welcomed the decision, saying the closure had cut their trade by a quarter.",
    "\"People used to stop here on their way to the market,\" said the owner of the bakery by the bridge.",
    "The council will pay for the work from its road budget and a grant from the regional heritage fund.",
    "A public meeting on the design of the new railings will be held at the library next month.",
    "Residents who cannot attend can send their comments to the council by post or by email.",
]


def _code(variant: int) -> str:
    lines = ["import sys", ""]
    for i, (name, arg, doc, body) in enumerate(_FUNCTIONS[variant % 2:] + _FUNCTIONS[:variant % 2]):
        lines += [f"def {name}({arg}):", f'    """{doc}"""'] + [f"    {b}" for b in body] + ["", ""]
    lines += ["if __name__ == '__main__':", "    sys.exit(main(sys.argv))"]
    return "\n".join(lines)


def edit_messages() -> list[str]:
    """User turns that ask for the input back with one change (300-1,000 tokens each)."""
    renames = [("rows", "records"), ("totals", "sums"), ("line", "text"), ("width", "pad"),
               ("fields", "cells"), ("handle", "stream"), ("name", "key"), ("body", "data")]
    turns = []
    for i in range(8):
        if i % 4 == 3:  # a summary that quotes its source
            article = " ".join(_ARTICLE[(i + j) % len(_ARTICLE)] for j in range(len(_ARTICLE))) * 2
            turns.append("Summarise this news article, quoting its most important sentences word for word:\n\n"
                         + article)
        else:
            old, new = renames[i]
            turns.append(f"Rewrite this code with one change: rename the variable `{old}` to `{new}` everywhere. "
                         f"Output the whole file.\n\n```python\n{_code(i)}\n```")
    return turns


def free_messages() -> list[str]:
    """User turns whose answers are new prose: nothing in the prompt to look up."""
    return ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
            "Explain how a refrigerator keeps food cold, for a ten-year-old.",
            "Give me five ideas for a birthday party in winter, each with one sentence of detail.",
            "Describe a walk through a forest in autumn.",
            "What are the pros and cons of learning to play the piano as an adult?",
            "Write a letter to a friend about your first week at a new job.",
            "Invent a new board game and explain its rules.",
            "Why do cats purr? Answer in a few paragraphs."]


def workload_prompts(tokenizer) -> dict[str, list[list[int]]]:
    """Each workload's prompts as token ids, through the chat template."""
    def ids(text):
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]),
                                add_special_tokens=False)
    return {"edit": [ids(t) for t in edit_messages()], "free": [ids(t) for t in free_messages()]}


def generate(engine, prompts: list[list[int]], params: list, timeout_s: float = 1800
             ) -> tuple[list[Timeline], list[list[int]]]:
    """Submit all `prompts` at once; each one's timeline (stamped when the engine reports tokens) and tokens."""
    ready: queue.SimpleQueue = queue.SimpleQueue()
    timelines, tokens = [], [[] for _ in prompts]
    for i, (p, sampling) in enumerate(zip(prompts, params)):
        timelines.append(Timeline(time.perf_counter()))
        engine.submit(p, sampling, on_ready=lambda handle, i=i: ready.put((time.perf_counter(), handle, i)))
    deadline, pending = time.monotonic() + timeout_s, len(prompts)
    while pending:
        try:
            stamp, handle, i = ready.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            raise TimeoutError(f"{len(prompts)} requests did not finish in {timeout_s} s") from None
        out = handle.poll()
        if out is None:
            continue
        if out.token_ids:
            timelines[i].arrivals.append((stamp, len(out.token_ids)))
            tokens[i] += out.token_ids
        if out.finish_reason is not None:
            pending -= 1
            if out.finish_reason not in ("length", "stop"):
                raise RuntimeError(f"a request failed: {out.error or out.finish_reason}")
    return timelines, tokens


def measure(engine, workload: str, prompts: list[list[int]], streams: int, max_tokens: int, speculate: bool) -> dict:
    """`prompts` in groups of `streams` submitted together, one group after another."""
    from backend.params import SamplingParams
    params = [SamplingParams(max_tokens=max_tokens, ignore_eos=True, speculate=speculate, seed=i, **SAMPLING[workload])
              for i in range(len(prompts))]
    before = engine.stats()
    timelines, tokens, wall = [], [], 0.0
    for start in range(0, len(prompts), streams):
        group = prompts[start:start + streams]
        t0 = time.perf_counter()
        tl, tok = generate(engine, group, params[start:start + streams])
        wall += time.perf_counter() - t0
        timelines += tl
        tokens += tok
    after = engine.stats()
    spec, spec0 = after.spec_decode, before.spec_decode
    return {**outcome(timelines, wall, spec.num_drafts - spec0.num_drafts,
                      spec.num_draft_tokens - spec0.num_draft_tokens,
                      spec.num_accepted_tokens - spec0.num_accepted_tokens),
            "steps": after.step_times.steps - before.step_times.steps,
            # The engine's estimate of a draft's cost in shares of a step after the run (backend/speculative.py's
            # best_num_drafts: a sequence speculates while its drafts' acceptance beats it); None for off.
            "draft_cost": after.spec_decode.draft_cost if speculate else None,
            "tokens": tokens}


def outcome(timelines: list[Timeline], wall: float, drafts: int, proposed: int, accepted: int) -> dict:
    """A run's row: ITL (mean over requests of decode time per token after the first), tokens/s over
    `wall`, and the drafts' acceptance. benchmarks/vllm_baseline.py reports vLLM's runs with it too."""
    itl = [(t.end - t.arrivals[0][0]) / (t.num_tokens - 1) for t in timelines if t.num_tokens > 1]
    return {"itl_ms": 1e3 * sum(itl) / len(itl), "tokens_per_s": sum(t.num_tokens for t in timelines) / wall,
            "wall_s": wall, "output_tokens": sum(t.num_tokens for t in timelines),
            "drafts": drafts, "draft_tokens": proposed, "accepted_tokens": accepted,
            "acceptance_rate": accepted / proposed if proposed else None,
            "tokens_per_verify": (drafts + accepted) / drafts if drafts else None}


def draft_speculative_config(checkpoint: Path, layers: int = DRAFT_LAYERS, tokens: int = DRAFT_TOKENS) -> dict:
    """The draft_model config whose draft is `checkpoint`'s first `layers` layers (written once)."""
    from backend.draft_checkpoint import cached_draft_checkpoint
    return {"method": "draft_model", "model": str(cached_draft_checkpoint(checkpoint, layers)),
            "num_speculative_tokens": tokens}


def schedule(prompts: dict[str, list[list[int]]], max_tokens: int, reps: int, streams=STREAMS,
             num_prompts: Optional[int] = None) -> Iterator[tuple[int, str, int, list[list[int]], int]]:
    """(repetition, workload, streams, prompts, max tokens) in run order; repetition 0 is a warm-up of
    one prompt and 4 tokens per workload and streams."""
    for rep in range(reps + 1):
        for workload in WORKLOADS:
            for n in streams:
                chosen = prompts[workload][:num_prompts or max(n, 2)]
                yield (rep, workload, n, chosen[:1], 4) if rep == 0 else (rep, workload, n, chosen, max_tokens)


def run(engine, max_tokens: int, reps: int, streams=STREAMS, num_prompts: Optional[int] = None,
        progress: Callable[[str], None] = lambda s: None, draft_engine=None, exact: bool = True) -> Iterator[dict]:
    """One record per (repetition, workload, streams, speculation method); repetition 0 is a short
    warm-up, not recorded. `engine` speculates by n-gram (and runs "off" by the opt-out), `draft_engine`
    (if any) with a draft model. Raises if speculation changed any request's tokens."""
    runs = {"off": (engine, False), "ngram": (engine, True)}
    if draft_engine is not None:
        runs["draft_model"] = (draft_engine, True)
    for rep, workload, n, chosen, tokens in schedule(workload_prompts(engine.tokenizer), max_tokens, reps, streams,
                                                     num_prompts):
        results = {}
        for label in (list(runs) if rep % 2 else list(runs)[::-1]):
            progress(f"speculative: {'warm-up' if rep == 0 else f'rep {rep}/{reps}'}: {workload}, "
                     f"{n} stream(s), {len(chosen)} requests x {tokens} tokens, speculation {label}")
            target, speculate = runs[label]
            results[label] = measure(target, workload, chosen, n, tokens, speculate)
        changed = [label for label in results if results[label]["tokens"] != results["off"]["tokens"]]
        if changed and exact:
            raise AssertionError(f"{workload}, {n} streams: speculation ({', '.join(changed)}) changed the output")
        if rep == 0:
            continue
        for label, r in results.items():
            yield {"type": "speculative", "rep": rep, "workload": workload, "streams": n, "speculation": label,
                   "prompt_tokens": [len(p) for p in chosen], "max_tokens": tokens,
                   "same_as_off": sum(a == b for a, b in zip(r["tokens"], results["off"]["tokens"])),
                   **{k: v for k, v in r.items() if k != "tokens"}}


KEYS = ("itl_ms", "tokens_per_s", "acceptance_rate", "tokens_per_verify", "draft_cost")


def table(records: list[dict]) -> list[dict]:
    """Medians over repetitions per (workload, streams, speculation)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["workload"], r["streams"], r["speculation"]), []).append(r)
    rows = []
    for (workload, streams, label), rs in groups.items():
        row = {"workload": workload, "streams": streams, "speculation": label, "reps": len(rs),
               "prompt_tokens": rs[0]["prompt_tokens"], "max_tokens": rs[0]["max_tokens"]}
        for key in KEYS:
            values = [r[key] for r in rs if r.get(key) is not None]
            row[key] = median(values) if values else None
        rows.append(row)
    return rows


def ratios(rows: list[dict]) -> dict:
    """Each method over off, per workload and streams: ITL speedup (off / method) and tokens/s ratio
    (method / off), and the method's acceptance; keys `spec_*` for n-gram, `spec_draft_*` for the draft."""
    at = {(r["workload"], r["streams"], r["speculation"]): r for r in rows}
    out = {}
    for (workload, streams, label), on in at.items():
        if label not in KEY_PREFIX or (workload, streams, "off") not in at:
            continue
        off, prefix = at[(workload, streams, "off")], KEY_PREFIX[label]
        out[f"{prefix}_{workload}_itl_speedup_{streams}"] = ratio(off["itl_ms"], on["itl_ms"])
        out[f"{prefix}_{workload}_tok_s_ratio_{streams}"] = ratio(on["tokens_per_s"], off["tokens_per_s"])
        out[f"{prefix}_{workload}_acceptance_{streams}"] = on["acceptance_rate"]
    return out


def paired(records: list[dict]) -> dict:
    """Each repetition's method / off tokens/s ratio per (workload, streams): keys `edit_1` for n-gram,
    `draft_edit_1` for the draft model."""
    by = {(r["rep"], r["workload"], r["streams"], r["speculation"]): r for r in records}
    out: dict[str, list] = {}
    for (rep, workload, streams, label), r in sorted(by.items()):
        if label in KEY_PREFIX and (rep, workload, streams, "off") in by:
            key = f"{workload}_{streams}" if label == "ngram" else f"draft_{workload}_{streams}"
            out.setdefault(key, []).append(ratio(r["tokens_per_s"], by[(rep, workload, streams, "off")]["tokens_per_s"]))
    return out


def _fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(rows: list[dict], summary: dict) -> str:
    lines = ["| workload | streams | prompt tokens | speculation | ITL ms | tok/s | acceptance | tokens / verify "
             "| draft cost | ITL speedup | tok/s ratio |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (WORKLOADS.index(r["workload"]), r["streams"], METHODS.index(r["speculation"]))):
        speedup = tok = ""
        if r["speculation"] in KEY_PREFIX:
            prefix = KEY_PREFIX[r["speculation"]]
            speedup = _fmt(summary.get(f"{prefix}_{r['workload']}_itl_speedup_{r['streams']}"), 2) + "x"
            tok = _fmt(summary.get(f"{prefix}_{r['workload']}_tok_s_ratio_{r['streams']}"), 2) + "x"
        tokens = f"{min(r['prompt_tokens'])}-{max(r['prompt_tokens'])}"
        lines.append(f"| {r['workload']} | {r['streams']} | {tokens} | {r['speculation']} | {_fmt(r['itl_ms'])} "
                     f"| {_fmt(r['tokens_per_s'], 2)} | {_fmt(r['acceptance_rate'], 2)} "
                     f"| {_fmt(r['tokens_per_verify'], 2)} | {_fmt(r['draft_cost'], 2)} | {speedup} | {tok} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description="Speculative decoding on and off (docs/benchmarks.md).")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--streams", default="1,8", help="concurrent requests, e.g. 1,8")
    p.add_argument("--prompts", type=int, help="requests per run (default: max(streams, 2))")
    p.add_argument("--speculative-config", default=json.dumps(SPECULATIVE_CONFIG), help="the n-gram rows' config")
    p.add_argument("--draft-layers", type=int, default=DRAFT_LAYERS,
                   help="the draft_model rows' draft: the checkpoint's first N layers (0: no draft rows)")
    p.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS, help="the draft's num_speculative_tokens")
    p.add_argument("--checkpoint", type=Path, help="HF checkpoint with a tokenizer (default: the packaged 270M)")
    p.add_argument("--engine", choices=("auto", "te", "torch"), default="auto")
    p.add_argument("--fp8", action="store_true", help="TE: FP8 GEMMs")
    p.add_argument("--out", type=Path, help="JSON lines file (default: stdout only)")
    p.add_argument("--inexact", action="store_true",
                   help="bf16 on a GPU: count the requests whose tokens equal off's instead of requiring all")
    args = p.parse_args(argv)
    from backend.loader import start_engine
    from backend.params import EngineConfig
    from backend.loader import resolve_checkpoint
    checkpoint = resolve_checkpoint(args.checkpoint)
    config = EngineConfig(checkpoint=str(checkpoint), engine=args.engine, fp8=args.fp8,
                          speculative_config=args.speculative_config, enable_prefix_caching=False)
    draft_config = draft_speculative_config(checkpoint, args.draft_layers, args.draft_tokens) \
        if args.draft_layers else None
    engine = start_engine(config)
    draft_engine = None if draft_config is None else \
        start_engine(dataclasses.replace(config, speculative_config=json.dumps(draft_config)))
    out = open(args.out, "w") if args.out else None
    records = []
    try:
        for record in run(engine, args.max_tokens, args.reps, tuple(int(s) for s in args.streams.split(",")),
                          args.prompts, progress=lambda m: print(m, flush=True), draft_engine=draft_engine,
                          exact=not args.inexact):
            records.append(record)
            line = json_line(record)
            if out:
                out.write(line + "\n")
    finally:
        engine.shutdown()
        if draft_engine is not None:
            draft_engine.shutdown()
    rows = table(records)
    summary = {"type": "speculative_summary", **ratios(rows), "paired_tok_s_ratios": paired(records),
               "speculative_config": json.loads(args.speculative_config), "draft_speculative_config": draft_config,
               "table": rows, "engine_config": dataclasses.asdict(config)}
    print(markdown(rows, summary))
    if out:
        out.write(json_line(summary) + "\n")
        out.close()
    return summary


if __name__ == "__main__":
    main()
