"""Every public op on every memory layout a user can hand it, at every SIMD level, against torch.

Property-based (hypothesis): random shapes, dtypes and layouts -- permuted (transposed) memory order, step
slices (non-contiguous), storage offsets, expanded dims (stride 0) and, for numpy inputs, negative strides
(flips) -- for attention, scaled_dot_product_attention, linear, topk_search and FlatIndex, forward and backward.
Gradients are taken with respect to the storage the views were cut from, so an expanded input's gradient is
the sum over its repeats, as torch gives it. scripts/sanitize.sh runs this file under ASan/UBSan, where a read
past a buffer is a report even when the numbers happen to come out right.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm.index import FlatIndex
from minillm.ops import (_backend, attention, attention_qkvpacked, force_torch, linear, scaled_dot_product_attention,
                         topk_search)
from minillm.ops.reference import attention_reference, topk_search_reference

pytestmark = pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")

# The simd_level fixture runs each test once per level; hypothesis draws its examples inside that run.
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])


@st.composite
def layouts(draw, shape, dtype=torch.float32, expand=True, values=None):
    """(view, storage): a tensor of logical `shape` cut from a flat storage tensor in a random layout."""
    nd = len(shape)
    order = draw(st.permutations(range(nd)))  # memory order of the logical dims (outermost first)
    steps = [draw(st.sampled_from((1, 1, 2, 3))) for _ in shape]
    expanded = [expand and s > 1 and draw(st.integers(0, 5)) == 0 for s in shape]
    offset = draw(st.integers(0, 3))
    base = [1 if e else s * t for s, t, e in zip(shape, steps, expanded)]  # (*logical), before slicing
    mem = [base[i] for i in order]
    n = offset + math.prod(mem)
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    flat = (torch.randn(n, generator=g, dtype=torch.float64) if values is None else values(n, g)).to(dtype)
    inverse = [order.index(i) for i in range(nd)]
    view = flat[offset:].view(mem).permute(inverse)  # (*base) in logical order
    view = view[tuple(slice(None, None, t) for t in steps)]
    view = view.expand(shape) if any(expanded) else view  # stride 0 where expanded
    assert tuple(view.shape) == tuple(shape)
    return view, flat


def cut(flat, like):
    """The same layout as `like` (a view of some storage) over `flat`, which is differentiable."""
    return flat.as_strided(like.shape, like.stride(), like.storage_offset())


# ---- attention and the SDPA drop-in ----

TOL = {torch.float64: 1e-9, torch.float32: 2e-5}
HALF = (torch.bfloat16, torch.float16)


def _close(got, want, what, tol):
    err = (got.double() - want.double()).abs()
    limit = tol * (1 + want.double().abs())
    assert bool((err <= limit).all()), f"{what}: max error {err.max().item():.3g}, tolerance {tol:.1g}"


def _run(fn, flats, views, dtype, grad_seed, contiguous=False, **kwargs):
    """fn on views cut from fresh leaves of `flats` (in `dtype`), or on contiguous copies of those views:
    (output, gradients of the leaves)."""
    leaves = [f.detach().to(dtype).requires_grad_() for f in flats]
    inputs = [cut(f, t) for f, t in zip(leaves, views)]
    out = fn(*(x.contiguous() if contiguous else x for x in inputs), **kwargs)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(grad_seed))
    out.backward(g.to(dtype))
    return out.detach(), [f.grad for f in leaves]


def _compare(fn, torch_fn, flats, views, dtype, grad_seed, grad_names, **kwargs):
    """fp32/fp64: minillm's fn on the views against torch_fn in fp64, elementwise. bf16/fp16: the precision
    itself is tests/ops/test_attention.py's (error at most 2x torch's own, on contiguous inputs); here the
    layout must not change the result: fn on the views equals fn on contiguous copies of them (the same
    arithmetic on the same values), and both stay near fp64."""
    out, grads = _run(fn, flats, views, dtype, grad_seed, **kwargs)
    if dtype in HALF:
        want, want_grads = _run(fn, flats, views, dtype, grad_seed, contiguous=True, **kwargs)
        tol = 1e-6
    else:
        # torch on contiguous copies: torch 2.13's own CPU SDPA is wrong for overlapping inputs (an expanded
        # query), which minillm's torch path copies first (reference.sdpa_operand)
        want, want_grads = _run(torch_fn, flats, views, torch.float64, grad_seed, contiguous=True, **kwargs)
        tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == want.shape
    _close(out, want, "out", tol)
    for name, a, b in zip(grad_names, grads, want_grads):
        _close(a, b, name, 4 * tol)
    if dtype in HALF:  # and near fp64, far looser than a layout error (reads of the wrong elements are O(1))
        ref, ref_grads = _run(torch_fn, flats, views, torch.float64, grad_seed, contiguous=True, **kwargs)
        scale = 1 + max([ref.abs().max().item()] + [g.abs().max().item() for g in ref_grads])
        for name, a, b in zip(("out",) + tuple(grad_names), [out] + grads, [ref] + ref_grads):
            err = (a.double() - b).abs().max().item()
            assert err <= 0.05 * scale, f"{name}: max error {err:.3g} against fp64 (scale {scale:.3g})"


@st.composite
def attention_case(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    Nq, Nk, D = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 20))
    dtype = draw(st.sampled_from((torch.float32, torch.float64, torch.bfloat16, torch.float16)))
    q, k, v = (draw(layouts((B, H, n, D), dtype)) for n in (Nq, Nk, Nk))
    bits = lambda n, g: (torch.rand(n, generator=g) > 0.3).double()
    kpm = draw(st.none() | layouts((B, Nk), torch.bool, values=bits))
    qpm = draw(st.none() | layouts((B, Nq), torch.bool, values=bits))
    return q, k, v, kpm, qpm, draw(st.booleans()), dtype


@given(case=attention_case())
@SETTINGS
def test_attention_on_any_layout(simd_level, case):
    (q, fq), (k, fk), (v, fv), kpm, qpm, causal, dtype = case
    kpm = kpm[0] if kpm is not None else None  # strided bool views too
    qpm = qpm[0] if qpm is not None else None
    _compare(attention, attention_reference, (fq, fk, fv), (q, k, v), dtype, 1, ("dq", "dk", "dv"),
             causal=causal, key_padding_mask=kpm, query_padding_mask=qpm)


@st.composite
def packed_case(draw):
    B, N, D = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 20))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 3))
    dtype = draw(st.sampled_from((torch.float32, torch.float64, torch.bfloat16, torch.float16)))
    qkv = draw(layouts((B, N, H + 2 * Hkv, D), dtype))
    bits = lambda n, g: (torch.rand(n, generator=g) > 0.3).double()
    kpm = draw(st.none() | layouts((B, N), torch.bool, values=bits))
    window = draw(st.none() | st.tuples(st.integers(-1, 4), st.integers(-1, 4)))
    return qkv, H, Hkv, kpm, draw(st.booleans()), window, dtype


def _packed_reference(qkv, heads, kv_heads, **kw):
    """attention_qkvpacked by its definition: the reference on the three (B, heads, N, D) views, K/V repeated per
    query head, transposed back to (B, N, H, D)."""
    t = qkv.transpose(1, 2)
    q, k, v = t[:, :heads], t[:, heads:heads + kv_heads], t[:, heads + kv_heads:]
    G = heads // kv_heads
    return attention_reference(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), **kw).transpose(1, 2)


@given(case=packed_case())
@settings(SETTINGS, max_examples=50)
def test_attention_qkvpacked_on_any_layout(simd_level, case):
    """The packed entry point (output rows written in (B, N, H, D) order, q/k/v gradients into one packed
    gradient) against its definition, for grouped-query heads, masks, windows, causal or not, on any layout."""
    (qkv, flat), H, Hkv, kpm, causal, window, dtype = case
    kpm = kpm[0] if kpm is not None else None
    kw = dict(causal=causal, key_padding_mask=kpm, window=window)
    _compare(lambda x, **k: attention_qkvpacked(x, H, kv_heads=Hkv, **k),
             lambda x, **k: _packed_reference(x, H, Hkv, **k), (flat,), (qkv,), dtype, 3, ("dqkv",), **kw)


@given(case=attention_case())
@SETTINGS
def test_sdpa_dropin_on_any_layout(simd_level, case):
    (q, fq), (k, fk), (v, fv), kpm, _, causal, dtype = case
    # torch's SDPA is the reference here; a boolean (B, 1, 1, Nk) mask takes the native kernel, and a key
    # row with every key masked is NaN in torch (0 in minillm), so the mask keeps key 0.
    mask = None
    if kpm is not None and not causal:
        mask = kpm[0].clone()
        mask[:, 0] = True
        mask = mask[:, None, None, :]
    _compare(scaled_dot_product_attention, F.scaled_dot_product_attention, (fq, fk, fv), (q, k, v), dtype, 2,
             ("dq", "dk", "dv"), attn_mask=mask, is_causal=causal)


@given(case=attention_case())
@SETTINGS
def test_torch_paths_on_any_layout(simd_level, case):
    # The plain-torch twins (other devices, MINILLM_FORCE_TORCH=1) on the same layouts: torch's SDPA read
    # uninitialised memory for an expanded query before reference.sdpa_operand copied it.
    (q, fq), (k, fk), (v, fv), kpm, qpm, causal, dtype = case
    kpm = kpm[0] if kpm is not None else None
    qpm = qpm[0] if qpm is not None else None
    # In half precision torch picks its SDPA kernel by layout, each rounding its own way: fp32 here.
    dtype = torch.float32 if dtype in HALF else dtype
    with force_torch():
        _compare(attention, attention_reference, (fq, fk, fv), (q, k, v), dtype, 5, ("dq", "dk", "dv"),
                 causal=causal, key_padding_mask=kpm, query_padding_mask=qpm)
        # and the drop-in's fallback to torch's function (a dense mask never takes the kernel)
        dense = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
        _compare(scaled_dot_product_attention, F.scaled_dot_product_attention, (fq, fk, fv), (q, k, v), dtype, 6,
                 ("dq", "dk", "dv"), attn_mask=dense)


# ---- linear ----

@st.composite
def linear_case(draw):
    dtype = draw(st.sampled_from((torch.float32, torch.float64)))
    batch = tuple(draw(st.lists(st.integers(1, 5), max_size=2)))
    # Up to 40 rows: both kernels (few rows: streamed weights; more: the packed GEMM).
    M = draw(st.sampled_from((1, 3, 16, 17, 40)))
    K, N = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    x = draw(layouts(batch + (M, K), dtype))
    w = draw(layouts((N, K), dtype))
    b = draw(st.none() | layouts((N,), dtype))
    return x, w, b, dtype


@given(case=linear_case())
@SETTINGS
def test_linear_on_any_layout(simd_level, case):
    (x, fx), (w, fw), b, dtype = case
    views = [x, w] + ([b[0]] if b is not None else [])
    flats = [fx, fw] + ([b[1]] if b is not None else [])
    _compare(linear, F.linear, flats, views, dtype, 3, ("dx", "dweight", "dbias"))


# ---- top-k search and FlatIndex ----

def _numpy_layout(draw, t: torch.Tensor) -> np.ndarray:
    """A numpy view with t's values, its axes flipped (negative strides) where drawn."""
    a = t.contiguous().numpy()
    flips = [draw(st.booleans()) for _ in range(a.ndim)]
    src = a[tuple(slice(None, None, -1) if f else slice(None) for f in flips)].copy()
    view = src[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]  # == a, negative strides
    assert np.array_equal(view, a)
    return view


