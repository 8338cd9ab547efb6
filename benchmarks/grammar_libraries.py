"""xgrammar against llguidance on our vocabulary (Gemma 3, 262144 tokens): which grammar library the
engine should use for structured outputs (issue #26).

    python -m benchmarks.grammar_libraries [--checkpoint DIR] [--threads N] [--batch 64] [--steps 160]
                                           [--out docs/benchmarks/grammar_libraries_cpu.jsonl]

For each library, on the tokenizer of the packaged Gemma 3 270M (or --checkpoint):
- tokenizer set-up: llguidance from tokenizer.json's text; xgrammar from the HF tokenizer (its load
  is timed apart: the engine's front has one already, the engine process has none);
- compile per case of benchmarks/structured_cases.py: cold (the first time) and cached (the second:
  xgrammar's compiler cache, llguidance a new matcher from the already validated grammar), each up
  to a matcher that exists, plus the first mask of that matcher (llguidance builds its lexer lazily);
  which schemas fail, with the library's message;
- mask time per step: each JSON case's matcher walks the tokens of one valid instance of its schema
  (structured_cases.example_instance, `json.dumps` spacing, then EOS), checking at every step that
  the mask allows the next token. Batch 1: one matcher, one fill per step. Batch 64: 64 matchers (the
  cases in turn), one batched fill for all per step (llguidance's LLExecutor, xgrammar's
  BatchGrammarMatcher), each matcher starting over when its walk ends, so every step fills 64 rows.
The libraries alternate case by case (and step block by step block), so a busy machine slows both
alike. Prints a table; writes one JSON line per measurement to --out (the last line is the summary).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .stats import json_line, percentile
from .structured_cases import CHOICE_CASES, JSON_CASES, REGEX_CASES, example_instance, schema_text

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "grammar_libraries_cpu.jsonl"
# Compiled once before anything is timed: each library's one-time start-up cost is not a schema's.
WARM_UP_SCHEMA = '{"type": "object", "properties": {"warm": {"type": "boolean"}}}'


def _ms(ns: int) -> float:
    return ns / 1e6


def _us(nanoseconds: list[int]) -> list[float]:
    return [round(ns / 1e3, 1) for ns in nanoseconds]


def _choice_lark(choices) -> str:
    return "start: " + " | ".join(json.dumps(c) for c in choices)


class Llguidance:
    name = "llguidance"

    def __init__(self, checkpoint: Path, vocab_size: int, eos_ids: list[int], threads: int):
        import llguidance
        import llguidance.numpy as llg_numpy
        self._llg, self._np = llguidance, llg_numpy
        start = time.perf_counter_ns()
        self.tokenizer = llguidance.LLTokenizer((checkpoint / "tokenizer.json").read_text(),
                                                n_vocab=vocab_size, eos_token=eos_ids)
        self.setup_ms = _ms(time.perf_counter_ns() - start)
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.version = importlib.metadata.version("llguidance")

    def grammar(self, kind: str, source: Any) -> str:
        m = self._llg.LLMatcher
        if kind == "json":
            return m.grammar_from_json_schema(source)
        if kind == "regex":
            return m.grammar_from_regex(source)
        return m.grammar_from_lark(_choice_lark(source))

    def compile(self, kind: str, source: Any):
        """Cold: grammar text, validation against our tokenizer, a matcher. Returns (grammar, matcher);
        raises ValueError with the library's message."""
        grammar = self.grammar(kind, source)
        error = self._llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(error)
        matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar, matcher

    def compile_cached(self, grammar: str):
        return grammar, self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)

    @staticmethod
    def copy(matcher):
        return matcher.deep_copy()

    def clear_cache(self) -> None:
        pass  # nothing is cached between matchers

    def bitmask(self, rows: int):
        return self._np.allocate_token_bitmask(rows, self.tokenizer.vocab_size)

    @staticmethod
    def as_numpy(bitmask) -> np.ndarray:
        return bitmask

    def fill(self, matcher, bitmask, row: int = 0) -> None:
        self._np.fill_next_token_bitmask(matcher, bitmask, row)

    def fill_batch(self, matchers: list, bitmask) -> None:
        self._np.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.consume_token(token)

    def accept_batch(self, matchers: list, tokens: list[int]) -> list[bool]:
        return self._np.consume_token_par(self.executor, list(zip(matchers, tokens)))

    @staticmethod
    def reset(matcher) -> None:
        matcher.reset()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, checkpoint: Path, vocab_size: int, eos_ids: list[int], threads: int):
        import xgrammar
        from transformers import AutoTokenizer
        self._xgr = xgrammar
        start = time.perf_counter_ns()
        hf_tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        self.hf_tokenizer_ms = _ms(time.perf_counter_ns() - start)
        start = time.perf_counter_ns()
        info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size, stop_token_ids=eos_ids)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads)
        self.setup_ms = _ms(time.perf_counter_ns() - start)
        self.vocab_size = vocab_size
        self.batch_matcher = xgrammar.BatchGrammarMatcher(max_threads=threads)
        self.version = importlib.metadata.version("xgrammar")

    def _compiled(self, kind: str, source: Any):
        if kind == "json":
            return self.compiler.compile_json_schema(source)
        if kind == "regex":
            return self.compiler.compile_regex(source)
        return self.compiler.compile_lark(_choice_lark(source))

    def compile(self, kind: str, source: Any):
        try:
            compiled = self._compiled(kind, source)
        except Exception as e:  # RuntimeError or xgrammar's own errors, each with the message
            raise ValueError(f"{type(e).__name__}: {e}") from None
        return (kind, source), self._xgr.GrammarMatcher(compiled)

    def compile_cached(self, key):
        return key, self._xgr.GrammarMatcher(self._compiled(*key))

    @staticmethod
    def copy(matcher):
        return matcher.fork()

    def clear_cache(self) -> None:
        self.compiler.clear_cache()

    def bitmask(self, rows: int):
        return self._xgr.allocate_token_bitmask(rows, self.vocab_size)

    @staticmethod
    def as_numpy(bitmask) -> np.ndarray:
        return bitmask.numpy()

    @staticmethod
    def fill(matcher, bitmask, row: int = 0) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers: list, bitmask) -> None:
        self.batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask)

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.accept_token(token)

    def accept_batch(self, matchers: list, tokens: list[int]) -> list[bool]:
        return self._xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)

    @staticmethod
    def reset(matcher) -> None:
        matcher.reset()


