"""minillm.ops.linear (few-row native kernel) against torch.nn.functional.linear."""
import pytest
import torch
import torch.nn.functional as F

from minillm.ops import Linear, _backend, linear
from minillm.ops.linear import SMALL_M

pytestmark = pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("K,N", [(384, 1152), (37, 5), (1, 1), (64, 3), (100, 257)])
@pytest.mark.parametrize("M", [1, 2, 7, 8, 9, 16])
def test_matches_f_linear(M, K, N, bias):
    x, w = torch.randn(M, K), torch.randn(N, K)
    b = torch.randn(N) if bias else None
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-5 * K ** 0.5, rtol=1e-5)
    torch.testing.assert_close(linear(x.double(), w.double(), b.double() if bias else None),
                               F.linear(x.double(), w.double(), b.double() if bias else None))


def test_every_simd_level(simd_level):
    for M, K, N in [(3, 77, 33), (8, 384, 130), (1, 16, 2)]:
        x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)


def test_batched_shapes_strides_and_fallback():
    w, b = torch.randn(24, 40), torch.randn(24)
    x = torch.randn(2, 3, 40)  # 6 rows: native
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    xs = torch.randn(5, 80)[:, ::2]  # column stride 2: copied, still right
    torch.testing.assert_close(linear(xs, w, b), F.linear(xs, w, b), atol=1e-5, rtol=1e-5)
    big = torch.randn(SMALL_M + 1, 40)  # above the row limit: F.linear
    torch.testing.assert_close(linear(big, w, b), F.linear(big, w, b))
    half = torch.randn(2, 40, dtype=torch.bfloat16)
    torch.testing.assert_close(linear(half, w.bfloat16()), F.linear(half, w.bfloat16()))


def test_gradients_gradcheck_and_opcheck():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: linear(x, w), (x, w))
    for args in [(x.float(), w.float(), b.float()), (x.float(), w.float(), None)]:
        torch.library.opcheck(torch.ops.minillm.linear_small_m.default, args)


def test_linear_module_is_a_drop_in():
    layer = Linear(10, 7)
    ref = torch.nn.Linear(10, 7)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), ref(x), atol=1e-6, rtol=1e-5)
