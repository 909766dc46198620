"""On a machine with a CUDA GPU (scripts/gpu_check.sh runs these there; elsewhere they skip): minillm's CUDA
kernels, forced on with MINILLM_CUDA_KERNELS=on semantics, against the fp64 reference, forward and backward;
and the path CUDA calls take by default (torch, unless the dispatch table has a measured row) against the
same reference."""
import pytest
import torch

from minillm.ops import _backend, attention, topk_search
from minillm.ops.reference import attention_reference, topk_search_reference

has_gpu = torch.cuda.is_available()
gpu = pytest.mark.skipif(not has_gpu, reason="needs a CUDA GPU")
kernels = pytest.mark.skipif(not (has_gpu and _backend.native_available() and _backend.cuda_kernels_built()),
                             reason="needs a CUDA GPU and an extension built with the CUDA kernels")
MODES = [pytest.param("on", marks=kernels, id="kernel"), pytest.param("auto", marks=gpu, id="dispatched")]


def _attention_case(mode, dtype, causal, Nq, Nk, D, padded, strided):
    dev = torch.device("cuda")
    B, H = 2, 3
    if strided:  # (B, N, H, D) storage viewed as (B, H, N, D), as a fused projection gives
        q, k, v = (torch.randn(B, n, H, D, device=dev, dtype=dtype).transpose(1, 2) for n in (Nq, Nk, Nk))
    else:
        q, k, v = (torch.randn(B, H, n, D, device=dev, dtype=dtype) for n in (Nq, Nk, Nk))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = qmask = None
    if padded:
        mask = torch.rand(B, Nk, device=dev) > 0.25
        mask[0] = False  # a fully padded sequence: zeros, zero gradients
        qmask = torch.rand(B, Nq, device=dev) > 0.2
    with _backend.cuda_kernels(mode):
        out = attention(q, k, v, causal=causal, key_padding_mask=mask, query_padding_mask=qmask)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = attention_reference(*ref, causal=causal, key_padding_mask=mask, query_padding_mask=qmask)
    want.backward(grad.double())
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    for g, w in zip((out, q.grad, k.grad, v.grad), (want, *(t.grad for t in ref))):
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk,D", [(1, 77, 64), (100, 100, 64), (130, 70, 128), (65, 200, 256), (33, 33, 40)])
def test_attention_matches_reference(mode, dtype, causal, Nq, Nk, D):
    _attention_case(mode, dtype, causal, Nq, Nk, D, padded=False, strided=False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk,D", [(50, 90, 64), (90, 50, 32), (257, 257, 128)])
def test_attention_padded_and_strided(mode, dtype, causal, Nq, Nk, D):
    _attention_case(mode, dtype, causal, Nq, Nk, D, padded=True, strided=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("k", [1, 10, 1000])
def test_topk_matches_reference(mode, metric, k):
    dev = torch.device("cuda")
    corpus, queries = torch.randn(20000, 96, device=dev), torch.randn(37, 96, device=dev)
    with _backend.cuda_kernels(mode):
        scores, idx = topk_search(queries, corpus, k, metric)
    want_scores, _ = topk_search_reference(queries.double(), corpus.double(), k, metric)
    torch.testing.assert_close(scores.double(), want_scores, atol=1e-3, rtol=1e-4)
    assert all(len(set(r.tolist())) == k for r in idx.cpu())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_ties_and_half_corpora(mode, dtype):
    # Duplicated rows tie exactly: the lower index comes first, as on the CPU. Tie-aware: the k best scores
    # match the reference's, each id carries its own score, and a duplicate follows its twin.
    dev = torch.device("cuda")
    base = torch.randn(3000, 48, device=dev)
    corpus = torch.cat([base, base[:500]]).to(dtype)  # rows 3000.. repeat rows 0..
    queries = torch.randn(9, 48, device=dev)
    with _backend.cuda_kernels(mode):
        scores, idx = topk_search(queries, corpus, 25, "ip")
    want_scores, _ = topk_search_reference(queries.cpu(), corpus.cpu(), 25, "ip")
    torch.testing.assert_close(scores.cpu(), want_scores, atol=1e-4, rtol=1e-4)
    own = (corpus[idx].float() * queries[:, None, :]).sum(-1)
    torch.testing.assert_close(scores, own, atol=1e-4, rtol=1e-4)
    for row in idx.cpu().tolist():
        for pos, j in enumerate(row):
            if j >= 3000:
                assert j - 3000 in row[:pos], f"duplicate {j} came before (or without) its twin {j - 3000}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 40])
@pytest.mark.parametrize("mods", [dict(), dict(window=(64, -1)), dict(softcap=20.0), dict(alibi=True), dict(sinks=True),
                                  dict(window=(32, -1), softcap=10.0, alibi=True, sinks=True)],
                         ids=["plain", "window", "softcap", "alibi", "sinks", "all"])
def test_attention_grouped_heads_and_modifiers(mode, dtype, D, mods):
    # The tensor-core kernels (cuda/flash_*.cuh) take grouped-query heads in place and every modifier but a bias.
    dev = torch.device("cuda")
    B, H, Hkv, Nq, Nk = 2, 4, 2, 200, 300
    q = torch.randn(B, H, Nq, D, device=dev, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Hkv, Nk, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = torch.rand(B, Nk, device=dev) > 0.2
    mask[:, -1] = True
    kw = dict(window=mods.get("window"), softcap=mods.get("softcap"),
              alibi_slopes=torch.rand(H, device=dev) * 0.1 if mods.get("alibi") else None,
              sinks=torch.randn(H, device=dev, requires_grad=True) if mods.get("sinks") else None)
    with _backend.cuda_kernels(mode):
        out = attention(q, k, v, causal=True, key_padding_mask=mask, **kw)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rkw = dict(kw, alibi_slopes=None if kw["alibi_slopes"] is None else kw["alibi_slopes"].double(),
               sinks=None if kw["sinks"] is None else kw["sinks"].detach().double())
    want = attention_reference(*ref, causal=True, key_padding_mask=mask, **rkw)
    want.backward(grad.double())
    for g, w in zip((out, q.grad, k.grad, v.grad), (want, *(t.grad for t in ref))):
        torch.testing.assert_close(g.double(), w, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("k", [10, 100])
def test_topk_many_queries_on_tensor_cores(mode, dtype, metric, k):
    # >= 16 queries over a 16-bit corpus: the tensor-core scan (cuda/topk_mma.cuh).
    dev = torch.device("cuda")
    corpus, queries = torch.randn(30000, 96, device=dev).to(dtype), torch.randn(300, 96, device=dev)
    with _backend.cuda_kernels(mode):
        scores, idx = topk_search(queries, corpus, k, metric)
    want_scores, _ = topk_search_reference(queries.double(), corpus.double(), k, metric)
    torch.testing.assert_close(scores.double(), want_scores, atol=1e-3, rtol=1e-4)
    assert all(len(set(r.tolist())) == k for r in idx.cpu())


@gpu
def test_default_cuda_path_follows_the_dispatch_table():
    # With no row for this GPU, CUDA calls take torch; backend_info says so.
    info = _backend.backend_info()
    arch = _backend.cuda_arch(torch.device("cuda"))
    if _backend.cuda_kernels_mode() == "auto" and not any(tuple(r.arch) == arch for r in _backend.CUDA_KERNEL_TABLE):
        assert info["ops"]["attention"]["cuda"].startswith("torch (")


@kernels
def test_cuda_bindings_check_scratch_extents():
    # The bindings check every device buffer against its storage too, and the launchers the scratch they are
    # given: too small a top-k workspace or attention-backward delta raises instead of writing past it.
    dev = torch.device("cuda")
    C = _backend._C
    buf = _backend.buf
    queries, corpus = torch.randn(4, 32, device=dev), torch.randn(5000, 32, device=dev)
    scores = torch.empty(4, 10, device=dev)
    idx = torch.empty(4, 10, dtype=torch.int64, device=dev)
    need = C.cuda_topk_workspace(4, 5000, 10, 0)
    args = (buf(queries), buf(corpus), 32, 0, 4, 5000, 32, 10, 0, buf(scores), buf(idx))
    if need > 0:
        small = torch.empty(need - 1, dtype=torch.uint8, device=dev)
        with pytest.raises(RuntimeError, match="workspace holds"):
            C.cuda_topk(*args, buf(small), 0, _backend.cuda_stream(queries))
    with pytest.raises(ValueError, match="out_idx reaches"):
        C.cuda_topk(*args[:10], buf(idx[:3]), (0, 0), 0, _backend.cuda_stream(queries))
    q = torch.randn(1, 2, 8, 16, device=dev)
    lse = torch.empty(1, 2, 8, device=dev)
    st = tuple(q.stride()[:3])
    grads = [torch.empty_like(q) for _ in range(3)]  # kept alive: the kernel writes them
    delta, short = torch.empty(16, device=dev), torch.empty(15, device=dev)  # B * H * Nq floats, and one fewer
    bwd = (buf(q),) * 5 + (buf(lse), (0, 0), (0, 0), (0, 0)) + tuple(buf(g) for g in grads) + (
        (1, 2, 8, 8, 16), st, st, st, st, st, False, 0, 0.25, 0)
    with pytest.raises(ValueError, match="delta reaches"):
        C.cuda_attention_bwd(*bwd, buf(short), 0, _backend.cuda_stream(q))
    C.cuda_attention_bwd(*bwd, buf(delta), 0, _backend.cuda_stream(q))
    torch.cuda.synchronize()