def allowed(bitmask_np: np.ndarray, row: int, token: int) -> bool:
    return bool((int(bitmask_np[row, token >> 5]) >> (token & 31)) & 1)


def compile_all(libs: list, cases: list[tuple[str, str, Any]], progress) -> tuple[list[dict], dict]:
    """Cold then cached compile of every case, the libraries alternating case by case.
    Returns the records and, per library, the cached handle of each case that compiled."""
    records, handles = [], {lib.name: {} for lib in libs}
    for lib in libs:  # one-time start-up (thread pools, tables) is nobody's schema
        _, warm = lib.compile("json", WARM_UP_SCHEMA)
        lib.fill(warm, lib.bitmask(1))
    for kind, name, source in cases:
        for lib in libs:
            record = {"type": "compile", "library": lib.name, "kind": kind, "case": name}
            start = time.perf_counter_ns()
            try:
                key, matcher = lib.compile(kind, source)
            except ValueError as e:
                records.append({**record, "ok": False, "error": str(e)[:400]})
                progress(f"  {lib.name} cannot compile {kind} {name}: {str(e)[:160]}")
                continue
            cold = time.perf_counter_ns() - start
            bitmask = lib.bitmask(1)
            start = time.perf_counter_ns()
            lib.fill(matcher, bitmask)
            first_mask = time.perf_counter_ns() - start
            start = time.perf_counter_ns()
            key, matcher = lib.compile_cached(key)
            cached = time.perf_counter_ns() - start
            start = time.perf_counter_ns()
            lib.fill(matcher, bitmask)
            cached_first_mask = time.perf_counter_ns() - start
            lib.reset(matcher)
            start = time.perf_counter_ns()
            lib.copy(matcher)
            copy = time.perf_counter_ns() - start
            handles[lib.name][(kind, name)] = key
            records.append({**record, "ok": True, "cold_ms": _ms(cold), "first_mask_ms": _ms(first_mask),
                            "cached_ms": _ms(cached), "cached_first_mask_ms": _ms(cached_first_mask),
                            "copy_ms": _ms(copy)})
    return records, handles


def walk_tokens(hf_tokenizer, eos_id: int) -> dict[str, list[int]]:
    """Each JSON case's instance as the tokens a model would emit (the tokenizer's own split), then EOS."""
    return {case.name: hf_tokenizer.encode(json.dumps(example_instance(case.schema)), add_special_tokens=False)
            + [eos_id] for case in JSON_CASES}


