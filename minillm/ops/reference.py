"""Plain-torch twins of the native kernels: the fallback on devices without a kernel, and the tests' oracle.

They define what "correct" means and stay simple on purpose; speed is the kernels' job.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

METRICS = ("ip", "cosine", "l2")


def _opmath(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are computed in fp32, as the kernels do.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    causal_offset: Optional[int] = None,
    query_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v, with minillm's masking rules.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); key_padding_mask: bool (B, Nk), True = keep;
    query_padding_mask: bool (B, Nq), True = compute (a padded query returns 0 and gets no gradient).
    Causal: key j is visible to query i when j <= i + causal_offset; the default offset Nk - Nq
    aligns the last query with the last key (bottom-right, as in KV-cache decoding).
    A query that sees no key returns 0. Padded keys, values and queries are never used.
    Returns (B, H, Nq, D) in q's dtype.
    """
    Nq, Nk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dt = _opmath(q.dtype)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    # Padded queries, keys and values are never used, even in the backward (0 * inf would be NaN).
    visible = None
    if query_padding_mask is not None:
        qf = qf.masked_fill(~query_padding_mask[:, None, :, None], 0)
        visible = query_padding_mask[:, None, :, None]  # (B, 1, Nq, 1)
    if key_padding_mask is not None:
        kf = kf.masked_fill(~key_padding_mask[:, None, :, None], 0)
        vf = vf.masked_fill(~key_padding_mask[:, None, :, None], 0)
        keep = key_padding_mask[:, None, None, :]  # (B, 1, 1, Nk)
        visible = keep if visible is None else visible & keep
    if causal:
        off = Nk - Nq if causal_offset is None else causal_offset
        i = torch.arange(Nq, device=q.device)[:, None]
        j = torch.arange(Nk, device=q.device)[None, :]
        visible = (j <= i + off) if visible is None else visible & (j <= i + off)  # (Nq, Nk)
    s = (qf @ kf.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    # Softmax is shift-invariant, so the shift carries no gradient; rows with no visible key shift by 0.
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = (p @ vf) / torch.where(denom == 0, torch.ones_like(denom), denom)
    return out.to(q.dtype)


def topk_search_reference(
    queries: Tensor, corpus: Tensor, k: int, metric: str = "ip", *, max_scores: int = 1 << 25
) -> Tuple[Tensor, Tensor]:
    """Exact top-k by brute force: a full score matrix per chunk of queries and a stable sort.

    queries: (Q, d), corpus: (N, d) -> scores (Q, k), indices (Q, k) int64, best first.
    ip: <q, c>, larger first; cosine: <q, c> / (|q| |c|) with 0 for a zero vector; l2: squared
    distance, smaller first. Ties go to the lower index; NaN scores rank last and come back as NaN.
    Scores are computed in fp32 (fp64 for fp64 inputs). At most `max_scores` scores exist at once.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    dt = torch.float64 if queries.dtype == torch.float64 or corpus.dtype == torch.float64 else torch.float32
    q, c = queries.to(dt), corpus.to(dt)
    N = c.shape[0]
    if metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
        c = c / c.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
    cc = (c * c).sum(dim=1) if metric == "l2" else None  # (N,)
    step = max(1, max_scores // max(N, 1))
    all_scores, all_idx = [], []
    for q0 in range(0, q.shape[0], step):
        qb = q[q0 : q0 + step]
        s = qb @ c.T  # (Qb, N)
        if metric == "l2":
            s = ((qb * qb).sum(dim=1, keepdim=True) + cc[None, :] - 2 * s).clamp_min(0)
        key = -s if metric == "l2" else s
        key = torch.where(torch.isnan(key), torch.full_like(key, float("-inf")), key)
        order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]  # (Qb, k)
        all_scores.append(torch.gather(s, 1, order))
        all_idx.append(order)
    if not all_idx:
        return queries.new_zeros((0, k), dtype=dt), torch.zeros((0, k), dtype=torch.int64, device=queries.device)
    return torch.cat(all_scores), torch.cat(all_idx)
