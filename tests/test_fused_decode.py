"""The GPU path's RoPE + K/V write and decode attention kernels (backend/kernels/rope_store.py,
decode.py) against the plain-torch attention they replace: compiled on a GPU, run by Triton's
interpreter on CPU tensors elsewhere (CI)."""
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first defined

pytest.importorskip("triton")

from backend.attention import FusedAttention, LayerAttention, StepContext, TorchAttention  # noqa: E402
from backend.attention.layout import Decodes, StepLayout, decode_masks  # noqa: E402
from backend.attention.reference import attend, write_kv  # noqa: E402
from backend.config import RopeSpec  # noqa: E402
from backend.kernels import decode as fused_decode  # noqa: E402
from backend.kernels.rope_store import rope_and_store  # noqa: E402
from backend.model import RMSNorm  # noqa: E402
from backend.rope import apply_rope, rope_cos_sin  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def qkv_views(T, kv_heads, group, D, gen):
    """q, k, v as the TE layer slices them out of its fused projection [T, KV, G + 2, D]."""
    qkv = torch.randn(T, kv_heads, group + 2, D, generator=gen).to(DEVICE)
    return qkv[:, :, :group], qkv[:, :, group], qkv[:, :, group + 1]


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("kv_heads,group", [(1, 4), (2, 3), (4, 1)])
def test_rope_and_store_matches_torch(kv_heads, group, qk_norm):
    gen = torch.Generator().manual_seed(0)
    T, D, num_slots = 7, 32, 40
    q, k, v = qkv_views(T, kv_heads, group, D, gen)
    positions = torch.tensor([0, 5, 9, 3, 17, 0, 0], device=DEVICE)
    cos, sin = rope_cos_sin(RopeSpec(theta=10000.0), D, positions, torch.float32)
    slots = torch.tensor([3, 11, 12, 30, 4], device=DEVICE)  # 5 stored rows; the last 2 are FP8 row padding
    row_valid = torch.tensor([True, True, False, True, True, True, True], device=DEVICE)  # row 2: graph padding
    caches = [torch.zeros(num_slots, kv_heads, D, device=DEVICE) for _ in range(2)]
    norms = None
    want_q, want_k = q.reshape(T, kv_heads * group, D), k
    if qk_norm:  # Gemma 3: each head's zero-centred RMSNorm, then RoPE
        q_norm, k_norm = RMSNorm(D, 1e-6), RMSNorm(D, 1e-6)
        with torch.no_grad():
            q_norm.weight.normal_(generator=gen), k_norm.weight.normal_(generator=gen)
        q_norm, k_norm = q_norm.to(DEVICE), k_norm.to(DEVICE)
        norms = (q_norm.weight.detach(), k_norm.weight.detach(), 1e-6)
        want_q, want_k = q_norm(want_q), k_norm(want_k)
    q_out = rope_and_store(q, k, v, cos, sin, *caches, slots, row_valid, qk_norm=norms)

    want_q, want_k = apply_rope(want_q, cos, sin), apply_rope(want_k, cos, sin)
    torch.testing.assert_close(q_out, want_q, atol=1e-6, rtol=1e-5)
    keep = torch.tensor([0, 1, 3, 4], device=DEVICE)
    want = [torch.zeros(num_slots, kv_heads, D, device=DEVICE) for _ in range(2)]
    write_kv(*want, slots[keep], want_k[keep], v[keep])
    torch.testing.assert_close(caches[0], want[0], atol=1e-6, rtol=1e-5)
    assert torch.equal(caches[1], want[1])  # values are copied, not rotated


