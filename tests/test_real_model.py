"""The real Gemma 3 270M (packaged GGUF, converted): our greedy tokens equal HF generate's."""
import pytest
import torch

from backend.loader import start_engine
from backend.params import EngineConfig, SamplingParams

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def engine(default_checkpoint):
    eng = start_engine(EngineConfig(checkpoint=str(default_checkpoint), dtype="float32", device="cpu"))
    yield eng
    eng.shutdown()


def test_greedy_tokens_match_hf_generate(engine, default_checkpoint):
    """As ignore_eos, and as min_tokens (HF's min_new_tokens: EOS masked until then), each batched."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_checkpoint, dtype=torch.float32).eval()
    ways = {"ignore_eos": dict(ignore_eos=True), "min_tokens": dict(min_tokens=NEW_TOKENS)}
    handles = {(prompt, way): engine.submit(prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, **options))
               for way, options in ways.items() for prompt in PROMPTS}
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False)
        expected = out[0, len(ids):].tolist()
        for way in ways:
            got = handles[prompt, way].result()
            assert got.token_ids == expected, (prompt, way)
            assert got.text == engine.tokenizer.decode(expected)


def test_writes_coherent_text(engine):
    out = engine.submit("The capital of France is", SamplingParams(max_tokens=8, temperature=0)).result()
    assert "France" in out.text or "Paris" in out.text
