"""What backend/graphs.py captures, run eagerly on the CPU: the model's forward on the fixed-shape
decode layout (batch padded to its bucket, context padded to a power of two, masks built from the
positions) gives the logits of the ordinary decode layout, and padding rows touch no other
sequence's cache. On a GPU the same body is captured and replayed (tests/gpu)."""
import pytest
import torch

from backend.attention.layout import StepLayout
from backend.batch import HostToDevice, SeqChunk
from backend.graphs import DecodeGraphs
from backend.kv_cache import PagedKVCache
from backend.weights import load_reference_model
from tests.tiny_models import hf_model


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])  # softcap + sliding window; qk-norm + local RoPE
def test_fixed_shape_decode_body_matches_the_eager_step(family, tmp_path):
    hf_model(family, seed=5).save_pretrained(tmp_path, safe_serialization=True)
    model, cfg = load_reference_model(tmp_path, torch.float32, "cpu")
    kv = PagedKVCache(cfg, num_blocks=64, block_size=4, dtype=torch.float32, device="cpu")
    cpu = HostToDevice("cpu")
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (3, 12, 21)]
    tables = [kv.pool.allocate(kv.blocks_for(len(p))) for p in prompts]
    for p, t in zip(prompts, tables):
        model(*model.attention.build_step([SeqChunk(p[:-1], 0, t, True)], 4, cpu), kv)
    ids, layout = model.attention.build_step([SeqChunk([p[-1]], len(p) - 1, t, True) for p, t in zip(prompts, tables)],
                                             4, cpu)
    before = kv.slots.clone()
    expected = model(ids, layout, kv)
    after_eager = kv.slots.clone()

    kv.slots.copy_(before)
    graphs = DecodeGraphs(model)
    assert graphs.can_run(ids, layout)
    entry = graphs._entry((4, 128), kv)  # 3 sequences in the batch-4 bucket, context 21 in the 128 bucket
    graphs._load(entry, ids, layout)
    logits = graphs._body(entry, kv)
    torch.testing.assert_close(logits[:3], expected, atol=2e-5, rtol=0)
    # The padding row wrote row 0's K/V to row 0's slot: the cache is the eager step's (up to the
    # rounding of a 4-row instead of a 3-row matmul), and no slot beyond this step's three changed.
    torch.testing.assert_close(kv.slots, after_eager, atol=2e-5, rtol=0)
    written = torch.zeros(kv.slots.shape[2], dtype=torch.bool)
    written[layout.slot_mapping] = True
    assert torch.equal(kv.slots[:, :, ~written], before[:, :, ~written])


def test_every_decode_graph_writes_its_logits_into_the_sets_one_buffer(tmp_path):
    """A logits output per graph stayed allocated with it: ~14 GB for the 133 decode graphs of 256
    sequences x 8,192 positions at Gemma's 262k vocabulary (an H100, outside gpu_memory_utilization's
    share). Each bucket's body now writes the first rows of one buffer of the largest bucket's rows."""
    hf_model("gemma2", seed=5).save_pretrained(tmp_path, safe_serialization=True)  # softcap: done in place
    model, cfg = load_reference_model(tmp_path, torch.float32, "cpu")
    kv = PagedKVCache(cfg, num_blocks=64, block_size=4, dtype=torch.float32, device="cpu")
    graphs = DecodeGraphs(model, max_batch=16)
    outputs = {}
    for key in ((2, 128), (4, 128), (16, 256)):
        entry = graphs._entry(key, kv)
        entry.tokens.copy_(torch.arange(key[0]) + 3)
        entry.num_valid.fill_(key[0])
        outputs[key] = graphs._body(entry, kv)
        eager = model(entry.tokens, *_layout_of(graphs, entry), kv)
        torch.testing.assert_close(outputs[key], eager, atol=2e-5, rtol=0)
    assert graphs._logits.shape == (16, cfg.vocab_size)
    assert {out.data_ptr() for out in outputs.values()} == {graphs._logits.data_ptr()}
    assert [out.shape[0] for out in outputs.values()] == [2, 4, 16]


def _layout_of(graphs, entry):
    return (StepLayout(positions=entry.positions, slot_mapping=entry.slots, logit_rows=None,
                       attention=graphs.model.attention.decodes(entry.kv_slots, entry.positions),
                       row_valid=entry.row_ids < entry.num_valid),)
