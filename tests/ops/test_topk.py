"""minillm.ops.topk_search against brute force, tie-aware, for every metric, input kind and SIMD level."""
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from minillm.ops import _backend, force_torch, topk_search
from minillm.ops.reference import topk_search_reference

pytestmark = pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")

METRICS = ("ip", "cosine", "l2")


def exact_scores(q, c, idx, metric):
    """fp64 score of corpus row idx[i, j] for query i."""
    q, c = q.double(), c.double()
    if metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)
        c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-300)
    rows = c[idx]  # (Q, k, d)
    if metric == "l2":
        return ((rows - q[:, None, :]) ** 2).sum(-1)
    return (rows * q[:, None, :]).sum(-1)


def check_topk(q, c, k, metric, scores, idx, tol=1e-4):
    """Tie-aware: the returned rows are a valid exact top-k, not necessarily the same rows where
    scores tie within fp32 rounding."""
    q, c = torch.as_tensor(q).float(), torch.as_tensor(c).float()
    scores, idx = torch.as_tensor(scores), torch.as_tensor(idx)
    Q = q.shape[0]
    assert scores.shape == (Q, k) and idx.shape == (Q, k)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    for row in idx:
        assert len(set(row.tolist())) == k, "duplicate indices"
    # The scores reported are the rows' true scores...
    exact = exact_scores(q, c, idx, metric)
    scale = 1 + exact.abs()
    assert ((scores.double() - exact).abs() <= tol * scale).all()
    # ...sorted best first...
    better = -scores if metric == "l2" else scores
    assert (better[:, :-1] >= better[:, 1:] - tol * scale[:, 1:]).all()
    # ...and they match the k best scores of brute force, so no clearly better row was missed.
    ref_scores, _ = topk_search_reference(q.double(), c.double(), k, metric)
    assert ((scores.double() - ref_scores).abs() <= tol * (1 + ref_scores.abs())).all()


# k = N on the largest corpus only for Q <= 5: the brute-force check of Q = 300 full sorts is slow.
GRID = [
    (N, d, k, Q)
    for N, d in [(20, 8), (1000, 37), (3001, 64)]
    for k in (1, 10, N)
    for Q in (1, 5, 300)
    if not (k == N == 3001 and Q == 300)
]


