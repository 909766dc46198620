"""minillm.ops.quant: int8 (per channel or grouped) / 4-bit weight-only linear kernels and the bf16 streaming linear against their torch twins
(dequantize, then F.linear), at every SIMD level; quantization's own error bounds; the custom ops' contracts."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm.ops import _backend, linear
from minillm.ops import quant as Q
from minillm.ops.linear import SMALL_M

pytestmark = pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")


def _reference(x, bits, codes, scale, offset, group, bias):
    w = Q._dequantize_twin(bits, codes, scale, offset, group)
    return F.linear(x.double(), w.double(), None if bias is None else bias.double())


def _bound(x, bits, codes, scale, offset, group):
    """Rounding bound of an fp32 dot product against the fp64 reference: ~K eps |x| |W| per output (the kernels sum
    in another order, and grouped codes widen with one FMA)."""
    w = Q._dequantize_twin(bits, codes, scale, offset, group)
    K = x.shape[1]
    return 2 * K ** 0.5 * 1.2e-7 * (x.double().abs() @ w.double().abs().t()) + 1e-6


def _quantized(bits, N, K, group, gen):
    w = torch.randn(N, K, generator=gen) * torch.rand(N, 1, generator=gen) * 2  # rows of different scales
    if bits == 8 and not group:
        return Q.quantize_int8(w) + (None, 0)
    return (Q.quantize_int8_grouped if bits == 8 else Q.quantize_int4)(w, group) + (group,)


def _check(M, K, N, bits, group, bias, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    codes, scale, offset, group = _quantized(bits, N, K, group, gen)
    base = torch.randn(M, 2 * K + 3, generator=gen)
    x = {"contiguous": base[:, :K].contiguous(), "row stride": base[:, 3:K + 3],
         "no unit stride": base[:, ::2][:, :K], "transposed": base[:, :K].t().contiguous().t()}[layout]
    b = torch.randn(N, generator=gen) if bias else None
    got = Q._linear_quant_cpu(x, bits, codes, scale, offset, group, b)
    want = _reference(x, bits, codes, scale, offset, group, b)
    err = (got.double() - want).abs()
    bound = _bound(x, bits, codes, scale, offset, group)
    assert (err <= bound).all(), f"max error {err.max():.3g} over bound {(err / bound).max():.3g}x"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.integers(1, 2 * SMALL_M + 3), kb=st.integers(1, 12), N=st.integers(1, 70), group=st.sampled_from([32, 64]),
       bias=st.booleans(), layout=st.sampled_from(["contiguous", "row stride", "no unit stride", "transposed"]),
       seed=st.integers(0, 2 ** 16))
def test_int4_matches_dequantized_reference(simd_level, M, kb, N, group, bias, layout, seed):
    K = kb * group
    _check(M, K, N, 4, group, bias, layout, seed)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.integers(1, 2 * SMALL_M + 3), kb=st.integers(1, 12), N=st.integers(1, 70), group=st.sampled_from([32, 64]),
       bias=st.booleans(), layout=st.sampled_from(["contiguous", "row stride", "no unit stride", "transposed"]),
       seed=st.integers(0, 2 ** 16))
def test_grouped_int8_matches_dequantized_reference(simd_level, M, kb, N, group, bias, layout, seed):
    _check(M, kb * group, N, 8, group, bias, layout, seed)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.integers(1, 2 * SMALL_M + 3), K=st.integers(1, 300), N=st.integers(1, 70), bias=st.booleans(),
       layout=st.sampled_from(["contiguous", "row stride", "no unit stride", "transposed"]),
       seed=st.integers(0, 2 ** 16))
def test_int8_matches_dequantized_reference(simd_level, M, K, N, bias, layout, seed):
    _check(M, K, N, 8, 0, bias, layout, seed)  # K not a multiple of 32: the column tail


@pytest.mark.parametrize("bits,group", [(8, 0), (8, 32), (8, 64), (4, 64)])
def test_native_dequantize_is_the_twin(simd_level, bits, group):
    gen = torch.Generator().manual_seed(0)
    codes, scale, offset, group = _quantized(bits, 37, 192, group, gen)
    want = Q._dequantize_twin(bits, codes, scale, offset, group)
    got = Q._dequantize_cpu(bits, codes, scale, offset, group)
    # int8 per channel: one product, bit for bit; grouped: q * scale + offset in one FMA against two roundings
    exact = not group
    torch.testing.assert_close(got, want, atol=0 if exact else 1e-6, rtol=0 if exact else 2e-7)


def test_4bit_layout_is_the_documented_one():
    # column i of a 32-block in the low nibble of byte i, column i + 16 in its high nibble
    w = torch.arange(64, dtype=torch.float32).repeat(2, 1) % 16  # values 0..15 twice per row: scale 1, offset 0
    codes, scale, offset = Q.quantize_int4(w, 32)
    assert torch.equal(scale, torch.ones(2, 2)) and torch.equal(offset, torch.zeros(2, 2))
    assert codes[0, 0].item() == 0 | (0 << 4) and codes[0, 1].item() == 1 | (1 << 4)
    w2 = torch.zeros(1, 32)
    w2[0, 16] = 15  # column 16: the high nibble of byte 0
    c2, _, _ = Q.quantize_int4(w2, 32)
    assert c2[0, 0].item() == 15 << 4 and int(c2[0, 1:].sum()) == 0


def test_quantization_error_bounds():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen) * torch.logspace(-3, 1, 64)[:, None]
    w[5] = 0  # a zero row: scale 0, codes 0, exact
    codes, scale = Q.quantize_int8(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127
    err = (Q.dequantize_int8(codes, scale) - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all() and err[5].max() == 0
    for group in (32, 64):
        c4, s4, o4 = Q.quantize_int4(w, group)
        assert c4.dtype == torch.uint8 and c4.shape == (64, 128) and s4.shape == (64, 256 // group)
        err = (Q.dequantize_int4(c4, s4, o4, group) - w).abs().reshape(64, -1, group)
        assert (err <= s4[..., None] / 2 * (1 + 1e-5) + 1e-6 * w.abs().max()).all()
        assert err[5].max() == 0
        c8, s8, o8 = Q.quantize_int8_grouped(w, group)
        assert c8.dtype == torch.uint8 and c8.shape == (64, 256) and s8.shape == o8.shape == (64, 256 // group)
        assert int(c8.max()) == 255 and int(c8.min()) == 0
        err = (Q.dequantize_int8_grouped(c8, s8, o8, group) - w).abs().reshape(64, -1, group)
        assert (err <= s8[..., None] / 2 * (1 + 1e-5) + 1e-6 * w.abs().max()).all()
        assert err[5].max() == 0


def test_grouped_int8_keeps_a_4bit_grid():
    # A weight already on 16 levels per group of 32 (a Q4_1 GGUF file's, dequantized): 256 levels between the same
    # minimum and maximum hold them to fp32 rounding when the levels used span 15 steps (or 1, 3, 5), and within
    # 1/17 of a 4-bit step otherwise; a scale per channel moves them by up to half of max |W[n]| / 127.
    gen = torch.Generator().manual_seed(2)
    N, K = 16, 256
    d = torch.rand(N, K // 32, 1, generator=gen) * 0.02 + 1e-3  # (N, groups, 1)
    m = -torch.rand(N, K // 32, 1, generator=gen) * 0.1
    q = torch.randint(0, 16, (N, K // 32, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans its 15 steps
    w = (q * d + m).reshape(N, K)
    c8, s8, o8 = Q.quantize_int8_grouped(w, 32)
    err = (Q.dequantize_int8_grouped(c8, s8, o8, 32) - w).abs()
    assert err.max() <= 4e-7 * w.abs().max()
    q[..., 1] = 9  # spans of 9..15 steps: not all on the grid
    w = (q * d + m).reshape(N, K)
    c8, s8, o8 = Q.quantize_int8_grouped(w, 32)
    err = (Q.dequantize_int8_grouped(c8, s8, o8, 32) - w).abs().reshape(N, K // 32, 32)
    assert (err <= d / 34 * (1 + 1e-4) + 4e-7 * w.abs().max()).all()
    cc, sc = Q.quantize_int8(w)
    assert (Q.dequantize_int8(cc, sc) - w).abs().mean() > 5 * err.mean()


@pytest.mark.parametrize("M", [1, 3, 8, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_streaming_linear_within_twice_torch_error(simd_level, M, bias):
    # Against an fp64 product of the same bf16 inputs: the kernel's error at most 2x torch's own bf16 F.linear's
    # (both sum in fp32 and round once; the bound allows one bf16 ulp of difference).
    gen = torch.Generator().manual_seed(M)
    K, N = 200, 333  # K: a column tail past the 32-blocks
    x = torch.randn(M, 2 * K, generator=gen).bfloat16()[:, ::2]  # no unit stride
    w = torch.randn(N, K, generator=gen).bfloat16()
    b = torch.randn(N, generator=gen).bfloat16() if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    torch_err = (F.linear(x, w, b).double() - exact).abs().max()
    ulp = exact.abs().max() * 2.0 ** -8
    assert (got.double() - exact).abs().max() <= 2 * torch_err + ulp


def test_bf16_streaming_linear_leaves_gradients_and_many_rows_to_torch():
    x = torch.randn(2, 64).bfloat16().requires_grad_()
    w = torch.randn(8, 64).bfloat16()
    y = linear(x, w)
    y.float().sum().backward()
    torch.testing.assert_close(x.grad, w.float().sum(0).bfloat16().expand(2, 64))
    big = torch.randn(40, 64).bfloat16()
    torch.testing.assert_close(linear(big, w), F.linear(big, w))


@pytest.mark.parametrize("mode,group", [("int8", None), ("int8", 64), ("int4", 64)])
def test_quantized_linear_module(mode, group):
    lin = nn.Linear(128, 48)
    q = Q.QuantizedLinear.from_linear(lin, mode, group_size=group)
    assert q.group_size == (group or 0) and (q.offset is None) == (group is None)
    w = q.dequantize()
    assert w.shape == (48, 128) and (w - lin.weight).abs().max() < 0.02
    for shape in [(1, 128), (3, 5, 128), (40, 128)]:  # few rows and the dequantize + GEMM path
        x = torch.randn(shape)
        torch.testing.assert_close(q(x), F.linear(x, w, lin.bias), atol=1e-5, rtol=1e-5)
    xb = torch.randn(2, 128).bfloat16()
    assert q(xb).dtype == torch.bfloat16
    q.to(torch.bfloat16)  # a model cast: the scales stay fp32, the bias follows
    assert q.scale.dtype == torch.float32 and q.bias.dtype == torch.bfloat16
    torch.testing.assert_close(q(xb).float(), F.linear(xb.float(), w, lin.bias.bfloat16().float()), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("mode,group", [("int8", None), ("int8", 32), ("int4", 32)])
def test_gradients_reach_x_and_bias(mode, group):
    q = Q.QuantizedLinear.from_linear(nn.Linear(64, 10), mode, group)
    w = q.dequantize()
    for M in (2, 30):
        x = torch.randn(M, 64, requires_grad=True)
        y = q(x)
        g = torch.randn_like(y)
        y.backward(g)
        torch.testing.assert_close(x.grad, g @ w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(q.bias.grad, g.sum(0), atol=1e-5, rtol=1e-5)
        q.bias.grad = None


def test_opcheck_and_compile():
    gen = torch.Generator().manual_seed(0)
    c8, s8, _, _ = _quantized(8, 12, 64, 0, gen)
    c4, s4, o4, _ = _quantized(4, 12, 64, 32, gen)
    g8, gs, go, _ = _quantized(8, 12, 64, 32, gen)
    for x in (torch.randn(3, 64, requires_grad=True), torch.randn(20, 64)):
        torch.library.opcheck(torch.ops.minillm.linear_int8.default, (x, c8, s8, torch.randn(12)))
        torch.library.opcheck(torch.ops.minillm.linear_int4.default, (x, c4, s4, o4, 32, None))
        torch.library.opcheck(torch.ops.minillm.linear_int8_grouped.default, (x, g8, gs, go, 32, torch.randn(12)))
    for mode, group in (("int4", 32), ("int8", 32)):
        q = Q.QuantizedLinear.from_linear(nn.Linear(64, 12), mode, group)
        x = torch.randn(2, 64)
        compiled = torch.compile(q, fullgraph=True)
        torch.testing.assert_close(compiled(x), q(x))


@pytest.mark.parametrize("mode,group", [("int8", None), ("int8", 32), ("int4", 32)])
def test_torch_path_equals_kernels(monkeypatch, mode, group):
    q = Q.QuantizedLinear.from_linear(nn.Linear(96, 20), mode, group)
    x = torch.randn(4, 96)
    native = q(x)
    monkeypatch.setattr(_backend, "native_available", lambda: False)
    torch.testing.assert_close(q(x), native, atol=1e-5, rtol=1e-5)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="group_size must be one of"):
        Q.quantize_int4(torch.randn(4, 96), 48)
    with pytest.raises(ValueError, match="divisible by group_size"):
        Q.quantize_int4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="mode must be one of"):
        Q.QuantizedLinear(64, 8, "int3")
    with pytest.raises(ValueError, match="last dim"):
        Q.QuantizedLinear(64, 8)(torch.randn(2, 63))
    c, s = Q.quantize_int8(torch.randn(8, 64))
    ops = torch.ops.minillm
    with pytest.raises(ValueError, match="x must be a 2-D float32"):
        ops.linear_int8(torch.randn(2, 64).double(), c, s, None)
    with pytest.raises(ValueError, match="columns"):
        ops.linear_int8(torch.randn(2, 65), c, s, None)
    with pytest.raises(ValueError, match="scale must be"):
        ops.linear_int8(torch.randn(2, 64), c, s[:7], None)
    with pytest.raises(ValueError, match="codes must be"):
        ops.linear_int8(torch.randn(2, 64), c.t(), s, None)
    c4, s4, o4 = Q.quantize_int4(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="offset must be"):
        ops.linear_int4(torch.randn(2, 64), c4, s4, o4[:, :1], 32, None)
    with pytest.raises(ValueError, match="bias must be"):
        ops.linear_int4(torch.randn(2, 64), c4, s4, o4, 32, torch.randn(9))
    g8, gs, go = Q.quantize_int8_grouped(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="linear_int8_grouped: codes must be a contiguous 2-D torch.uint8"):
        ops.linear_int8_grouped(torch.randn(2, 64), c, gs, go, 32, None)
    with pytest.raises(ValueError, match="linear_int8_grouped: offset must be .* shape \\(8, 2\\)"):
        ops.linear_int8_grouped(torch.randn(2, 64), g8, gs, go[:, :1], 32, None)
    with pytest.raises(ValueError, match="group_size must be one of"):
        ops.linear_int8_grouped(torch.randn(2, 64), g8, gs, go, 16, None)
    with pytest.raises(ValueError, match="group_size must be one of"):
        Q.QuantizedLinear(64, 8, "int8", group_size=48)
