"""minillm.ops.attention's score modifiers (window, softcap, alibi_slopes, bias, sinks) and grouped-query heads
against attention_reference: forward and every gradient at every SIMD level, half precision against torch's own
error, gradcheck in float64, opcheck, torch.compile, the torch path, and the argument checks."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm.ops import _backend, attention, force_torch
from minillm.ops.reference import attention_reference

pytestmark = pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])


def _bias_shape(draw, B, H, Nq, Nk):
    """A shape broadcastable to (B, H, Nq, Nk): T5's (1, H, Nq, Nk), a key bias (B, 1, 1, Nk), 2-D (Nq, Nk), ..."""
    full = (B, H, Nq, Nk)
    nd = draw(st.integers(2, 4))
    return tuple(n if draw(st.booleans()) else 1 for n in full[4 - nd:])


@st.composite
def cases(draw, max_n=80):
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 3))
    Nq = draw(st.sampled_from((1, 3, 5, 17, 64, max_n)))
    Nk = draw(st.sampled_from((1, 4, 9, 33, 70, max_n)))
    D = draw(st.sampled_from((4, 8, 13, 32)))
    kw = {"causal": draw(st.booleans())}
    if draw(st.booleans()):
        kw["window"] = (draw(st.integers(-1, 40)), draw(st.integers(-1, 40)))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.sampled_from((0.3, 1.0, 5.0, 50.0)))
    if draw(st.booleans()):
        kw["alibi_slopes"] = torch.rand(H) if draw(st.booleans()) else torch.rand(B, H)
    if draw(st.booleans()):
        kw["bias"] = torch.randn(_bias_shape(draw, B, H, Nq, Nk))
        if draw(st.integers(0, 3)) == 0:  # an expanded view (stride 0), as models pass theirs
            kw["bias"] = kw["bias"][..., :1].expand(kw["bias"].shape[:-1] + (Nk,))
    if draw(st.booleans()):
        kw["sinks"] = 2 * torch.randn(H)
    if draw(st.booleans()):
        kpm = torch.rand(B, Nk) > 0.3
        kw["key_padding_mask"] = kpm
    if draw(st.integers(0, 3)) == 0:
        kw["query_padding_mask"] = torch.rand(B, Nq) > 0.3
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return (B, H, Hkv, Nq, Nk, D), kw, seed


def _grads_of(fn, dtype, shapes, kw, seed):
    """out and the gradients of q, k, v and of the bias and sinks (those that exist), all in `dtype` inputs."""
    (B, H, Hkv, Nq, Nk, D) = shapes
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))
    dout = torch.randn(B, H, Nq, D, generator=g)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    kw = dict(kw)
    leaves = [q, k, v]
    for name in ("bias", "sinks"):
        if name in kw:
            kw[name] = kw[name].to(dtype if dtype == torch.float64 else torch.float32).detach().requires_grad_()
            leaves.append(kw[name])
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = kw["alibi_slopes"].to(dtype)
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return [out.detach()] + list(grads)


@SETTINGS
@given(case=cases())
def test_modifiers_match_reference_at_every_simd_level(simd_level, case):
    shapes, kw, seed = case
    ours = _grads_of(attention, torch.float32, shapes, kw, seed)
    want = _grads_of(attention_reference, torch.float64, shapes, kw, seed)
    for name, o, w in zip(("out", "dq", "dk", "dv", "dbias/dsinks", "dsinks"), ours, want):
        torch.testing.assert_close(o.double(), w, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name} {kw}: {m}")


@SETTINGS
@given(case=cases(max_n=40))
def test_modifiers_float64_exact_at_every_simd_level(simd_level, case):
    shapes, kw, seed = case
    ours = _grads_of(attention, torch.float64, shapes, kw, seed)
    want = _grads_of(attention_reference, torch.float64, shapes, kw, seed)
    for o, w in zip(ours, want):
        torch.testing.assert_close(o, w, atol=1e-10, rtol=1e-9)