def walk_batch1(libs: list, handles: dict, walks: dict[str, list[int]]) -> list[dict]:
    """One matcher at a time along its instance: per step one mask fill (timed), a check that the
    mask allows the next token, then accepting it (timed apart)."""
    records = []
    for name, tokens in walks.items():
        for lib in libs:
            if ("json", name) not in handles[lib.name]:
                continue
            _, matcher = lib.compile_cached(handles[lib.name][("json", name)])
            bitmask = lib.bitmask(1)
            view = lib.as_numpy(bitmask)
            fills, accepts, refused = [], [], None
            for step, token in enumerate(tokens):
                start = time.perf_counter_ns()
                lib.fill(matcher, bitmask)
                fills.append(time.perf_counter_ns() - start)
                if not allowed(view, 0, token):
                    refused = refused or f"step {step}: token {token} masked out"
                start = time.perf_counter_ns()
                ok = lib.accept(matcher, token)
                accepts.append(time.perf_counter_ns() - start)
                if not ok:
                    refused = f"step {step}: token {token} not accepted"
                    break
            records.append({"type": "walk", "library": lib.name, "batch": 1, "case": name, "steps": len(fills),
                            "ok": refused is None, "error": refused, "mask_us": _us(fills), "accept_us": _us(accepts)})
    return records


def walk_batch(libs: list, handles: dict, walks: dict[str, list[int]], batch: int, steps: int,
               block: int = 20) -> list[dict]:
    """`batch` matchers (the cases that every library compiled, in turn), one batched mask fill per
    step for all rows (timed), the tokens accepted in one batched call (timed apart); a matcher whose
    walk ended starts over (not timed). Libraries alternate every `block` steps."""
    names = [n for n in walks if all(("json", n) in handles[lib.name] for lib in libs)]
    state = {}
    for lib in libs:
        matchers = [lib.compile_cached(handles[lib.name][("json", names[i % len(names)])])[1] for i in range(batch)]
        state[lib.name] = {"matchers": matchers, "pos": [0] * batch, "bitmask": lib.bitmask(batch),
                           "fills": [], "accepts": [], "refused": []}
    for first in range(0, steps, block):
        for lib in libs:
            s = state[lib.name]
            view = lib.as_numpy(s["bitmask"])
            for _ in range(first, min(first + block, steps)):
                tokens = [walks[names[i % len(names)]][s["pos"][i]] for i in range(batch)]
                start = time.perf_counter_ns()
                lib.fill_batch(s["matchers"], s["bitmask"])
                s["fills"].append(time.perf_counter_ns() - start)
                s["refused"] += [(names[i % len(names)], s["pos"][i]) for i, t in enumerate(tokens)
                                 if not allowed(view, i, t)]
                start = time.perf_counter_ns()
                accepted = lib.accept_batch(s["matchers"], tokens)
                s["accepts"].append(time.perf_counter_ns() - start)
                s["refused"] += [(names[i % len(names)], s["pos"][i]) for i, ok in enumerate(accepted) if not ok]
                for i in range(batch):
                    s["pos"][i] += 1
                    if s["pos"][i] == len(walks[names[i % len(names)]]) or not accepted[i]:
                        lib.reset(s["matchers"][i])
                        s["pos"][i] = 0
    return [{"type": "walk", "library": lib.name, "batch": batch, "steps": steps,
             "ok": not state[lib.name]["refused"], "error": sorted(set(state[lib.name]["refused"]))[:10] or None,
             "mask_us": _us(state[lib.name]["fills"]), "accept_us": _us(state[lib.name]["accepts"])}
            for lib in libs]


def _brief(walk: dict) -> dict:
    """A walk record as written: its per-step times as mean / p50 / p99 / max (us)."""
    brief = {k: v for k, v in walk.items() if not k.endswith("_us")}
    for key in ("mask_us", "accept_us"):
        values = walk[key]
        brief[key] = {"mean": float(np.mean(values)), "p50": percentile(values, 50), "p99": percentile(values, 99),
                      "max": max(values)}
    return brief


def _dist(values: list[float]) -> dict[str, Optional[float]]:
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "max": max(values) if values else None}


