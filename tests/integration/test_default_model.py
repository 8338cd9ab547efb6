"""The shipped repository with no overrides: the packaged Gemma 3 270M, served on the CPU."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
GREEDY_24 = json.dumps({"max_tokens": 24, "temperature": 0.0})


def test_default_model_serves_what_the_engine_generates(default_server):
    from backend.loader import start_engine
    from backend.params import EngineConfig, SamplingParams

    engine = start_engine(EngineConfig(kv_cache_bytes=64 << 20))
    try:
        expected = engine.submit(PROMPT, SamplingParams(max_tokens=24, temperature=0.0)).result()
    finally:
        engine.shutdown()
    whole = default_server.stream(PROMPT, sampling_parameters=GREEDY_24, exclude_input_in_output=True)
    streamed = default_server.stream(PROMPT, sampling_parameters=GREEDY_24, stream=True)
    assert expected.text.strip()
    assert whole.text == streamed.text == expected.text
    assert whole.token_ids == streamed.token_ids == expected.token_ids
    assert whole.finish_reason == expected.finish_reason


def test_default_model_over_http(default_server):
    status, body = default_server.post("/v2/models/gemma/generate",
                                       {"text_input": PROMPT, "sampling_parameters": GREEDY_24})
    assert status == 200, body
    reply = json.loads(body)
    assert reply["text_output"].startswith(PROMPT) and len(reply["text_output"]) > len(PROMPT)
    assert default_server.metric("gemma_kv_blocks_total") > 0
