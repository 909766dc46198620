"""minillm.ops.attention against the plain-torch reference: forward, gradients, masks, dtypes, levels."""
import itertools
import os
import subprocess
import sys
import tempfile
import math

import pytest
import torch
import torch.nn.functional as F

from minillm.ops import _backend, attention, attention_qkvpacked, force_torch, scaled_dot_product_attention
from minillm.ops.attention import _AttentionFunction
from minillm.ops.reference import attention_reference

pytestmark = pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")

LENGTHS = (1, 7, 64, 97, 300)
HEAD_DIMS = (8, 40, 64, 80, 128)


def make_inputs(B, H, Nq, Nk, D, dtype=torch.float32, padded=False, fully_padded_row=False):
    q, k, v = (torch.randn(B, H, n, D, dtype=dtype) for n in (Nq, Nk, Nk))
    mask = None
    if padded:
        mask = torch.rand(B, Nk) > 0.25
        mask[:, 0] = True  # every sequence keeps a key unless asked otherwise
        if fully_padded_row:
            mask[-1] = False
    return q, k, v, mask


def visible_rows(B, H, Nq, Nk, causal, mask):
    """(B, H, Nq) bool: query rows that see at least one key."""
    vis = torch.ones(B, H, Nq, Nk, dtype=torch.bool)
    if causal:
        i = torch.arange(Nq)[:, None]
        j = torch.arange(Nk)[None, :]
        vis = vis & (j <= i + Nk - Nq)
    if mask is not None:
        vis = vis & mask[:, None, None, :]
    return vis, vis.any(-1)


def forward_backward(fn, q, k, v, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def check_against_reference(B, H, Nq, Nk, D, causal, padded, fully_padded_row=False):
    q, k, v, mask = make_inputs(B, H, Nq, Nk, D, padded=padded, fully_padded_row=fully_padded_row)
    grad = torch.randn(B, H, Nq, D)
    got = forward_backward(lambda a, b, c: attention(a, b, c, causal=causal, key_padding_mask=mask), q, k, v, grad)
    want = forward_backward(
        lambda a, b, c: attention_reference(a, b, c, causal=causal, key_padding_mask=mask),
        q.double(), k.double(), v.double(), grad.double(),
    )
    # Gradients of k and v sum over up to 300 query rows in fp32, hence their wider atol.
    for name, g, w, atol in zip(("out", "dq", "dk", "dv"), got, want, (1e-5, 1e-5, 3e-5, 3e-5)):
        torch.testing.assert_close(g, w.float(), atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    return got, mask


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("Nq,Nk", list(itertools.product(LENGTHS, LENGTHS)))
@pytest.mark.parametrize("B,H", [(1, 1), (3, 4)])
def test_fp32_grid(B, H, Nq, Nk, D, causal, padded):
    (out, dq, dk, dv), mask = check_against_reference(B, H, Nq, Nk, D, causal, padded, fully_padded_row=padded and B > 1)
    if padded and B > 1:  # the fully padded sequence: zeros, never NaN, and no gradient
        for t in (out, dq, dk, dv):
            assert torch.equal(t[-1], torch.zeros_like(t[-1]))


@pytest.mark.parametrize("causal,padded", [(False, False), (True, False), (False, True), (True, True)])
def test_every_simd_level(simd_level, causal, padded):
    for Nq, Nk, D in [(97, 300, 40), (64, 64, 64), (1, 7, 8), (300, 97, 80), (33, 33, 128)]:
        check_against_reference(2, 3, Nq, Nk, D, causal, padded)


def _errors(dtype, B, H, Nq, Nk, D, causal, padded):
    """Max abs error of minillm and of torch's SDPA in `dtype`, both against an fp32 reference on the
    same (rounded) inputs, for out, dq, dk, dv, over rows that see at least one key."""
    q, k, v, mask = make_inputs(B, H, Nq, Nk, D, dtype=dtype, padded=padded)
    grad = torch.randn(B, H, Nq, D, dtype=dtype)
    vis, rows = visible_rows(B, H, Nq, Nk, causal, mask)
    ref = forward_backward(
        lambda a, b, c: attention_reference(a, b, c, causal=causal, key_padding_mask=mask),
        q.float(), k.float(), v.float(), grad.float(),
    )
    ours = forward_backward(lambda a, b, c: attention(a, b, c, causal=causal, key_padding_mask=mask), q, k, v, grad)
    sdpa_mask = vis if (causal or padded) else None
    theirs = forward_backward(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=sdpa_mask),
                              q, k, v, grad)
    rows_d = rows[..., None]
    key_rows = mask[:, None, :, None] if mask is not None else torch.ones(1, 1, Nk, 1, dtype=torch.bool)

    def err(x, r, sel):
        return torch.where(sel, (x.float() - r).abs(), torch.zeros(())).nan_to_num(nan=float("inf")).max().item()

    sels = (rows_d, rows_d, key_rows, key_rows)
    return [err(o, r, s) for o, r, s in zip(ours, ref, sels)], [err(t, r, s) for t, r, s in zip(theirs, ref, sels)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("D", (7, 40, 64, 128))
@pytest.mark.parametrize("Nq,Nk", [(64, 64), (97, 300), (300, 97), (1, 300), (300, 300)])
def test_half_precision_within_2x_torch_error(dtype, Nq, Nk, D, causal, padded):
    ours, theirs = _errors(dtype, 2, 4, Nq, Nk, D, causal, padded)
    # torch's error is the yardstick; the tiny floor only covers cases where both are exact.
    for name, o, t in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert o <= 2 * t + 1e-6, f"{name}: minillm error {o:.3g} > 2x torch error {t:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"])
