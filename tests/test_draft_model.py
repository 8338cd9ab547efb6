"""Speculative decoding with a draft model (method draft_model): the layer-truncated draft checkpoint,
the refusals when the engine starts, and the engine's outputs with a draft against without (greedy
token for token, seeded sampling seed for seed, the sampled distribution), with the draft's KV cache
given back on finish, preemption and cancellation."""
import json

import pytest
import torch

from backend.config import GemmaConfig
from backend.draft_checkpoint import write_draft_checkpoint
from backend.draft_model import check_draft_checkpoint, draft_proposer
from backend.kv_cache import bytes_per_block
from backend.params import EngineConfig, SamplingParams, SpeculativeConfig
from tests.test_speculative import (GREEDY, SEEDED, Core, check_same, check_sampled_distribution, mixed_requests,
                                    plain_prompt, repeating_prompt)
from tests.tiny_models import hf_model, write_checkpoint


def draft_config(path, k=3):
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k}


def test_the_method_is_draft_model_when_a_model_is_named_as_in_vllm():
    config = EngineConfig(speculative_config={"model": "/models/draft", "num_speculative_tokens": 4,
                                              "draft_tensor_parallel_size": 1})
    assert config.speculative() == SpeculativeConfig(method="draft_model", model="/models/draft",
                                                     num_speculative_tokens=4, draft_tensor_parallel_size=1)


# --- the draft checkpoint -------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_a_truncated_draft_is_the_first_layers_then_the_final_norm_and_head(family, tmp_path):
    src = write_checkpoint(tmp_path / "src", family, seed=4)
    (src / "tokenizer.json").write_text("{}")
    (src / "self_check.json").write_text("{}")
    dst = write_draft_checkpoint(src, tmp_path / "draft", num_layers=2)
    assert json.loads((dst / "config.json").read_text())["num_hidden_layers"] == 2
    assert (dst / "tokenizer.json").is_file() and not (dst / "self_check.json").exists()
    # HF's own model with its layers cut after the second is the oracle.
    from transformers import AutoModelForCausalLM
    oracle = hf_model(family, seed=4)
    oracle.model.layers = oracle.model.layers[:2]
    oracle.config.num_hidden_layers = 2
    if getattr(oracle.config, "layer_types", None):
        oracle.config.layer_types = oracle.config.layer_types[:2]
    draft = AutoModelForCausalLM.from_pretrained(dst).eval()
    ids = torch.tensor([plain_prompt(0, length=12)])
    with torch.no_grad():
        assert torch.allclose(draft(ids).logits, oracle(ids).logits, atol=1e-5)


def test_the_draft_tool_refuses_what_it_cannot_truncate(tmp_path):
    src = write_checkpoint(tmp_path / "src", "gemma", seed=4)  # 3 layers
    for layers in (0, 3):
        with pytest.raises(ValueError, match=r"--layers must be in \[1, 2\]"):
            write_draft_checkpoint(src, tmp_path / "d", layers)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        write_draft_checkpoint(src, tmp_path / "taken", 1)


# --- refusals when the engine starts --------------------------------------------------------------

@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("target"), "gemma3_text", seed=3)


@pytest.mark.parametrize("draft, words", [
    (lambda tmp: tmp / "nowhere", "does not exist"),
    (lambda tmp: write_checkpoint(tmp / "small-vocab", "gemma3_text", vocab_size=256),
     "vocabulary of 256 tokens, the target one of 512"),
    (lambda tmp: write_checkpoint(tmp / "short", "gemma3_text", max_position_embeddings=64),
     r"64 positions, fewer than max_model_len \(512\)"),
])
def test_an_unusable_draft_is_refused_when_the_engine_starts(target, tmp_path, draft, words):
    with pytest.raises(ValueError, match="speculative_config: the draft model") as info:
        Core(target, draft_config(draft(tmp_path)))
    assert info.match(words)


