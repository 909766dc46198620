"""Exact top-k vector search: public wrapper and the `minillm::topk_search` custom op.

Shapes: queries (Q, d) or (d,); corpus (N, d); results (Q, k) (or (k,) for one 1-D query).
"""
from __future__ import annotations

import warnings
from typing import Tuple, Union

import numpy as np
import torch
from torch import Tensor

from minillm.ops import _backend
from minillm.ops.reference import METRICS, topk_search_torch

# Corpus storage the kernels scan (their codes: _backend.DTYPE_CODE, from the extension).
_CORPUS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

ArrayLike = Union[Tensor, np.ndarray]


def _threads(Q: int, N: int, d: int, itemsize: int) -> int:
    # One thread reads ~15 GB/s of corpus and scores ~20 G multiply-adds/s: the estimate only decides whether
    # waking the other threads pays (one (1, 16) query against 64 rows took ~200 us on 2 threads, mostly the
    # wake-up, and ~25 us on one).
    return _backend.threads_for(max(N * d * itemsize / 1.5e4, Q * N * d / 2e4))


def _prepare(queries: Tensor, corpus: Tensor, k: int):
    """Kernel-ready inputs (contiguous queries, unit column stride corpus) and empty outputs (Q, k)."""
    queries = queries.contiguous()
    corpus = corpus if corpus.stride(-1) == 1 or corpus.size(-1) == 1 else corpus.contiguous()
    scores = queries.new_empty((queries.shape[0], k), dtype=torch.float32)
    idx = torch.empty((queries.shape[0], k), dtype=torch.int64, device=queries.device)
    return queries, corpus, scores, idx


@torch.library.custom_op("minillm::topk_search", mutates_args=(), device_types="cpu")
def _topk_search(queries: Tensor, corpus: Tensor, k: int, metric: str) -> Tuple[Tensor, Tensor]:
    """queries: (Q, d) float32; corpus: (N, d) float32/bfloat16/float16 -> scores (Q, k) float32, indices (Q, k)."""
    _check_op_args("topk_search", queries, corpus, k, metric, _CORPUS_DTYPES)
    return _topk_search_cpu(queries, corpus, k, metric)


def _topk_search_cpu(queries: Tensor, corpus: Tensor, k: int, metric: str) -> Tuple[Tensor, Tensor]:
    """The op's CPU body, which eager calls of topk_search run directly: the custom-op dispatch costs ~18 us a call
    (measured 21 us through the op against 3 us for the
    binding alone, one (1, 16) query in 64 rows)."""
    queries, corpus, scores, idx = _prepare(queries, corpus, k)
    (Q, d), N = queries.shape, corpus.shape[0]
    if Q == 0:
        return scores, idx
    buf, dense = _backend.buf, _backend.dense_buf
    _backend._C.topk(queries=dense(queries), corpus=buf(corpus), corpus_stride=corpus.stride(0),
                     dtype=_backend.DTYPE_CODE[corpus.dtype], Q=Q, N=N, d=d, k=k, metric=_backend.METRIC_CODE[metric],
                     out_scores=dense(scores), out_idx=dense(idx), nthreads=_threads(Q, N, d, corpus.element_size()))
    return scores, idx


def _check_op_args(op: str, queries, corpus, k, metric, corpus_dtypes, d=None) -> None:
    """The registered ops' own checks (torch.ops.minillm.* can be called directly; the kernels take raw
    pointers): a corpus narrower than the queries was read past its end."""
    if not (isinstance(queries, Tensor) and queries.dim() == 2 and queries.dtype == torch.float32):
        raise ValueError(f"minillm::{op}: queries must be a 2-D float32 tensor (Q, d), got "
                         f"{tuple(queries.shape) if isinstance(queries, Tensor) else type(queries).__name__}")
    if not (isinstance(corpus, Tensor) and corpus.dim() == 2 and corpus.dtype in corpus_dtypes):
        raise ValueError(f"minillm::{op}: corpus must be a 2-D tensor of {sorted(map(str, corpus_dtypes))}")
    width = corpus.shape[1] if d is None else d
    if queries.shape[1] != width or width < 1:
        raise ValueError(f"minillm::{op}: queries have d = {queries.shape[1]}, the corpus d = {width}")
    if queries.device != corpus.device:
        raise ValueError(f"minillm::{op}: queries on {queries.device}, corpus on {corpus.device}")
    if not 1 <= k <= corpus.shape[0]:
        raise ValueError(f"minillm::{op}: k must satisfy 1 <= k <= N = {corpus.shape[0]}, got {k}")
    if metric not in METRICS:
        raise ValueError(f"minillm::{op}: metric must be one of {METRICS}, got {metric!r}")


