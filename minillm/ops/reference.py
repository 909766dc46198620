"""Plain-torch twins of the native kernels: the tests' oracle, and the torch paths of devices and cases
without a (measured faster) kernel.

``attention_reference`` and ``topk_search_reference`` define what "correct" means and stay simple on purpose.
``attention_sdpa`` and ``topk_search_torch`` compute the same functions with what torch runs fastest
(``F.scaled_dot_product_attention``, chunked ``mm`` + ``torch.topk``): they are what CUDA calls run when the
dispatch table has no measured row for minillm's kernel, and what CPU calls run without the extension.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
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
    window: Optional[Tuple[int, int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """softmax(s) v with minillm's masking rules and score modifiers, s = q k^T * scale + modifiers.

    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D), Hkv dividing H (query head h reads key/value head h // (H // Hkv));
    key_padding_mask: bool (B, Nk), True = keep; query_padding_mask: bool (B, Nq), True = compute (a padded
    query returns 0 and gets no gradient).
    With off = causal_offset (default Nk - Nq: the last query aligned with the last key, bottom-right, as in
    KV-cache decoding): causal: key j is visible to query i when j <= i + off; window (left, right): when
    i + off - left <= j <= i + off + right (-1: unbounded on that side).
    Scores: softcap * tanh(s / softcap) when softcap is set, minus alibi_slopes ((H,) or (B, H)) times
    |i + off - j|, plus bias (broadcastable to (B, H, Nq, Nk)); sinks (H,): a logit per head added to the
    softmax's denominator only. A query that sees no key returns 0. Padded keys, values and queries are never
    used. Returns (B, H, Nq, D) in q's dtype.
    """
    Nq, Nk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    if Nk == 0:  # no key at all: every query returns 0
        return q.masked_fill(torch.ones((), dtype=torch.bool, device=q.device), 0)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dt = _opmath(q.dtype)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    if kf.shape[1] != qf.shape[1]:  # grouped-query attention
        G = qf.shape[1] // kf.shape[1]
        kf, vf = kf.repeat_interleave(G, dim=1), vf.repeat_interleave(G, dim=1)
    off = Nk - Nq if causal_offset is None else causal_offset
    i = torch.arange(Nq, device=q.device)[:, None]
    j = torch.arange(Nk, device=q.device)[None, :]
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
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    for ok, band in ((right >= 0, j <= i + off + right), (left >= 0, j >= i + off - left)):
        if ok:
            visible = band if visible is None else visible & band  # (Nq, Nk)
    s = (qf @ kf.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dt)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]  # (B or 1, H, 1, 1)
        s = s - slopes * (i + off - j).abs().to(dt)
    if bias is not None:
        s = s + bias.to(dt)
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    # Softmax is shift-invariant, so the shift carries no gradient; rows with no visible key shift by 0.
    m = s.detach().amax(dim=-1, keepdim=True)
    if sinks is not None:
        sink = sinks.to(dt)[None, :, None, None]  # (1, H, 1, 1)
        m = torch.maximum(m, sink.detach())
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sink - m)
    out = (p @ vf) / torch.where(denom == 0, torch.ones_like(denom), denom)
    return out.to(q.dtype)


def _overlaps(t: Tensor) -> bool:
    """Whether two indices of `t` address one element: an expanded dim (stride 0), rows closer than a row."""
    span = 1  # elements spanned by the dims seen so far, innermost (smallest stride) first
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


def sdpa_operand(t: Tensor) -> Tensor:
    """`t`, copied when its elements overlap: torch 2.13's CPU ``F.scaled_dot_product_attention`` returns wrong
    values for such inputs, zeros or uninitialised memory in some rows (a query expanded along N from one row,
    or rows closer than D apart: 1,549 of 20,000 random overlapping layouts differed from the same call on
    contiguous copies; no non-overlapping layout did). Non-overlapping views (transposes, slices) pass as they are."""
    return t if t.is_contiguous() or not _overlaps(t) else t.contiguous()


def attention_sdpa(
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
    """:func:`attention_reference`'s function through ``F.scaled_dot_product_attention`` (FlashAttention or
    cuDNN on a GPU when there is no mask, the memory-efficient kernel with one).

    Same arguments and semantics: bottom-right causal alignment by default, padded keys, values and queries
    never used (they are zeroed first, so NaN there stays out), a query that sees no key returns 0 with zero
    gradients (it is given every key, so the softmax stays finite, and its output is then zeroed). No
    data-dependent branch, so torch.compile traces it whole.
    """
    Nq, Nk = q.shape[-2], k.shape[-2]
    if Nq == 0 or Nk == 0:
        return q.masked_fill(torch.ones((), dtype=torch.bool, device=q.device), 0)  # zeros, zero gradients
    q, k, v = sdpa_operand(q), sdpa_operand(k), sdpa_operand(v)
    off = Nk - Nq if causal_offset is None else causal_offset
    causal = causal and off < Nk - 1  # every query sees every key: no causal mask at all (decoding)
    if key_padding_mask is None and query_padding_mask is None:
        if not causal:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if off == 0:  # torch's is_causal is top-left: j <= i
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        if off == Nk - Nq and Nq < Nk:  # bottom-right, every query sees at least one key
            # Imported here: torch.nn.attention.bias loads torch._dynamo, a second on every `import minillm.ops`.
            from torch.nn.attention.bias import causal_lower_right

            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Nq, Nk), scale=scale)
    # Masked: one boolean mask for SDPA, in as few passes as the masks allow (each pass is a kernel launch,
    # which is what costs at small N on a GPU).
    visible = None
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :, None]  # (B, 1, Nk, 1): zero padded keys and values
        k, v = torch.where(keep, k, 0), torch.where(keep, v, 0)
        visible = key_padding_mask[:, None, None, :]  # (B, 1, 1, Nk)
    if causal:
        band = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(off)  # j <= i + off
        visible = band if visible is None else visible & band  # (B or 1, 1 or Nq, Nq, Nk)
    row_ok = None  # rows that see a key and are not padding; the others return 0, with no gradient
    if visible is not None:
        # A row with no visible key is given every key, so the softmax stays finite, then zeroed.
        row_ok = visible.any(dim=-1, keepdim=True)
        visible = torch.where(row_ok, visible, True)
    if query_padding_mask is not None:
        q_ok = query_padding_mask[:, None, :, None]  # (B, 1, Nq, 1): computed from zeros, then zeroed
        q = torch.where(q_ok, q, 0)
        row_ok = q_ok if row_ok is None else row_ok & q_ok
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    return torch.where(row_ok, out, 0)


def _topk_rows(s: Tensor, k: int, largest: bool) -> Tensor:
    """Columns of the k best scores of each row of s (R, M), largest first (ip, cosine) or smallest first (l2),
    ties to the lower column, NaN ranked as the worst score (ties with -inf / +inf by column), as
    topk_search_reference's stable sort ranks them. torch.topk is fast but picks among tied scores freely and
    ranks NaN first: rows where that could matter (the (k+1)-th score equal to the k-th, so a tie crosses the
    cut; a NaN taken; a k-th score that is not finite) are redone with the stable sort, and the k are then put
    in (score, column) order. Asking topk for k + 1 finds the crossing ties without another pass over s."""
    M = s.shape[1]
    top = torch.topk(s, min(k + 1, M), dim=1, largest=largest, sorted=True)
    kth = top.values[:, k - 1]
    redo = ~torch.isfinite(kth)
    if M > k:
        redo |= top.values[:, k] == kth
    if largest:
        redo |= top.values[:, :k].isnan().any(dim=1)
    idx = top.indices[:, :k]
    if bool(redo.any()):  # one device sync per tile
        rows = redo.nonzero()[:, 0]
        idx = idx.clone()
        idx[rows] = torch.sort(_rank_key(s[rows], largest), dim=1, descending=True, stable=True).indices[:, :k]
    idx, _ = torch.sort(idx, dim=1)  # columns ascending, so the stable sort below breaks ties to the lower
    order = torch.sort(_rank_key(torch.gather(s, 1, idx), largest), dim=1, descending=True, stable=True).indices
    return torch.gather(idx, 1, order)


def _rank_key(s: Tensor, largest: bool) -> Tensor:
    """Larger is better, NaN as -inf: the key topk_search_reference sorts by."""
    key = s if largest else -s
    return torch.nan_to_num(key, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def topk_search_torch(
    queries: Tensor, corpus: Tensor, k: int, metric: str = "ip", *, max_scores: Optional[int] = None
) -> Tuple[Tensor, Tensor]:
    """:func:`topk_search_reference`'s results (ties to the lower index, NaN scores ranked as -inf) through
    ``mm`` and ``torch.topk`` over tiles of at most `max_scores` scores (default 2^28 on a GPU, 2^26
    elsewhere): (queries x corpus rows) tiles, with a running top-k per query merged tile by tile, so memory
    stays bounded for any Q and N.

    queries: (Q, d), corpus: (N, d), any float dtype (scores in fp32; fp64 when either is fp64).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if max_scores is None:
        max_scores = 1 << 28 if queries.device.type == "cuda" else 1 << 26
    dt = torch.float64 if queries.dtype == torch.float64 or corpus.dtype == torch.float64 else torch.float32
    tiny = torch.finfo(dt).tiny
    largest = metric != "l2"
    q = queries.to(dt)
    if metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp_min(tiny)
    Q, N = q.shape[0], corpus.shape[0]
    q_step = max(1, min(Q, max_scores // max(1, min(N, 1 << 16))))  # queries per tile
    n_step = max(1, min(N, max_scores // q_step))  # corpus rows per tile
    all_scores, all_idx = [], []
    for q0 in range(0, Q, q_step):
        qb = q[q0:q0 + q_step]  # (Qb, d)
        qq = (qb * qb).sum(dim=1, keepdim=True) if metric == "l2" else None
        best_s = best_idx = None  # the running top-k of these queries: (Qb, <= k)
        for n0 in range(0, N, n_step):
            c = corpus[n0:n0 + n_step].to(dt)  # (Nc, d)
            if metric == "cosine":
                c = c / c.norm(dim=1, keepdim=True).clamp_min(tiny)
            if metric == "l2":  # |q|^2 + |c|^2 - 2 q.c, the sum formed in the product's epilogue
                s = torch.addmm(qq + (c * c).sum(dim=1)[None, :], qb, c.T, alpha=-2).clamp_min_(0)
            else:
                s = qb @ c.T  # (Qb, Nc)
            cols = _topk_rows(s, min(k, s.shape[1]), largest)  # (Qb, kk)
            tile_s, tile_idx = torch.gather(s, 1, cols), cols + n0
            if best_idx is None:
                best_s, best_idx = tile_s, tile_idx
                continue
            # The running top-k holds lower indices than this tile, and each part is in (score, index) order,
            # so a stable sort of the two keeps ties to the lower index.
            cat_s = torch.cat([best_s, tile_s], dim=1)
            order = torch.sort(_rank_key(cat_s, largest), dim=1, descending=True, stable=True).indices[:, :k]
            best_s = torch.gather(cat_s, 1, order)
            best_idx = torch.gather(torch.cat([best_idx, tile_idx], dim=1), 1, order)
        all_scores.append(best_s)
        all_idx.append(best_idx)
    if not all_idx:
        return queries.new_zeros((0, k), dtype=dt), torch.zeros((0, k), dtype=torch.int64, device=queries.device)
    return torch.cat(all_scores), torch.cat(all_idx)


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