def test_a_draft_with_another_tokenizer_is_refused(tmp_path):
    def checkpoint(name, vocab):
        path = tmp_path / name
        hf_model("gemma3_text").config.save_pretrained(path)
        spec = {"model": {"type": "BPE", "vocab": vocab}, "added_tokens": [{"id": 0, "content": "<pad>"}]}
        (path / "tokenizer.json").write_text(json.dumps(spec))
        return path
    target_path = checkpoint("target", {"a": 1, "b": 2})
    target_cfg = GemmaConfig.from_checkpoint(target_path)
    check_draft_checkpoint(checkpoint("same", {"b": 2, "a": 1}), target_cfg, target_path, 512)  # other bytes, same tokens
    with pytest.raises(ValueError, match="tokenizer whose vocabulary differs"):
        check_draft_checkpoint(checkpoint("other", {"a": 2, "b": 1}), target_cfg, target_path, 512)


# --- the proposer ---------------------------------------------------------------------------------

def test_drafts_are_the_draft_models_greedy_picks_whatever_was_accepted_before(target):
    """After each verify (some drafts accepted, then a token of the target's own), the proposer's
    cached K/V gives the drafts a fresh start would: those HF's draft model picks greedily."""
    from transformers import AutoModelForCausalLM

    from backend.engine_core import load_model
    from backend.speculative import DraftRequest
    config = EngineConfig(checkpoint=str(target), device="cpu", max_num_batched_tokens=16,
                          speculative_config=draft_config(target, k=4))
    proposer = draft_proposer(load_model(config, target, torch.device("cpu"), torch.float32), config,
                              target_num_blocks=8, max_model_len=512)
    oracle = AutoModelForCausalLM.from_pretrained(target).eval()
    rng = torch.Generator().manual_seed(0)
    sequences = [repeating_prompt(1), plain_prompt(2, length=40)]  # 53 and 40 tokens: catch-ups of 16-token forwards
    states = [proposer.start(tokens) for tokens in sequences]
    for round in range(8):
        wanted = [4, 1 + round % 4]
        drafts = proposer.propose([DraftRequest(st, tokens, k) for st, tokens, k in zip(states, sequences, wanted)])
        fresh = [proposer.start(tokens) for tokens in sequences]
        assert proposer.propose([DraftRequest(st, tokens, k) for st, tokens, k in zip(fresh, sequences, wanted)]) \
            == drafts
        for st in fresh:
            proposer.release(st)
        if round % 4 == 0:
            with torch.no_grad():
                greedy = oracle.generate(torch.tensor([sequences[0]]), max_new_tokens=4, do_sample=False)
            assert drafts[0] == greedy[0, len(sequences[0]):].tolist()
        for tokens, d in zip(sequences, drafts):  # accept some, then the target's own next token
            accepted = int(torch.randint(0, len(d) + 1, (1,), generator=rng))
            tokens += d[:accepted] + [(d[accepted] + 1) % 512 if accepted < len(d) else 7]
            if round % 2:  # then steps without drafts (a pause): the rejected drafts' K/V must not stay
                tokens += torch.randint(3, 512, (3,), generator=rng).tolist()
    for st in states:
        proposer.release(st)
    assert proposer.kv_cache.usage().used_blocks == 0


# --- the engine -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines(target, tmp_path_factory):
    """Speculation off, with the target as its own draft (greedy drafts all accepted), and with its
    first two layers as the draft (many rejected)."""
    truncated = write_draft_checkpoint(target, tmp_path_factory.mktemp("drafts") / "two-layers", num_layers=2)
    cores = {"off": Core(target), "itself": Core(target, draft_config(target)),
             "truncated": Core(target, draft_config(truncated))}
    yield cores
    for core in cores.values():
        core.close()


def assert_no_blocks_used(core):
    stats = core.stats()
    assert stats.kv_cache.used_blocks == 0 and stats.draft_kv_cache.used_blocks == 0