def summarize(lib, compiles: list[dict], walks: list[dict]) -> dict:
    mine = [r for r in compiles if r["library"] == lib.name]
    json_ok = [r for r in mine if r["kind"] == "json" and r["ok"]]
    one = [r for r in walks if r["library"] == lib.name and r["batch"] == 1]
    many = [r for r in walks if r["library"] == lib.name and r["batch"] > 1]
    mask1 = [x for r in one for x in r["mask_us"]]
    accept1 = [x for r in one for x in r["accept_us"]]
    summary = {
        "type": "summary", "library": lib.name, "version": lib.version, "tokenizer_setup_ms": lib.setup_ms,
        "json_compiled": len(json_ok), "json_cases": sum(r["kind"] == "json" for r in mine),
        "regex_compiled": sum(r["kind"] == "regex" and r["ok"] for r in mine),
        "regex_cases": sum(r["kind"] == "regex" for r in mine),
        "choice_compiled": sum(r["kind"] == "choice" and r["ok"] for r in mine),
        "choice_cases": sum(r["kind"] == "choice" for r in mine),
        "failures": {r["case"]: r["error"] for r in mine if not r["ok"]},
        "json_cold_ms": _dist([r["cold_ms"] for r in json_ok]),
        "json_cold_first_mask_ms": _dist([r["cold_ms"] + r["first_mask_ms"] for r in json_ok]),
        "json_cached_ms": _dist([r["cached_ms"] for r in json_ok]),
        "json_cached_first_mask_ms": _dist([r["cached_ms"] + r["cached_first_mask_ms"] for r in json_ok]),
        "json_copy_ms": _dist([r["copy_ms"] for r in json_ok]),
        "regex_choice_cold_ms": _dist([r["cold_ms"] for r in mine if r["kind"] != "json" and r["ok"]]),
        "batch1_steps": len(mask1), "batch1_mask_mean_us": float(np.mean(mask1)),
        "batch1_mask_p99_us": percentile(mask1, 99), "batch1_accept_mean_us": float(np.mean(accept1)),
        "walk_failures": [f"{r['case']}: {r['error']}" for r in one if not r["ok"]]
        + [f"batch {r['batch']}: {r['error']}" for r in many if not r["ok"]],
    }
    if hasattr(lib, "hf_tokenizer_ms"):
        summary["hf_tokenizer_load_ms"] = lib.hf_tokenizer_ms
    for r in many:
        summary.update({"batch": r["batch"], "batch_steps": r["steps"], "batch_mask_mean_us": float(np.mean(r["mask_us"])),
                        "batch_mask_p99_us": percentile(r["mask_us"], 99),
                        "batch_accept_mean_us": float(np.mean(r["accept_us"]))})
    return summary


def combine(summaries: list[dict]) -> dict:
    """One library's summaries of several repetitions -> the median of each number (of each
    percentile of a distribution), every failure seen; marked "rep": "median"."""
    combined: dict = {"rep": "median", "reps": len(summaries)}
    for key, value in summaries[0].items():
        values = [s.get(key) for s in summaries]
        if isinstance(value, bool) or not isinstance(value, (int, float, dict, list)) or all(v == value for v in values):
            combined[key] = value
        elif isinstance(value, (int, float)):
            combined[key] = percentile(values, 50)
        elif isinstance(value, list):
            combined[key] = sorted({x for v in values for x in v})
        elif all(isinstance(x, (int, float)) or x is None for x in value.values()):
            combined[key] = {k: percentile([v[k] for v in values if v[k] is not None], 50) for k in value}
        else:
            combined[key] = {k: x for v in values for k, x in v.items()}
    return combined


