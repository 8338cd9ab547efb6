"""Speculative decoding with a draft model on a GPU, in fp32: the draft's decode steps replay its own
CUDA graphs, fed the previous position's picks on the device, beside the target's verify steps (the
reference model's torch attention, and the Triton kernels' varlen attention replayed from mixed-step
graphs), async scheduling on. The tokens are those without speculation, as on the CPU
(tests/test_draft_model.py), and both KV caches are given back."""
import pytest
import torch

from backend.draft_checkpoint import write_draft_checkpoint
from tests.gpu.test_speculative_gpu import use_attention
from tests.test_draft_model import draft_config
from tests.test_speculative import Core, check_same, check_sampled_distribution, mixed_requests
from tests.tiny_models import write_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("attention", ["torch", "kernels"])
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_a_draft_model_gives_the_tokens_of_one_token_steps_on_a_gpu(family, attention, tmp_path, monkeypatch):
    use_attention(attention, monkeypatch)
    path = write_checkpoint(tmp_path / family, family, seed=3)
    drafts = {"itself": path, "truncated": write_draft_checkpoint(path, tmp_path / "draft", num_layers=2)}
    config = dict(device="cuda", dtype="float32", engine="torch")  # async scheduling and CUDA graphs: on by default
    off = Core(path, **config)
    try:
        requests = mixed_requests()
        want = [off.run([r])[0] for r in requests]
        for name, draft in drafts.items():
            on = Core(path, draft_config(draft), **config)
            try:
                assert on.core._async and on.core._proposer.runner.graphs is not None
                for r, w in zip(requests, want):
                    check_same(on.run([r])[0], w)
                for got, w in zip(on.run(requests), want):
                    check_same(got, w)
                stats = on.stats()
                assert stats.spec_decode.num_accepted_tokens > 0
                assert stats.kv_cache.used_blocks == 0 and stats.draft_kv_cache.used_blocks == 0
            finally:
                on.close()
    finally:
        off.close()


def test_sampled_outputs_have_the_model_distribution_with_a_draft_model_on_a_gpu(tmp_path):
    check_sampled_distribution(tmp_path, speculative=lambda path: draft_config(
        write_draft_checkpoint(path, path.parent / "draft", num_layers=2), k=2),
        device="cuda", dtype="float32", engine="torch")