@pytest.mark.parametrize("draft", ["itself", "truncated"])
def test_outputs_are_the_same_with_a_draft_model_alone_and_mixed(engines, draft):
    """Greedy and seeded requests, beside prefill chunks (32-token budget: the draft catches up on a
    90-token prompt in several forwards), a request that does not speculate and one asking logprobs."""
    off, on = engines["off"], engines[draft]
    requests = mixed_requests()
    want = [off.run([r])[0] for r in requests]
    before = on.stats().spec_decode
    for r, w in zip(requests, want):
        check_same(on.run([r])[0], w)
    for got, w in zip(on.run(requests), want):
        check_same(got, w)
    spec = on.stats().spec_decode
    accepted, proposed = (spec.num_accepted_tokens - before.num_accepted_tokens,
                          spec.num_draft_tokens - before.num_draft_tokens)
    assert 0 < accepted
    if draft == "itself":  # greedy, the model's own drafts are what it then picks: every one accepted
        before = on.stats().spec_decode
        on.run([(plain_prompt(s), GREEDY) for s in range(2)])
        spec = on.stats().spec_decode
        assert spec.num_accepted_tokens - before.num_accepted_tokens == spec.num_draft_tokens - before.num_draft_tokens > 0
    else:
        assert accepted < proposed
    assert_no_blocks_used(on)
    assert on.stats().draft_kv_cache.total_blocks > 0


def test_a_seed_gives_the_same_tokens_with_a_draft_model_or_without(engines):
    requests = [(repeating_prompt(s), SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True))
                for s in range(4)] + [(plain_prompt(5), SEEDED)]
    want = engines["off"].run(requests)
    for draft in ("itself", "truncated"):
        assert engines[draft].run(requests) == want
        assert [engines[draft].run([r])[0] for r in requests] == want


def test_preempted_sequences_give_their_tokens_and_both_caches_back(target, engines, tmp_path):
    block_bytes = bytes_per_block(GemmaConfig.from_checkpoint(target), 16, torch.float32)
    tight = Core(target, draft_config(target), kv_cache_bytes=7 * block_bytes)  # three requests of ~80 tokens do not fit
    try:
        requests = [(repeating_prompt(s, length=20), GREEDY) for s in range(3)] + [(repeating_prompt(9, length=20), SEEDED)]
        want = [engines["off"].run([r])[0] for r in requests]
        assert tight.run(requests) == want
        stats = tight.stats()
        assert stats.num_preemptions > 0 and stats.spec_decode.num_accepted_tokens > 0
        assert_no_blocks_used(tight)
    finally:
        tight.close()


def test_cancelled_sequences_give_both_caches_back(engines):
    on = engines["truncated"]
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    ids = on.submit([(repeating_prompt(s), params) for s in range(3)])
    on.wait_for(lambda: all(len(on.outputs.get(i, [])) >= 3 for i in ids))
    assert on.stats().draft_kv_cache.used_blocks > 0  # the draft holds their tokens' K/V
    for i in ids:
        on.core.end(i, "cancelled")
    on.wait_for(lambda: all(i in on.ended for i in ids))
    assert [on.ended.pop(i) for i in ids] == ["cancelled"] * 3
    for i in ids:
        on.outputs.pop(i)
    assert_no_blocks_used(on)


def test_sampled_outputs_have_the_model_distribution_with_a_draft_model(tmp_path):
    check_sampled_distribution(tmp_path, speculative=lambda path: draft_config(
        write_draft_checkpoint(path, path.parent / "draft", num_layers=2), k=2))


def test_the_packaged_model_gives_the_same_tokens_with_its_truncated_draft(default_checkpoint):
    """The real Gemma 3 270M with its first 12 of 18 layers as the draft (fewer agree with it at almost
    no position: docs/benchmarks.md), greedy: an edit of a code snippet and free prose, alone and together."""
    from backend.draft_checkpoint import cached_draft_checkpoint
    from backend.tokenizer import Tokenizer
    tokenizer = Tokenizer(default_checkpoint)
    code = "".join(f"def area_{i}(width, height):\n    return width * height * {i}\n\n" for i in range(3))
    prompts = [tokenizer.encode(f"Rewrite this code with `height` renamed to `h`:\n\n{code}Rewritten:\n\n"),
               tokenizer.encode("Write a short poem about the sea at night.")]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    draft = cached_draft_checkpoint(default_checkpoint, 12)
    off = Core(default_checkpoint, max_num_batched_tokens=512)
    on = Core(default_checkpoint, draft_config(draft), max_num_batched_tokens=512)
    try:
        want = [off.run([(p, params)])[0] for p in prompts]
        assert [on.run([(p, params)])[0] for p in prompts] == want
        assert on.run([(p, params) for p in prompts]) == want
        assert on.stats().spec_decode.num_accepted_tokens > 0
        assert_no_blocks_used(on)
    finally:
        off.close()
        on.close()