def test_other_dtypes_at_every_simd_level(simd_level, dtype):
    # Below AVX-512 the 16-bit rows are converted row by row and fp64 panels are narrower: other code paths.
    for Nq, Nk, D, causal, padded in [(64, 64, 64, False, False), (97, 40, 8, True, True), (16, 72, 16, False, True)]:
        if dtype == torch.float64:
            q, k, v, mask = make_inputs(2, 3, Nq, Nk, D, dtype=torch.float64, padded=padded)
            grad = torch.randn(2, 3, Nq, D, dtype=torch.float64)
            got = forward_backward(lambda a, b, c: attention(a, b, c, causal=causal, key_padding_mask=mask), q, k, v, grad)
            want = forward_backward(lambda a, b, c: attention_reference(a, b, c, causal=causal, key_padding_mask=mask),
                                    q, k, v, grad)
            for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
                torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")
            continue
        ours, theirs = _errors(dtype, 2, 3, Nq, Nk, D, causal, padded)
        for name, o, t in zip(("out", "dq", "dk", "dv"), ours, theirs):
            assert o <= 2 * t + 1e-6, f"{name}: minillm error {o:.3g} > 2x torch error {t:.3g}"


@pytest.mark.parametrize("switch", ["MINILLM_NO_BF16DOT", "MINILLM_NO_AMX"])
def test_bf16_without_bf16_dot_products(switch):
    # On a CPU with AMX-BF16 the bf16 products run on AMX tiles, on one with only AVX512-BF16 on vdpbf16ps;
    # MINILLM_NO_AMX=1 checks the vdpbf16ps path and MINILLM_NO_BF16DOT=1 the fp32 path that other CPUs take,
    # against the same 2x-torch-error yardstick.
    code = (
        "import sys; sys.path.insert(0, %r); import test_attention as t;"
        "errs = [t._errors(t.torch.bfloat16, 2, 4, n, n, d, c, p) for n, d, c, p in"
        " [(64, 64, False, False), (97, 40, True, True)]];"
        "assert all(o <= 2 * th + 1e-6 for ours, theirs in errs for o, th in zip(ours, theirs)), errs"
    ) % os.path.dirname(__file__)
    env = dict(os.environ, **{switch: "1"})
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    assert res.returncode == 0, res.stderr


def test_half_precision_outputs_keep_dtype():
    q, k, v, mask = make_inputs(1, 2, 5, 9, 16, dtype=torch.bfloat16, padded=True)
    q.requires_grad_()
    out = attention(q, k, v, key_padding_mask=mask)
    out.sum().backward()
    assert out.dtype == torch.bfloat16 and q.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("causal,padded", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("Nq,Nk", [(5, 7), (7, 5), (1, 4), (6, 6)])
def test_gradcheck_float64(causal, padded, Nq, Nk):
    q, k, v, mask = make_inputs(1, 2, Nq, Nk, 3, dtype=torch.float64, padded=padded)
    args = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, causal=causal, key_padding_mask=mask), args)