@st.composite
def topk_case(draw):
    N, d, Q = draw(st.integers(1, 60)), draw(st.integers(1, 40)), draw(st.integers(1, 12))
    k = draw(st.integers(1, N))
    cdtype = draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16)))
    queries = draw(layouts((Q, d)))[0]
    corpus = draw(layouts((N, d), cdtype))[0]
    return queries, corpus, k, draw(st.sampled_from(("ip", "cosine", "l2"))), draw(st.sampled_from(("torch", "numpy")))


def _check_topk(q, c, k, metric, scores, idx):
    """Tie-aware: the reported scores are the returned rows' own scores and equal brute force's k best."""
    q, c = torch.as_tensor(np.asarray(q)).double(), torch.as_tensor(np.asarray(c)).double()
    scores, idx = torch.as_tensor(np.asarray(scores)).double(), torch.as_tensor(np.asarray(idx))
    ranked, order = topk_search_reference(q, c, c.shape[0], metric)  # every row, best first
    ref_scores = ranked[:, :k]
    full = torch.empty_like(ranked).scatter_(1, order, ranked)  # (Q, N) score of each row, to look rows up
    # fp32 scores carry rounding of the norms' size (l2 is |q|^2 + |c|^2 - 2 q.c, with cancellation)
    norms = (q ** 2).sum(1, keepdim=True) + (c ** 2).sum(1).max()
    tol = 1e-5 * (1 + norms) + 1e-4 * ref_scores.abs()
    assert ((scores - ref_scores).abs() <= tol).all(), "scores differ from brute force"
    assert ((full.gather(1, idx) - ref_scores).abs() <= tol).all(), "a returned row does not have its score"
    assert all(len(set(r.tolist())) == k for r in idx), "duplicate indices"


