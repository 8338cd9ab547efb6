"""Speculative decoding on a GPU: verify chunks through the reference model's torch attention and
through the Triton kernels (varlen attention with k + 1 query rows per verify chunk, replayed from the
mixed-step CUDA graphs), with async scheduling and CUDA graphs on as the engine runs on a GPU, and
seeded CUDA generators rewound past unused rows. The tokens with speculation are those without, in
fp32 (where the two paths round alike enough for greedy ties not to flip), as on the CPU
(tests/test_speculative.py). No TransformerEngine needed: the kernels' backend is put into the
reference model, as FusedAttention takes the same q/k/v. Where TransformerEngine is installed, the TE
model (bf16, and FP8) speculates too: there the two paths round differently, so outputs are compared
up to their first difference, which must be a near-tie of the step without speculation (bf16: its top
two tokens; FP8: its top five, as delayed scaling takes each GEMM's scale from the amax of the steps
before, which differ when the steps verify drafts), and the sampled distribution is checked against
the model's."""
import pytest
import torch

from backend.attention import FusedAttention
from backend.kernels import available as kernels_available
from backend.params import SamplingParams
from tests.gpu.helpers import report, requires_te
from tests.test_speculative import (NGRAM, Core, KnownAnswers, check_same, check_sampled_distribution, mixed_requests,
                                    plain_prompt, repeating_prompt, run_proposing)
from tests.tiny_models import write_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
FAMILIES = ["gemma", "gemma2", "gemma3_text"]


def with_kernels(load_model):
    """engine_core.load_model, with the reference model's attention done by the Triton kernels."""
    def load(*args, **kw):
        model = load_model(*args, **kw)
        fused = FusedAttention(model.cfg.queries_per_kv)
        model.attention = fused
        for layer in model.layers:
            layer.attn.backend = fused
        return model
    return load


def use_attention(attention: str, monkeypatch) -> None:
    """"kernels": the engine's reference model attends through the Triton kernels (skipped without
    Triton); "torch": as it loads."""
    if attention == "kernels":
        if not kernels_available():
            pytest.skip("needs Triton")
        import backend.engine_core as engine_core
        monkeypatch.setattr(engine_core, "load_model", with_kernels(engine_core.load_model))


@pytest.mark.parametrize("attention", ["torch", "kernels"])
@pytest.mark.parametrize("family", FAMILIES)
def test_speculation_gives_the_tokens_of_one_token_steps_on_a_gpu(family, attention, tmp_path, monkeypatch):
    use_attention(attention, monkeypatch)
    path = write_checkpoint(tmp_path / family, family, seed=3)
    config = dict(device="cuda", dtype="float32", engine="torch")  # async scheduling and CUDA graphs: on by default
    off, on = Core(path, **config), Core(path, NGRAM, **config)
    try:
        assert on.core._async and on.core.runner.graphs is not None
        requests = mixed_requests()
        want = [off.run([r])[0] for r in requests]
        for got, w in zip(on.run(requests), want):
            check_same(got, w)
        answers = KnownAnswers({tuple(p): p + w[0] for (p, _), w in zip(requests, want)}, vocab=512)
        for r, w in zip(requests, want):
            check_same(run_proposing(on, answers, [r])[0], w)
        for got, w in zip(run_proposing(on, answers, requests), want):
            check_same(got, w)
        stats = on.stats()
        assert stats.spec_decode.num_accepted_tokens > 0 and stats.kv_cache.used_blocks == 0
        mixed = on.core.runner.mixed_graphs
        if attention == "kernels":  # verify steps replayed from the mixed-step graphs
            assert mixed is not None and mixed.disabled is None
            assert sum(e.replays for e in mixed.entries.values()) > 0
        else:
            assert mixed is None
    finally:
        off.close()
        on.close()


def test_sampled_outputs_have_the_model_distribution_on_a_gpu(tmp_path):
    """Seeded draws on CUDA generators: the same tokens with speculation on and off, and the model's
    distribution (tests/test_speculative.py's chi-square test)."""
    check_sampled_distribution(tmp_path, device="cuda", dtype="float32", engine="torch")


def agreement(got, want) -> int:
    """Leading tokens equal; at a difference, the token taken must be among the top tokens of the
    step without speculation (as many as its logprobs name)."""
    for i, (a, b) in enumerate(zip(got[0], want[0])):
        if a != b:
            assert a in want[1][i].top_ids, (i, a, want[1][i])
            return i
    return len(want[0])


@requires_te
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_the_te_engine_speculates_in_graphs_bf16_and_fp8(fp8, tmp_path):
    path = write_checkpoint(tmp_path / "gemma3", "gemma3_text", seed=3)
    config = dict(device="cuda", engine="te", fp8=fp8)
    off, on = Core(path, **config), Core(path, NGRAM, **config)
    try:
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=5 if fp8 else 2)
        requests = [(repeating_prompt(s), params) for s in range(4)] + [(plain_prompt(s), params) for s in range(4)]
        want = [off.run([r])[0] for r in requests]
        # The same engine without speculation, all requests in one batch: how far rounding alone moves
        # the tokens when the steps' shapes change (reported beside the speculating run's agreement).
        batched = [agreement(g, w) for g, w in zip(off.run(requests), want)]
        answers = KnownAnswers({tuple(p): p + w[0] for (p, _), w in zip(requests, want)}, vocab=512)
        got = run_proposing(on, answers, requests)
        agreed = [agreement(g, w) for g, w in zip(got, want)]
        mixed = on.core.runner.mixed_graphs
        replays = sum(e.replays for e in mixed.entries.values())
        stats = on.stats()
        report(test="speculative_te", fp8=fp8, equal_tokens=agreed, equal_tokens_batched_off=batched, of=24, accepted=stats.spec_decode.num_accepted_tokens,
               drafted=stats.spec_decode.num_draft_tokens, mixed_graph_replays=replays)
        assert all(g[2] == "length" and len(g[0]) == 24 for g in got)
        assert stats.spec_decode.num_accepted_tokens > 0 and replays > 0 and stats.kv_cache.used_blocks == 0
    finally:
        off.close()
        on.close()


@requires_te
def test_the_te_engine_samples_the_model_distribution_with_speculation(tmp_path):
    check_sampled_distribution(tmp_path, identical=False, device="cuda", engine="te")
