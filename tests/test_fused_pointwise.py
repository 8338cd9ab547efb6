"""The TE layer step's residual add + RMSNorm and GeGLU kernels (backend/kernels/pointwise.py)
against the reference model's torch ops: compiled on a GPU, in Triton's interpreter elsewhere (CI)."""
import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first defined

pytest.importorskip("triton")

from backend.model import RMSNorm  # noqa: E402
from backend.kernels.pointwise import add_rms_norm, geglu  # noqa: E402

# The interpreter evaluates exp(2u) in numpy: inf for a saturated gate, which the kernel expects.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

EPS = 1e-6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def assert_rounded_like(got, want):
    """Equal up to rounding to the dtype. Compiled kernels round to nearest, as torch does; Triton's
    interpreter truncates to bf16 (up to one unit in the last place)."""
    if got.dtype == torch.bfloat16 and DEVICE == "cpu":
        ulp = 2.0 ** (torch.frexp(want.float().abs().amax()).exponent.item() - 8)
        torch.testing.assert_close(got.float(), want.float(), atol=ulp, rtol=0)
    else:
        torch.testing.assert_close(got, want)


def norm(x, weight):
    ref = RMSNorm(x.shape[1], EPS).to(x.device)
    with torch.no_grad():
        ref.weight.copy_(weight)
    return ref(x)


def case(rows, hidden, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, branch = (3 * torch.randn(2, rows, hidden, generator=gen)).to(DEVICE, dtype)
    w, w_branch = (0.5 * torch.randn(2, hidden, generator=gen)).to(DEVICE, dtype)
    return x, branch, w, w_branch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (5, 96), (3, 640)])  # 96, 640: not powers of two
def test_add_then_norm_matches_the_reference_ops(rows, hidden, dtype):
    x, branch, w, _ = case(rows, hidden, DTYPES[dtype])
    x_out, normed = add_rms_norm(x, branch, w, EPS)
    want_x = x + branch  # in the model dtype, as HF adds the residual
    assert_rounded_like(x_out, want_x)
    assert_rounded_like(normed, norm(x_out, w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sandwich_norms_the_branch_before_the_add(dtype):
    x, branch, w, w_branch = case(4, 96, DTYPES[dtype])
    x_out, normed = add_rms_norm(x, branch, w, EPS, branch_weight=w_branch)
    want_x = x + norm(branch, w_branch)  # Gemma 2/3: x + post_norm(h), then the next pre-norm
    assert_rounded_like(x_out, want_x)
    assert_rounded_like(normed, norm(x_out, w))


def test_without_a_branch_it_only_norms():
    x, _, w, _ = case(3, 96, torch.float32)
    x_out, normed = add_rms_norm(x, None, w, EPS)
    assert x_out is x
    torch.testing.assert_close(normed, norm(x, w))


def test_zero_rows_stay_zero_and_no_rows_are_fine():
    x, branch, w, _ = case(2, 64, torch.float32)
    x[1], branch[1] = 0, 0  # padding rows of a step
    _, normed = add_rms_norm(x, branch, w, EPS)
    assert torch.equal(normed[1], torch.zeros(64, device=DEVICE))
    assert add_rms_norm(x[:0], branch[:0], w, EPS)[1].shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ffn", [64, 1500])  # 1500: more than one block per row, a partial one
def test_geglu_is_tanh_gelu_of_the_gate_times_up(ffn, dtype):
    gen = torch.Generator().manual_seed(1)
    h = (4 * torch.randn(3, 2 * ffn, generator=gen)).to(DEVICE, DTYPES[dtype])
    h[0, :4] = torch.tensor([-60.0, 60.0, 0.0, -3.0])  # tanh's saturated ends
    gate, up = h.float().chunk(2, dim=-1)
    want = (F.gelu(gate, approximate="tanh") * up).to(h.dtype)  # fp32 math, one rounding
    assert_rounded_like(geglu(h), want)