@given(case=topk_case(), data=st.data())
@SETTINGS
def test_topk_search_on_any_layout(simd_level, case, data):
    queries, corpus, k, metric, kind = case
    if kind == "numpy" and corpus.dtype != torch.bfloat16:  # numpy has no bfloat16
        queries, corpus = _numpy_layout(data.draw, queries), _numpy_layout(data.draw, corpus)
    scores, idx = topk_search(queries, corpus, k, metric)
    _check_topk(queries.float() if isinstance(queries, torch.Tensor) else queries.astype(np.float32),
                corpus.float() if isinstance(corpus, torch.Tensor) else corpus.astype(np.float32), k, metric,
                scores, idx)


@given(case=topk_case(), data=st.data())
@SETTINGS
def test_flat_index_on_any_layout(simd_level, case, data):
    queries, corpus, k, metric, kind = case
    corpus = corpus.float()  # the index stores its own copy in its dtype; what it is given is float
    index = FlatIndex(corpus.shape[1], metric=metric)
    if kind == "numpy":
        index.add(_numpy_layout(data.draw, corpus))
        D, ids = index.search(_numpy_layout(data.draw, queries), k)
    else:
        index.add(corpus)
        D, ids = index.search(queries, k)
    _check_topk(queries, corpus, k, metric, D, ids)