@pytest.mark.parametrize("causal,padded", [(False, False), (True, True)])
def test_gradcheck_float64_every_simd_level(simd_level, causal, padded):
    # fp64 panels are half as wide as fp32 ones (4 keys in the scalar build): the packing paths differ per level.
    for Nq, Nk, D in [(5, 7, 3), (6, 13, 4), (9, 3, 2)]:
        q, k, v, mask = make_inputs(2, 1, Nq, Nk, D, dtype=torch.float64, padded=padded)
        args = tuple(t.requires_grad_() for t in (q, k, v))
        assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, causal=causal, key_padding_mask=mask), args)


def test_gradcheck_through_lse_output():
    # The op also returns the log-sum-exp; its gradient must be exact too, not dropped.
    q, k, v, mask = make_inputs(2, 2, 5, 6, 4, dtype=torch.float64, padded=True)
    args = tuple(t.requires_grad_() for t in (q, k, v))
    op = torch.ops.minillm.attention_fwd
    assert torch.autograd.gradcheck(lambda a, b, c: op(a, b, c, mask, None, True, 1, 0.7), args)
    qmask = torch.tensor([[True, False, True, True, False], [False, True, True, True, True]])

    def with_query_padding(a, b, c):  # padded rows' lse is a constant +inf: compare the others
        out, lse = op(a, b, c, mask, qmask, True, 1, 0.7)
        return out, lse.masked_fill(~qmask[:, None, :], 0.0)

    assert torch.autograd.gradcheck(with_query_padding, args)


def test_lse_matches_logsumexp_at_every_simd_level(simd_level):
    # The lse the backward relies on: softmax sums from 1 (one dominant key) to ~2000 (equal scores), a row
    # count that is not whole vectors, and a NaN score, which must give a NaN lse.
    q, k, v, _ = make_inputs(2, 3, 37, 2000, 24)
    k[1, :, :1000] = 0.0  # batch 1: the first 1000 keys all score 0 against every query
    q[0, 0, 5] *= 30.0  # one sharply peaked row
    k[0, 1, 7, 0] = float("nan")
    out, lse = torch.ops.minillm.attention_fwd(q, k, v, None, None, False, 0, 0.2)
    ref = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * 0.2, dim=-1)
    nan_rows = torch.zeros_like(lse, dtype=torch.bool)
    nan_rows[0, 1] = True
    assert lse[nan_rows].isnan().all() and not lse[~nan_rows].isnan().any()
    err = (lse.double() - ref)[~nan_rows].abs() / (1 + ref[~nan_rows].abs())
    assert err.max() < 1e-6, err.max()


def test_opcheck_forward_and_backward():
    for causal, padded in [(False, False), (True, True)]:
        q, k, v, mask = make_inputs(2, 3, 9, 11, 16, padded=padded)
        qmask = torch.rand(2, 9) > 0.3 if padded else None
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        torch.library.opcheck(torch.ops.minillm.attention_fwd.default, (q, k, v, mask, qmask, causal, 2, 0.25))
        out, lse = torch.ops.minillm.attention_fwd(q, k, v, mask, qmask, causal, 2, 0.25)
        dout, dlse = torch.randn_like(out), torch.randn_like(lse)
        args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), dlse, mask, qmask, causal, 2,
                0.25)
        torch.library.opcheck(torch.ops.minillm.attention_bwd.default, args)


def test_torch_compile_fullgraph_forward_backward():
    q, k, v, mask = make_inputs(2, 2, 33, 33, 16, padded=True)

    def f(a, b, c):
        return attention(a, b, c, causal=True, key_padding_mask=mask).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    eager_args = [t.clone().requires_grad_() for t in (q, k, v)]
    comp_args = [t.clone().requires_grad_() for t in (q, k, v)]
    f(*eager_args).backward()
    compiled(*comp_args).backward()
    for e, c in zip(eager_args, comp_args):
        torch.testing.assert_close(c.grad, e.grad, atol=1e-5, rtol=1e-4)