@pytest.mark.parametrize("as_numpy", [False, True], ids=["torch", "numpy"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("N,d,k,Q", GRID)
def test_grid_against_brute_force(N, d, k, Q, metric, as_numpy):
    c = torch.randn(N, d)
    q = torch.randn(Q, d)
    if as_numpy:
        scores, idx = topk_search(q.numpy(), c.numpy(), k, metric)
        assert isinstance(scores, np.ndarray) and isinstance(idx, np.ndarray)
    else:
        scores, idx = topk_search(q, c, k, metric)
        assert isinstance(scores, torch.Tensor)
    check_topk(q, c, k, metric, scores, idx)


@pytest.mark.parametrize("metric", METRICS)
def test_every_simd_level(simd_level, metric):
    for N, d, Q, k in [(2000, 48, 3, 10), (500, 33, 70, 7), (64, 16, 130, 64)]:
        c, q = torch.randn(N, d), torch.randn(Q, d)
        check_topk(q, c, k, metric, *topk_search(q, c, k, metric))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("metric", METRICS)
def test_every_few_query_count_at_every_simd_level(simd_level, metric, dtype):
    # 1-17 queries: rows read in place (fp32 whole vectors, 16-bit rows widened in registers) in groups of
    # kMQ queries per pass over a tile, the remaining 1-3 in one pass; from 8 or 9 queries (by CPU) tiles
    # are scored as a GEMM (large 16-bit corpora: below). fp32 at d = 37 converts tiles at every Q.
    # Rows j, j + 60 and j + 120 are identical: whatever the group, ties come back in index order.
    for d in (64, 37):
        c = torch.randn(60, d).repeat(3, 1).to(dtype)
        for Q in range(1, 18):
            q = torch.randn(Q, d)
            scores, idx = topk_search(q, c, 6, metric)
            check_topk(q, c, 6, metric, scores, idx)
            assert torch.equal(idx[:, 1] - idx[:, 0], torch.full((Q,), 60)), (d, Q)
            assert torch.equal(idx[:, 2] - idx[:, 1], torch.full((Q,), 60)), (d, Q)


@pytest.mark.parametrize("metric", METRICS)
def test_a_streamed_16_bit_corpus_at_9_to_16_queries(simd_level, metric):
    # A 16-bit corpus of 64 MB or more (one that cannot stay in the caches) is widened in registers up to 16
    # queries where scans request rows ahead, a GEMM elsewhere: either way the exact top-k of its values.
    c = torch.randn(90_000, 384).to(torch.float16)  # 69 MB
    for Q in (9, 12, 16):
        q = torch.randn(Q, 384)
        check_topk(q, c, 5, metric, *topk_search(q, c, 5, metric))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("Q", [7, 40])  # per-pair dot products; tiles scored as a GEMM from 32 queries
def test_exact_ties_go_to_the_lower_index(metric, Q):
    base = torch.randn(50, 16)
    c = base.repeat(3, 1)  # rows j, j + 50 and j + 100 are identical
    q = torch.randn(Q, 16)
    scores, idx = topk_search(q, c, 9, metric)
    ref_scores, ref_idx = topk_search_reference(q, c, 9, metric)
    assert torch.equal(idx, ref_idx)
    # Each best row comes back three times, in index order.
    assert torch.equal(idx[:, 1] - idx[:, 0], torch.full((Q,), 50))
    assert torch.equal(idx[:, 2] - idx[:, 1], torch.full((Q,), 50))
    # All-equal scores: the first k indices.
    s, i = topk_search(q, torch.ones(300, 16), 12, metric)
    assert torch.equal(i, torch.arange(12).expand(Q, 12))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("Q", [1, 3, 9])  # up to 4 queries widen rows in registers; more convert tiles
def test_half_precision_corpus(dtype, metric, Q):
    c = torch.randn(1500, 40).to(dtype)
    q = torch.randn(Q, 40)
    scores, idx = topk_search(q, c, 10, metric)
    check_topk(q, c.float(), 10, metric, scores, idx)  # the same (rounded) corpus values, in fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("Q", [1, 2])  # widened in registers: one query (several accumulator chains per row), a pair
def test_half_precision_exact_ties_at_every_simd_level(simd_level, dtype, Q):
    # d = 117: at every level whole chain groups, then a single bf16 pair block or vector, and a scalar tail
    base = torch.randn(50, 117).to(dtype)
    c = base.repeat(3, 1)  # rows j, j + 50 and j + 100 are identical, and fall in different tiles and tails
    q = torch.randn(Q, 117)
    for metric in METRICS:
        scores, idx = topk_search(q, c, 9, metric)
        assert torch.equal(idx[:, 1] - idx[:, 0], torch.full((Q,), 50)), metric
        assert torch.equal(idx[:, 2] - idx[:, 1], torch.full((Q,), 50)), metric
        check_topk(q, c.float(), 9, metric, scores, idx)
        # Every row scored (k = N): copies get bit-equal scores wherever they fall (a 4-row tile or the tail).
        scores, idx = topk_search(q, c, 150, metric)
        by_row = torch.empty_like(scores).scatter_(1, idx, scores)  # (Q, 150): the score of row j at j
        assert torch.equal(by_row[:, :50], by_row[:, 50:100]) and torch.equal(by_row[:, :50], by_row[:, 100:]), metric


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_strided_corpus_at_every_simd_level(simd_level, dtype):
    wide = torch.randn(900, 50).to(dtype)
    c = wide[:, 3:40]  # d = 37 (vector tails), row stride 50, odd start
    for Q in (1, 6):
        q = torch.randn(Q, 37)
        for metric in METRICS:
            check_topk(q, c.float(), 7, metric, *topk_search(q, c, 7, metric))


def test_numpy_float16_and_single_query():
    c = np.random.default_rng(0).standard_normal((400, 24)).astype(np.float16)
    q = np.random.default_rng(1).standard_normal(24).astype(np.float32)
    scores, idx = topk_search(q, c, 5, "cosine")
    assert scores.shape == (5,) and idx.shape == (5,)
    check_topk(q[None], c.astype(np.float32), 5, "cosine", scores[None], idx[None])


def test_strided_corpus_views():
    wide = torch.randn(700, 80)
    c = wide[:, :64]  # row stride 80, unit column stride: scanned in place
    q = torch.randn(4, 64)
    check_topk(q, c, 10, "ip", *topk_search(q, c, 10, "ip"))
    ct = torch.randn(64, 700).T  # column-major: copied once
    check_topk(q, ct, 10, "l2", *topk_search(q, ct, 10, "l2"))


@pytest.mark.parametrize("Q", [2, 40])
def test_nan_corpus_rows_rank_last(Q):
    c = torch.randn(100, 8)
    c[3] = float("nan")
    q = torch.randn(Q, 8)
    scores, idx = topk_search(q, c, 100, "ip")
    assert (idx[:, -1] == 3).all() and torch.isnan(scores[:, -1]).all()
    assert torch.isfinite(scores[:, :-1]).all()
    _, top = topk_search(q, c, 10, "ip")
    assert not (top == 3).any()


def test_cosine_zero_vectors_score_zero():
    c = torch.randn(30, 8)
    c[0] = 0
    scores, idx = topk_search(torch.randn(1, 8), c, 30, "cosine")
    assert scores[0, (idx[0] == 0).nonzero()[0, 0]] == 0
    scores, _ = topk_search(torch.zeros(1, 8), c, 5, "cosine")
    assert torch.equal(scores, torch.zeros(1, 5))


def test_l2_distances_are_squared_and_nonnegative():
    c = torch.randn(200, 16)
    q = c[:3].clone()  # each query is a corpus row: distance 0 to itself
    scores, idx = topk_search(q, c, 4, "l2")
    assert torch.equal(idx[:, 0], torch.arange(3))
    assert (scores >= 0).all() and (scores[:, 0] <= 1e-4).all()
    torch.testing.assert_close(scores[:, 1], ((c[idx[:, 1]] - q) ** 2).sum(-1), atol=1e-4, rtol=1e-4)


def test_opcheck():
    q, c = torch.randn(5, 16), torch.randn(300, 16)
    for metric in METRICS:
        torch.library.opcheck(torch.ops.minillm.topk_search.default, (q, c, 7, metric))
    torch.library.opcheck(torch.ops.minillm.topk_search.default, (q, c.bfloat16(), 3, "ip"))


def test_forced_torch_path_matches_native():
    c, q = torch.randn(800, 32), torch.randn(6, 32)
    for metric in METRICS:
        native = topk_search(q, c, 10, metric)
        with force_torch():
            fallback = topk_search(q, c, 10, metric)
        torch.testing.assert_close(native[0], fallback[0], atol=1e-4, rtol=1e-4)
        check_topk(q, c, 10, metric, *fallback)


def test_reference_bounds_its_score_matrix():
    # The fallback never holds more than max_scores scores: many chunks give the same answer.
    c, q = torch.randn(500, 8), torch.randn(40, 8)
    a = topk_search_reference(q, c, 5, "ip")
    b = topk_search_reference(q, c, 5, "ip", max_scores=1000)
    assert torch.equal(a[1], b[1])


def test_memory_stays_bounded_for_many_queries():
    # Q x N = 2000 x 200k scores would be 1.6 GB in fp32; the tiled kernel needs O(Q k + tiles).
    code = (
        "import resource, torch, minillm\n"
        "c = torch.randn(200_000, 32); q = torch.randn(2000, 32)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "minillm.ops.topk_search(q, c, 10, 'ip')\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tempfile.gettempdir())
    grew_mb = int(out.stdout.split()[-1])
    assert grew_mb < 64, f"peak RSS grew by {grew_mb} MB"