# ---- the registered ops, called directly (torch.compile, torch.library tooling and users reach them) ----

@given(case=attention_case())
@SETTINGS
def test_registered_attention_ops_on_any_layout(simd_level, case):
    (q, _), (k, _), (v, _), kpm, qpm, causal, dtype = case
    if dtype in HALF:
        dtype = torch.float32  # the precision is the public suite's; here the op's own layout handling
        q, k, v = q.float(), k.float(), v.float()
    kpm = kpm[0] if kpm is not None else None
    qpm = qpm[0] if qpm is not None else None
    offset, scale = k.shape[2] - q.shape[2], q.shape[-1] ** -0.5
    out, lse = torch.ops.minillm.attention_fwd(q, k, v, kpm, qpm, causal, offset, scale)
    want = attention_reference(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=kpm,
                               query_padding_mask=qpm, scale=scale)
    _close(out, want, "out", TOL[dtype])
    dout = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(4)).expand(out.shape)
    grads = torch.ops.minillm.attention_bwd(dout, q, k, v, out, lse, None, kpm, qpm, causal, offset, scale)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    attention_reference(*ref, causal=causal, key_padding_mask=kpm, query_padding_mask=qpm,
                        scale=scale).backward(dout.double())
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        _close(g, r.grad, name, 4 * TOL[dtype])


@given(case=linear_case())
@SETTINGS
def test_registered_linear_ops_on_any_layout(simd_level, case):
    (x, _), (w, _), b, dtype = case
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x  # the ops take 2-D operands (a view when it can be)
    b = b[0] if b is not None else None
    _close(torch.ops.minillm.linear(x2, w, b), F.linear(x2.double(), w.double(), None if b is None else b.double()),
           "linear", TOL[dtype])
    _close(torch.ops.minillm.matmul(x2, w.t()), x2.double() @ w.double().t(), "matmul", TOL[dtype])


@given(case=topk_case())
@SETTINGS
def test_registered_topk_op_on_any_layout(simd_level, case):
    queries, corpus, k, metric, _ = case
    scores, idx = torch.ops.minillm.topk_search(queries, corpus, k, metric)
    _check_topk(queries, corpus.float(), k, metric, scores, idx)