def test_eager_path_equals_custom_op():
    # Eager CPU calls skip the custom-op dispatch (attention._AttentionFunction); same kernels, same bits,
    # and the lse gradient reaches the kernel through either path.
    q, k, v, mask = make_inputs(2, 3, 40, 52, 24, padded=True)
    args = (mask, None, True, 52 - 40, 24 ** -0.5)
    grads = []
    for fn in (_AttentionFunction.apply, torch.ops.minillm.attention_fwd.default):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = fn(*inputs, *args)
        (out.square().sum() + lse.sum()).backward()
        grads.append([out, lse] + [t.grad for t in inputs])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_forced_torch_path_matches_native():
    q, k, v, mask = make_inputs(2, 3, 50, 70, 24, padded=True)
    grad = torch.randn(2, 3, 50, 24)
    fn = lambda a, b, c: attention(a, b, c, causal=True, key_padding_mask=mask)  # noqa: E731
    native = forward_backward(fn, q, k, v, grad)
    with force_torch():
        fallback = forward_backward(fn, q, k, v, grad)
    for n, f in zip(native, fallback):
        torch.testing.assert_close(n, f, atol=1e-5, rtol=1e-4)


def test_strided_inputs_and_gradients():
    # (B, N, H, D) storage viewed as (B, H, N, D), as in most model code; a non-contiguous dout too.
    B, N, H, D = 2, 45, 3, 32
    qs, ks, vs = (torch.randn(B, N, H, D) for _ in range(3))
    q, k, v = (t.transpose(1, 2) for t in (qs, ks, vs))
    assert not q.is_contiguous()
    grad = torch.randn(B, N, H, D).transpose(1, 2)
    got = forward_backward(lambda a, b, c: attention(a, b, c, causal=True), q, k, v, grad)
    want = forward_backward(lambda a, b, c: attention_reference(a, b, c, causal=True), q.double(), k.double(),
                            v.double(), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), atol=1e-5, rtol=1e-4)
    # Broadcast (stride-0) keys and a last-dim-strided value tensor.
    k0 = torch.randn(1, 1, 20, D).expand(B, H, 20, D)
    v0 = torch.randn(B, H, D, 20).transpose(2, 3)
    torch.testing.assert_close(attention(q, k0, v0), attention_reference(q, k0, v0), atol=1e-5, rtol=1e-4)


def test_kv_cache_decode_alignment():
    # One new query after 30 cached keys sees all 31 keys: the last row of full causal attention.
    q, k, v, _ = make_inputs(2, 4, 31, 31, 16)
    full = attention(q, k, v, causal=True)
    step = attention(q[:, :, -1:], k, v, causal=True)
    torch.testing.assert_close(step, full[:, :, -1:], atol=1e-6, rtol=1e-5)
    # More queries than keys: the first Nq - Nk queries see nothing and return 0.
    out = attention(q, k[:, :, :10], v[:, :, :10], causal=True)
    assert torch.equal(out[:, :, :21], torch.zeros_like(out[:, :, :21]))
    torch.testing.assert_close(out, attention_reference(q, k[:, :, :10], v[:, :, :10], causal=True),
                               atol=1e-5, rtol=1e-4)


def test_fully_padded_single_sequence_is_zero_with_zero_grads():
    q, k, v, _ = make_inputs(1, 2, 6, 8, 16)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    out, dq, dk, dv = forward_backward(lambda a, b, c: attention(a, b, c, key_padding_mask=mask), q, k, v,
                                       torch.randn(1, 2, 6, 16))
    for t in (out, dq, dk, dv):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("Nq", [8, 1], ids=["tiled", "decode"])
def test_nan_propagates_from_visible_positions_only(Nq):
    q, k, v, mask = make_inputs(1, 1, 8, 8, 16, padded=True)
    q = q[:, :, :Nq] if Nq == 1 else q
    mask[0, 5] = False
    if Nq == 8:
        q[0, 0, 3, 0] = float("nan")
        out = attention(q, k, v, key_padding_mask=mask)
        assert torch.isnan(out[0, 0, 3]).all()
        assert torch.isfinite(out[0, 0, [0, 1, 2, 4, 5, 6, 7]]).all()
    # Garbage in a padded key never reaches the output.
    k2, v2 = k.clone(), v.clone()
    k2[0, 0, 5], v2[0, 0, 5] = float("nan"), float("inf")
    q2 = torch.randn_like(q)
    torch.testing.assert_close(attention(q2, k2, v2, key_padding_mask=mask), attention(q2, k, v, key_padding_mask=mask))
    # NaN in a visible value reaches every row that attends to it.
    v3 = v.clone()
    v3[0, 0, 2, 0] = float("nan")
    assert torch.isnan(attention(q2, k, v3, key_padding_mask=mask)[..., 0]).all()


