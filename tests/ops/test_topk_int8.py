"""minillm.ops.Int8Corpus: int8 codes scanned by the kernel, candidates rescored exactly."""
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from minillm.ops import Int8Corpus, _backend, force_torch, topk_search
from minillm.ops.reference import topk_search_reference

pytestmark = pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")

METRICS = ("ip", "cosine", "l2")


def clustered(n, d, centres=50, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g)
    x = c[torch.randint(0, centres, (n,), generator=g)] + spread * torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def test_codes_reconstruct_each_row_within_half_a_step():
    x = torch.randn(300, 45) * torch.rand(300, 1) * 10
    x[7] = 0  # a zero row gets scale 1 and zero codes
    ic = Int8Corpus(x)
    assert ic.codes.shape == (300, 64) and ic.codes.dtype == torch.int8
    assert (ic.codes[:, 45:] == 0).all()
    recon = ic.codes[:, :45].float() * ic.scales[:, None]
    assert ((recon - x).abs() <= ic.scales[:, None] / 2 + 1e-6).all()
    torch.testing.assert_close(ic.norm2, (x.double() ** 2).sum(1).float())
    assert (ic.codes[7] == 0).all() and ic.scales[7] == 1


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("Q,k", [(1, 10), (5, 1), (20, 3), (70, 25)])
def test_results_equal_exact_search_on_clustered_data(metric, Q, k):
    c = clustered(4000, 96)
    q = c[torch.randint(0, 4000, (Q,))] + 0.05 * torch.randn(Q, 96)
    scores, idx = topk_search(q, Int8Corpus(c), k, metric)
    want_scores, want_idx = topk_search_reference(q.double(), c.double(), k, metric)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(idx, want_idx)])
    assert recall >= 0.99
    torch.testing.assert_close(scores.double(), want_scores, atol=1e-5, rtol=1e-5)


def test_every_simd_level(simd_level):
    c = torch.randn(1000, 40)
    for Q in (1, 3, 40):  # integer dot products for a few queries, widened tiles for more
        q = torch.randn(Q, 40)
        _, idx = topk_search(q, Int8Corpus(c), 10, "ip")
        _, want = topk_search_reference(q, c, 10, "ip")
        assert torch.equal(idx, want)


@pytest.mark.parametrize("metric", METRICS)
def test_every_query_count_up_to_the_gemm_at_every_simd_level(simd_level, metric):
    # Below 8 or 9 queries (by CPU) the codes are scored in place (passes of 4 queries, then the rest in
    # one), from there tiles are widened and scored as a GEMM: every count on either side.
    c = clustered(3000, 80)
    ic = Int8Corpus(c)
    for Q in range(1, 18):
        q = c[torch.randint(0, 3000, (Q,))] + 0.05 * torch.randn(Q, 80)
        scores, idx = topk_search(q, ic, 5, metric)
        want_scores, want_idx = topk_search_reference(q.double(), c.double(), 5, metric)
        recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(idx, want_idx)])
        assert recall >= 0.99, Q
        torch.testing.assert_close(scores.double(), want_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_a_streamed_int8_corpus_at_9_to_16_queries(simd_level, metric):
    # Codes of 64 MB or more are scored in place up to 16 queries where scans request rows ahead.
    c = clustered(180_000, 384)  # 69 MB of codes
    ic = Int8Corpus(c)
    for Q in (9, 16):
        q = c[torch.randint(0, 180_000, (Q,))] + 0.05 * torch.randn(Q, 384)
        scores, idx = topk_search(q, ic, 5, metric)
        want_scores, want_idx = topk_search_reference(q.double(), c.double(), 5, metric)
        recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(idx, want_idx)])
        assert recall >= 0.99, Q
        torch.testing.assert_close(scores.double(), want_scores, atol=1e-5, rtol=1e-5)


def test_without_vnni():
    # On a CPU with AVX512-VNNI the int8 scan uses vpdpbusd; MINILLM_NO_VNNI=1 checks the vpmaddwd path.
    code = (
        "import torch; from minillm.ops import Int8Corpus, topk_search;"
        "from minillm.ops.reference import topk_search_reference as ref;"
        "torch.manual_seed(0); c = torch.randn(3000, 70); q = torch.randn(2, 70);"
        "assert torch.equal(topk_search(q, Int8Corpus(c), 10, 'cosine')[1], ref(q, c, 10, 'cosine')[1])"
    )
    env = dict(os.environ, MINILLM_NO_VNNI="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    assert res.returncode == 0, res.stderr


def test_exact_ties_go_to_the_lower_index():
    c = torch.randn(20, 16).repeat(10, 1)  # every row 10 times
    q = torch.randn(4, 16)
    _, idx = topk_search(q, Int8Corpus(c, rescore=20), 15, "l2")
    _, want = topk_search_reference(q, c, 15, "l2")
    assert torch.equal(idx, want)


def test_numpy_memmap_vectors_are_kept_by_reference(tmp_path):
    x = np.random.default_rng(0).standard_normal((500, 24)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    ic = Int8Corpus(mm)
    assert ic.vectors.data_ptr() == mm.ctypes.data
    scores, idx = topk_search(x[:2], ic, 5, "cosine")
    assert isinstance(scores, np.ndarray) and idx.shape == (2, 5)
    assert (idx[:, 0] == [0, 1]).all()


def test_forced_torch_path_is_exact_search():
    c, q = torch.randn(800, 20), torch.randn(3, 20)
    with force_torch():
        scores, idx = topk_search(q, Int8Corpus(c), 6, "ip")
    want_scores, want_idx = topk_search_reference(q, c, 6, "ip")
    assert torch.equal(idx, want_idx)


def test_opcheck():
    c = Int8Corpus(torch.randn(200, 30))
    torch.library.opcheck(torch.ops.minillm.topk_int8, (torch.randn(3, 30), c.codes, c.scales, c.norm2, 30, 7, "ip"))


def test_bad_input():
    with pytest.raises(ValueError, match="NaN or inf"):
        Int8Corpus(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="rescore"):
        Int8Corpus(torch.randn(4, 3), rescore=0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        Int8Corpus(torch.randint(0, 3, (4, 3)))
    with pytest.raises(ValueError, match="2-D"):
        Int8Corpus(torch.randn(4))
    ic = Int8Corpus(torch.randn(10, 3))
    with pytest.raises(ValueError, match="d = 4"):
        topk_search(torch.randn(2, 4), ic, 3)
    with pytest.raises(ValueError, match="1 <= k <= N = 10"):
        topk_search(torch.randn(2, 3), ic, 11)


@pytest.mark.parametrize("metric", METRICS)
def test_rescoring_in_query_steps_matches_one_step(metric, monkeypatch):
    # Many queries rescore their candidates a bounded block of queries at a time: the same answer as one
    # gather of every candidate row (scores to rounding: torch's bmm blocks a smaller batch differently).
    topk_module = sys.modules["minillm.ops.topk"]
    x = clustered(2000, 40)
    q = clustered(37, 40, seed=3)
    corpus = Int8Corpus(x)
    whole = topk_search(q, corpus, k=5, metric=metric)
    monkeypatch.setattr(topk_module, "_RESCORE_BYTES", 3 * 40 * 40 * 4)  # 3 queries of 40 candidates per step
    stepped = topk_search(q, corpus, k=5, metric=metric)
    assert torch.equal(whole[1], stepped[1])
    torch.testing.assert_close(stepped[0], whole[0], rtol=1e-6, atol=1e-6)
