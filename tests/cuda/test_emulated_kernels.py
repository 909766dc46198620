"""The CUDA kernels of cuda/*.cuh, executed on the CPU by the SIMT emulator, against the plain-torch
reference (the same oracle and tolerances as the CPU kernels' tests in tests/ops)."""
import math
import pathlib

import numpy as np
import pytest
import torch

from minillm.ops.reference import attention_reference, topk_search_reference

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
METRIC_CODE = {"ip": 0, "cosine": 1, "l2": 2}
MAX_SMEM = 163 * 1024  # sm_80's opt-in shared memory per block


def write_tensor(path: pathlib.Path, t: torch.Tensor) -> None:
    """The storage a strided tensor spans, from its first element."""
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    flat = torch.as_strided(t, (span,), (1,), t.storage_offset()).contiguous()
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.view(torch.int16)
    path.write_bytes(flat.numpy().tobytes())


def read_tensor(path: pathlib.Path, dtype: torch.dtype, shape) -> torch.Tensor:
    raw = np.frombuffer(path.read_bytes(), dtype={torch.float32: np.float32, torch.int64: np.int64,
                                                  torch.bfloat16: np.int16, torch.float16: np.int16}[dtype])
    t = torch.from_numpy(raw.copy())
    if dtype in (torch.bfloat16, torch.float16):
        t = t.view(dtype)
    return t.reshape(shape)


def write_args(path: pathlib.Path, **args) -> None:
    path.write_text("".join(f"{k} {int(v) if isinstance(v, bool) else v}\n" for k, v in args.items()))


# ---- attention ----


