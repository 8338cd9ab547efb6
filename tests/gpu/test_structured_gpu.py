"""Structured outputs on the GPU engine (TE, CUDA graphs, async scheduling): the grammar's mask is
applied to the logits a graph replay wrote, outside the graph, and a batch holding constrained
sequences gives the tokens of steps run one at a time.

A tiny random Gemma 3 with the real Gemma 3 tokenizer (the grammars need its vocabulary): the
constraints used here complete within a few tokens whatever the weights, so each output is checked
whole. The tokenizer comes from GEMMA_TOKENIZER_DIR, or the serving carry's copy
(.gpu-serving/tokenizer.json.gz, scripts/prepare-gpu-serving-carry.sh).
"""
import gzip
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.engine_runs import wait_idle
from tests.gpu.helpers import report, requires_te
from tests.tiny_models import write_checkpoint

pytestmark = [pytest.mark.gpu, requires_te]
ROOT = Path(__file__).resolve().parents[2]
RECORD = {"type": "object", "additionalProperties": False, "required": ["ok", "size"],
          "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}}}
CONSTRAINTS = [
    ({"regex": r"\d{3}-\d{4}"}, lambda text: re.fullmatch(r"\d{3}-\d{4}", text)),
    ({"choice": ["red", "green", "blue"]}, lambda text: text in ("red", "green", "blue")),
    ({"json": RECORD, "disable_any_whitespace": True}, lambda text: set(json.loads(text)) == {"ok", "size"}),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = os.environ.get("GEMMA_TOKENIZER_DIR")
    if tokenizer is None:
        packed = ROOT / ".gpu-serving" / "tokenizer.json.gz"
        if not packed.exists():
            pytest.skip("needs the Gemma 3 tokenizer: GEMMA_TOKENIZER_DIR or .gpu-serving/tokenizer.json.gz")
        tokenizer = tmp_path_factory.mktemp("tokenizer")
        with gzip.open(packed, "rb") as src, open(tokenizer / "tokenizer.json", "wb") as dst:
            shutil.copyfileobj(src, dst)
        shutil.copy(packed.parent / "tokenizer_config.json", tokenizer / "tokenizer_config.json")
    return write_checkpoint(tmp_path_factory.mktemp("gemma3"), "gemma3_text", seed=3, tokenizer_dir=Path(tokenizer))


def test_constraints_hold_in_graph_replays_and_async_steps_match_steps_one_at_a_time(checkpoint):
    from backend.loader import start_engine
    from backend.params import EngineConfig, SamplingParams

    prompts = ["The phone number is", "My favourite colour is", "Record:", "Answer in JSON:"]

    def run(scheduling):
        engine = start_engine(EngineConfig(checkpoint=str(checkpoint), engine="te", device="cuda", dtype="float32",
                                           async_scheduling=scheduling, max_num_seqs=16, kv_cache_bytes=256 << 20))
        try:
            kinds = [SamplingParams(max_tokens=24, temperature=0, structured_outputs=c) for c, _ in CONSTRAINTS]
            kinds += [SamplingParams(max_tokens=24, temperature=0.8, seed=11, structured_outputs=CONSTRAINTS[2][0]),
                      SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)]  # plain rows beside them
            handles = [engine.submit(p, params) for params in kinds for p in prompts]
            outputs = [h.result() for h in handles]
            assert wait_idle(engine).kv_cache.used_blocks == 0
            replays = sum(e.replays for e in engine.core.runner.graphs.entries.values())
            return outputs, replays
        finally:
            engine.shutdown()

    (overlapped, replays), (one_at_a_time, _) = run("on"), run("off")
    checks = [check for _, check in CONSTRAINTS] + [CONSTRAINTS[2][1]]
    for i, out in enumerate(overlapped[:len(checks) * len(prompts)]):
        assert out.finish_reason == "stop" and checks[i // len(prompts)](out.text), out
    same = [(a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason) for a, b in zip(overlapped, one_at_a_time)]
    report(test="structured_outputs_gpu", identical=same, decode_replays=replays,
           texts=[o.text for o in overlapped[:len(checks) * len(prompts)]])
    assert replays > 0 and all(same)