FEATURES = {
    "window": dict(window=(6, 2)),
    "window-causal": dict(window=(9, -1), causal=True),
    "softcap": dict(softcap=1.5),
    "alibi": dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
    "bias": dict(bias=torch.randn(1, 4, 1, 1).expand(1, 4, 97, 300) + torch.randn(97, 300)),
    "sinks": dict(sinks=torch.tensor([2.0, -1.0, 0.5, 3.0])),
    "all": dict(causal=True, window=(40, -1), softcap=3.0, alibi_slopes=torch.rand(4), bias=torch.randn(4, 97, 300),
                sinks=torch.randn(4)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("Nq", [97, 3], ids=["blocks", "decode"])
def test_half_precision_within_2x_torch_error(dtype, feature, Nq):
    """Error against an fp32 reference on the same rounded inputs, ours vs torch's own computation in `dtype`
    (the reference's formula run in half precision: matmuls, softmax and all)."""
    kw = dict(FEATURES[feature])
    if "bias" in kw:
        kw["bias"] = kw["bias"][..., -Nq:, :]
    torch.manual_seed(0)
    B, H, Hkv, Nk, D = 2, 4, 2, 300, 64
    q, k, v = torch.randn(B, H, Nq, D), torch.randn(B, Hkv, Nk, D), torch.randn(B, Hkv, Nk, D)
    q, k, v = (t.to(dtype).float() for t in (q, k, v))  # the rounded inputs, exactly representable in dtype
    dout = torch.randn(B, H, Nq, D).to(dtype)

    def run(fn, cast):
        ins = [t.to(cast).requires_grad_() for t in (q, k, v)]
        out = fn(*ins, **kw)
        return [out] + list(torch.autograd.grad(out, ins, dout.to(cast)))

    ref = run(attention_reference, torch.float32)
    ours = run(attention, dtype)
    theirs = run(_half_reference, dtype)
    for name, o, t, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
        e_o, e_t = (o.float() - r).abs().max().item(), (t.float() - r).abs().max().item()
        assert e_o <= 2 * e_t + 1e-6, f"{name}: minillm error {e_o:.3g} > 2x torch error {e_t:.3g}"


def _half_reference(q, k, v, *, causal=False, window=None, softcap=None, alibi_slopes=None, bias=None, sinks=None):
    """attention_reference's formula computed in the inputs' dtype, as torch computes a model's eager attention."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-2, -1)) * D ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(Nq)[:, None] + Nk - Nq, torch.arange(Nk)[None, :]
    if alibi_slopes is not None:
        s = s - alibi_slopes.to(s.dtype)[:, None, None] * (i - j).abs().to(s.dtype)
    if bias is not None:
        s = s + bias.to(s.dtype)
    left, right = window or (-1, -1)
    right = 0 if causal and right < 0 else (min(right, 0) if causal else right)
    if right >= 0:
        s = s.masked_fill(j > i + right, float("-inf"))
    if left >= 0:
        s = s.masked_fill(j < i - left, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype)[None, :, None, None].expand(B, H, Nq, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)[..., :Nk]
    return p @ v


@pytest.mark.parametrize("feature", list(FEATURES))
def test_gradcheck_float64(feature):
    torch.manual_seed(0)
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 5, 9, 8
    q = torch.randn(B, H, Nq, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Nk, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Nk, D, dtype=torch.float64, requires_grad=True)
    kw = {n: t for n, t in FEATURES[feature].items() if not isinstance(t, torch.Tensor)}
    if feature in ("window", "window-causal", "all"):
        kw["window"] = (3, 1) if feature == "window" else (4, -1)
    tensors = {}
    if "alibi_slopes" in FEATURES[feature]:
        kw["alibi_slopes"] = torch.rand(H, dtype=torch.float64)
    if "bias" in FEATURES[feature]:
        tensors["bias"] = torch.randn(1, H, Nq, Nk, dtype=torch.float64, requires_grad=True)
    if "sinks" in FEATURES[feature]:
        tensors["sinks"] = torch.randn(H, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(B, Nk, dtype=torch.bool)
    mask[1, 2] = mask[1, -1] = False
    names = list(tensors)

    def f(a, b, c, *extra):
        return attention(a, b, c, key_padding_mask=mask, **kw, **dict(zip(names, extra)))

    assert torch.autograd.gradcheck(f, (q, k, v, *tensors.values()))


def test_opcheck_with_every_modifier():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = torch.rand(2, 11) > 0.3
    alibi, sinks = torch.rand(2, 4), torch.randn(4, requires_grad=True)
    bias = torch.randn(1, 4, 9, 11, requires_grad=True)
    mods = (5, 1, 2.5, alibi, bias, sinks)
    torch.library.opcheck(torch.ops.minillm.attention_fwd.default, (q, k, v, mask, None, True, 2, 0.25, *mods))
    out, lse = torch.ops.minillm.attention_fwd(q, k, v, mask, None, True, 2, 0.25, *mods)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
            torch.randn_like(lse), mask, None, True, 2, 0.25, 5, 1, 2.5, alibi, bias.detach(), True)
    torch.library.opcheck(torch.ops.minillm.attention_bwd.default, args)
    dq, dk, dv, dbias = torch.ops.minillm.attention_bwd(*args)
    assert dk.shape == k.shape and dbias.shape == (2, 4, 9, 11)


def test_torch_compile_fullgraph_with_modifiers():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 33, 16), torch.randn(2, 2, 33, 16), torch.randn(2, 2, 33, 16)
    bias, sinks = torch.randn(4, 33, 33), torch.randn(4)

    def f(a, b, c, bias, sinks):
        return attention(a, b, c, causal=True, window=(8, -1), softcap=2.0, bias=bias, sinks=sinks).square().sum()

    leaves = [lambda: [t.clone().requires_grad_() for t in (q, k, v, bias, sinks)] for _ in range(2)]
    eager, comp = leaves[0](), leaves[1]()
    f(*eager).backward()
    torch.compile(f, fullgraph=True)(*comp).backward()
    for e, c in zip(eager, comp):
        torch.testing.assert_close(c.grad, e.grad, atol=1e-5, rtol=1e-4)


def test_torch_path_computes_the_modifiers():
    torch.manual_seed(0)
    shapes = (2, 4, 2, 40, 50, 16)
    kw = dict(FEATURES["all"], bias=torch.randn(4, 40, 50), key_padding_mask=torch.rand(2, 50) > 0.2)
    native = _grads_of(attention, torch.float32, shapes, kw, 1)
    with force_torch():
        fallback = _grads_of(attention, torch.float32, shapes, kw, 1)
    for n, f in zip(native, fallback):
        torch.testing.assert_close(n, f, atol=2e-5, rtol=1e-4)


def test_sliding_window_matches_mistral_mask_over_long_sequences():
    """window=(W - 1, 0) with causal is Mistral's sliding window: keys i - W < j <= i; queries in blocks far
    past the window skip every block before it (and must still be exact)."""
    torch.manual_seed(0)
    N, W = 700, 64
    q, k, v = torch.randn(1, 2, N, 32), torch.randn(1, 2, N, 32), torch.randn(1, 2, N, 32)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    dense = torch.where((j <= i) & (j > i - W), 0.0, float("-inf"))
    want = attention_reference(q, k, v, bias=dense)
    got = attention(q, k, v, causal=True, window=(W - 1, 0))
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_sinks_with_no_visible_key_and_empty_keys():
    q = torch.randn(1, 2, 3, 8)
    k = v = torch.randn(1, 2, 4, 8)
    sinks = torch.tensor([1.0, -2.0])
    mask = torch.zeros(1, 4, dtype=torch.bool)
    out, lse = torch.ops.minillm.attention_fwd(q, k, v, mask, None, False, 1, 0.3, -1, -1, 0.0, None, None, sinks)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(lse, sinks[None, :, None].expand(1, 2, 3))  # the sink alone
    empty = torch.randn(1, 2, 0, 8)
    out, lse = torch.ops.minillm.attention_fwd(q, empty, empty, None, None, False, 1, 0.3, -1, -1, 0.0, None, None,
                                              sinks)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, sinks[None, :, None].expand(1, 2, 3))


@pytest.mark.parametrize("kw,err,match", [
    (dict(window=(3,)), ValueError, "window must be"),
    (dict(window=(-2, 0)), ValueError, "window must be"),
    (dict(softcap=-1.0), ValueError, "softcap must be"),
    (dict(softcap=float("inf")), ValueError, "softcap must be"),
    (dict(alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes must have shape"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.int64)), TypeError, "alibi_slopes must be a float"),
    (dict(sinks=torch.rand(4, 1)), ValueError, "sinks must have shape"),
    (dict(bias=torch.rand(4, 5, 7)), ValueError, "bias must broadcast"),
    (dict(bias=torch.ones(5, 6, dtype=torch.bool)), TypeError, "bias must be a float"),
    (dict(alibi_slopes=torch.rand(4, requires_grad=True)), ValueError, "alibi_slopes are constants"),
])
def test_bad_modifier_arguments_raise_clear_errors(kw, err, match):
    q = torch.randn(2, 4, 5, 8)
    k = v = torch.randn(2, 2, 6, 8)
    with pytest.raises(err, match=match):
        attention(q, k, v, **kw)


def test_softcap_tanh_is_accurate_for_small_and_large_scores():
    """The kernel's vectorised tanh (exp-based, series near 0) against torch.tanh through the whole op."""
    q = torch.linspace(-30, 30, 64 * 16).reshape(1, 1, 64, 16)
    k = torch.randn(1, 1, 64, 16)
    v = torch.randn(1, 1, 64, 16)
    for cap in (0.01, 1.0, 30.0, 1000.0):
        torch.testing.assert_close(attention(q, k, v, softcap=cap),
                                   attention_reference(q.double(), k.double(), v.double(), softcap=cap).float(),
                                   atol=3e-5, rtol=1e-4)
    assert math.isfinite(attention(q * 1e4, k, v, softcap=5.0).abs().max().item())


@pytest.mark.parametrize("threads", [1, 4], ids=["in-place", "repeated"])
def test_grouped_backward_in_place_and_repeated_agree(monkeypatch, threads):
    """The CPU backward reads grouped K/V in place unless there are fewer (batch, key/value head) items than threads,
    when it repeats them per query head: both with every modifier, against the reference."""
    import importlib

    attention_mod = importlib.import_module("minillm.ops.attention")
    monkeypatch.setattr(attention_mod, "_threads", lambda macs: threads)
    shapes = (1, 6, 2, 37, 53, 16)
    kw = dict(FEATURES["all"], alibi_slopes=torch.rand(6), bias=torch.randn(6, 37, 53), sinks=torch.randn(6),
              key_padding_mask=torch.rand(1, 53) > 0.2)
    ours = _grads_of(attention, torch.float32, shapes, kw, 3)
    want = _grads_of(attention_reference, torch.float64, shapes, kw, 3)
    for o, w in zip(ours, want):
        torch.testing.assert_close(o.double(), w, atol=2e-5, rtol=1e-4)
