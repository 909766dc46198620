"""The torch paths CUDA calls take without a measured kernel (minillm.ops.reference.attention_sdpa and
topk_search_torch) against the plain references that define minillm's semantics, on CPU tensors standing in
for CUDA ones: bottom-right causal alignment, padded keys and queries never used (NaN there stays out), rows
that see no key returning 0 with zero gradients, top-k ties to the lower index and NaN scores ranked last."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.ops import attention, reference
from minillm.ops.reference import (METRICS, attention_reference, attention_sdpa, topk_search_reference,
                                   topk_search_torch)


def _forward_backward(fn, q, k, v, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return [out] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in (q, k, v)]


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 3), Nq=st.integers(1, 12), Nk=st.integers(1, 12),
       D=st.integers(1, 9), causal=st.booleans(), key_pad=st.booleans(), query_pad=st.booleans(),
       offset=st.one_of(st.none(), st.integers(-5, 5)), seed=st.integers(0, 2 ** 16))
def test_attention_sdpa_matches_the_reference(B, H, Nq, Nk, D, causal, key_pad, query_pad, offset, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (Nq, Nk, Nk))
    kpm = torch.rand(B, Nk, generator=g) > 0.4 if key_pad else None
    qpm = torch.rand(B, Nq, generator=g) > 0.3 if query_pad else None
    if kpm is not None:  # padded keys hold NaN: never read
        k = k.masked_fill(~kpm[:, None, :, None], float("nan"))
        v = v.masked_fill(~kpm[:, None, :, None], float("nan"))
    if qpm is not None:
        q = q.masked_fill(~qpm[:, None, :, None], float("nan"))
    grad = torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64)
    kwargs = dict(causal=causal, key_padding_mask=kpm, query_padding_mask=qpm, causal_offset=offset,
                  scale=0.7 if seed % 2 else None)
    got = _forward_backward(lambda a, b, c: attention_sdpa(a, b, c, **kwargs), q, k, v, grad)
    want = _forward_backward(lambda a, b, c: attention_reference(a, b, c, **kwargs), q, k, v, grad)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-8)  # NaN nowhere (assert_close fails on it)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_sdpa_low_precision_and_strided(dtype):
    # (B, N, H, D) storage viewed as (B, H, N, D); within 2x torch's own error against fp64.
    q, k, v = (torch.randn(2, n, 4, 32).transpose(1, 2) for n in (40, 70, 70))
    mask = torch.rand(2, 70) > 0.3
    got = attention_sdpa(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, key_padding_mask=mask).double()
    want = attention_reference(q.double(), k.double(), v.double(), causal=True, key_padding_mask=mask)
    own = attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, key_padding_mask=mask).double()
    assert (got - want).abs().max() <= 2 * max((own - want).abs().max(), 1e-6)


def test_attention_sdpa_edge_cases():
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    empty = torch.randn(1, 2, 0, 8)
    out = attention_sdpa(q, empty, empty)  # no key at all: zeros, zero gradients
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(q.grad, torch.zeros_like(q))
    # Decoding: one query after the cache sees every key (no mask at all), as the last causal row.
    k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    full = attention_reference(torch.randn(1, 2, 9, 8), k, v, causal=True)
    step = attention_sdpa(q[:, :, :1].detach(), k, v, causal=True)
    torch.testing.assert_close(step, attention_reference(q[:, :, :1].detach(), k, v, causal=True))
    assert full.shape == (1, 2, 9, 8)


def _tied_corpus(g, N, d, dtype):
    # Small integers: every score is exact in fp32, so ties are real and tile boundaries cannot reorder them.
    c = torch.randint(-3, 4, (N, d), generator=g).to(dtype)
    c[torch.randint(0, N, (max(1, N // 10),), generator=g)] = c[0].clone()  # duplicated rows tie exactly
    return c


@settings(max_examples=60, deadline=None)
@given(N=st.integers(1, 300), Q=st.integers(1, 20), d=st.integers(1, 12), metric=st.sampled_from(METRICS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), nan_rows=st.booleans(),
       max_scores=st.sampled_from([1, 50, 1000, 1 << 26]), seed=st.integers(0, 2 ** 16), data=st.data())
def test_topk_search_torch_matches_the_reference(N, Q, d, metric, dtype, nan_rows, max_scores, seed, data):
    g = torch.Generator().manual_seed(seed)
    c = _tied_corpus(g, N, d, dtype)
    if nan_rows:
        c[torch.randint(0, N, (max(1, N // 7),), generator=g)] = float("nan")
    q = torch.randint(-3, 4, (Q, d), generator=g).float()
    k = data.draw(st.integers(1, N))
    got = topk_search_torch(q, c, k, metric, max_scores=max_scores)
    want = topk_search_reference(q, c, k, metric)
    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    if metric != "cosine":  # integer scores are exact: the very same ids, tie order included
        assert torch.equal(got[1], want[1])
        return
    # Cosine divides by norms, so rows at one angle tie only up to rounding: tie-aware, each id carries its
    # own reference score and appears once.
    full = topk_search_reference(q, c, N, metric)
    own = torch.stack([full[0][i][torch.argsort(full[1][i])][got[1][i]] for i in range(Q)])
    torch.testing.assert_close(got[0], own, equal_nan=True)
    assert all(len(set(row.tolist())) == k for row in got[1])


def test_topk_search_torch_bounds_its_tiles(monkeypatch):
    # No score tile holds more than max_scores scores, whatever Q and N.
    sizes = []
    real_mm = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: sizes.append(a.shape[0] * b.shape[1]) or real_mm(a, b))
    q, c = torch.randn(300, 8), torch.randn(5000, 8)
    got = topk_search_torch(q, c, 5, "ip", max_scores=20_000)
    assert max(sizes) <= 20_000 and len(sizes) > 1
    assert torch.equal(got[1], topk_search_reference(q, c, 5, "ip")[1])


def test_torch_paths_copy_overlapping_inputs():
    # torch 2.13's CPU F.scaled_dot_product_attention returns wrong rows (zeros, uninitialised memory) for inputs
    # whose elements overlap, e.g. a query expanded along N from one row. minillm's torch paths (attention_sdpa:
    # other devices, MINILLM_FORCE_TORCH; the drop-in's fallback to torch's function) copy such inputs first.
    from minillm.ops import force_torch, scaled_dot_product_attention

    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(4096, generator=gen)
    rng = np.random.default_rng(0)
    layouts = [((1, 1, 2, 2), (1, 1, 0, 1))]  # found by tests/ops/test_layouts.py
    while len(layouts) < 200:
        shape = tuple(int(rng.choice([1, 2, 3])) for _ in range(3)) + (int(rng.choice([1, 2, 4, 8])),)
        strides = tuple(int(rng.choice([0, 1, 2, 3, 4, 8, 16])) for _ in range(3)) + (1,)
        if reference._overlaps(flat.as_strided(shape, strides)):
            layouts.append((shape, strides))
    for shape, strides in layouts:
        q = flat.as_strided(shape, strides)
        k = torch.randn(shape[0], shape[1], 2, shape[3], generator=gen)
        v = torch.randn(k.shape, generator=gen)
        want = attention_reference(q.double(), k.double(), v.double())
        with force_torch():
            got = attention(q, k, v)
        dense = torch.ones(shape[2], 2, dtype=torch.bool)  # a dense mask: the drop-in calls torch's function
        got_dropin = scaled_dot_product_attention(q, k, v, attn_mask=dense)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=f"{shape} {strides}")
        torch.testing.assert_close(got_dropin.double(), want, atol=1e-5, rtol=1e-5, msg=f"{shape} {strides}")