@pytest.mark.parametrize("hole", [False, True], ids=["right-padded", "with-hole"])
def test_garbage_in_padded_keys_of_long_sequences(hole):
    # Several key blocks; a right-padded batch reads V in place up to its last kept key, a batch with a
    # hole copies V with the hole zeroed: in both, NaN / inf in padded rows must not reach any output.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 300, 32, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[0, 170:] = False
    mask[1, 290:] = False
    if hole:
        mask[:, 40:45] = False
    pad = ~mask[:, None, :, None].expand_as(k)
    k_bad = k.detach().masked_fill(pad, float("nan")).requires_grad_()
    v_bad = v.detach().masked_fill(pad, float("inf")).requires_grad_()
    grad = torch.randn(2, 2, 300, 32)
    got = forward_backward(lambda a, b, c: attention(a, b, c, key_padding_mask=mask), q, k_bad, v_bad, grad)
    want = forward_backward(lambda a, b, c: attention_reference(a, b, c, key_padding_mask=mask),
                            q.detach().double(), k.detach().double(), v.detach().double(), grad.double())
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w.float(), atol=3e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_right_padded_keys_at_every_simd_level(simd_level, causal):
    # Sequences ending inside a key block: the backward computes that block only up to the last kept key.
    # Padded rows hold NaN / inf, so a padded key that is computed anyway shows up in every gradient.
    torch.manual_seed(1)
    q, k, v = (torch.randn(3, 2, 70, 24) for _ in range(3))
    mask = torch.arange(70)[None, :] < torch.tensor([[70], [45], [13]])
    pad = ~mask[:, None, :, None].expand_as(k)
    grad = torch.randn(3, 2, 70, 24)
    got = forward_backward(lambda a, b, c: attention(a, b, c, causal=causal, key_padding_mask=mask), q,
                           k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf")), grad)
    want = forward_backward(lambda a, b, c: attention_reference(a, b, c, causal=causal, key_padding_mask=mask),
                            q.double(), k.double(), v.double(), grad.double())
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w.float(), atol=3e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert (got[2][pad] == 0).all() and (got[3][pad] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_non_positive_scale_with_masks(dtype, scale):
    # Masked scores are -inf before the scale is applied: a negative scale must not turn them into +inf.
    q, k, v, mask = make_inputs(2, 3, 70, 70, 64, dtype=dtype, padded=True)
    grad = torch.randn(2, 3, 70, 64, dtype=dtype)
    got = forward_backward(lambda a, b, c: attention(a, b, c, causal=True, key_padding_mask=mask, scale=scale),
                           q, k, v, grad)
    want = forward_backward(
        lambda a, b, c: attention_reference(a, b, c, causal=True, key_padding_mask=mask, scale=scale),
        q.double(), k.double(), v.double(), grad.double())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def test_custom_scale_and_empty_shapes():
    q, k, v, _ = make_inputs(2, 2, 9, 9, 8)
    torch.testing.assert_close(attention(q, k, v, scale=0.1), attention_reference(q, k, v, scale=0.1),
                               atol=1e-6, rtol=1e-5)
    assert attention(q[:, :, :0], k, v).shape == (2, 2, 0, 8)
    out = attention(q, k[:, :, :0], v[:, :, :0])
    assert torch.equal(out, torch.zeros_like(out))


# ---- the torch-signature drop-in ----


@pytest.mark.parametrize("Nq,Nk", [(16, 16), (10, 24), (24, 10)])
def test_sdpa_dropin_matches_torch(Nq, Nk):
    q, k, v, mask = make_inputs(2, 3, Nq, Nk, 16, padded=True)
    for kwargs in [{}, {"is_causal": True}, {"attn_mask": mask[:, None, None, :]},
                   {"scale": 0.3}]:
        torch.testing.assert_close(scaled_dot_product_attention(q, k, v, **kwargs),
                                   F.scaled_dot_product_attention(q, k, v, **kwargs), atol=1e-5, rtol=1e-4)


def test_sdpa_dropin_falls_back_for_dense_masks_and_dropout():
    q, k, v, _ = make_inputs(2, 3, 12, 12, 16)
    dense = torch.rand(2, 3, 12, 12) > 0.3
    dense[..., 0] = True
    additive = torch.randn(12, 12)
    for kwargs in [{"attn_mask": dense}, {"attn_mask": additive}]:
        torch.testing.assert_close(scaled_dot_product_attention(q, k, v, **kwargs),
                                   F.scaled_dot_product_attention(q, k, v, **kwargs))
    torch.manual_seed(1)
    a = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(1)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(a, b)


def test_sdpa_dropin_gqa():
    q = torch.randn(2, 6, 10, 16)
    k, v = torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                               atol=1e-5, rtol=1e-4)


def test_default_scale_is_inverse_sqrt_d():
    q, k, v, _ = make_inputs(1, 1, 4, 4, 9)
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, scale=1 / math.sqrt(9)))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("Nq,Nk", [(3, 9), (70, 70), (300, 97)])  # the decode path, then blocked rows
def test_query_padding_skips_rows_forward_and_backward(causal, Nq, Nk):
    B, H, D = 3, 2, 40
    q, k, v, mask = make_inputs(B, H, Nq, Nk, D, padded=True)
    qmask = torch.rand(B, Nq) > 0.3
    qmask[0, Nq // 2:] = False  # trailing padding, as in a right-padded batch
    qmask[1] = False  # a sequence with no query at all
    q[~qmask[:, None, :, None].expand_as(q)] = float("nan")  # never read
    grad = torch.randn(B, H, Nq, D)
    got = forward_backward(
        lambda a, b, c: attention(a, b, c, causal=causal, key_padding_mask=mask, query_padding_mask=qmask),
        q, k, v, grad)
    want = forward_backward(
        lambda a, b, c: attention_reference(a, b, c, causal=causal, key_padding_mask=mask, query_padding_mask=qmask),
        q.nan_to_num().double(), k.double(), v.double(), grad.double())
    for name, g, w, atol in zip(("out", "dq", "dk", "dv"), got, want, (1e-5, 1e-5, 3e-5, 3e-5)):
        torch.testing.assert_close(g, w.float(), atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    rows = ~qmask[:, None, :, None].expand_as(q)
    assert (got[0][rows] == 0).all() and (got[1][rows] == 0).all()


def test_query_padding_at_every_simd_level(simd_level):
    q, k, v, mask = make_inputs(2, 2, 50, 50, 24, padded=True)
    qmask = mask.clone()
    out = attention(q, k, v, causal=True, key_padding_mask=mask, query_padding_mask=qmask)
    want = attention_reference(q, k, v, causal=True, key_padding_mask=mask, query_padding_mask=qmask)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)


# ---- grouped-query attention: k / v with Hkv heads, each serving H / Hkv query heads ----


def _gqa_reference(q, k, v, **kw):
    G = q.shape[1] // k.shape[1]
    return attention_reference(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), **kw)


