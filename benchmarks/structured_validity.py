"""Structured outputs through the engine: do the outputs hold to their constraint, and what does a
constraint cost (issue #26, "Measure").

    python -m benchmarks.structured_validity [--only validity|cost] [--checkpoint DIR] [--temperature 0.8]
        [--closed] [--no-whitespace] [--repetition-penalty 1.0] [--modes greedy,sampled]
        [--kinds json,json_object,regex,choice,grammar] [--cases NAME,...]
        [--cost-prompts 16] [--cost-reps 6] [--cost-max-tokens 64]
        [--out docs/benchmarks/structured_validity_cpu.jsonl]

Validity: every case of benchmarks/structured_cases.py (JSON schemas, regexes, choice lists, Lark
grammars, and `json_object` on the first JSON prompts), greedy and sampled (--temperature, seeded),
all submitted at once to one in-process engine. A JSON output must parse and validate with
`jsonschema` (formats checked: date, date-time, time, email, uuid, uri, ipv4); a regex output must
`re.fullmatch`; a choice output must be exactly one of the choices; a grammar output must fullmatch
the case's equivalent Python regex. The finish reason of each is recorded ("stop" expected).

Each failed output gets a cause from its text: undeclared properties, whitespace, digits or a
string without end, an object or array that kept growing (all cut by max_tokens), or the engine's
finish reason ("invalid": the constraint did not compile).

Cost: the first --cost-prompts JSON prompts, 8 streams (a closed loop: each stream submits its next
request when one finishes), constrained (greedy) and unconstrained with each request's max_tokens
set to what its constrained run generated and EOS ignored, so both decode exactly the same tokens
per request; --cost-reps such pairs, rep 0 constrained first and compiling cold, later reps
alternating which runs first. Output tokens per second of each, of the wall clock and of this
process's CPU time (every thread: the engine's, the grammar library's; other processes on a shared
machine move it much less than the wall clock), and their ratios per rep. Also the compile
time of each JSON case as backend.grammar's compiler sees it, cold and cached.

Writes one JSON line per request and per run to --out (the last line is the summary) and prints
the tables.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import queue
import re
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Optional

from .stats import json_line, median, percentile, ratio
from .structured_cases import CHOICE_CASES, GRAMMAR_CASES, JSON_CASES, REGEX_CASES

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "structured_validity_cpu.jsonl"
JSON_OBJECT_CASES = 6  # `json_object: true` on this many JSON prompts
COST_STREAMS = 8


def format_checker():
    """jsonschema's format checker, with the formats our schemas use that it checks only when extra
    packages are installed (date-time, time, uri) checked here by the standard library."""
    import jsonschema
    checker = jsonschema.FormatChecker()

    @checker.checks("date-time", raises=ValueError)
    def _date_time(value: object) -> bool:
        return not isinstance(value, str) or bool(
            re.fullmatch(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", value)
            and dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00")))

    @checker.checks("time", raises=ValueError)
    def _time(value: object) -> bool:
        return not isinstance(value, str) or bool(
            re.fullmatch(r"\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", value)
            and dt.time.fromisoformat(value.upper().replace("Z", "+00:00")))

    @checker.checks("uri", raises=ValueError)
    def _uri(value: object) -> bool:
        return not isinstance(value, str) or bool(urllib.parse.urlsplit(value).scheme
                                                  and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:\S*", value))

    @checker.checks("uuid", raises=ValueError)
    def _uuid(value: object) -> bool:
        return not isinstance(value, str) or bool(uuid.UUID(value))

    @checker.checks("ipv4", raises=ValueError)
    def _ipv4(value: object) -> bool:
        return not isinstance(value, str) or bool(ipaddress.IPv4Address(value))

    return checker


def check_json(text: str, schema: Optional[dict], checker) -> Optional[str]:
    """None if `text` is a JSON value valid for `schema` (None: any JSON object), else why not."""
    import jsonschema
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"does not parse: {e}"
    if schema is None:
        return None if isinstance(value, dict) else f"not an object: {type(value).__name__}"
    error = jsonschema.exceptions.best_match(
        jsonschema.validators.validator_for(schema)(schema, format_checker=checker).iter_errors(value))
    return None if error is None else f"invalid at {'/'.join(map(str, error.absolute_path)) or 'top'}: {error.message}"


def validity_requests(temperature: float, no_whitespace: bool, closed: bool, modes: list[str],
                      repetition_penalty: float = 1.0) -> list[dict]:
    """Every (case, mode) to run: kind, case name, prompt, StructuredOutputs, max_tokens, and how to
    check the output (`check(text) -> None or why not`)."""
    from backend.params import StructuredOutputs
    checker = format_checker()
    ws = {"disable_any_whitespace": True} if no_whitespace else {}
    options = {**ws, "disable_additional_properties": True} if closed else ws
    cases = []
    for case in JSON_CASES:
        cases.append(("json", case.name, case.prompt, StructuredOutputs(json=case.schema, **options),
                      case.max_tokens, lambda text, schema=case.schema: check_json(text, schema, checker)))
    schemas = {case.name: case.schema for case in JSON_CASES}
    for case in JSON_CASES[:JSON_OBJECT_CASES]:
        cases.append(("json_object", case.name, case.prompt, StructuredOutputs(json_object=True, **ws),
                      case.max_tokens, lambda text: check_json(text, None, checker)))
    for case in REGEX_CASES:
        cases.append(("regex", case.name, case.prompt, StructuredOutputs(regex=case.pattern), case.max_tokens,
                      lambda text, p=case.pattern: None if re.fullmatch(p, text) else f"does not match {p}"))
    for case in CHOICE_CASES:
        cases.append(("choice", case.name, case.prompt, StructuredOutputs(choice=case.choices), case.max_tokens,
                      lambda text, c=case.choices: None if text in c else "not one of the choices"))
    for case in GRAMMAR_CASES:
        cases.append(("grammar", case.name, case.prompt, StructuredOutputs(grammar=case.lark), case.max_tokens,
                      lambda text, p=case.check: None if re.fullmatch(p, text) else f"does not match {p}"))
    requests = []
    for mode, temp in (("greedy", 0.0), ("sampled", temperature)):
        if mode not in modes:
            continue
        for index, (kind, name, prompt, constraint, max_tokens, check) in enumerate(cases):
            requests.append({"kind": kind, "case": name, "mode": mode, "prompt": prompt, "check": check,
                             "schema": schemas[name] if kind == "json" else None,
                             "params": dict(max_tokens=max_tokens, temperature=temp, seed=1000 + index,
                                            repetition_penalty=repetition_penalty, structured_outputs=constraint)})
    return requests


def declared_properties(schema: Any) -> Optional[set[str]]:
    """Every property name a schema declares, at any depth; None where some object takes keys of
    any name by an additionalProperties schema (then no key is undeclared)."""
    names: set[str] = set()

    def walk(node: Any) -> bool:
        if isinstance(node, list):
            return all(walk(x) for x in node)
        if not isinstance(node, dict):
            return True
        if isinstance(node.get("additionalProperties"), dict):
            return False
        names.update(node.get("properties", {}))
        return all(walk(v) for v in node.values())

    return names if walk(schema) else None


def why_not_done(text: str, finish_reason: str, error: Optional[str], schema: Any = None) -> Optional[str]:
    """What kept a failed output from finishing, by what its text holds and ends with."""
    if finish_reason not in ("length", "stop"):
        return finish_reason
    if finish_reason == "stop":
        return "complete but invalid"
    declared = declared_properties(schema) if schema is not None else None
    if declared is not None and set(re.findall(r'"([^"\\]{1,80})"\s*:', text)) - declared:
        return "undeclared properties without end"
    if re.search(r"\s{24,}$", text):
        return "whitespace without end"
    if re.search(r"[0-9]{24,}$", text):
        return "digits without end"
    if error and "Unterminated string" in error:
        return "string without end"
    return "length (an object or array kept growing)"


def run_validity(engine, requests: list[dict], progress) -> list[dict]:
    """Submit every request at once; check each output as it finishes."""
    from backend.params import SamplingParams
    start = time.perf_counter()
    handles = [engine.submit(r["prompt"], SamplingParams(**r["params"])) for r in requests]
    records = []
    for done, (r, handle) in enumerate(zip(requests, handles), 1):
        out = handle.result()
        why = r["check"](out.text) if out.finish_reason in ("stop", "length") else out.error or out.finish_reason
        records.append({"type": "validity", "kind": r["kind"], "case": r["case"], "mode": r["mode"],
                        "ok": why is None and out.finish_reason == "stop", "finish_reason": out.finish_reason,
                        "output_tokens": out.num_output_tokens, "max_tokens": r["params"]["max_tokens"],
                        "error": why, "text": out.text})
        if not records[-1]["ok"]:
            records[-1]["cause"] = why_not_done(out.text, out.finish_reason, why, r.get("schema"))
        if done % 20 == 0 or done == len(requests):
            progress(f"  {done}/{len(requests)} checked, {time.perf_counter() - start:.0f} s")
    return records


def closed_loop(engine, jobs: list[tuple[str, Any]], streams: int, cpu: Optional[list] = None) -> tuple[float, list]:
    """Run (prompt, SamplingParams) jobs with `streams` in flight; returns (wall seconds, outputs in
    job order). With `cpu`, appends the CPU seconds this process spent (every thread: the engine's,
    the grammar library's)."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for i, job in enumerate(jobs):
        todo.put((i, job))
    outputs: list = [None] * len(jobs)

    def stream() -> None:
        while True:
            try:
                i, (prompt, params) = todo.get_nowait()
            except queue.Empty:
                return
            outputs[i] = engine.submit(prompt, params).result()

    threads = [threading.Thread(target=stream) for _ in range(streams)]
    start, start_cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if cpu is not None:
        cpu.append(time.process_time() - start_cpu)
    return time.perf_counter() - start, outputs


def run_cost(engine, prompts: int, reps: int, max_tokens: int, no_whitespace: bool, closed: bool,
             progress) -> list[dict]:
    """Constrained and unconstrained (the same tokens per request) `reps` times; rep 0 compiles
    cold and runs constrained first, later reps alternate which runs first (a busy machine then
    slows both alike)."""
    import dataclasses

    from backend.params import SamplingParams, StructuredOutputs
    options = {"disable_any_whitespace": no_whitespace, "disable_additional_properties": closed}
    constrained = [(c.prompt, SamplingParams(max_tokens=min(c.max_tokens, max_tokens), temperature=0,
                                             structured_outputs=StructuredOutputs(json=c.schema, **options)))
                   for c in JSON_CASES[:prompts]]
    free: list = []
    records = []
    for rep in range(reps):
        order = ("constrained", "unconstrained") if rep % 2 == 0 else ("unconstrained", "constrained")
        for system in order:
            cpu: list[float] = []
            wall, outs = closed_loop(engine, constrained if system == "constrained" else free, COST_STREAMS, cpu)
            tokens = [o.num_output_tokens for o in outs]
            records.append({"type": "cost", "rep": rep, "system": system, "requests": len(outs),
                            "output_tokens": sum(tokens), "wall_s": wall, "tok_s": sum(tokens) / wall,
                            "cpu_s": cpu[0], "tok_per_cpu_s": sum(tokens) / cpu[0], "loadavg": os.getloadavg()[0],
                            "finish_reasons": sorted({o.finish_reason for o in outs}, key=str)})
            if system == "constrained" and not free:  # the unconstrained twin of each request
                free = [(prompt, dataclasses.replace(params, structured_outputs=None, ignore_eos=True, max_tokens=n))
                        for (prompt, params), n in zip(constrained, tokens)]
        mine = {r["system"]: r for r in records if r["rep"] == rep}
        progress(f"  cost rep {rep}: constrained {mine['constrained']['tok_s']:.1f} tok/s "
                 f"({mine['constrained']['tok_per_cpu_s']:.1f} per CPU s), unconstrained "
                 f"{mine['unconstrained']['tok_s']:.1f} ({mine['unconstrained']['tok_per_cpu_s']:.1f})")
    return records


def engine_compile_times(engine, closed: bool) -> dict:
    """Compile time of each JSON case as the engine's compiler sees it (backend.grammar, its own
    cache and threads, not the running engine's instance): cold (the first time, the tokenizer built
    beforehand) and cached (the same constraint again, plus the per-sequence matcher copy)."""
    from backend.grammar import GrammarCompiler
    from backend.params import StructuredOutputs
    compiler = GrammarCompiler(Path(engine.config.checkpoint) / "tokenizer.json", engine.tokenizer.vocab_size,
                               engine.tokenizer.eos_token_ids, on_done=lambda: None)
    try:
        limit = engine.config.grammar_compile_timeout_s
        compiler.compile(StructuredOutputs(json_object=True), limit).result()  # builds the tokenizer (~2 s)
        constraints = [StructuredOutputs(json=c.schema, disable_additional_properties=closed) for c in JSON_CASES]
        times: dict[str, list[float]] = {"cold": [], "cached": []}
        failed = {}
        for label in ("cold", "cached"):
            for case, constraint in zip(JSON_CASES, constraints):
                start = time.perf_counter()
                try:
                    compiler.compile(constraint, limit).result().deep_copy()  # each sequence gets a copy
                except ValueError as e:  # GrammarError: counted apart, not timed
                    failed[case.name] = str(e)
                    continue
                times[label].append(time.perf_counter() - start)
    finally:
        compiler.shutdown()
    return {**{label: {"p50": percentile(values, 50) * 1e3, "p90": percentile(values, 90) * 1e3,
                       "max": max(values) * 1e3, "n": len(values)} for label, values in times.items()},
            "failed": failed}


def summarize(validity: list[dict], cost: list[dict], compile_ms: Optional[dict]) -> dict:
    groups: dict[str, dict] = {}
    for r in validity:
        g = groups.setdefault(f"{r['kind']} {r['mode']}", {"requests": 0, "valid": 0, "finish_reasons": {}})
        g["requests"] += 1
        g["valid"] += r["ok"]
        g["finish_reasons"][r["finish_reason"]] = g["finish_reasons"].get(r["finish_reason"], 0) + 1
    summary: dict[str, Any] = {"type": "summary", "validity": groups,
                               "failures": [{k: r[k] for k in ("kind", "case", "mode", "finish_reason", "cause", "error",
                                                               "text")} for r in validity if not r["ok"]]}
    causes: dict[str, int] = {}
    for f in summary["failures"]:
        causes[f["cause"]] = causes.get(f["cause"], 0) + 1
    summary["failure_causes"] = causes
    if cost:
        by_rep: dict[int, dict[str, dict]] = {}
        for c in cost:
            by_rep.setdefault(c["rep"], {})[c["system"]] = c
        pairs = [ratio(r["constrained"]["tok_s"], r["unconstrained"]["tok_s"]) for _, r in sorted(by_rep.items())]
        cpu_pairs = [ratio(r["constrained"]["tok_per_cpu_s"], r["unconstrained"]["tok_per_cpu_s"])
                     for _, r in sorted(by_rep.items())]

        def med(system: str, key: str) -> Optional[float]:
            return median([c[key] for c in cost if c["system"] == system])
        summary["cost"] = {"constrained_tok_s": med("constrained", "tok_s"),
                           "unconstrained_tok_s": med("unconstrained", "tok_s"),
                           "constrained_tok_per_cpu_s": med("constrained", "tok_per_cpu_s"),
                           "unconstrained_tok_per_cpu_s": med("unconstrained", "tok_per_cpu_s"),
                           "ratio_per_rep": pairs, "ratio_median": median(pairs),
                           "ratio_cached_median": median(pairs[1:] or pairs),
                           "cpu_ratio_per_rep": cpu_pairs, "cpu_ratio_median": median(cpu_pairs),
                           "cpu_ratio_cached_median": median(cpu_pairs[1:] or cpu_pairs)}
    if compile_ms is not None:
        summary["engine_compile_ms"] = compile_ms
    return summary


def tables(summary: dict) -> str:
    lines = ["| constraint | mode | valid | finish reasons |", "|---|---|---|---|"]
    for key, g in summary["validity"].items():
        kind, mode = key.split(" ")
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(g["finish_reasons"].items(), key=str))
        lines.append(f"| {kind} | {mode} | {g['valid']} / {g['requests']} | {reasons} |")
    if summary["failure_causes"]:
        lines += ["", "| why the failed outputs failed | outputs |", "|---|---|"]
        lines += [f"| {cause} | {n} |" for cause, n in sorted(summary["failure_causes"].items(), key=lambda x: -x[1])]
    if "cost" in summary:
        c = summary["cost"]
        lines += ["", "| 8 streams | output tok/s (wall, median) | output tokens per CPU second (median) |",
                  "|---|---|---|",
                  f"| constrained (JSON schema) | {c['constrained_tok_s']:.1f} | {c['constrained_tok_per_cpu_s']:.1f} |",
                  f"| unconstrained, same tokens | {c['unconstrained_tok_s']:.1f} | {c['unconstrained_tok_per_cpu_s']:.1f} |",
                  f"| constrained / unconstrained per rep (rep 0 compiles cold) | "
                  f"{', '.join(f'{x:.3f}' for x in c['ratio_per_rep'])} (median {c['ratio_median']:.3f}) | "
                  f"{', '.join(f'{x:.3f}' for x in c['cpu_ratio_per_rep'])} (median {c['cpu_ratio_median']:.3f}) |"]
    if "engine_compile_ms" in summary:
        lines += ["", "| engine compile, ms (backend.grammar) | p50 | p90 | max |", "|---|---|---|---|"]
        lines += [f"| {label} ({d['n']} schemas) | {d['p50']:.2f} | {d['p90']:.2f} | {d['max']:.2f} |"
                  for label, d in summary["engine_compile_ms"].items() if label != "failed"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("validity", "cost"), default=None)
    parser.add_argument("--checkpoint", default=None, help="default: the packaged Gemma 3 270M")
    parser.add_argument("--temperature", type=float, default=0.8, help="of the sampled (seeded) run")
    parser.add_argument("--no-whitespace", action="store_true", help="JSON with disable_any_whitespace")
    parser.add_argument("--closed", action="store_true",
                        help="JSON schemas with disable_additional_properties (objects take only the properties named)")
    parser.add_argument("--modes", default="greedy,sampled", help="greedy, sampled or both")
    parser.add_argument("--cost-prompts", type=int, default=16)
    parser.add_argument("--cost-reps", type=int, default=6)
    parser.add_argument("--cost-max-tokens", type=int, default=64, help="cap on each cost request's max_tokens")
    parser.add_argument("--kinds", default="json,json_object,regex,choice,grammar", help="constraint kinds to check")
    parser.add_argument("--cases", default=None, help="only these cases (comma-separated names)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="of every validity request")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from backend.loader import start_engine
    from backend.params import EngineConfig
    engine = start_engine(EngineConfig(checkpoint=args.checkpoint))
    validity, cost = [], []
    try:
        if args.only in (None, "validity"):
            requests = [r for r in validity_requests(args.temperature, args.no_whitespace, args.closed,
                                                     args.modes.split(","), args.repetition_penalty)
                        if r["kind"] in args.kinds.split(",") and (not args.cases or r["case"] in args.cases.split(","))]
            progress(f"validity: {len(requests)} requests")
            validity = run_validity(engine, requests, progress)
        if args.only in (None, "cost"):
            progress(f"cost: {args.cost_prompts} JSON prompts, {COST_STREAMS} streams, {args.cost_reps} reps")
            cost = run_cost(engine, args.cost_prompts, args.cost_reps, args.cost_max_tokens, args.no_whitespace,
                            args.closed, progress)
        compile_ms = engine_compile_times(engine, args.closed) if args.only in (None, "cost") else None
    finally:
        engine.shutdown()
    summary = summarize(validity, cost, compile_ms)
    from .run import machine
    run = {"type": "run", **machine(engine.device), "loadavg": list(os.getloadavg()),
           "engine_config": dict(vars(engine.config)),
           "command": "python -m benchmarks.structured_validity " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as out:
        for record in [run, *validity, *cost, summary]:
            out.write(json_line(record) + "\n")
    print(tables(summary))
    for f in summary["failures"]:
        print(f"FAILED {f['kind']} {f['case']} ({f['mode']}, {f['cause']}): {f['error']}\n    {f['text'][:300]!r}")
    progress(f"wrote {args.out}")


if __name__ == "__main__":
    main()
