"""minillm.ops.layer_norm (csrc/cpu/layer_norm.h) against F.layer_norm: values and gradients for any layout, every
SIMD level, float64 gradcheck, the custom ops' opcheck, torch.compile, and the module as a drop-in."""
import os
import subprocess
import sys
import tempfile

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


def _bf16_out_grads(x, w, b, dy_bf16, fused):
    """y and the input gradients of layer_norm(x) as bfloat16: fused (out_dtype) or cast after the float32 op."""
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = layer_norm(x, w, b, out_dtype=torch.bfloat16) if fused else layer_norm(x, w, b).to(torch.bfloat16)
    return (y, *torch.autograd.grad(y, (x, w, b), dy_bf16))


@pytest.mark.parametrize("layout", ["contiguous", "wide_rows", "transposed", "expanded"])
def test_bf16_output_is_the_cast_of_the_float32_result_bit_for_bit(simd_level, layout):
    # out_dtype=bfloat16 rounds y as the kernel stores it and reads the bf16 gradient as it is: the same bits as
    # casting the float32 result (round to nearest even) and widening the gradient, forward and backward.
    gen = torch.Generator().manual_seed(3)
    for lead, C in [((1, 1), 1), ((3, 2), 15), ((2, 9), 16), ((4, 10), 33), ((2, 384), 128), ((2, 3), 300)]:
        x = make_x((*lead, C), layout, torch.float32, gen) * 3 + 1
        w, b = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
        dy = torch.randn(x.shape, generator=gen).bfloat16()
        got, want = _bf16_out_grads(x, w, b, dy, True), _bf16_out_grads(x, w, b, dy, False)
        assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
        for g, r in zip(got, want):
            assert torch.equal(g, r), (lead, C, layout)


def test_bf16_output_without_the_bf16_conversion_instruction():
    # CPUs without AVX512-BF16 round in software (MINILLM_NO_BF16DOT=1 takes that path here): the same bits.
    code = (
        "import sys; sys.path.insert(0, %r); import torch, test_layer_norm as t;"
        "g = torch.Generator().manual_seed(4); x = torch.randn(64, 200, generator=g) * 4;"
        "x[0, :3] = torch.tensor([3.0e38, 1.0e-40, float('nan')]);"
        "w, b = torch.randn(200, generator=g), torch.randn(200, generator=g);"
        "dy = torch.randn(64, 200, generator=g).bfloat16();"
        "got, want = t._bf16_out_grads(x, w, b, dy, True), t._bf16_out_grads(x, w, b, dy, False);"
        "assert all(torch.equal(a, c) or torch.allclose(a, c, equal_nan=True, rtol=0, atol=0) for a, c in zip(got, want))"
    ) % os.path.dirname(__file__)
    for env in ({}, {"MINILLM_NO_BF16DOT": "1"}):
        res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                             cwd=tempfile.gettempdir())
        assert res.returncode == 0, (env, res.stderr)


def test_bf16_output_elsewhere_is_the_cast():
    gen = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(6, 24, generator=gen), torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    for out_dtype in (torch.float16, torch.float64, torch.float32):  # not fused: the cast of the result
        assert torch.equal(layer_norm(x, w, b, out_dtype=out_dtype), layer_norm(x, w, b).to(out_dtype))
    xd, wd = x.double(), w.double()  # float64 x: cast after the float64 kernel
    assert torch.equal(layer_norm(xd, wd, None, out_dtype=torch.bfloat16), layer_norm(xd, wd, None).bfloat16())
    mod = LayerNorm(24)
    assert torch.equal(mod(x, out_dtype=torch.bfloat16), mod(x).bfloat16())
    compiled = torch.compile(lambda t: layer_norm(t, w, b, out_dtype=torch.bfloat16), fullgraph=True)
    assert torch.equal(compiled(x), layer_norm(x, w, b).bfloat16())
    # a double backward through the bf16 output takes the torch-ops twin
    xg = torch.randn(3, 5, dtype=torch.float32, generator=gen, requires_grad=True)
    y = layer_norm(xg, w[:5], b[:5], out_dtype=torch.bfloat16)
    (g,) = torch.autograd.grad(y.float().square().sum(), xg, create_graph=True)
    assert g.requires_grad