def reference_grads(q, k, v, mask, causal, scale, dout, dlse, qmask=None):
    """fp64 out, lse and gradients of (out, lse) . (dout, dlse) by autograd through the reference."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = attention_reference(q, k, v, causal=causal, key_padding_mask=mask, scale=scale, query_padding_mask=qmask)
    Nq, Nk = q.shape[2], k.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale
    vis = torch.ones(Nq, Nk, dtype=torch.bool)
    if causal:
        vis = torch.arange(Nk)[None, :] <= torch.arange(Nq)[:, None] + (Nk - Nq)
    vis = vis[None, None].expand(q.shape[0], 1, Nq, Nk)
    if mask is not None:
        vis = vis & mask[:, None, None, :]
    if qmask is not None:
        vis = vis & qmask[:, None, :, None]
    # A row that sees no key has lse = +inf (so exp(s - lse) = 0 in the backward), as the kernels.
    lse = torch.logsumexp(s.masked_fill(~vis, float("-inf")), dim=-1).masked_fill(~vis.any(-1), float("inf"))
    loss = (out * dout.double()).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isinf(lse), 0.0, lse) * dlse.double()).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def run_attention(emu, tmp_path, q, k, v, mask=None, causal=False, scale=None, dout=None, dlse=None, qmask=None):
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    args = dict(B=B, H=H, Nq=Nq, Nk=Nk, D=D, causal=causal, causal_offset=Nk - Nq, scale=repr(scale),
                dtype=DTYPE_CODE[q.dtype], max_smem=MAX_SMEM)
    for name, t in (("q", q), ("k", k), ("v", v), ("dout", dout)):
        write_tensor(tmp_path / f"{name}.bin", t)
        args.update({f"{name}_s{i}": t.stride(i) for i in range(3)})
    if mask is not None:
        (tmp_path / "mask.bin").write_bytes(mask.to(torch.uint8).contiguous().numpy().tobytes())
    if qmask is not None:
        (tmp_path / "qmask.bin").write_bytes(qmask.to(torch.uint8).contiguous().numpy().tobytes())
    if dlse is not None:
        write_tensor(tmp_path / "dlse.bin", dlse.float().contiguous())
    write_args(tmp_path / "args.txt", **args)
    emu.run("attention", tmp_path)
    shape_q, shape_k = (B, H, Nq, D), (B, H, Nk, D)
    return (read_tensor(tmp_path / "out.bin", q.dtype, shape_q), read_tensor(tmp_path / "lse.bin", torch.float32, (B, H, Nq)),
            read_tensor(tmp_path / "dq.bin", q.dtype, shape_q), read_tensor(tmp_path / "dk.bin", q.dtype, shape_k),
            read_tensor(tmp_path / "dv.bin", q.dtype, shape_k))


def padding_mask(B, Nk, fully_padded_row=False):
    mask = torch.rand(B, Nk) > 0.25
    mask[:, 0] = True
    if fully_padded_row:
        mask[-1] = False
    return mask


ATTENTION_CASES = [
    # B, H, Nq, Nk, D, causal, padded
    (1, 2, 37, 37, 40, False, False),
    (1, 2, 37, 37, 40, True, False),
    (2, 1, 70, 70, 64, True, True),
    (2, 2, 33, 65, 8, False, True),
    (1, 1, 5, 70, 16, True, False),    # decode-like: few new queries after a cache, bottom-right causal
    (1, 1, 40, 9, 24, True, False),    # Nq > Nk: the first queries see no key
    (1, 1, 20, 45, 128, True, True),   # 4 columns per lane
    (1, 1, 18, 35, 200, False, True),  # 8 columns per lane, D not a multiple of 32
]


@pytest.mark.parametrize("B,H,Nq,Nk,D,causal,padded", ATTENTION_CASES)
def test_attention_fp32_forward_backward(emu, tmp_path, B, H, Nq, Nk, D, causal, padded):
    q, k, v = (torch.randn(B, H, n, D) for n in (Nq, Nk, Nk))
    mask = padding_mask(B, Nk, fully_padded_row=B > 1) if padded else None
    dout = torch.randn(B, H, Nq, D)
    got = run_attention(emu, tmp_path, q, k, v, mask, causal, dout=dout)
    want = reference_grads(q, k, v, mask, causal, 1 / math.sqrt(D), dout, None)
    for name, g, w, atol in zip(("out", "lse", "dq", "dk", "dv"), got, want, (1e-5, 1e-5, 1e-5, 3e-5, 3e-5)):
        torch.testing.assert_close(g, w.float(), atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_attention_fully_masked_rows_are_zero_with_inf_lse(emu, tmp_path):
    B, H, N, D = 2, 1, 12, 16
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1] = False
    out, lse, dq, dk, dv = run_attention(emu, tmp_path, q, k, v, mask, dout=torch.randn(B, H, N, D))
    assert (out[1] == 0).all() and torch.isinf(lse[1]).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert torch.isfinite(out).all()


def test_attention_query_padding_skips_rows(emu, tmp_path):
    B, H, Nq, Nk, D = 2, 2, 37, 45, 24
    q, k, v = (torch.randn(B, H, n, D) for n in (Nq, Nk, Nk))
    mask = padding_mask(B, Nk)
    qmask = torch.rand(B, Nq) > 0.3
    qmask[0, 20:] = False
    dout = torch.randn(B, H, Nq, D)
    padded = ~qmask[:, None, :, None].expand_as(q)
    q_in, dout_in = q.masked_fill(padded, float("nan")), dout.masked_fill(padded, float("nan"))  # never read
    got = run_attention(emu, tmp_path, q_in, k, v, mask, True, dout=dout_in, qmask=qmask)
    want = reference_grads(q, k, v, mask, True, 1 / math.sqrt(D), dout.masked_fill(padded, 0), None, qmask=qmask)
    for name, g, w, atol in zip(("out", "lse", "dq", "dk", "dv"), got, want, (1e-5, 1e-5, 1e-5, 3e-5, 3e-5)):
        torch.testing.assert_close(g, w.float(), atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert torch.isinf(got[1][~qmask[:, None, :].expand(B, H, Nq)]).all()


def test_attention_never_reads_padded_keys(emu, tmp_path):
    B, H, N, D = 1, 2, 40, 32
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    mask = padding_mask(B, N)
    k[:, :, ~mask[0]] = float("nan")
    v[:, :, ~mask[0]] = float("nan")
    dout = torch.randn(B, H, N, D)
    got = run_attention(emu, tmp_path, q, k, v, mask, dout=dout)
    want = reference_grads(q, k.nan_to_num(), v.nan_to_num(), mask, False, 1 / math.sqrt(D), dout, None)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), atol=3e-5, rtol=1e-4)


def test_attention_strided_inputs_custom_scale_and_lse_gradient(emu, tmp_path):
    B, H, N, D = 2, 3, 29, 24
    qkv = torch.randn(B, N, 3, H, D)  # as a fused projection leaves it
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, D) views, non-contiguous
    dout = torch.randn(B, N, H, D).transpose(1, 2)
    dlse = torch.randn(B, H, N)
    got = run_attention(emu, tmp_path, q, k, v, None, True, scale=0.3, dout=dout, dlse=dlse)
    want = reference_grads(q, k, v, None, True, 0.3, dout, dlse)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w.float(), atol=3e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_half_precision_within_2x_torch_error(emu, tmp_path, dtype):
    B, H, Nq, Nk, D = 1, 2, 45, 45, 64
    q, k, v = (torch.randn(B, H, n, D).to(dtype) for n in (Nq, Nk, Nk))
    mask = padding_mask(B, Nk)
    dout = torch.randn(B, H, Nq, D).to(dtype)
    got = run_attention(emu, tmp_path, q, k, v, mask, True, dout=dout)
    want = reference_grads(q, k, v, mask, True, 1 / math.sqrt(D), dout, None)
    # torch's own error at this precision: the reference run in `dtype`
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_t = attention_reference(qt, kt, vt, causal=True, key_padding_mask=mask)
    out_t.backward(dout)
    torch_own = (out_t.detach(), None, qt.grad, kt.grad, vt.grad)
    for name, g, w, t in zip(("out", "lse", "dq", "dk", "dv"), got, want, torch_own):
        if t is None:
            continue
        err = (g.double() - w).abs().max().item()
        torch_err = (t.double() - w).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, f"{name}: error {err:.3g} vs torch's {torch_err:.3g}"


# ---- top-k ----


def run_topk(emu, tmp_path, q, c, k, metric, target_blocks=8):
    Q, d = q.shape
    write_tensor(tmp_path / "queries.bin", q.float().contiguous())
    write_tensor(tmp_path / "corpus.bin", c)
    write_args(tmp_path / "args.txt", Q=Q, N=c.shape[0], d=d, k=k, metric=METRIC_CODE[metric],
               dtype=DTYPE_CODE[c.dtype], corpus_stride=c.stride(0), target_blocks=target_blocks, max_smem=MAX_SMEM)
    res = emu.run("topk", tmp_path)
    parts = int(res.stdout.split()[1])
    return (read_tensor(tmp_path / "scores.bin", torch.float32, (Q, k)),
            read_tensor(tmp_path / "idx.bin", torch.int64, (Q, k)), parts)


def check_topk(q, c, k, metric, scores, idx, tol=1e-4):
    """Tie-aware: a valid exact top-k with true scores, best first, matching brute force's k best scores."""
    q64, c64 = q.double(), c.double()
    for row in idx:
        assert len(set(row.tolist())) == k, "duplicate indices"
    if metric == "cosine":
        q64 = q64 / q64.norm(dim=1, keepdim=True).clamp_min(1e-300)
        c64 = c64 / c64.norm(dim=1, keepdim=True).clamp_min(1e-300)
    rows = c64[idx]  # (Q, k, d)
    exact = ((rows - q64[:, None]) ** 2).sum(-1) if metric == "l2" else (rows * q64[:, None]).sum(-1)
    scale = 1 + exact.abs()
    assert ((scores.double() - exact).abs() <= tol * scale).all()
    better = -scores if metric == "l2" else scores
    assert (better[:, :-1] >= better[:, 1:] - tol * scale[:, 1:]).all()
    ref_scores, _ = topk_search_reference(q.double(), c.double(), k, metric)
    assert ((scores.double() - ref_scores).abs() <= tol * (1 + ref_scores.abs())).all()