def decode_case(B, kv_heads, group, D, lengths, width, gen):
    """B decoding sequences with scattered cache slots; kv_slots padded to `width` columns."""
    num_slots = B * width + 8
    k_cache, v_cache = torch.randn(2, num_slots, kv_heads, D, generator=gen)
    perm = torch.randperm(num_slots, generator=gen)
    kv_slots = torch.zeros(B, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        kv_slots[b, :n] = perm[b * width:b * width + n]
    q = torch.randn(B, kv_heads * group, D, generator=gen)
    positions = torch.tensor(lengths) - 1
    return tuple(t.to(DEVICE) for t in (q, k_cache, v_cache, kv_slots, positions))


def reference(q, k_cache, v_cache, kv_slots, positions, scale, softcap, window):
    mask = decode_masks(positions, kv_slots.shape[1], [window])[window]
    return attend(q[:, None], k_cache[kv_slots], v_cache[kv_slots], mask, scale, softcap)[:, 0]


@pytest.mark.parametrize("kv_heads,group,softcap,window", [
    (1, 8, None, None),  # multi-query (gemma-2b)
    (2, 4, 50.0, None),  # grouped-query with Gemma 2's softcap
    (3, 1, None, 5),  # multi-head with a sliding window
    (1, 5, None, 12),  # Gemma 3 style: 5 queries per KV head, window
])
def test_decode_attention_matches_torch(kv_heads, group, softcap, window):
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 7, 40, 33]
    q, k_cache, v_cache, kv_slots, positions = decode_case(4, kv_heads, group, 16, lengths, 48, gen)
    args = (kv_slots, positions, 0.3, softcap, window)
    got = fused_decode.decode_attention(q, k_cache, v_cache, *args)
    torch.testing.assert_close(got, reference(q, k_cache, v_cache, *args), atol=2e-6, rtol=1e-5)


def test_long_context_splits_merge(monkeypatch):
    """Contexts longer than one split: partial softmaxes merged; a window can empty early splits."""
    monkeypatch.setattr(fused_decode, "SPLIT_KEYS", 64)
    gen = torch.Generator().manual_seed(2)
    lengths = [200, 3, 129]
    q, k_cache, v_cache, kv_slots, positions = decode_case(3, 1, 4, 16, lengths, 256, gen)
    for window in (None, 70):
        args = (kv_slots, positions, 0.25, None, window)
        got = fused_decode.decode_attention(q, k_cache, v_cache, *args)
        torch.testing.assert_close(got, reference(q, k_cache, v_cache, *args), atol=2e-6, rtol=1e-5)


def test_padding_does_not_change_results():
    """A graph bucket pads the slot list and the batch; real rows must come out bitwise equal."""
    gen = torch.Generator().manual_seed(3)
    q, k_cache, v_cache, kv_slots, positions = decode_case(2, 1, 4, 16, [30, 9], 30, gen)
    narrow = fused_decode.decode_attention(q, k_cache, v_cache, kv_slots, positions, 0.25, None, None)
    wide_slots = torch.cat([kv_slots, torch.zeros(2, 98, dtype=torch.long, device=DEVICE)], 1)
    padded_q = torch.cat([q, q[:1]])
    wide = fused_decode.decode_attention(padded_q, k_cache, v_cache, torch.cat([wide_slots, wide_slots[:1] * 0]),
                                         torch.cat([positions, positions[:1] * 0]), 0.25, None, None)
    assert torch.equal(wide[:2], narrow)


class _Cache:
    def __init__(self, k_cache, v_cache):
        self.k_cache, self.v_cache = k_cache, v_cache

    def layer(self, index):
        return self.k_cache, self.v_cache


@pytest.mark.parametrize("padding_rows", [0, 3])
def test_both_backends_attend_a_decode_step_alike(padding_rows):
    """The kernel backend and the torch backend over the same decode-only layout (FP8 row padding:
    rows past the sequences come out zero in both)."""
    gen = torch.Generator().manual_seed(4)
    lengths = [5, 17]
    _, k_cache, v_cache, kv_slots, positions = decode_case(2, 2, 2, 16, lengths, 17, gen)
    q, k, v = qkv_views(2 + padding_rows, 2, 2, 16, gen)
    slots = kv_slots[torch.arange(2, device=DEVICE), positions]  # each token's own slot: written, then attended
    cos, sin = rope_cos_sin(RopeSpec(theta=10000.0), 16, torch.cat([positions, positions.new_zeros(padding_rows)]),
                            torch.float32)
    layer = LayerAttention(0, None, RopeSpec(theta=10000.0), 0.3, None, 1e-6)
    outs, caches = [], []
    for backend in (TorchAttention({None}), FusedAttention(2)):
        layout = StepLayout(positions, slots, None, backend.decodes(kv_slots, positions))
        cache = _Cache(k_cache.clone(), v_cache.clone())
        outs.append(backend.forward(layer, q, k, v, StepContext(layout, {layer.rope: (cos, sin)}), cache))
        caches.append(cache)
    torch.testing.assert_close(outs[1], outs[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(caches[1].k_cache, caches[0].k_cache, atol=1e-6, rtol=1e-5)
    assert not outs[1][2:].any() and not outs[0][2:].any()