# The CUDA kernel's candidate buffers fit the default 48 KB of shared memory up to this k.
_CUDA_MAX_K = 1024


@_topk_search.register_kernel("cuda")
def _topk_search_cuda(queries: Tensor, corpus: Tensor, k: int, metric: str) -> Tuple[Tensor, Tensor]:
    _check_op_args("topk_search", queries, corpus, k, metric, _CORPUS_DTYPES)
    if k > _CUDA_MAX_K:
        raise ValueError(f"minillm::topk_search on CUDA takes k <= {_CUDA_MAX_K}, got {k}")
    queries, corpus, scores, idx = _prepare(queries, corpus, k)
    (Q, d), N = queries.shape, corpus.shape[0]
    if Q == 0:
        return scores, idx
    device = queries.device.index
    # (parts x Q x k) candidates when the corpus is split across blocks
    workspace = torch.empty(_backend._C.cuda_topk_workspace(Q, N, k, device), dtype=torch.uint8, device=queries.device)
    buf, dense = _backend.buf, _backend.dense_buf
    _backend._C.cuda_topk(queries=dense(queries), corpus=buf(corpus), corpus_stride=corpus.stride(0),
                          dtype=_backend.DTYPE_CODE[corpus.dtype], Q=Q, N=N, d=d, k=k,
                          metric=_backend.METRIC_CODE[metric], out_scores=dense(scores), out_idx=dense(idx),
                          workspace=dense(workspace), device=device, stream=_backend.cuda_stream(queries))
    return scores, idx


@_topk_search.register_fake
def _topk_search_fake(queries, corpus, k, metric):
    Q = queries.shape[0]
    return (queries.new_empty((Q, k), dtype=torch.float32),
            torch.empty((Q, k), dtype=torch.int64, device=queries.device))


def _as_tensor(name: str, x) -> Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype not in (np.float32, np.float16, np.float64) and not (name == "codes" and x.dtype == np.int8):
            raise TypeError(f"{name} must be a float32 or float16 array, got dtype {x.dtype}")
        if any(s < 0 for s in x.strides):  # torch has no negative strides (flipped arrays)
            # A copy, not np.ascontiguousarray: that keeps a size-1 axis's negative stride (the array already
            # counts as contiguous), and torch.from_numpy then refused a flipped (1, d) query.
            x = x.copy()
        with warnings.catch_warnings():
            # A read-only array (e.g. a memory map) makes torch warn; the kernel only ever reads it.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(x)
    if isinstance(x, Tensor):
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


# ---- int8 corpus: approximate scan, exact rescoring ----

_I8_ALIGN = 64  # codes are zero-padded to a multiple of this many columns (csrc/kernels.h: kI8Pad, _C.I8_PAD)


@torch.library.custom_op("minillm::topk_int8", mutates_args=(), device_types="cpu")
def _topk_int8(queries: Tensor, codes: Tensor, scales: Tensor, norm2: Tensor, d: int, k: int,
               metric: str) -> Tuple[Tensor, Tensor]:
    """queries: (Q, d) float32; codes: (N, Dpad) int8, row j ~ scales[j] * codes[j]; norm2: (N,) squared norms
    -> approximate scores (Q, k) float32 and indices (Q, k), best first."""
    if not (isinstance(codes, Tensor) and codes.dim() == 2 and codes.dtype == torch.int8
            and codes.shape[1] % _I8_ALIGN == 0 and d <= codes.shape[1]):
        raise ValueError(f"minillm::topk_int8: codes must be (N, Dpad) int8 with Dpad a multiple of {_I8_ALIGN} and "
                         f">= d = {d}; make them with Int8Corpus.quantize")
    _check_op_args("topk_int8", queries, codes, k, metric, (torch.int8,), d=d)
    for name, t in (("scales", scales), ("norm2", norm2)):
        if not (isinstance(t, Tensor) and tuple(t.shape) == (codes.shape[0],) and t.dtype == torch.float32
                and t.is_contiguous() and t.device == codes.device):
            raise ValueError(f"minillm::topk_int8: {name} must be a contiguous ({codes.shape[0]},) float32 tensor")
    queries, codes, scores, idx = _prepare(queries, codes, k)
    Q, N = queries.shape[0], codes.shape[0]
    if Q == 0:
        return scores, idx
    buf, dense = _backend.buf, _backend.dense_buf
    _backend._C.topk(queries=dense(queries), corpus=buf(codes), corpus_stride=codes.stride(0),
                     dtype=_backend.DTYPE_CODE[torch.int8], Q=Q, N=N, d=d, k=k, metric=_backend.METRIC_CODE[metric],
                     out_scores=dense(scores), out_idx=dense(idx), nthreads=_threads(Q, N, d, 1),
                     row_scale=dense(scales), row_norm2=dense(norm2))
    return scores, idx


