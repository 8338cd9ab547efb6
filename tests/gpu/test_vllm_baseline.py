"""benchmarks/vllm_baseline.py on the real vLLM (GPU machine, after ~/vllm-carry/run.sh installed it):
both parts on a 2-layer gemma-2b-wide checkpoint give their records and every request its tokens.

    PYTHONPATH=~/vllm-site python3 -m pytest -q tests/gpu/test_vllm_baseline.py

The tokenizer is the one .gpu-serving/run.sh or ~/vllm-carry/run.sh unpacks ($GEMMA_TOKENIZER, default
/tmp/gemma-serving/tokenizer). Skipped where vLLM, CUDA or that tokenizer is missing (the CPU machine).
"""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks import vllm_baseline

TOKENIZER = Path(os.environ.get("GEMMA_TOKENIZER", "/tmp/gemma-serving/tokenizer"))

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                                 reason="needs vLLM (PYTHONPATH=~/vllm-site) and CUDA"),
              pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").exists(), reason=f"no tokenizer in {TOKENIZER}")]


def test_both_parts_measure_a_small_gemma(tmp_path):
    out = tmp_path / "vllm.jsonl"
    assert vllm_baseline.main(["--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", str(TOKENIZER), "--layers", "2",
                               "--batches", "1,4", "--prompt", "16", "--new", "8", "--reps", "1",
                               "--concurrencies", "1,4", "--server-tokens", "8", "--requests-per-client", "2",
                               "--server-reps", "1", "--gpu-memory-utilization", "0.3", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r for r in records if r["kind"] in ("error", "retry")] == []
    offline = [r for r in records if r["kind"] == "vllm_offline"]
    assert [r["batch"] for r in offline] == [1, 4] and all(r["decode_tok_s"] > 0 for r in offline)
    server = [r for r in records if r["kind"] == "vllm_serving"]
    assert [r["concurrency"] for r in server] == [1, 4]
    assert all(r["errors"] == 0 and r["output_tokens"] == 8 * r["requests"] for r in server)
