"""minillm.ops.layer_norm (csrc/cpu/layer_norm.h) against F.layer_norm: values and gradients for any layout, every
SIMD level, float64 gradcheck, the custom ops' opcheck, torch.compile, and the module as a drop-in."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.ops import LayerNorm, _backend, layer_norm
from minillm.ops.layer_norm import _layer_norm_backward_op, _layer_norm_op

pytestmark = pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")


def grads(fn, x, w, b, dy):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = fn(x, w, b)
    inputs = [t for t in (x, w, b) if t is not None]
    return (y, *torch.autograd.grad(y, inputs, dy))


def ours(x, w, b):
    return layer_norm(x, w, b, 1e-5)


def ref(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def make_x(shape, layout, dtype, gen):
    """x of `shape` laid out as given: contiguous, rows wider than C (a slice), transposed batch dims, an offset
    view, or rows repeated by stride 0 (expanded)."""
    *lead, C = shape
    if layout == "contiguous":
        return torch.randn(shape, dtype=dtype, generator=gen)
    if layout == "wide_rows":
        return torch.randn(*lead, C + 5, dtype=dtype, generator=gen)[..., 2:2 + C]
    if layout == "transposed" and len(lead) == 2:
        return torch.randn(lead[1], lead[0], C, dtype=dtype, generator=gen).transpose(0, 1)
    if layout == "expanded":
        return torch.randn(*lead[:-1], 1, C, dtype=dtype, generator=gen).expand(shape)
    if layout == "column_stride":  # no unit stride along C: copied
        return torch.randn(*lead, 2 * C, dtype=dtype, generator=gen)[..., ::2]
    return torch.randn(shape, dtype=dtype, generator=gen)


@settings(max_examples=60, deadline=None)
@given(lead=st.lists(st.integers(1, 7), min_size=1, max_size=2), C=st.integers(1, 150),
       layout=st.sampled_from(["contiguous", "wide_rows", "transposed", "expanded", "column_stride"]),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2 ** 16))
def test_matches_f_layer_norm_for_any_layout(lead, C, layout, bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_x((*lead, C), layout, dtype, gen) * 3 + 5  # rows far from zero: the variance must not cancel
    w = torch.randn(C, dtype=dtype, generator=gen)
    b = torch.randn(C, dtype=dtype, generator=gen) if bias else None
    dy = torch.randn(x.shape, dtype=dtype, generator=gen)
    # Against F.layer_norm in float64. fp32 within explicit tolerances, scaled by what no fp32 layer norm escapes:
    # x - mean loses log2(|mean| / std) bits (a row of near-equal values far from zero: C = 2 rows often are),
    # and the weight's and bias's gradients sum over rows, so their error grows with the row count.
    d = torch.float64
    got = grads(ours, x, w, b, dy)
    want = grads(ref, x.to(d), w.to(d), b.to(d) if b is not None else None, dy.to(d))
    assert got[0].shape == want[0].shape and got[0].dtype == dtype
    rows = x.reshape(-1, C).to(d)
    cond = (rows.mean(-1).abs() / (rows.var(-1, unbiased=False) + 1e-5).sqrt()).max().item()
    for g, r in zip(got, want):
        if dtype == torch.float64:
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)
            continue
        scale = max(1.0, cond / 4) * (rows.shape[0] ** 0.5 if g.dim() == 1 else 1)
        torch.testing.assert_close(g, r.to(dtype), atol=2e-5 * scale, rtol=1e-4)


def test_every_simd_level(simd_level):
    gen = torch.Generator().manual_seed(0)
    for M, C in [(1, 1), (3, 15), (9, 16), (40, 33), (768, 128), (5, 300)]:
        x, w, b = (torch.randn(M, C, generator=gen), torch.randn(C, generator=gen), torch.randn(C, generator=gen))
        dy = torch.randn(M, C, generator=gen)
        for g, r in zip(grads(ours, x, w, b, dy), grads(ref, x, w, b, dy)):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_many_rows_on_several_threads_sum_the_weight_gradients():
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3000, 256, generator=gen), torch.randn(256, generator=gen), torch.randn(256, generator=gen)
    dy = torch.randn(3000, 256, generator=gen)
    for g, r in zip(grads(ours, x, w, b, dy), grads(ref, x, w, b, dy)):
        torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-4)


def test_gradcheck_double_backward_and_opcheck():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(ours, (x, w, b))
    assert torch.autograd.gradgradcheck(ours, (x, w, b))  # create_graph takes the torch-ops backward
    x2 = torch.randn(7, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _layer_norm_op(x, w, b, 1e-5)[0], (x2, w, b))
    torch.library.opcheck(_layer_norm_op, (x2, w, b, 1e-5))
    torch.library.opcheck(_layer_norm_op, (x2.float().detach(), w.float().detach(), None, 1e-6))
    y, mean, rstd = _layer_norm_op(x2.detach(), w.detach(), b.detach(), 1e-5)
    torch.library.opcheck(_layer_norm_backward_op, (torch.randn_like(y), x2.detach(), w.detach(), mean, rstd))


def test_torch_compile_fullgraph_forward_backward():
    norm = LayerNorm(24)
    x = torch.randn(5, 24, requires_grad=True)
    compiled = torch.compile(lambda t: norm(t).square().sum(), fullgraph=True)
    loss = compiled(x)
    loss.backward()
    x2 = x.detach().requires_grad_()
    want = F.layer_norm(x2, (24,), norm.weight, norm.bias).square().sum()
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_module_is_a_drop_in_and_other_cases_take_torch():
    torch.manual_seed(0)
    ref_mod = torch.nn.LayerNorm(16)
    mod = LayerNorm(16)
    mod.load_state_dict(ref_mod.state_dict())
    assert set(mod.state_dict()) == set(ref_mod.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(mod(x), ref_mod(x))
    torch.testing.assert_close(LayerNorm((4, 16))(torch.randn(2, 4, 16)).shape, (2, 4, 16))  # 2-D shape: torch
    no_affine = LayerNorm(16, elementwise_affine=False)
    torch.testing.assert_close(no_affine(x), F.layer_norm(x, (16,)))
    xb, wb = x.bfloat16(), mod.weight.detach().bfloat16()
    assert layer_norm(xb, wb, None).dtype == torch.bfloat16  # not a kernel dtype: F.layer_norm
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 inside autocast, as F.layer_norm's policy gives
        assert mod(x).dtype == torch.float32
    assert layer_norm(torch.randn(0, 16), mod.weight, mod.bias).shape == (0, 16)


def test_the_ops_refuse_bad_arguments():
    w = torch.randn(8)
    with pytest.raises(ValueError, match="weight must be"):
        _layer_norm_op(torch.randn(3, 8), torch.randn(7), None, 1e-5)
    with pytest.raises(ValueError, match="dtype must be"):
        _layer_norm_op(torch.randn(3, 8).half(), w.half(), None, 1e-5)
    with pytest.raises(ValueError, match="x must be 2-D"):
        _layer_norm_op(torch.randn(8), w, None, 1e-5)