@_topk_int8.register_fake
def _topk_int8_fake(queries, codes, scales, norm2, d, k, metric):
    Q = queries.shape[0]
    return queries.new_empty((Q, k), dtype=torch.float32), torch.empty((Q, k), dtype=torch.int64)


class Int8Corpus:
    """A corpus stored as int8 codes, one fp32 scale per row, for :func:`topk_search`.

    The scan reads one byte per value instead of four. It ranks rows by the approximate score
    ``scale_j * <q, codes_j>`` and keeps the best ``rescore * k`` as candidates, which are then rescored
    exactly against the original float rows (kept by reference, so a memory map stays on disk). Results are
    exact whenever the true top-k are among the candidates: with the default ``rescore=8``, recall@10 was 1.0
    against exact search on 1M clustered 384-d vectors (``benchmarks/bench_topk.py --data clustered``, kind
    ``minillm-int8``). This is an explicit choice: ``topk_search`` never quantizes on its own.

    Args:
        vectors: (N, d) float32, float16 or bfloat16 CPU tensor or numpy array, finite (NaN/inf raise).
        rescore: candidates kept per result for exact rescoring, >= 1.

    Attributes: ``codes`` (N, Dpad) int8 (zero-padded columns), ``scales`` (N,) and ``norm2`` (N,) float32,
    ``vectors`` (the input rows), ``rescore``.
    """

    def __init__(self, vectors: ArrayLike, rescore: int = 8, *, _chunk: int = 1 << 16):
        v = _as_tensor("vectors", vectors)
        if v.dim() != 2 or v.shape[1] == 0:
            raise ValueError(f"vectors must be 2-D (N, d) with d >= 1, got shape {tuple(v.shape)}")
        if v.dtype not in _CORPUS_DTYPES:
            raise TypeError(f"vectors must be float32, float16 or bfloat16, got {v.dtype}")
        if v.device.type != "cpu":
            raise ValueError(f"Int8Corpus runs on the CPU; got vectors on {v.device}")
        if isinstance(rescore, bool) or not isinstance(rescore, int) or rescore < 1:
            raise ValueError(f"rescore must be an int >= 1, got {rescore!r}")
        self.vectors, self.rescore = v.detach(), rescore
        self.codes, self.scales, self.norm2 = self.quantize(self.vectors, _chunk=_chunk)

    @staticmethod
    def code_width(d: int) -> int:
        """Dpad: columns of the code rows for d-dimensional vectors (zero-padded for the kernel)."""
        return -(-d // _I8_ALIGN) * _I8_ALIGN

    @staticmethod
    def quantize(vectors: ArrayLike, *, _chunk: int = 1 << 16) -> Tuple[Tensor, Tensor, Tensor]:
        """(codes (N, Dpad) int8, scales (N,), norm2 (N,)) of float rows (N, d): row j ~ scales[j] * codes[j]."""
        v = _as_tensor("vectors", vectors)
        N, d = v.shape
        codes = torch.zeros((N, Int8Corpus.code_width(d)), dtype=torch.int8)
        scales = torch.empty(N, dtype=torch.float32)
        norm2 = torch.empty(N, dtype=torch.float32)
        for r0 in range(0, N, _chunk):  # chunks: no full fp32 copy of a large (maybe memory-mapped) corpus
            x = v[r0:r0 + _chunk].float()
            if not bool(torch.isfinite(x).all()):
                raise ValueError("vectors contain NaN or inf; int8 codes need finite values")
            amax = x.abs().amax(dim=1)
            scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
            codes[r0:r0 + len(x), :d] = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            scales[r0:r0 + len(x)] = scale
            norm2[r0:r0 + len(x)] = (x.double() ** 2).sum(dim=1).float()
        return codes, scales, norm2

    @classmethod
    def from_parts(cls, vectors: ArrayLike, codes: ArrayLike, scales: ArrayLike, norm2: ArrayLike,
                   rescore: int = 8) -> "Int8Corpus":
        """An Int8Corpus over codes made earlier by :meth:`quantize` (e.g. kept by an index), not recomputed."""
        self = cls.__new__(cls)
        self.vectors, self.rescore = _as_tensor("vectors", vectors).detach(), rescore
        self.codes, self.scales, self.norm2 = (_as_tensor(n, a) for n, a in
                                               (("codes", codes), ("scales", scales), ("norm2", norm2)))
        N, d = self.vectors.shape
        if (self.codes.dtype != torch.int8 or self.codes.shape[0] != N or self.codes.shape[1] % _I8_ALIGN
                or self.codes.shape[1] < d or self.codes.stride(1) != 1 or self.scales.shape != (N,)
                or self.norm2.shape != (N,)):
            raise ValueError(f"codes/scales/norm2 do not match {N} vectors of d = {d}: codes "
                             f"{tuple(self.codes.shape)} {self.codes.dtype}, scales {tuple(self.scales.shape)}, "
                             f"norm2 {tuple(self.norm2.shape)}; make them with Int8Corpus.quantize")
        self.scales, self.norm2 = self.scales.float().contiguous(), self.norm2.float().contiguous()
        return self

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.vectors.shape)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def __repr__(self) -> str:
        return f"Int8Corpus(N={self.shape[0]}, d={self.shape[1]}, rescore={self.rescore})"


