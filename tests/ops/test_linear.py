"""minillm.ops.linear (streaming kernel for few rows, packed GEMM beyond) against torch.nn.functional.linear."""
import pytest
import torch
import torch.nn.functional as F

from minillm.ops import Linear, _backend, linear
from minillm.ops.linear import SMALL_M, _LinearFunction, gemm_native

pytestmark = pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")

op_linear = torch.ops.minillm.linear.default
op_matmul = torch.ops.minillm.matmul.default


def _tol(K):
    return dict(atol=1e-5 * K ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("K,N", [(384, 1152), (37, 5), (1, 1), (64, 3), (100, 257), (300, 64), (128, 65)])
@pytest.mark.parametrize("M", [1, 2, 7, 8, 9, 16, 17, 23, 96, 97, 250])
def test_matches_f_linear(M, K, N, bias):
    x, w = torch.randn(M, K), torch.randn(N, K)
    b = torch.randn(N) if bias else None
    torch.testing.assert_close(op_linear(x, w, b), F.linear(x, w, b), **_tol(K))
    xd, wd, bd = x.double(), w.double(), (b.double() if bias else None)
    torch.testing.assert_close(op_linear(xd, wd, bd), F.linear(xd, wd, bd))


def test_every_simd_level(simd_level):
    # Row tails (M % 6), partial panels (N % 64), several K blocks (K > 128) and row blocks (M > 96).
    for M, K, N in [(3, 77, 33), (8, 384, 130), (1, 16, 2), (17, 5, 3), (203, 300, 70), (100, 129, 128)]:
        x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
        torch.testing.assert_close(op_linear(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
        a, bt = torch.randn(K, M).t(), torch.randn(N, K).t()  # column-major A and B
        torch.testing.assert_close(op_matmul(a, bt), a @ bt, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("a_layout", ["row", "col", "strided"])
@pytest.mark.parametrize("b_layout", ["row", "col", "strided"])
def test_matmul_any_layout(a_layout, b_layout):
    def make(rows, cols, layout):
        if layout == "row":
            return torch.randn(rows, cols + 3)[:, :cols]  # row stride > cols
        if layout == "col":
            return torch.randn(cols, rows + 2)[:, :rows].t()
        return torch.randn(rows, 2 * cols)[:, ::2]  # no unit stride: copied
    for M, K, N in [(40, 33, 70), (5, 200, 9), (1, 7, 1), (130, 1, 64)]:
        a, b = make(M, K, a_layout), make(K, N, b_layout)
        torch.testing.assert_close(op_matmul(a, b), a @ b, **_tol(K))


def test_empty_and_zero_k():
    w, b = torch.randn(5, 0), torch.randn(5)
    torch.testing.assert_close(op_linear(torch.randn(30, 0), w, b), b.expand(30, 5))
    assert op_linear(torch.randn(0, 4), torch.randn(5, 4), None).shape == (0, 5)
    assert op_matmul(torch.randn(20, 3), torch.randn(3, 0)).shape == (20, 0)
    torch.testing.assert_close(op_matmul(torch.randn(20, 0), torch.randn(0, 4)), torch.zeros(20, 4))


def test_dispatch_batched_strides_and_fallback():
    w, b = torch.randn(24, 40), torch.randn(24)
    for x in [torch.randn(2, 3, 40), torch.randn(4, 30, 40)]:  # few rows (streaming) and many (GEMM)
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    xs = torch.randn(50, 80)[:, ::2]  # column stride 2: copied, still right
    torch.testing.assert_close(linear(xs, w, b), F.linear(xs, w, b), atol=1e-5, rtol=1e-5)
    half = torch.randn(20, 40, dtype=torch.bfloat16)  # no bf16 kernel: F.linear
    torch.testing.assert_close(linear(half, w.bfloat16()), F.linear(half, w.bfloat16()))


def test_transposed_weight_at_few_rows_takes_f_linear():
    # A streaming kernel would copy a transposed weight (GPT-2's Conv1D) on every decoding step.
    w = torch.randn(40, 24).t()  # (24, 40) viewed as (N, K)
    x = torch.randn(3, 40)
    assert torch.equal(linear(x, w), F.linear(x, w))
    xs = torch.randn(50, 40)  # many rows: the GEMM reads the transposed view in place
    torch.testing.assert_close(linear(xs, w), F.linear(xs, w), atol=1e-5, rtol=1e-5)


def test_gemm_only_at_avx512():
    levels = _backend.simd_levels()
    lower = [lv for lv in levels if lv != "avx512"]
    if not lower:
        pytest.skip("no SIMD level below avx512 on this CPU")
    before = _backend.simd_level()
    x, w = torch.randn(SMALL_M + 10, 40), torch.randn(24, 40)
    try:
        _backend.set_simd_level(lower[0])
        assert not gemm_native(x.device)
        assert torch.equal(linear(x, w), F.linear(x, w))  # routed to F.linear, bit for bit
    finally:
        _backend.set_simd_level(before)
    assert gemm_native(x.device) == (before == "avx512")


@pytest.mark.parametrize("M", [5, 60])
def test_gradients_match_torch(M):
    x = torch.randn(3, M, 48, requires_grad=True)
    w = torch.randn(70, 48, requires_grad=True)
    b = torch.randn(70, requires_grad=True)
    dy = torch.randn(3, M, 70)
    grads = torch.autograd.grad(linear(x, w, b), (x, w, b), dy)
    ref = torch.autograd.grad(F.linear(x, w, b), (x, w, b), dy)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("M", [3, 21])
def test_gradcheck_and_opcheck(M):
    x = torch.randn(M, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: op_linear(x, w, b), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w: op_linear(x, w, None), (x, w))
    a = torch.randn(6, M, dtype=torch.float64).t().requires_grad_()  # column-major
    assert torch.autograd.gradcheck(op_matmul, (a, w.t()))
    for args in [(x.float(), w.float(), b.float()), (x.float(), w.float(), None), (x, w, b)]:
        torch.library.opcheck(op_linear, args)
    torch.library.opcheck(op_matmul, (x.detach().float(), w.detach().float().t()))
    torch.library.opcheck(op_matmul, (a.detach(), w.detach().t()))


@pytest.mark.parametrize("M", [5, 40])
def test_eager_path_equals_custom_op(M):
    # Eager calls skip the custom-op dispatch (linear._LinearFunction): same kernels, same bits.
    x, w, b = torch.randn(M, 30), torch.randn(20, 30), torch.randn(20)
    dy = torch.randn(M, 20)
    results = []
    for fn in (_LinearFunction.apply, op_linear):
        args = [t.clone().requires_grad_() for t in (x, w, b)]
        y = fn(*args)
        y.backward(dy)
        results.append([y] + [t.grad for t in args])
    for a, c in zip(*results):
        assert torch.equal(a, c)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, w: _LinearFunction.apply(x, w, None), (xd, wd))


def test_torch_compile_fullgraph_forward_backward():
    layer = Linear(24, 40)
    x = torch.randn(3, 30, 24)

    def f(t):
        return layer(t).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    eager_x, comp_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    f(eager_x).backward()
    eager_grads = [eager_x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled(comp_x).backward()
    comp_grads = [comp_x.grad] + [p.grad for p in layer.parameters()]
    for e, c in zip(eager_grads, comp_grads):
        torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-5)


def test_linear_module_is_a_drop_in():
    layer = Linear(10, 7)
    ref = torch.nn.Linear(10, 7)
    ref.load_state_dict(layer.state_dict())
    for x in [torch.randn(4, 10), torch.randn(64, 10)]:
        torch.testing.assert_close(layer(x), ref(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("M", [3, 32, 100])
def test_expanded_and_overlapping_operands(M):
    # An expanded (stride 0) input once reached the GEMM as leading dim 1: errors of 1e21, NaN gradients,
    # reads past the buffer. Every layout torch accepts must give F.linear's result, forward and backward.
    K, N = 64, 24
    w = torch.randn(N, K, requires_grad=True)
    b = torch.randn(N, requires_grad=True)
    base = torch.randn(1, K, requires_grad=True)
    cases = {
        "expanded rows": lambda: base.expand(M, K),
        "expanded 3-D": lambda: base.expand(2, M, K),
        "overlapping rows": lambda: torch.randn(M + K).as_strided((M, K), (1, 1)),
        "expanded weight": None,
    }
    for name, make in cases.items():
        if make is None:
            x, weight = torch.randn(M, K), torch.randn(1, K).expand(N, K)
        else:
            x, weight = make(), w
        got = linear(x, weight, b)
        want = torch.nn.functional.linear(x, weight, b)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)
        if make is not None and name != "overlapping rows":
            g = torch.randn_like(want)
            grads = torch.autograd.grad(got, (base, w, b), g)
            want_grads = torch.autograd.grad(want, (base, w, b), g)
            for gg, ww in zip(grads, want_grads):
                torch.testing.assert_close(gg, ww, atol=1e-3, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [2, 300])  # the few-row kernel's and the GEMM's sizes
def test_autocast_runs_in_its_dtype_as_nn_linear(dtype, M):
    """Under torch.autocast the layer computes in autocast's dtype with gradients in the parameters' dtype, as
    nn.Linear does (the native fp32 kernels would silently keep it in fp32)."""
    torch.manual_seed(0)
    ours, ref = Linear(64, 48), torch.nn.Linear(64, 48)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(M, 64, requires_grad=True)
    outs = []
    for layer in (ours, ref):
        with torch.autocast("cpu", dtype=dtype):
            y = layer(x)
        y.float().square().sum().backward()
        outs.append((y, x.grad.clone(), layer.weight.grad.clone()))
        x.grad = None
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = outs
    assert y.dtype == y_ref.dtype == dtype and dw.dtype == torch.float32
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref) and torch.equal(dw, dw_ref)