@pytest.mark.parametrize("H,Hkv", [(4, 1), (6, 2), (8, 4)])
@pytest.mark.parametrize("Nq,Nk", [(1, 40), (37, 53), (130, 130)])
@pytest.mark.parametrize("causal,padded", [(False, False), (True, False), (False, True), (True, True)])
def test_grouped_query_attention_at_every_simd_level(simd_level, H, Hkv, Nq, Nk, causal, padded):
    torch.manual_seed(H * 1000 + Nq)
    B, D = 2, 32
    q = torch.randn(B, H, Nq, D)
    # k and v as strided views of a fused (B, Nk, 2, Hkv, D) projection, as models make them
    kv = torch.randn(B, Nk, 2, Hkv, D)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    mask = None
    if padded:
        mask = torch.rand(B, Nk) > 0.3
        mask[:, 0] = True
    grad = torch.randn(B, H, Nq, D)
    got = forward_backward(lambda a, b, c: attention(a, b, c, causal=causal, key_padding_mask=mask), q, k, v, grad)
    want = forward_backward(lambda a, b, c: _gqa_reference(a, b, c, causal=causal, key_padding_mask=mask),
                            q.double(), k.double(), v.double(), grad.double())
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w.float(), atol=5e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():  # the forward-only path reads each key/value head in place for its group
        torch.testing.assert_close(attention(q, k, v, causal=causal, key_padding_mask=mask), got[0], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_grouped_query_attention_half_precision_within_2x_torch_error(dtype):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 97, 64), torch.randn(2, 2, 300, 64), torch.randn(2, 2, 300, 64)
    ref = _gqa_reference(q.double(), k.double(), v.double(), causal=True)
    with torch.no_grad():
        ours = attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
        theirs = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), enable_gqa=True,
                                                attn_mask=torch.ones(97, 300, dtype=torch.bool).tril(300 - 97))
    e_ours, e_theirs = (ours.double() - ref).abs().max(), (theirs.double() - ref).abs().max()
    assert e_ours <= 2 * e_theirs, f"minillm error {e_ours:.3g} > 2x torch error {e_theirs:.3g}"