# Bytes of gathered candidate rows per rescoring step: Q=4096 x 80 candidates x 384 dims in one gather
# was 503 MB (the whole call's peak); in steps the peak stays near this.
_RESCORE_BYTES = 32 << 20


def _rescore(q: Tensor, vectors: Tensor, cand: Tensor, k: int, metric: str) -> Tuple[Tensor, Tensor]:
    """Exact scores of the candidate rows; the best k, ties to the lower index. q: (Q, d), cand: (Q, C)."""
    Q, C = cand.shape
    step = max(1, _RESCORE_BYTES // max(1, C * q.shape[1] * 4))
    if Q > step:  # queries are independent: the same result, a bounded gather
        parts = [_rescore(q[i:i + step], vectors, cand[i:i + step], k, metric) for i in range(0, Q, step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    cand, _ = torch.sort(cand, dim=1)  # ascending index, so a stable sort breaks ties to the lower one
    rows = vectors[cand.reshape(-1)].float().reshape(Q, C, -1)  # (Q, C, d)
    if metric == "l2":
        s = ((rows - q[:, None, :]) ** 2).sum(-1)
    elif metric == "cosine":
        tiny = torch.finfo(torch.float32).tiny
        qn = q / q.norm(dim=1, keepdim=True).clamp_min(tiny)
        s = torch.bmm(rows, qn[:, :, None])[..., 0] / rows.norm(dim=-1).clamp_min(tiny)
    else:
        s = torch.bmm(rows, q[:, :, None])[..., 0]
    key = -s if metric == "l2" else s
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]  # (Q, k)
    return torch.gather(s, 1, order), torch.gather(cand, 1, order)


def _device_type(t: Tensor) -> str:
    # One place that reads the device type, so tests can stand CPU tensors in for CUDA ones.
    return "cpu" if t.is_cpu else t.device.type  # is_cpu first: a torch.device object costs 0.3 us


def _choose(q: Tensor, c: Tensor, k: int) -> Tuple[bool, str]:
    """(native kernel?, why): the C++ kernel takes every CPU call; the CUDA kernel only k <= 1024 and the
    cases the dispatch table has measured faster than torch (minillm.ops._backend.CUDA_KERNEL_TABLE)."""
    dev = _device_type(c)
    if dev == "cpu":
        return _backend.native_available(), ""
    if dev != "cuda":
        return False, ""
    if k > _CUDA_MAX_K:
        return False, f"the CUDA kernel takes k <= {_CUDA_MAX_K}"
    case = _backend.KernelCase("topk_search", str(c.dtype).replace("torch.", ""), c.shape[1], c.shape[0],
                               q.shape[0], "search")
    return _backend.cuda_kernel_choice(case, c.device)


def _check_k(k, N: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not (1 <= int(k) <= N):
        raise ValueError(f"k must satisfy 1 <= k <= N = {N}, got k = {int(k)}")
    return int(k)


def topk_search(
    queries: ArrayLike, corpus: Union[ArrayLike, Int8Corpus], k: int, metric: str = "ip"
) -> Tuple[ArrayLike, ArrayLike]:
    """Exact k nearest neighbours of each query in `corpus`.

    Args:
        queries: (Q, d) or (d,) float tensor or numpy array (computed in fp32).
        corpus: (N, d), float32, bfloat16 or float16 (numpy: float32 or float16), on the queries' device; or an
            :class:`Int8Corpus` (CPU): an int8 scan of a quarter of the bytes, then exact rescoring of
            ``rescore * k`` candidates.
        k: number of results, 1 <= k <= N.
        metric: "ip" (inner product, larger first), "cosine" (larger first; a zero vector scores 0)
            or "l2" (squared Euclidean distance, smaller first).

    Returns:
        (scores, indices): float32 (Q, k) and int64 (Q, k), best first, ties broken by the lower
        index; (k,) each for a 1-D query. numpy in (queries), numpy out. Scores are not differentiable.

    The scan is tiled with a running top-k per query, so extra memory is O(Q k + tiles), never Q x N. CUDA
    tensors run minillm's CUDA kernel only for the cases measured faster than torch on that GPU
    (``minillm.ops._backend.CUDA_KERNEL_TABLE``; ``MINILLM_CUDA_KERNELS=on|off`` overrides), and otherwise
    :func:`minillm.ops.reference.topk_search_torch` (tiled ``mm`` + ``torch.topk``, the same results).
    A corpus row whose score is NaN ranks after every other row and reports NaN; NaN or inf in the
    queries raises ValueError.
    """
    as_numpy = isinstance(queries, np.ndarray)
    q = _as_tensor("queries", queries)
    int8 = isinstance(corpus, Int8Corpus)
    c = corpus.vectors if int8 else _as_tensor("corpus", corpus)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if c.dim() != 2:
        raise ValueError(f"corpus must be 2-D (N, d), got shape {tuple(c.shape)}")
    if q.dim() not in (1, 2):
        raise ValueError(f"queries must be (Q, d) or (d,), got shape {tuple(q.shape)}")
    single = q.dim() == 1
    if single:
        q = q[None, :]
    N, d = c.shape
    if N == 0:
        raise ValueError("corpus is empty (N = 0): add vectors before searching")
    if d == 0:
        raise ValueError("vectors must have d >= 1 dimensions, got d = 0")
    if q.shape[1] != d:
        raise ValueError(f"queries have d = {q.shape[1]} but corpus has d = {d}")
    k = _check_k(k, N)
    if not q.dtype.is_floating_point:
        raise TypeError(f"queries must be a floating-point tensor, got {q.dtype}")
    if c.dtype == torch.float64:
        raise TypeError("corpus is float64; store it as float32 (x.astype(np.float32) or x.float()), "
                        "which the kernel scans at twice the speed")
    if c.dtype not in _CORPUS_DTYPES:
        raise TypeError(f"corpus must be float32, bfloat16 or float16, got {c.dtype}")
    if q.device != c.device:
        raise ValueError(f"queries and corpus must be on one device: queries on {q.device}, corpus on {c.device}")
    q = q.detach().to(torch.float32)
    c = c.detach()
    if q.numel() and not bool(torch.isfinite(q).all()):
        raise ValueError("queries contain NaN or inf; clean them (e.g. torch.nan_to_num) before searching")

    if int8:
        native = _backend.native_for(c.device)
        _backend.log_path_once("topk_search(int8)", c.device, native)
        if native:
            candidates = min(N, max(k * corpus.rescore, k + 16))
            _, cand = _topk_int8(q, corpus.codes, corpus.scales, corpus.norm2, d, candidates, metric)
            scores, idx = _rescore(q, c, cand, k, metric)
        else:  # the plain-torch twin: what the int8 scan plus rescoring aims at, exact search
            scores, idx = topk_search_torch(q, c, k, metric)
            scores = scores.to(torch.float32)
    else:
        native, why = _choose(q, c, k)
        _backend.log_path_once("topk_search", c.device, native, why)
        if native:
            cpu_eager = _device_type(c) == "cpu" and not torch.compiler.is_compiling()
            scores, idx = (_topk_search_cpu if cpu_eager else _topk_search)(q, c, k, metric)
        else:
            scores, idx = topk_search_torch(q, c, k, metric)
            scores = scores.to(torch.float32)
    if single:
        scores, idx = scores[0], idx[0]
    if as_numpy:
        return scores.cpu().numpy(), idx.cpu().numpy()
    return scores, idx