def table(summaries: list[dict]) -> str:
    def f(x, digits=2):
        return "-" if x is None else f"{x:.{digits}f}"

    def dist(d):
        return f"{f(d['p50'])} / {f(d['p90'])} / {f(d['max'])}"

    rows = [
        ("version", lambda s: s["version"]),
        ("tokenizer set-up (s)", lambda s: f(s["tokenizer_setup_ms"] / 1e3) + (
            f" (+{s['hf_tokenizer_load_ms'] / 1e3:.2f} HF tokenizer load)" if "hf_tokenizer_load_ms" in s else "")),
        ("JSON schemas compiled", lambda s: f"{s['json_compiled']} / {s['json_cases']}"),
        ("regexes compiled", lambda s: f"{s['regex_compiled']} / {s['regex_cases']}"),
        ("choice lists compiled", lambda s: f"{s['choice_compiled']} / {s['choice_cases']}"),
        ("JSON compile cold, ms p50 / p90 / max", lambda s: dist(s["json_cold_ms"])),
        ("compile cold + first mask, ms", lambda s: dist(s["json_cold_first_mask_ms"])),
        ("compile cached, ms", lambda s: dist(s["json_cached_ms"])),
        ("compile cached + first mask, ms", lambda s: dist(s["json_cached_first_mask_ms"])),
        ("copy of a fresh matcher, ms", lambda s: dist(s["json_copy_ms"])),
        ("regex and choice compile cold, ms", lambda s: dist(s["regex_choice_cold_ms"])),
        ("mask batch 1, us per step: mean / p99", lambda s: f"{f(s['batch1_mask_mean_us'], 1)} / {f(s['batch1_mask_p99_us'], 1)}"),
        ("accept token batch 1, us mean", lambda s: f(s["batch1_accept_mean_us"], 1)),
        ("mask batch 64, us per step: mean / p99", lambda s: f"{f(s.get('batch_mask_mean_us'), 0)} / {f(s.get('batch_mask_p99_us'), 0)}"),
        ("accept 64 tokens, us per step mean", lambda s: f(s.get("batch_accept_mean_us"), 0)),
        ("walks refused (mask or accept)", lambda s: str(len(s["walk_failures"]))),
    ]
    lines = ["| | " + " | ".join(s["library"] for s in summaries) + " |",
             "|---|" + "---|" * len(summaries)]
    lines += [f"| {label} | " + " | ".join(value(s) for s in summaries) + " |" for label, value in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the packaged Gemma 3 270M")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of each batched API")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=160, help="batched steps per library")
    parser.add_argument("--reps", type=int, default=3, help="whole repetitions; the table shows their medians")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.checkpoint is None:
        from backend.default_model import ensure_default_checkpoint
        args.checkpoint = ensure_default_checkpoint()
    config = json.loads((args.checkpoint / "config.json").read_text())
    vocab_size = config.get("vocab_size") or config["text_config"]["vocab_size"]
    eos_ids = [1, 106]  # <eos> and <end_of_turn>, what the engine stops on for Gemma 3
    progress(f"tokenizer set-up ({args.checkpoint.name}, vocabulary {vocab_size})")
    libs = []
    for library in (Llguidance, Xgrammar):
        try:
            libs.append(library(args.checkpoint, vocab_size, eos_ids, args.threads))
        except ImportError as e:  # xgrammar is not a dependency of the project: pip install xgrammar
            progress(f"skipping {library.name}: {e}")
    from transformers import AutoTokenizer
    hf_tokenizer = AutoTokenizer.from_pretrained(str(args.checkpoint))

    cases = ([("json", c.name, schema_text(c)) for c in JSON_CASES]
             + [("regex", c.name, c.pattern) for c in REGEX_CASES]
             + [("choice", c.name, c.choices) for c in CHOICE_CASES])
    walks = walk_tokens(hf_tokenizer, eos_ids[0])
    records, per_rep = [], []
    for rep in range(args.reps):
        for lib in libs:
            lib.clear_cache()
        progress(f"rep {rep + 1}/{args.reps}: compiling {len(cases)} cases, cold then cached")
        compiles, handles = compile_all(libs, cases, progress if rep == 0 else lambda msg: None)
        progress(f"rep {rep + 1}/{args.reps}: mask walks, batch 1 ({sum(map(len, walks.values()))} steps "
                 f"per library) and batch {args.batch} ({args.steps} steps)")
        walk_records = walk_batch1(libs, handles, walks) + walk_batch(libs, handles, walks, args.batch, args.steps)
        summaries = [summarize(lib, compiles, walk_records) for lib in libs]
        records += [{**r, "rep": rep} for r in compiles + [_brief(w) for w in walk_records] + summaries]
        per_rep.append(summaries)
    summaries = [combine([rep[i] for rep in per_rep]) for i in range(len(libs))]

    import torch

    from .run import machine
    run = {"type": "run", **machine(torch.device("cpu")), "loadavg": list(os.getloadavg()), "threads": args.threads,
           "libraries": {lib.name: lib.version for lib in libs},
           "checkpoint": args.checkpoint.name, "vocab_size": vocab_size, "eos_ids": eos_ids,
           "command": "python -m benchmarks.grammar_libraries " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as out:
        for record in [run, *records, *summaries]:
            out.write(json_line(record, digits=3) + "\n")
    print(table(summaries))
    for s in summaries:
        for case, error in s["failures"].items():
            print(f"{s['library']} does not compile {case}: {error}")
        for failure in s["walk_failures"]:
            print(f"{s['library']} refused a valid instance: {failure}")
    progress(f"wrote {args.out}")


if __name__ == "__main__":
    main()
