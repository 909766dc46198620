"""The CUDA kernels of cuda/*.cuh, executed on the CPU by the SIMT emulator, against the plain-torch
reference (the same oracle and tolerances as the CPU kernels' tests in tests/ops)."""
import math
import pathlib

import numpy as np
import pytest
import torch

from minillm.ops.reference import attention_reference, attention_sdpa, topk_search_reference

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


def run_attention(emu, tmp_path, q, k, v, mask=None, causal=False, scale=None, dout=None, dlse=None, qmask=None,
                  window=(-1, -1), softcap=0.0, alibi=None, sinks=None, simt_only=False, sm=80, check=True):
    """Forward then backward through the launchers, which pick the tensor-core kernels for 16-bit inputs they
    take (on sm >= 80, unless simt_only) and the SIMT kernels otherwise. check=False returns the exit code."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    args = dict(B=B, H=H, Nq=Nq, Nk=Nk, D=D, causal=causal, causal_offset=Nk - Nq, scale=repr(scale),
                dtype=DTYPE_CODE[q.dtype], max_smem=MAX_SMEM, Hkv=Hkv, window_left=window[0],
                window_right=window[1], softcap=repr(float(softcap)), sm=sm, simt_only=int(simt_only))
    if alibi is not None:
        write_tensor(tmp_path / "alibi.bin", alibi.float().contiguous())
    if sinks is not None:
        write_tensor(tmp_path / "sinks.bin", sinks.float().contiguous())
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
    res = emu.run("attention", tmp_path, check=check)
    if not check:
        return res.returncode
    shape_q, shape_k = (B, H, Nq, D), (B, Hkv, Nk, D)
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


@pytest.mark.parametrize("simt_only", [True, False], ids=["simt", "tensor-core"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_half_precision_within_2x_torch_error(emu, tmp_path, dtype, simt_only):
    B, H, Nq, Nk, D = 1, 2, 45, 45, 64
    q, k, v = (torch.randn(B, H, n, D).to(dtype) for n in (Nq, Nk, Nk))
    mask = padding_mask(B, Nk)
    dout = torch.randn(B, H, Nq, D).to(dtype)
    got = run_attention(emu, tmp_path, q, k, v, mask, True, dout=dout, simt_only=simt_only)
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


# ---- tensor-core kernels (cuda/flash_*.cuh) ----


def reference_all(q, k, v, dout, *, mask=None, qmask=None, causal=False, scale=None, window=None, softcap=None,
                  alibi=None, sinks=None):
    """fp64 out, lse and (dq, dk, dv) of (out . dout) through attention_reference, with every modifier.

    lse: log(sum_j exp(z_ij) + exp(sink)) over visible keys; +inf for a padded query or a row with nothing in
    its denominator (the kernels' convention)."""
    D = q.shape[-1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw = dict(causal=causal, key_padding_mask=mask, query_padding_mask=qmask, scale=scale, window=window,
              softcap=softcap, alibi_slopes=None if alibi is None else alibi.double(),
              sinks=None if sinks is None else sinks.double())
    out = attention_reference(q64, k64, v64, **kw)
    (out * dout.double()).sum().backward()
    # lse from the same scores: the reference with v = identity columns is not enough, so rebuild them
    B, H, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(H // Hkv, dim=1)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    off = Nk - Nq
    i, j = torch.arange(Nq)[:, None], torch.arange(Nk)[None, :]
    if alibi is not None:
        s = s - alibi.double()[:, :, None, None] * (i + off - j).abs()
    vis = torch.ones(B, H, Nq, Nk, dtype=torch.bool)
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0
    if right >= 0:
        vis &= j <= i + off + right
    if left >= 0:
        vis &= j >= i + off - left
    if mask is not None:
        vis &= mask[:, None, None, :]
    s = s.masked_fill(~vis, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[None, :, None, None].expand(B, H, Nq, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    if qmask is not None:
        lse = lse.masked_fill(~qmask[:, None, :], float("inf"))
    return out.detach(), lse, q64.grad, k64.grad, v64.grad


def torch_own(q, k, v, dout, **kw):
    """torch's own results at q's precision: F.scaled_dot_product_attention on the 16-bit tensors (through
    attention_sdpa, which takes masks but no score modifier) and attention_reference on them (fp32 inside,
    rounded once at the end), autograd for the grads: a list of (out, dq, dk, dv)."""
    kw = dict(kw)
    kw["key_padding_mask"] = kw.pop("mask", None)
    kw["query_padding_mask"] = kw.pop("qmask", None)
    kw["alibi_slopes"] = kw.pop("alibi", None)
    plain = (kw.get("window") in (None, (-1, -1)) and not kw.get("softcap") and kw.get("alibi_slopes") is None
             and kw.get("sinks") is None)
    fns = [lambda *t: attention_reference(*t, **kw)]
    if plain and q.shape[1] == k.shape[1]:  # attention_sdpa takes one key/value head per query head
        sdpa_kw = {n: kw[n] for n in ("causal", "key_padding_mask", "query_padding_mask", "scale") if n in kw}
        fns.append(lambda *t: attention_sdpa(*t, **sdpa_kw))
    results = []
    for fn in fns:
        qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = fn(qt, kt, vt)
        out.backward(dout)
        results.append((out.detach(), qt.grad, kt.grad, vt.grad))
    return results


def check_half(got, want, own, names=("out", "dq", "dk", "dv")):
    """Each 16-bit result's max error against fp64 within 2x torch's own 16-bit error (the larger of SDPA's and
    the reference's at that precision; + a floor for results torch rounds exactly)."""
    for n, (name, g, w) in enumerate(zip(names, got, want)):
        err = (g.double() - w).abs().max().item()
        torch_err = max((r[n].double() - w).abs().max().item() for r in own)
        floor = 2 ** -10 * (1 + w.abs().max().item())
        assert err <= 2 * torch_err + floor, f"{name}: error {err:.3g} vs torch's {torch_err:.3g}"


FLASH_CASES = [
    # B, H, Hkv, Nq, Nk, D, causal, key padding, query padding
    (1, 2, 2, 64, 64, 64, False, False, False),     # one tile
    (2, 2, 2, 150, 150, 64, True, True, False),     # 3 query blocks x 3 key tiles, causal diagonal, padding
    (1, 2, 1, 70, 130, 128, True, False, True),     # grouped (2 query heads per key/value head), Nq < Nk
    (1, 4, 2, 90, 33, 40, False, True, True),       # D padded to 64, Nq > Nk, a partial tile
    (1, 1, 1, 20, 100, 96, True, True, False),      # D padded to 128
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Hkv,Nq,Nk,D,causal,padded,qpadded", FLASH_CASES)
def test_flash_attention_forward_backward(emu, tmp_path, dtype, B, H, Hkv, Nq, Nk, D, causal, padded, qpadded):
    torch.manual_seed(Nq * 7 + D)
    q = torch.randn(B, H, Nq, D).to(dtype)
    k, v = (torch.randn(B, Hkv, Nk, D).to(dtype) for _ in range(2))
    dout = torch.randn(B, H, Nq, D).to(dtype)
    mask = padding_mask(B, Nk, fully_padded_row=B > 1) if padded else None
    qmask = (torch.rand(B, Nq) > 0.2) if qpadded else None
    got = run_attention(emu, tmp_path, q, k, v, mask, causal, dout=dout, qmask=qmask)
    kw = dict(mask=mask, qmask=qmask, causal=causal)
    out, lse, dq, dk, dv = reference_all(q, k, v, dout, **kw)
    check_half((got[0], got[2], got[3], got[4]), (out, dq, dk, dv), torch_own(q, k, v, dout, **kw))
    finite = torch.isfinite(lse)
    assert torch.equal(torch.isinf(got[1]), ~finite)
    torch.testing.assert_close(got[1][finite].double(), lse[finite], atol=2e-2, rtol=1e-2)


MOD_CASES = [
    # window, softcap, alibi, sinks, causal
    ((16, -1), 0.0, False, False, True),     # sliding window (Mistral-style): 16 keys back, causal
    ((20, 10), 0.0, False, False, False),    # a two-sided band
    ((-1, -1), 5.0, False, False, True),     # Gemma 2's softcap
    ((-1, -1), 0.0, True, False, True),      # ALiBi
    ((-1, -1), 0.0, False, True, True),      # sinks (gpt-oss)
    ((8, -1), 3.0, True, True, True),        # all at once
]


@pytest.mark.parametrize("window,softcap,alibi,sinks,causal", MOD_CASES)
def test_flash_attention_score_modifiers(emu, tmp_path, window, softcap, alibi, sinks, causal):
    dtype = torch.bfloat16
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 80, 100, 64
    torch.manual_seed(3)
    q = (torch.randn(B, H, Nq, D) * 2).to(dtype)
    k, v = (torch.randn(B, Hkv, Nk, D).to(dtype) for _ in range(2))
    dout = torch.randn(B, H, Nq, D).to(dtype)
    mask = padding_mask(B, Nk)
    slopes = torch.rand(B, H) * 0.2 if alibi else None
    sink = torch.randn(H) if sinks else None
    got = run_attention(emu, tmp_path, q, k, v, mask, causal, dout=dout, window=window, softcap=softcap,
                        alibi=slopes, sinks=sink)
    kw = dict(mask=mask, causal=causal, window=window, softcap=softcap or None, alibi=slopes, sinks=sink)
    out, lse, dq, dk, dv = reference_all(q, k, v, dout, **kw)
    check_half((got[0], got[2], got[3], got[4]), (out, dq, dk, dv), torch_own(q, k, v, dout, **kw))
    finite = torch.isfinite(lse)
    assert torch.equal(torch.isinf(got[1]), ~finite)
    torch.testing.assert_close(got[1][finite].double(), lse[finite], atol=2e-2, rtol=1e-2)


def test_flash_attention_never_reads_padded_keys_or_queries(emu, tmp_path):
    dtype = torch.float16
    B, H, N, D = 1, 2, 70, 64
    q, k, v, dout = (torch.randn(B, H, N, D).to(dtype) for _ in range(4))
    mask, qmask = padding_mask(B, N), torch.rand(B, N) > 0.3
    k_in, v_in = k.clone(), v.clone()
    k_in[:, :, ~mask[0]] = float("nan")
    v_in[:, :, ~mask[0]] = float("nan")
    q_in, dout_in = q.clone(), dout.clone()
    q_in[:, :, ~qmask[0]] = float("nan")
    dout_in[:, :, ~qmask[0]] = float("nan")
    got = run_attention(emu, tmp_path, q_in, k_in, v_in, mask, True, dout=dout_in, qmask=qmask)
    kw = dict(mask=mask, qmask=qmask, causal=True)
    want = reference_all(q, k, v, dout, **kw)
    for g in got:
        assert not torch.isnan(g).any()
    check_half((got[0], got[2], got[3], got[4]), (want[0], want[2], want[3], want[4]), torch_own(q, k, v, dout, **kw))


def test_flash_attention_strided_rows_and_the_simt_fallback(emu, tmp_path):
    """Views of a fused projection (aligned rows) take the tensor-core kernels; a view whose rows are not 16-byte
    aligned (a row stride that is not a multiple of 8 elements) falls back to the SIMT kernels for plain attention and is refused (exit code 11) with a modifier."""
    dtype = torch.bfloat16
    B, H, N, D = 2, 2, 40, 64
    qkv = torch.randn(B, N, 3, H, D).to(dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    dout = torch.randn(B, N, H, D).to(dtype).transpose(1, 2)
    got = run_attention(emu, tmp_path, q, k, v, None, True, dout=dout)
    kw = dict(causal=True)
    want = reference_all(q, k, v, dout, **kw)
    check_half((got[0], got[2], got[3], got[4]), (want[0], want[2], want[3], want[4]), torch_own(q, k, v, dout, **kw))
    q_odd = torch.randn(B, H, N, D + 1).to(dtype)[..., :D]  # row stride 65 elements: rows not on 16 bytes
    got = run_attention(emu, tmp_path, q_odd, k, v, None, True, dout=dout)
    want = reference_all(q_odd, k, v, dout, **kw)
    check_half((got[0], got[2], got[3], got[4]), (want[0], want[2], want[3], want[4]),
               torch_own(q_odd, k, v, dout, **kw))
    assert run_attention(emu, tmp_path, q_odd, k, v, None, True, dout=dout, softcap=5.0, check=False) == 11
    # below sm_80 a modifier has no kernel either
    assert run_attention(emu, tmp_path, q, k, v, None, True, dout=dout, softcap=5.0, sm=75, check=False) == 11


# ---- top-k ----


def run_topk(emu, tmp_path, q, c, k, metric, target_blocks=8, sm=80, simt_only=False, corpus_offset=0,
             with_path=False):
    """The launcher's plan picks the tensor-core scan for 16-bit corpora it can copy by cp.async (16-byte aligned
    rows, d % 8 == 0) with >= 16 queries on sm >= 80, else the SIMT scan; corpus_offset misaligns the corpus."""
    Q, d = q.shape
    write_tensor(tmp_path / "queries.bin", q.float().contiguous())
    write_tensor(tmp_path / "corpus.bin", c)
    write_args(tmp_path / "args.txt", Q=Q, N=c.shape[0], d=d, k=k, metric=METRIC_CODE[metric],
               dtype=DTYPE_CODE[c.dtype], corpus_stride=c.stride(0), target_blocks=target_blocks, max_smem=MAX_SMEM,
               sm=sm, simt_only=int(simt_only), corpus_offset=corpus_offset)
    res = emu.run("topk", tmp_path)
    fields = res.stdout.split()
    parts, mma = int(fields[1]), int(fields[7])
    out = (read_tensor(tmp_path / "scores.bin", torch.float32, (Q, k)),
           read_tensor(tmp_path / "idx.bin", torch.int64, (Q, k)), parts)
    return out + (bool(mma),) if with_path else out


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


# ---- the tensor-core top-k scan (cuda/topk_mma.cuh) ----

MMA_TOPK_CASES = [
    # Q, N, d, k, metric, corpus dtype
    (20, 600, 64, 10, "ip", torch.bfloat16),      # a full block of 16 queries and a partial one
    (16, 1500, 40, 25, "l2", torch.float16),      # d padded to 64 by zero-filled copies; parts merged
    (33, 300, 136, 100, "cosine", torch.bfloat16),  # three column stages per tile, k = 100 (256-slot buffers)
    (17, 400, 64, 7, "cosine", torch.float16),
    (16, 400, 32, 12, "l2", torch.bfloat16),
    (18, 300, 48, 5, "ip", torch.float16),
]


@pytest.mark.parametrize("Q,N,d,k,metric,dtype", MMA_TOPK_CASES)
def test_topk_tensor_cores_against_brute_force(emu, tmp_path, Q, N, d, k, metric, dtype):
    torch.manual_seed(N + d)
    q, c = torch.randn(Q, d), torch.randn(N, d).to(dtype)
    scores, idx, parts, mma = run_topk(emu, tmp_path, q, c, k, metric, with_path=True)
    assert mma, "this case is meant for the tensor-core scan"
    check_topk(q, c.float(), k, metric, scores, idx)
    if N >= 1500:
        assert parts > 1


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_topk_tensor_cores_ties_go_to_the_lower_index(emu, tmp_path, metric):
    base = torch.randn(50, 16).to(torch.bfloat16)
    c = base.repeat(20, 1)  # every row 20 times: equal rows score equally in any lane and tile
    q = torch.randn(17, 16)
    scores, idx, parts, mma = run_topk(emu, tmp_path, q, c, 45, metric, with_path=True)
    assert mma and parts > 1
    _, want = topk_search_reference(q, c.float(), 45, metric)
    assert torch.equal(idx, want)


def test_topk_tensor_cores_strided_corpus_and_nan_rows(emu, tmp_path):
    wide = torch.randn(400, 48).to(torch.float16)
    c = wide[:, :32]  # row stride 48 elements (96 bytes): rows on 16 bytes
    c[[5, 100, 399]] = float("nan")
    q = torch.randn(16, 32)
    k = 200
    scores, idx, _, mma = run_topk(emu, tmp_path, q, c, k, "ip", with_path=True)
    assert mma
    assert not set(idx.flatten().tolist()) & {5, 100, 399}  # NaN rows rank after every number
    finite = torch.ones(400, dtype=torch.bool)
    finite[[5, 100, 399]] = False
    kept = c[finite].float()
    check_topk(q, kept, k, "ip", scores, torch.searchsorted(finite.nonzero().flatten(), idx.contiguous()))


def test_topk_tensor_cores_only_where_they_apply(emu, tmp_path):
    """The SIMT scan takes what the tensor-core scan cannot: few queries, fp32 corpora, rows not on 16 bytes,
    d not a multiple of 8, GPUs before sm_80; both give the same top-k."""
    q, c = torch.randn(16, 24), torch.randn(200, 24).to(torch.bfloat16)
    cases = [dict(), dict(simt_only=True), dict(sm=75), dict(corpus_offset=2)]
    results = [run_topk(emu, tmp_path, q, c, 9, "cosine", with_path=True, **kw) for kw in cases]
    assert [r[3] for r in results] == [True, False, False, False]
    for scores, idx, _, _ in results:
        check_topk(q, c.float(), 9, "cosine", scores, idx)
    assert not run_topk(emu, tmp_path, q[:15], c, 9, "ip", with_path=True)[3]  # one query short of a tile
    assert not run_topk(emu, tmp_path, q, c.float(), 9, "ip", with_path=True)[3]  # fp32 corpus
    assert not run_topk(emu, tmp_path, q[:, :20], c[:, :20], 9, "ip", with_path=True)[3]  # d % 8 != 0