TOPK_CASES = [
    # N, d, k, Q
    (20, 8, 20, 3),      # k = N
    (1000, 37, 10, 5),   # the corpus split in parts, merged by the second kernel
    (3001, 64, 1, 9),    # queries in two blocks
    (3000, 16, 700, 2),  # large k: 1024-slot buffers, many bitonic sorts
]


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("N,d,k,Q", TOPK_CASES)
def test_topk_fp32_against_brute_force(emu, tmp_path, N, d, k, Q, metric):
    q, c = torch.randn(Q, d), torch.randn(N, d)
    scores, idx, parts = run_topk(emu, tmp_path, q, c, k, metric)
    check_topk(q, c, k, metric, scores, idx)
    if N >= 1000 and Q <= 5:
        assert parts > 1, "this case is meant to exercise the merge kernel"


def test_topk_k_1024_and_one_block_per_query(emu, tmp_path):
    q, c = torch.randn(2, 12), torch.randn(2500, 12)
    scores, idx, _ = run_topk(emu, tmp_path, q, c, 1024, "ip", target_blocks=1)
    check_topk(q, c, 1024, "ip", scores, idx)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_topk_exact_ties_go_to_the_lower_index(emu, tmp_path, metric):
    base = torch.randn(50, 16)
    c = base.repeat(30, 1)  # every row 30 times: scores tie exactly, across tiles and parts
    q = torch.randn(3, 16)
    scores, idx, parts = run_topk(emu, tmp_path, q, c, 45, metric)
    assert parts > 1
    _, want = topk_search_reference(q, c, 45, metric)
    assert torch.equal(idx, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_half_precision_corpus(emu, tmp_path, dtype):
    q, c = torch.randn(4, 40), torch.randn(900, 40).to(dtype)
    scores, idx, _ = run_topk(emu, tmp_path, q, c, 7, "cosine")
    check_topk(q, c.float(), 7, "cosine", scores, idx)


def test_topk_strided_corpus_and_nan_rows_rank_last(emu, tmp_path):
    wide = torch.randn(600, 48)
    c = wide[:, :33]  # row stride 48
    c[[5, 100, 599]] = float("nan")
    q = torch.randn(2, 33)
    scores, idx, _ = run_topk(emu, tmp_path, q, c, 600, "ip")
    assert set(idx[:, -3:].flatten().tolist()) == {5, 100, 599}
    assert torch.isnan(scores[:, -3:]).all() and not torch.isnan(scores[:, :-3]).any()
    finite = torch.ones(600, dtype=torch.bool)
    finite[[5, 100, 599]] = False
    kept = c[finite]
    check_topk(q, kept, 597, "ip", scores[:, :-3], torch.searchsorted(finite.nonzero().flatten(), idx[:, :-3].contiguous()))
