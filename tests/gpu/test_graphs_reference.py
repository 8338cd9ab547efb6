"""CUDA graphs belong to the engine's runner, not to one model: the plain-PyTorch reference model
replays captured decode steps on a GPU too (no TransformerEngine needed), with the tokens and
logits of its eager steps."""
import pytest
import torch

from backend.graphs import DecodeGraphs
from tests.tiny_models import GEMMA_VOCAB
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


def test_captured_graphs_hold_one_logits_buffer_not_one_per_graph(tmp_path):
    """Every decode graph writes its logits into one buffer of the largest bucket's rows. A logits
    output per graph stayed allocated with it: ~14 GB for 256 sequences x 8,192 positions at Gemma's
    262k vocabulary, outside gpu_memory_utilization's share (an H100, 2026-12-06: two engines of 0.3
    each ran out of memory)."""
    from backend.kv_cache import PagedKVCache
    from backend.weights import load_reference_model

    # Gemma's vocabulary: the logits, not the graphs' input buffers, are what a graph holds.
    model, cfg = load_reference_model(save_tiny(tmp_path, "gemma3_text", seed=3, vocab_size=GEMMA_VOCAB,
                                                max_position_embeddings=1024), torch.float32, DEVICE)
    kv = PagedKVCache(cfg, num_blocks=64, block_size=16, dtype=torch.float32, device=DEVICE)
    graphs = DecodeGraphs(model, max_batch=64)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(DEVICE)
    graphs.capture_all(kv, max_batch=64, max_len=1024)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated(DEVICE) - before
    row_bytes = cfg.vocab_size * 4
    rows_per_graph = sum(batch for batch, _ in graphs.entries)  # what one output per graph held
    report(test="graph_logits_memory", graphs=len(graphs.entries), held_bytes=held, one_buffer=64 * row_bytes,
           one_per_graph=rows_per_graph * row_bytes)
    assert graphs.disabled is None and len(graphs.entries) == 11 * 4  # batch buckets 1..64 x contexts 128..1024
    assert held < 64 * row_bytes + rows_per_graph * row_bytes // 4