def test_grouped_query_attention_gradcheck_and_opcheck():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, True, True, False]])
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, causal=True, key_padding_mask=mask), (q, k, v))
    torch.library.opcheck(torch.ops.minillm.attention_fwd.default, (q, k, v, mask, None, True, 2, 0.25))
    out, lse = torch.ops.minillm.attention_fwd(q, k, v, mask, None, True, 2, 0.25)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, mask, None,
            True, 2, 0.25)
    torch.library.opcheck(torch.ops.minillm.attention_bwd.default, args)
    dq, dk, dv, dbias = torch.ops.minillm.attention_bwd(*args)
    assert dk.shape == k.shape and dv.shape == v.shape and dbias.numel() == 0


def test_grouped_query_heads_must_divide():
    q, k = torch.randn(1, 6, 4, 8), torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="grouped-query"):
        attention(q, k, k)
    # torch's drop-in semantics: different head counts need enable_gqa=True
    with pytest.raises(RuntimeError):
        scaled_dot_product_attention(q, k[:, :2], k[:, :2])
    torch.testing.assert_close(scaled_dot_product_attention(q, k[:, :2], k[:, :2], enable_gqa=True),
                               F.scaled_dot_product_attention(q, k[:, :2], k[:, :2], enable_gqa=True))


# ---- attention_qkvpacked: one packed projection in, (B, N, H, D) out ----


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)])
def test_qkvpacked_paths_agree(H, Hkv):
    """The eager CPU path (output written in (B, N, H, D) order, one packed gradient) equals the no-grad path
    bit for bit, and the torch path (force_torch) and the compiled path (attention() of the three views) to
    rounding; the output reshapes to (B, N, H * D) without a copy and the gradient comes back packed."""
    torch.manual_seed(0)
    B, N, D = 2, 45, 16
    qkv = torch.randn(B, N, H + 2 * Hkv, D)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 33:] = False
    grad = torch.randn(B, N, H, D)

    def run(fn=attention_qkvpacked):
        x = qkv.clone().requires_grad_()
        out = fn(x, H, kv_heads=Hkv, causal=True, key_padding_mask=mask)
        out.backward(grad)
        return out.detach(), x.grad

    out, dqkv = run()
    assert out.shape == (B, N, H, D) and out.is_contiguous() and out.reshape(B, N, H * D).data_ptr() == out.data_ptr()
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous()
    with torch.no_grad():
        assert torch.equal(attention_qkvpacked(qkv, H, kv_heads=Hkv, causal=True, key_padding_mask=mask), out)
    with force_torch():
        t_out, t_dqkv = run()
    torch.testing.assert_close(out, t_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dqkv, t_dqkv, atol=1e-5, rtol=1e-4)
    c_out, c_dqkv = run(torch.compile(attention_qkvpacked, fullgraph=True, dynamic=False))
    torch.testing.assert_close(out, c_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dqkv, c_dqkv, atol=1e-5, rtol=1e-4)


def test_qkvpacked_gradcheck_float64():
    torch.manual_seed(0)
    qkv = torch.randn(1, 7, 4, 5, dtype=torch.float64, requires_grad=True)  # H 2, Hkv 1
    torch.autograd.gradcheck(lambda x: attention_qkvpacked(x, 2, kv_heads=1, causal=True, window=(3, 0)), (qkv,))


def test_qkvpacked_rejects_a_qkv_that_is_not_heads_plus_two_kv_heads():
    qkv = torch.randn(1, 4, 9, 8)
    with pytest.raises(ValueError, match="heads \\+ 2 \\* kv_heads"):
        attention_qkvpacked(qkv, 4)  # 4 + 2 * 4 = 12 != 9
    with pytest.raises(ValueError, match="kv_heads dividing"):
        attention_qkvpacked(qkv, 5, kv_heads=2)
    with pytest.raises(ValueError, match="qkv must be a \\(B, N, H \\+ 2 Hkv, D\\)"):
        attention_qkvpacked(torch.randn(4, 12, 8), 4)
