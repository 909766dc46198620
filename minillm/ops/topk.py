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
from minillm.ops.reference import METRICS, topk_search_reference

_METRIC_CODE = {"ip": 0, "cosine": 1, "l2": 2}
# Kernel dtype codes (csrc/kernels.h: DType) for corpus storage.
_CORPUS_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

ArrayLike = Union[Tensor, np.ndarray]


@torch.library.custom_op("minillm::topk_search", mutates_args=(), device_types="cpu")
def _topk_search(queries: Tensor, corpus: Tensor, k: int, metric: str) -> Tuple[Tensor, Tensor]:
    """queries: (Q, d) float32; corpus: (N, d) float32/bfloat16/float16 -> scores (Q, k) float32, indices (Q, k)."""
    queries = queries.contiguous()
    corpus = corpus if corpus.stride(-1) == 1 or corpus.size(-1) == 1 else corpus.contiguous()
    Q, d = queries.shape
    N = corpus.shape[0]
    scores = queries.new_empty((Q, k), dtype=torch.float32)
    idx = torch.empty((Q, k), dtype=torch.int64, device=queries.device)
    if Q == 0:
        return scores, idx
    _backend._C.topk(
        queries.data_ptr(), corpus.data_ptr(), corpus.stride(0), _CORPUS_CODE[corpus.dtype], Q, N, d, k,
        _METRIC_CODE[metric], scores.data_ptr(), idx.data_ptr(), torch.get_num_threads(),
    )
    return scores, idx


# The CUDA kernel's candidate buffers fit the default 48 KB of shared memory up to this k.
_CUDA_MAX_K = 1024


@_topk_search.register_kernel("cuda")
def _topk_search_cuda(queries: Tensor, corpus: Tensor, k: int, metric: str) -> Tuple[Tensor, Tensor]:
    queries = queries.contiguous()
    corpus = corpus if corpus.stride(-1) == 1 or corpus.size(-1) == 1 else corpus.contiguous()
    Q, d = queries.shape
    N = corpus.shape[0]
    scores = queries.new_empty((Q, k), dtype=torch.float32)
    idx = torch.empty((Q, k), dtype=torch.int64, device=queries.device)
    if Q == 0:
        return scores, idx
    device = queries.device.index
    # (parts x Q x k) candidates when the corpus is split across blocks
    workspace = torch.empty(_backend._C.cuda_topk_workspace(Q, N, k, device), dtype=torch.uint8, device=queries.device)
    _backend._C.cuda_topk(
        queries.data_ptr(), corpus.data_ptr(), corpus.stride(0), _CORPUS_CODE[corpus.dtype], Q, N, d, k,
        _METRIC_CODE[metric], scores.data_ptr(), idx.data_ptr(), workspace.data_ptr() if workspace.numel() else 0,
        device, _backend.cuda_stream(queries),
    )
    return scores, idx


@_topk_search.register_fake
def _topk_search_fake(queries, corpus, k, metric):
    Q = queries.shape[0]
    return (queries.new_empty((Q, k), dtype=torch.float32),
            torch.empty((Q, k), dtype=torch.int64, device=queries.device))


def _as_tensor(name: str, x) -> Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype not in (np.float32, np.float16, np.float64):
            raise TypeError(f"{name} must be a float32 or float16 array, got dtype {x.dtype}")
        if any(s < 0 for s in x.strides):
            x = np.ascontiguousarray(x)
        with warnings.catch_warnings():
            # A read-only array (e.g. a memory map) makes torch warn; the kernel only ever reads it.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(x)
    if isinstance(x, Tensor):
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def topk_search(
    queries: ArrayLike, corpus: ArrayLike, k: int, metric: str = "ip"
) -> Tuple[ArrayLike, ArrayLike]:
    """Exact k nearest neighbours of each query in `corpus`.

    Args:
        queries: (Q, d) or (d,) float tensor or numpy array (computed in fp32).
        corpus: (N, d), float32, bfloat16 or float16 (numpy: float32 or float16), on the queries' device.
        k: number of results, 1 <= k <= N.
        metric: "ip" (inner product, larger first), "cosine" (larger first; a zero vector scores 0)
            or "l2" (squared Euclidean distance, smaller first).

    Returns:
        (scores, indices): float32 (Q, k) and int64 (Q, k), best first, ties broken by the lower
        index; (k,) each for a 1-D query. numpy in (queries), numpy out. Scores are not differentiable.

    The scan is tiled with a running top-k per query, so extra memory is O(Q k + tiles), never Q x N.
    A corpus row whose score is NaN ranks after every other row and reports NaN; NaN or inf in the
    queries raises ValueError.
    """
    as_numpy = isinstance(queries, np.ndarray)
    q = _as_tensor("queries", queries)
    c = _as_tensor("corpus", corpus)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
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
    if not (1 <= k <= N):
        raise ValueError(f"k must satisfy 1 <= k <= N = {N}, got k = {k}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"queries must be a floating-point tensor, got {q.dtype}")
    if c.dtype == torch.float64:
        raise TypeError("corpus is float64; store it as float32 (x.astype(np.float32) or x.float()), "
                        "which the kernel scans at twice the speed")
    if c.dtype not in _CORPUS_CODE:
        raise TypeError(f"corpus must be float32, bfloat16 or float16, got {c.dtype}")
    if q.device != c.device:
        raise ValueError(f"queries and corpus must be on one device: queries on {q.device}, corpus on {c.device}")
    q = q.detach().to(torch.float32)
    c = c.detach()
    if q.numel() and not bool(torch.isfinite(q).all()):
        raise ValueError("queries contain NaN or inf; clean them (e.g. torch.nan_to_num) before searching")

    native = _backend.native_for(c.device, cuda=True) and (c.device.type == "cpu" or k <= _CUDA_MAX_K)
    _backend.log_path_once("topk_search", c.device, native)
    if native:
        scores, idx = _topk_search(q, c, k, metric)
    else:
        scores, idx = topk_search_reference(q, c, k, metric)
        scores = scores.to(torch.float32)
    if single:
        scores, idx = scores[0], idx[0]
    if as_numpy:
        return scores.cpu().numpy(), idx.cpu().numpy()
    return scores, idx
