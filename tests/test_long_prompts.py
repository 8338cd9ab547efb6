"""benchmarks/long_prompts.py: its prompts defeat prefix caching and have the asked length; its
table reads the records it wrote. (The measurement itself runs on the GPU: docs/benchmarks.md.)"""
import argparse

from backend.tokenizer import Tokenizer
from benchmarks.long_prompts import distinct_prompts, markdown


def test_prompts_differ_from_their_first_token_and_have_about_the_asked_length(default_checkpoint):
    tokenizer = Tokenizer(default_checkpoint)
    prompts = distinct_prompts(tokenizer, 6, 200, seed=1)
    ids = [tokenizer.encode(p) for p in prompts]
    assert all(195 <= len(i) <= 205 for i in ids), [len(i) for i in ids]
    assert len({tuple(i[:2]) for i in ids}) == 6  # the BOS and then a different first token each
    assert distinct_prompts(tokenizer, 6, 200, seed=1) == prompts
    assert distinct_prompts(tokenizer, 6, 200, seed=2) != prompts


def record(kind, system, **values):
    base = {"prompt_tokens_per_s": None, "tokens_per_s": None, "ttft_ms": {"p50": None}, "itl_ms": {"p50": None}}
    return {**base, "type": kind, "system": system, **values}


def test_table_has_medians_and_server_over_engine_ratios():
    records = [record("prefill", "server", prompt_tokens_per_s=v) for v in (900.0, 1000.0, 1100.0)]
    records += [record("prefill", "engine_direct", prompt_tokens_per_s=v) for v in (2000.0, 1900.0, 2100.0)]
    records += [record("server", "server", tokens_per_s=300.0, ttft_ms={"p50": 50.0}, itl_ms={"p50": 10.0}),
                record("server", "engine_direct", tokens_per_s=400.0, ttft_ms={"p50": 40.0}, itl_ms={"p50": 8.0})]
    table = markdown(records, argparse.Namespace(prompt_tokens=1024, clients=64)).splitlines()
    assert table[0].startswith("| 1024-token prompts |")
    assert table[2] == "| prefill, bursts of 8: prompt tok/s | 1,000.0 | 2,000.0 | 0.50 |"
    assert table[3] == "| 64 clients x 64 new tokens: tok/s | 300.0 | 400.0 | 0.75 |"
    assert table[4] == "| 64 clients: TTFT p50 ms | 50.0 | 40.0 | 1.25 |"
