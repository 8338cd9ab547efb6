"""CUDA graphs belong to the engine's runner, not to one model: the plain-PyTorch reference model
replays captured decode steps on a GPU too (no TransformerEngine needed), with the tokens and
logits of its eager steps."""
import pytest
import torch

from backend.graphs import DecodeGraphs
from tests.gpu.helpers import DEVICE, FAMILIES, drive, greedy_agreement, prompts_for, rel_err, report, save_tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_model_graph_decode_equals_eager(family, tmp_path):
    from backend.weights import load_reference_model

    model, cfg = load_reference_model(save_tiny(tmp_path, family, seed=3), torch.float32, DEVICE)
    prompts = prompts_for(cfg.vocab_size, [5, 40, 100], seed=2)  # 3 decodes: padded to bucket 4
    kw = dict(arrivals=[0, 3, 6], dtype=torch.float32)
    graphs = DecodeGraphs(model)
    graphed = drive(graphs, cfg, prompts, 48, **kw)
    eager = drive(model, cfg, prompts, 48, **kw)
    equal = [greedy_agreement(e, g, 1e-3, f"{family} seq {i}") for i, (e, g) in enumerate(zip(eager, graphed))]
    errs = [rel_err(torch.stack(g.logits[:n]), torch.stack(e.logits[:n])) for e, g, n in zip(eager, graphed, equal)]
    report(test="reference_graphs_vs_eager", family=family, equal_tokens=equal, of=48, logits_rel_err=max(errs),
           buckets=sorted(graphs.entries), replays=sum(x.replays for x in graphs.entries.values()),
           graphs_disabled=graphs.disabled)
    assert graphs.disabled is None and sum(x.replays for x in graphs.entries.values()) > 0
    assert max(errs) < 1e-4
