"""Our reference model against HF transformers (the oracle), per family, through the paged cache."""
import pytest
import torch

from backend.batch import HostToDevice, SeqChunk
from backend.kv_cache import PagedKVCache
from backend.weights import load_reference_model
from tests.tiny_models import hf_model

FP32_ATOL = 2e-5  # observed ~1e-6 on logits of magnitude ~1; fp32 rounding in a different op order
FAMILIES = ["gemma", "gemma2", "gemma3_text"]


def run_steps(model, cfg, prompt: list[int], prefill: int, chunk: int = 5):
    """Prefill `prefill` tokens in chunks of `chunk`, then decode the rest one token per step;
    return the logits at every position from prefill-1 on."""
    kv = PagedKVCache(cfg, num_blocks=64, block_size=4, dtype=torch.float32, device="cpu")
    blocks = kv.pool.allocate(kv.blocks_for(len(prompt)))
    cpu = HostToDevice("cpu")
    logits = []
    for start in range(0, prefill, chunk):
        end = min(start + chunk, prefill)
        ids, layout = model.attention.build_step([SeqChunk(prompt[start:end], start, blocks, end == prefill)], 4, cpu)
        out = model(ids, layout, kv)
    logits.append(out)
    for pos in range(prefill, len(prompt)):
        ids, layout = model.attention.build_step([SeqChunk([prompt[pos]], pos, blocks, True)], 4, cpu)
        logits.append(model(ids, layout, kv))
    return torch.cat(logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_match_hf(family, tmp_path):
    hf = hf_model(family, seed=3)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, cfg = load_reference_model(tmp_path, torch.float32, "cpu")
    prompt = torch.randint(0, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
    # 30 tokens > the sliding window of 8: local layers must forget what HF forgets.
    got = run_steps(model, cfg, prompt, prefill=17)
    torch.testing.assert_close(got, expected[16:], atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_decode_matches_single(family, tmp_path):
    """Sequences of different lengths decoded in one batch give the logits each gives alone."""
    hf_model(family, seed=4).save_pretrained(tmp_path, safe_serialization=True)
    model, cfg = load_reference_model(tmp_path, torch.float32, "cpu")
    kv = PagedKVCache(cfg, num_blocks=64, block_size=4, dtype=torch.float32, device="cpu")
    cpu = HostToDevice("cpu")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (3, 11, 20)]
    tables = [kv.pool.allocate(kv.blocks_for(len(p))) for p in prompts]
    for p, t in zip(prompts, tables):  # prefill all but the last token of each
        model(*model.attention.build_step([SeqChunk(p[:-1], 0, t, True)], 4, cpu), kv)
    chunks = [SeqChunk([p[-1]], len(p) - 1, t, True) for p, t in zip(prompts, tables)]
    batched = model(*model.attention.build_step(chunks, 4, cpu), kv)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            expected = hf_model(family, seed=4)(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(batched[i], expected, atol=FP32_ATOL, rtol=0)


def test_strict_loading_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from backend.weights import CheckpointError

    hf_model("gemma3_text").save_pretrained(tmp_path, safe_serialization=True)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    missing = dict(state)
    del missing["model.layers.2.mlp.up_proj.weight"]
    save_file(missing, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.2.mlp.up_proj.weight"):
        load_reference_model(tmp_path, torch.float32, "cpu")
    save_file(state | {"model.extra.weight": torch.zeros(2)}, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.extra.weight"):
        load_reference_model(tmp_path, torch.float32, "cpu")
    bad = dict(state)
    bad["model.norm.weight"] = torch.zeros(63)
    save_file(bad, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.norm.weight.*\(63,\)"):
        load_reference_model(tmp_path, torch.float32, "cpu")


def test_refuses_pickled_checkpoints(tmp_path):
    from backend.weights import CheckpointError

    hf_model("gemma").save_pretrained(tmp_path, safe_serialization=False)
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_reference_model(tmp_path, torch.float32, "cpu")


def test_sharded_checkpoint_loads(tmp_path):
    hf = hf_model("gemma2", seed=5)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, cfg = load_reference_model(tmp_path, torch.float32, "cpu")
    prompt = list(range(1, 10))
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(run_steps(model, cfg, prompt, prefill=9)[0], expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_prepacked_weights_match_hf(family, tmp_path):
    """The engine's CPU model (oneDNN-prepacked weights) computes the same logits as HF."""
    from backend.model import prepare_for_cpu

    hf = hf_model(family, seed=6)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, cfg = load_reference_model(tmp_path, torch.float32, "cpu")
    prepare_for_cpu(model)
    prompt = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(run_steps(model, cfg, prompt, prefill=12), expected[11:], atol=FP32_ATOL, rtol=0)
