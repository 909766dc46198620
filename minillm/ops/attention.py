"""Fused scaled-dot-product attention: public wrappers, the `minillm::attention_*` custom ops,
their fake (meta) implementations and autograd registration.

Shapes: q (B, H, Nq, D); k, v (B, H, Nk, D); key_padding_mask (B, Nk) bool, True = keep;
query_padding_mask (B, Nq) bool, True = compute.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from minillm.ops import _backend
from minillm.ops.reference import attention_reference, attention_sdpa, sdpa_operand

# The dtypes the kernels take (their codes: _backend.DTYPE_CODE, from the extension).
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DTYPE_NAMES = "float32, bfloat16, float16 or float64"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_last(t: Tensor) -> Tensor:
    # Kernels take any (b, h, n) strides but need unit stride along D.
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


def _threads(macs: int) -> int:
    # ~20 GMAC/s per thread for small tiles: the estimate only decides whether threads are worth waking.
    return _backend.threads_for(macs / 2e4)


def _mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    return mask.contiguous() if mask is not None else None


def _bias_operand(bias: Optional[Tensor], B: int, H: int, Nq: int, Nk: int, acc: torch.dtype) -> Optional[Tensor]:
    """The additive bias as the kernels read it: (B, H, Nq, Nk) in the accumulation dtype, broadcast dims as stride 0
    (an expanded input is cast from its unexpanded values, never materialised whole)."""
    if bias is None:
        return None
    b4 = bias[(None,) * (4 - bias.dim())]  # (.., .., Nq or 1, Nk or 1) view
    for d in range(4):  # un-expand stride-0 dims, so that a cast copies only the distinct values
        if b4.stride(d) == 0 and b4.shape[d] > 1:
            b4 = b4.narrow(d, 0, 1)
    if b4.dtype != acc:
        b4 = b4.to(acc)
    return b4.expand(B, H, Nq, Nk)


def _mods_arg(window_left, window_right, softcap, alibi, bias, sinks, dbias, shape, acc):
    """The bindings' `mods` keyword (csrc/bindings.cpp, ModsIn), the modifiers' tuple, and the tensors it points
    into, to keep alive until the call returns. (Plain calls pass mods=None.)"""
    B, H, Nq, Nk = shape
    if alibi is not None:
        alibi = alibi.to(acc).expand(B, H).contiguous()
    if bias is not None:
        bias = _bias_operand(bias, B, H, Nq, Nk, acc)
    if sinks is not None:
        sinks = sinks.detach().to(acc).contiguous()
    dense = _backend.dense_buf
    mods = (window_left, window_right, float(softcap or 0.0), dense(alibi), _backend.buf(bias),
            bias.stride() if bias is not None else (0, 0, 0, 0), dense(sinks), dense(dbias))
    return mods, (alibi, bias, sinks)


# One preparation per direction for every device: kernel-ready inputs (unit stride along D, contiguous lse and
# masks), fresh contiguous outputs, the empty-shape answers, then the binding of the same name (csrc/bindings.cpp:
# keywords as its AttnFwdIn / AttnBwdIn). `cuda`: the CUDA binding's device index and stream, else the CPU kernel.
# `mods`: the score modifiers (window_left, window_right, softcap, alibi, bias, sinks; no bias on CUDA), or
# nothing for plain attention (which then costs no more than it did before they existed).
def _forward(q, k, v, key_padding_mask, query_padding_mask, causal, causal_offset, scale, *mods, cuda=None,
             out=None):
    """out: None, or a (B, H, Nq, D) tensor with unit stride along D to write into (CPU only; strided, e.g. a
    transposed (B, Nq, H, D) buffer)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, Nq, D = q.shape  # q (B, H, Nq, D), k / v (B, Hkv, Nk, D)
    Nk = k.shape[2]
    # Positional sizes: the tuple form of new_empty costs twice as much (~1.5 us each), a tenth of a small call.
    strided = out is not None
    out = q.new_empty(B, H, Nq, D) if out is None else out
    acc = _acc_dtype(q.dtype)
    lse = q.new_empty(B, H, Nq, dtype=acc)
    if B * H * Nq * D == 0 or Nk == 0:
        out.zero_()
        lse.fill_(float("inf"))
        if mods and mods[5] is not None and Nq * D > 0:  # a query with no key: out 0, its lse the sink alone
            lse.copy_(mods[5].detach().to(acc)[None, :, None].expand(B, H, Nq))
        return out, lse
    buf, dense = _backend.buf, _backend.dense_buf
    kpm, qpm = _mask(key_padding_mask), _mask(query_padding_mask)  # kept alive until the call returns
    if cuda is None:
        mods, keep = _mods_arg(*mods, None, (B, H, Nq, Nk), acc) if mods else (None, None)
        extra = {"out_strides": out.stride()[:3]} if strided else {}
        _backend._C.attention_fwd(
            q=buf(q), k=buf(k), v=buf(v), out=buf(out) if strided else dense(out), lse=dense(lse),
            key_padding_mask=dense(kpm), query_padding_mask=dense(qpm), sizes=(B, H, Nq, Nk, D),
            q_strides=q.stride()[:3], k_strides=k.stride()[:3], v_strides=v.stride()[:3], causal=causal,
            causal_offset=causal_offset, scale=scale, dtype=_backend.DTYPE_CODE[q.dtype],
            nthreads=_threads(B * H * Nq * Nk * D), kv_heads=k.shape[1], mods=mods, **extra)
    else:
        mods, keep = _mods_arg(*mods, None, (B, H, Nq, Nk), acc) if mods else (None, None)
        _backend._C.cuda_attention_fwd(
            q=buf(q), k=buf(k), v=buf(v), out=dense(out), lse=dense(lse), key_padding_mask=dense(kpm),
            query_padding_mask=dense(qpm), sizes=(B, H, Nq, Nk, D), q_strides=q.stride()[:3],
            k_strides=k.stride()[:3], v_strides=v.stride()[:3], causal=causal, causal_offset=causal_offset,
            scale=scale, dtype=_backend.DTYPE_CODE[q.dtype], device=cuda[0], stream=cuda[1], kv_heads=k.shape[1],
            mods=mods)
    return out, lse


def _backward(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, causal, causal_offset, scale,
              *mods, cuda=None, into=None):
    """(dq, dk, dv, dbias). mods: nothing, or (window_left, window_right, softcap, alibi, bias, bias_grad); dbias is
    dL/ds (B, H, Nq, Nk) in the accumulation dtype when bias_grad, else None. into: None, or (dq, dk, dv) to write
    into (CPU only): tensors of q's / k's shapes with unit stride along D, e.g. slices of one packed buffer."""
    H, Hkv = q.shape[1], k.shape[1]
    # Grouped-query attention with K/V repeated per query head: the CPU kernel's work items are (b, key/value
    # head), so with fewer of them than threads a copy keeps every thread busy (B1 H8 Hkv1 N1024 D64 causal
    # backward: 27.0 ms in place, 14.1 ms repeated; B2 Hkv1 N512: 6.9 against 8.3, B1 Hkv2 N1024: 13.6 against
    # 14.4, 2 threads). The CUDA tensor-core kernels sum over the group in place; the SIMT ones take Hkv = H only.
    if Hkv != H and ((cuda is not None and not _cuda_tensor_cores(q, k, v)) or (cuda is None and
                     k.shape[0] * Hkv < _threads(3 * q.shape[0] * H * q.shape[2] * k.shape[2] * q.shape[3]))):
        G = H // Hkv
        dq, dk, dv, dbias = _backward(dout, q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1), out,
                                      lse, dlse, key_padding_mask, query_padding_mask, causal, causal_offset, scale,
                                      *mods, cuda=cuda)
        B, _, Nk, D = k.shape
        # (B, H, Nk, D) -> (B, Hkv, G, Nk, D), summed over the group in fp32 (fp64 for fp64)
        acc = _acc_dtype(q.dtype)
        grads = (dq, dk.view(B, Hkv, G, Nk, D).to(acc).sum(2).to(k.dtype),
                 dv.view(B, Hkv, G, Nk, D).to(acc).sum(2).to(v.dtype))
        if into is not None:
            grads = tuple(t.copy_(g) for t, g in zip(into, grads))
        return grads + (dbias,)
    dout, q, k, v, out = _unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(out)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if into is None:
        dq, dk, dv = q.new_empty(B, H, Nq, D), k.new_empty(B, Hkv, Nk, D), v.new_empty(B, Hkv, Nk, D)  # contiguous
    else:
        dq, dk, dv = into
    # Zeros: the kernel writes the rows and blocks it computes, and the rest have no gradient.
    dbias = q.new_zeros(B, H, Nq, Nk, dtype=_acc_dtype(q.dtype)) if mods and mods[5] else None
    if B * H * Nq * D == 0 or Nk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias
    lse = lse.contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    buf, dense = _backend.buf, _backend.dense_buf
    kpm, qpm = _mask(key_padding_mask), _mask(query_padding_mask)
    if cuda is None:
        mods, keep = (_mods_arg(*mods[:5], None, dbias, (B, H, Nq, Nk), _acc_dtype(q.dtype)) if mods
                      else (None, None))
        extra = ({"dq_strides": dq.stride()[:3], "dk_strides": dk.stride()[:3], "dv_strides": dv.stride()[:3]}
                 if into is not None else {})
        out_buf = buf if into is not None else dense
        _backend._C.attention_bwd(
            dout=buf(dout), q=buf(q), k=buf(k), v=buf(v), out=buf(out), lse=dense(lse), dlse=dense(dlse),
            key_padding_mask=dense(kpm), query_padding_mask=dense(qpm), dq=out_buf(dq), dk=out_buf(dk),
            dv=out_buf(dv), sizes=(B, H, Nq, Nk, D), dout_strides=dout.stride()[:3], q_strides=q.stride()[:3],
            k_strides=k.stride()[:3], v_strides=v.stride()[:3], out_strides=out.stride()[:3], causal=causal,
            causal_offset=causal_offset, scale=scale, dtype=_backend.DTYPE_CODE[q.dtype],
            nthreads=_threads(3 * B * H * Nq * Nk * D), kv_heads=Hkv, mods=mods, **extra)
    else:
        if (mods or Hkv != H) and not _cuda_rows_aligned(dout):
            dout = dout.contiguous()  # the tensor-core kernels copy rows by 16 bytes (D % 8 == 0 holds)
        mods, keep = (_mods_arg(*mods[:5], None, None, (B, H, Nq, Nk), _acc_dtype(q.dtype)) if mods
                      else (None, None))
        delta = torch.empty(B * H * Nq, dtype=torch.float32, device=q.device)  # scratch
        _backend._C.cuda_attention_bwd(
            dout=buf(dout), q=buf(q), k=buf(k), v=buf(v), out=buf(out), lse=dense(lse), dlse=dense(dlse),
            key_padding_mask=dense(kpm), query_padding_mask=dense(qpm), dq=dense(dq), dk=dense(dk), dv=dense(dv),
            sizes=(B, H, Nq, Nk, D), dout_strides=dout.stride()[:3], q_strides=q.stride()[:3],
            k_strides=k.stride()[:3], v_strides=v.stride()[:3], out_strides=out.stride()[:3], causal=causal,
            causal_offset=causal_offset, scale=scale, dtype=_backend.DTYPE_CODE[q.dtype], delta=dense(delta),
            device=cuda[0], stream=cuda[1], kv_heads=Hkv, mods=mods)
    return dq, dk, dv, dbias


# ---- custom ops (schema once; CPU implementation here, fake + autograd beside it) ----


@torch.library.custom_op("minillm::attention_fwd", mutates_args=(), device_types="cpu")
def _attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor],
    query_padding_mask: Optional[Tensor],
    causal: bool,
    causal_offset: int,
    scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Returns out (B, H, Nq, D) and the log-sum-exp (B, H, Nq) in fp32 (fp64 for fp64 inputs);
    lse is +inf for a query that sees no key or is padding (with sinks: the sink's logit when it sees no key)."""
    _check_op_args(q, k, v, key_padding_mask, query_padding_mask, scale, window_left, window_right, softcap, alibi,
                   bias, sinks)
    return _forward(q, k, v, key_padding_mask, query_padding_mask, causal, causal_offset, scale, window_left,
                    window_right, softcap, alibi, bias, sinks)


def _check_op_args(q, k, v, key_padding_mask, query_padding_mask, scale, window_left=-1, window_right=-1,
                   softcap=0.0, alibi=None, bias=None, sinks=None) -> None:
    """The registered ops' own checks: torch.ops.minillm.* can be called directly (torch.compile, torch.library
    tooling, users), and the kernels take raw pointers, so a mismatch must stop here. The public attention()
    makes the same checks before its eager path, which skips the op."""
    _check_inputs(q, k, v, key_padding_mask, query_padding_mask)
    _check_scale(scale, q.shape[-1])
    _check_mods(q, k, (window_left, window_right), softcap, alibi, bias, sinks)


def _check_bwd_args(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, scale, *mods) -> None:
    _check_op_args(q, k, v, key_padding_mask, query_padding_mask, scale, *mods)
    B, H, Nq, D = q.shape
    for name, t, shape, dtype in (("dout", dout, (B, H, Nq, D), q.dtype), ("out", out, (B, H, Nq, D), q.dtype),
                                  ("lse", lse, (B, H, Nq), _acc_dtype(q.dtype)),
                                  ("dlse", dlse, (B, H, Nq), _acc_dtype(q.dtype))):
        if t is None and name == "dlse":
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != dtype or t.device != q.device:
            got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"minillm::attention_bwd: {name} must be {shape} {dtype} on {q.device}, got {got}")


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, key_padding_mask, query_padding_mask, causal, causal_offset, scale, *mods):
    B, H, Nq, D = q.shape
    return q.new_empty((B, H, Nq, D)), q.new_empty((B, H, Nq), dtype=_acc_dtype(q.dtype))


@torch.library.custom_op("minillm::attention_bwd", mutates_args=(), device_types="cpu")
def _attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    query_padding_mask: Optional[Tensor],
    causal: bool,
    causal_offset: int,
    scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    bias_grad: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dbias) of attention_fwd given the gradients of both of its outputs; dbias is
    dL/ds (B, H, Nq, Nk) in the accumulation dtype when bias_grad, else an empty tensor. (A sink's gradient
    follows from lse and Delta: see _grads.)"""
    _check_bwd_args(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, scale, window_left,
                    window_right, softcap, alibi, bias)
    dq, dk, dv, dbias = _backward(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, causal,
                                  causal_offset, scale, window_left, window_right, softcap, alibi, bias, bias_grad)
    return dq, dk, dv, _no_dbias(q) if dbias is None else dbias


def _no_dbias(q: Tensor) -> Tensor:
    return q.new_empty((0,), dtype=_acc_dtype(q.dtype))  # custom ops return tensors: an empty one for no dbias


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, causal, causal_offset,
                        scale, window_left=-1, window_right=-1, softcap=0.0, alibi=None, bias=None, bias_grad=False):
    B, H, Nq, _ = q.shape
    dbias = q.new_empty((B, H, Nq, k.shape[2]), dtype=_acc_dtype(q.dtype)) if bias_grad else _no_dbias(q)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


# CUDA kernels: the tensor-core kernels (cuda/flash_*.cuh) for bf16/fp16 with D a multiple of 8 up to 128, rows
# on 16 bytes and a GPU of compute capability 8.0 or newer, with grouped-query heads and every modifier but an
# additive bias; the SIMT kernels (cuda/attention.cuh) for fp32/bf16/fp16 plain attention with D up to 256.
_CUDA_MAX_D = 256
_CUDA_TC_MAX_D = 128


def _cuda_rows_aligned(t: Tensor) -> bool:
    """Rows on 16 bytes as the kernel will see them: a tensor without unit stride along D reaches it as
    _unit_last's fresh contiguous copy (aligned when D % 8 == 0)."""
    if t.stride(-1) != 1 and t.size(-1) != 1:
        return True
    return t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in t.stride()[:3])


def _cuda_tensor_cores(q: Tensor, k: Tensor, v: Tensor) -> bool:
    D = q.shape[-1]
    return (q.dtype in (torch.bfloat16, torch.float16) and D % 8 == 0 and D <= _CUDA_TC_MAX_D
            and _backend.cuda_arch(q.device) >= (8, 0) and all(_cuda_rows_aligned(t) for t in (q, k, v)))


def _cuda_fits(q: Tensor, k: Tensor, v: Tensor, mods: tuple = ()) -> bool:
    """Whether a CUDA kernel computes this call: plain attention with one key/value head per query head on either
    kernel, grouped-query heads and modifiers (but an additive bias) on the tensor-core kernels only."""
    if q.dtype == torch.float64 or q.shape[-1] > _CUDA_MAX_D:
        return False
    if mods and mods[4] is not None:  # bias: no CUDA kernel
        return False
    if k.shape[1] == q.shape[1] and (not mods or _plain(*mods)):
        return True
    return _cuda_tensor_cores(q, k, v)


_CUDA_NO_KERNEL = ("no CUDA kernel takes these arguments: float32/bfloat16/float16 with D <= 256 for plain "
                   "attention; grouped-query heads and window/softcap/alibi/sinks need bfloat16/float16, D a multiple "
                   "of 8 up to 128, rows on 16 bytes (unit stride along D, other strides multiples of 8) and a GPU "
                   "of compute capability 8.0+; an additive bias has no CUDA kernel")


def _plain(window_left=-1, window_right=-1, softcap=0.0, alibi=None, bias=None, sinks=None) -> bool:
    return window_left < 0 and window_right < 0 and not softcap and alibi is None and bias is None and sinks is None


@_attention_fwd.register_kernel("cuda")
def _attention_fwd_cuda(q, k, v, key_padding_mask, query_padding_mask, causal, causal_offset, scale, *mods):
    _check_op_args(q, k, v, key_padding_mask, query_padding_mask, scale, *mods)
    mods = () if _plain(*mods) else tuple(mods) + _MOD_DEFAULTS[len(mods):]
    if not _cuda_fits(q, k, v, mods):
        raise ValueError(f"minillm::attention_fwd on CUDA: {_CUDA_NO_KERNEL}; got {q.dtype} D={q.shape[-1]}, "
                         f"H={q.shape[1]}, Hkv={k.shape[1]}")
    return _forward(q, k, v, key_padding_mask, query_padding_mask, causal, causal_offset, scale, *mods,
                    cuda=(q.device.index, _backend.cuda_stream(q)))


@_attention_bwd.register_kernel("cuda")
def _attention_bwd_cuda(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, causal, causal_offset,
                        scale, window_left=-1, window_right=-1, softcap=0.0, alibi=None, bias=None, bias_grad=False):
    _check_bwd_args(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, scale, window_left,
                    window_right, softcap, alibi, bias)
    mods = (window_left, window_right, softcap, alibi, bias, None)
    mods = () if _plain(*mods) else mods
    if bias_grad or not _cuda_fits(q, k, v, mods):
        raise ValueError(f"minillm::attention_bwd on CUDA: {_CUDA_NO_KERNEL}")
    dq, dk, dv, _ = _backward(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, causal,
                              causal_offset, scale, *mods, cuda=(q.device.index, _backend.cuda_stream(q)))
    return dq, dk, dv, _no_dbias(q)


_MOD_DEFAULTS = (-1, -1, 0.0, None, None, None)  # window_left, window_right, softcap, alibi, bias, sinks


def _setup_context(ctx, inputs, output):
    # Plain calls (8 inputs: the modifiers left at their defaults, as _run passes them) save and return no more
    # than before the modifiers existed: each saved or returned slot costs ~0.5 us, a call at (1, 1, 8, 8) ~90.
    q, k, v, key_padding_mask, query_padding_mask, causal, causal_offset, scale = inputs[:8]
    out, lse = output
    ctx.causal, ctx.causal_offset, ctx.scale = causal, causal_offset, scale
    if len(inputs) == 8:
        ctx.mods = None
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, query_padding_mask)
        return
    mods = tuple(inputs[8:]) + _MOD_DEFAULTS[len(inputs) - 8:]  # a call to the op may leave defaults out
    window_left, window_right, softcap, alibi, bias, sinks = mods
    ctx.mods = (window_left, window_right, softcap)
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[12]
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, query_padding_mask, alibi, bias, sinks)


def _grads(ctx, dout, dlse, attention_bwd):
    """The inputs' gradients from the saved context, through `attention_bwd` (the op, or its CPU body): dq, dk,
    dv from the kernel, the bias's from its dL/ds summed over broadcast dims, the sinks' from lse:
    dL/dsink_h = -sum_(b, i) exp(sink_h - lse) Delta with Delta = rowsum(dO * O) - dlse (a sink is a logit whose
    value row is 0, so its dP is 0)."""
    if ctx.mods is None:
        q, k, v, out, lse, key_padding_mask, query_padding_mask = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        grads = attention_bwd(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, ctx.causal,
                              ctx.causal_offset, ctx.scale)
        return grads[0], grads[1], grads[2], None, None, None, None, None
    q, k, v, out, lse, key_padding_mask, query_padding_mask, alibi, bias, sinks = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dbias = attention_bwd(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, ctx.causal,
                                      ctx.causal_offset, ctx.scale, *ctx.mods, alibi, bias, ctx.bias_grad)
    gbias = dbias.sum_to_size(bias.shape).to(bias.dtype) if ctx.bias_grad else None
    gsinks = None
    if sinks is not None and ctx.needs_input_grad[13]:
        acc = lse.dtype
        delta = (dout.to(acc) * out.to(acc)).sum(-1)  # (B, H, Nq)
        if dlse is not None:
            delta = delta - dlse
        p_sink = torch.exp(sinks.to(acc)[None, :, None] - lse)  # 0 for padded queries (lse = +inf)
        gsinks = -(p_sink * delta).sum((0, 2)).to(sinks.dtype)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, gbias, gsinks


_attention_fwd.register_autograd(lambda ctx, dout, dlse: _grads(ctx, dout, dlse, _attention_bwd),
                                 setup_context=_setup_context)


class _AttentionFunction(torch.autograd.Function):
    """Eager CPU calls: the custom op's CPU kernels and autograd, without the custom-op dispatch, which
    costs ~25 us per forward and ~50 us per forward + backward here (measured on (1, 1, 8, 8) inputs:
    op 36 / 87 us, this class 11 / 40 us), a fifth of a whole attention call at training shapes. Code that
    torch.compile traces, and every other device, goes through the custom op."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        return _grads(ctx, dout, dlse, _backward)


def _packed_views(qkv: Tensor, heads: int, kv_heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(B, N, H + 2 Hkv, D) -> q (B, H, N, D), k and v (B, Hkv, N, D): strided views, no copy."""
    heads_first = qkv.transpose(1, 2)  # (B, H + 2 Hkv, N, D)
    return heads_first[:, :heads], heads_first[:, heads:heads + kv_heads], heads_first[:, heads + kv_heads:]


def _packed_forward(qkv: Tensor, heads: int, kv_heads: int, key_padding_mask, causal: bool, scale: float,
                    mods: tuple) -> Tuple[Tensor, Tensor]:
    """(out (B, N, H, D), lse) of the CPU kernel over qkv's views, the output rows written in (B, N, H, D) order."""
    B, N, _, D = qkv.shape
    q, k, v = _packed_views(qkv, heads, kv_heads)
    out = qkv.new_empty(B, N, heads, D)
    _, lse = _forward(q, k, v, key_padding_mask, None, causal, 0, scale, *mods, out=out.transpose(1, 2))
    return out, lse


def _window_mods(wl: int, wr: int) -> tuple:
    """_forward's modifiers for a window (-1: unbounded on that side), or none."""
    return () if wl < 0 and wr < 0 else (wl, wr, 0.0, None, None, None)


class _PackedAttentionFunction(torch.autograd.Function):
    """Eager CPU attention over one packed projection, qkv (B, N, H + 2 Hkv, D) -> out (B, N, H, D). The kernels
    read q, k and v in place, write the output rows in (B, N, H, D) order, and write dq, dk and dv into one
    (B, N, H + 2 Hkv, D) gradient: the gradient of the projection itself. Separate q, k, v views would leave
    autograd to stack their three gradients and copy them back to the projection's layout, and the output's
    transpose to (B, N, C) another copy (one layer of nanoGPT's baby GPT at batch 12 x 64, forward + backward:
    1.58 ms through the views, 0.82 ms packed; benchmarks/bench_train_parts.py)."""

    @staticmethod
    def forward(ctx, qkv, heads, kv_heads, key_padding_mask, causal, scale, window_left, window_right):
        mods = _window_mods(window_left, window_right)
        out, lse = _packed_forward(qkv, heads, kv_heads, key_padding_mask, causal, scale, mods)
        ctx.heads, ctx.kv_heads, ctx.causal, ctx.scale = heads, kv_heads, causal, scale
        ctx.mods = mods[:5] + (False,) if mods else ()
        ctx.save_for_backward(qkv, out, lse, key_padding_mask)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        qkv, out, lse, key_padding_mask = ctx.saved_tensors
        q, k, v = _packed_views(qkv, ctx.heads, ctx.kv_heads)
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # (B, N, H + 2 Hkv, D)
        _backward(dout.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, None, key_padding_mask, None, ctx.causal,
                  0, ctx.scale, *ctx.mods, into=_packed_views(dqkv, ctx.heads, ctx.kv_heads))
        return dqkv, None, None, None, None, None, None, None


# ---- public API ----


def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def _check_scale(scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _check_qkv(q, k, v) -> None:
    # The common case in one expression (~1 us); the checks below only run to name what is wrong.
    if isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor):
        qs, ks = q.shape, k.shape
        dtype = q.dtype
        if (len(qs) == 4 and len(ks) == 4 and ks == v.shape and ks[0] == qs[0] and ks[3] == qs[3] != 0
                and (ks[1] == qs[1] or (ks[1] > 0 and qs[1] % ks[1] == 0))
                and dtype in _DTYPES and k.dtype == dtype and v.dtype == dtype
                and ((q.is_cpu and k.is_cpu and v.is_cpu) or (k.device == q.device and v.device == q.device))):
            return
    _check_tensor("q", q, 4, "(B, H, Nq, D)")
    _check_tensor("k", k, 4, "(B, Hkv, Nk, D)")
    _check_tensor("v", v, 4, "(B, Hkv, Nk, D)")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be {_DTYPE_NAMES}, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != B or v.shape[0] != B or v.shape[1] != Hkv or Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"q, k and v must agree in B and H (k and v may have fewer heads Hkv, grouped-query attention, when Hkv "
            f"divides H): q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length Nk: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if D == 0 or k.shape[3] != D or v.shape[3] != D:
        raise ValueError(
            f"q, k and v must share one head dim D >= 1: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def _check_mask(name: str, mask, expected: Tuple[int, int], device: torch.device) -> None:
    layout = "(B, Nk)" if name == "key_padding_mask" else "(B, Nq)"
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool tensor {layout} or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be torch.bool (True = keep), got {mask.dtype}; for a 0/1 mask pass mask.bool()")
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name} must have shape {layout} = {expected}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on {device}, got {mask.device}")


def _check_inputs(q, k, v, key_padding_mask, query_padding_mask) -> None:
    _check_qkv(q, k, v)
    if key_padding_mask is not None:
        _check_mask("key_padding_mask", key_padding_mask, (k.shape[0], k.shape[2]), q.device)
    if query_padding_mask is not None:
        _check_mask("query_padding_mask", query_padding_mask, (q.shape[0], q.shape[2]), q.device)


def _device_type(q: Tensor) -> str:
    # One place that reads the device type, so tests can stand CPU tensors in for CUDA ones. is_cpu first: building
    # the torch.device that .device returns costs 0.3 us, a fortieth of a small call.
    return "cpu" if q.is_cpu else q.device.type


def _cuda_choice(q: Tensor, k: Tensor, v: Tensor, causal: bool, padded: bool, mods: tuple = ()) -> Tuple[bool, str]:
    """(take the CUDA kernel?, why): only for arguments it supports and cases the dispatch table has
    measured faster than torch (see minillm.ops._backend.CUDA_KERNEL_TABLE and MINILLM_CUDA_KERNELS)."""
    if not _cuda_fits(q, k, v, mods):
        return False, _CUDA_NO_KERNEL
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    case = _backend.KernelCase("attention", str(q.dtype).replace("torch.", ""), q.shape[-1], k.shape[2],
                               q.shape[2], "fwd+bwd" if grad else "fwd", causal, padded)
    return _backend.cuda_kernel_choice(case, q.device)


def _choose(q: Tensor, k: Tensor, v: Tensor, causal: bool, padded: bool, mods: tuple = ()) -> Tuple[bool, str]:
    """(native kernel?, why) for this call: the C++ kernels take every CPU call, the CUDA kernels what
    _cuda_choice allows, other devices run torch."""
    dev = _device_type(q)
    if dev == "cpu":
        return _backend.native_available(), ""
    if dev == "cuda":
        return _cuda_choice(q, k, v, causal, padded, mods)
    return False, ""


def _check_mods(q: Tensor, k: Tensor, window, softcap, alibi_slopes, bias, sinks) -> None:
    """The score modifiers' arguments, named in the messages as attention() takes them."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    if window is not None:
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window)):
            raise ValueError(f"window must be (left, right), two ints >= -1 (-1: unbounded on that side), got {window!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap < 0):
        raise ValueError(f"softcap must be a finite float > 0 (or 0 / None: none), got {softcap!r}")
    for name, t, shapes, layout in (("alibi_slopes", alibi_slopes, ((H,), (B, H)), "(H,) or (B, H)"),
                                    ("sinks", sinks, ((H,),), "(H,)")):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor {layout}, got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) not in shapes:
            raise ValueError(f"{name} must have shape {layout} = {shapes[-1]}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {t.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be a float tensor broadcastable to (B, H, Nq, Nk), got "
                            f"{getattr(bias, 'dtype', type(bias).__name__)}; for a boolean mask use "
                            f"torch.where(mask, 0.0, float('-inf'))")
        ok = bias.dim() <= 4 and all(n in (1, want) for n, want in zip(bias.shape[::-1], (Nk, Nq, H, B)))
        if not ok:
            raise ValueError(f"bias must broadcast to (B, H, Nq, Nk) = {(B, H, Nq, Nk)}, got {tuple(bias.shape)}")
        if bias.device != q.device:
            raise ValueError(f"bias must be on {q.device}, got {bias.device}")


def _run(q, k, v, key_padding_mask, causal: bool, causal_offset: int, scale: float,
         query_padding_mask: Optional[Tensor] = None, mods: tuple = ()) -> Tensor:
    """mods: () for plain attention, else (window_left, window_right, softcap, alibi, bias, sinks)."""
    cpu = _device_type(q) == "cpu"
    if cpu:  # the C++ kernels take every CPU call
        native, why = _backend.native_available(), ""
        _backend.log_path_once("attention", "cpu", native, why)
    else:
        native, why = _choose(q, k, v, causal, key_padding_mask is not None or query_padding_mask is not None, mods)
        _backend.log_path_once("attention", q.device, native, why)
    if native:
        args = (q, k, v, key_padding_mask, query_padding_mask, causal, causal_offset, scale) + mods
        if cpu and not torch.compiler.is_compiling():
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                            or (mods and any(t is not None and t.requires_grad for t in mods[4:]))):
                return _AttentionFunction.apply(*args)[0]
            return _forward(*args)[0]  # nothing to differentiate: no autograd node to build
        return _attention_fwd(*args)[0]
    if mods:  # the torch twin computes the modifiers densely
        window_left, window_right, softcap, alibi, bias, sinks = mods
        return attention_reference(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                   causal_offset=causal_offset, query_padding_mask=query_padding_mask,
                                   window=(window_left, window_right), softcap=softcap or None, alibi_slopes=alibi,
                                   bias=bias, sinks=sinks)
    if k.shape[1] != q.shape[1]:  # grouped-query attention on the torch path: each key/value head serves H / Hkv
        k, v = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1), v.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return attention_sdpa(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                          causal_offset=causal_offset, query_padding_mask=query_padding_mask)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    window: Optional[Tuple[int, int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """Fused scaled-dot-product attention, softmax(q k^T * scale) v, with forward and backward kernels.

    Args:
        q: (B, H, Nq, D) queries; float32, bfloat16, float16 or float64 (any head dim D >= 1).
        k: (B, Hkv, Nk, D) keys, same dtype and device. Nk may differ from Nq. Hkv = H, or fewer heads dividing H
            (grouped-query attention: query head h reads key/value head h // (H // Hkv), without a copy on CPU).
        v: (B, Hkv, Nk, D) values.
        causal: query i sees key j only when j <= i + (Nk - Nq): bottom-right alignment, so in
            KV-cache decoding (Nq new queries after Nk - Nq cached keys) each query sees the cache
            and itself. Queries that see no key (Nq > Nk) return 0.
        key_padding_mask: (B, Nk) bool, True = keep the key. Padded keys' values are never read.
        query_padding_mask: (B, Nq) bool, True = compute the query. Padded queries are skipped: their
            output rows are 0 and get no gradient. For a padded self-attention batch pass the same mask
            as both masks, and padding costs nothing in either direction (variable-length batches).
        scale: multiplier of q k^T; default 1 / sqrt(D).
        window: (left, right), flash-attention's ``window_size``: query i sees keys j with
            i + Nk - Nq - left <= j <= i + Nk - Nq + right; -1 leaves that side unbounded. Blocks outside the
            window are skipped, not masked. Mistral's ``sliding_window=W`` is ``window=(W - 1, 0)`` with causal.
        softcap: logit soft-capping, s -> softcap * tanh(s / softcap) (Gemma 2); None or 0: none.
        alibi_slopes: (H,) or (B, H): ALiBi, s -> s - slope * |i + Nk - Nq - j| (flash-attention's form; in
            causal attention it differs from BLOOM's slope * j by a constant per row, which softmax ignores).
            Constants: no gradient.
        bias: an additive float bias broadcastable to (B, H, Nq, Nk) (T5's relative position bias), read
            blockwise from its broadcast form; it gets a gradient when it requires one.
        sinks: (H,) attention sinks (gpt-oss): a learned logit per head in the softmax's denominator, with no
            value; it gets a gradient when it requires one.

    Returns:
        (B, H, Nq, D) in the input dtype. A query row that sees no key is 0 (never NaN).
        NaN or inf in a visible position propagates to the outputs that attend to it.

    CPU tensors run the C++ kernel (fp32 accumulation for 16-bit inputs, O(N) extra memory). CUDA tensors
    run minillm's CUDA kernel only for the cases measured faster than torch on that GPU architecture
    (``minillm.ops._backend.CUDA_KERNEL_TABLE``; ``MINILLM_CUDA_KERNELS=on|off`` overrides) and without score
    modifiers; every other call runs :func:`minillm.ops.reference.attention_sdpa` (torch's
    scaled_dot_product_attention with the same masks and semantics), or with modifiers
    :func:`minillm.ops.reference.attention_reference`.
    """
    _check_inputs(q, k, v, key_padding_mask, query_padding_mask)
    if causal is not False and causal is not True:
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = _check_scale(scale, q.shape[-1])
    if window is None and softcap is None and alibi_slopes is None and bias is None and sinks is None:
        return _run(q, k, v, key_padding_mask, causal, k.shape[2] - q.shape[2], scale, query_padding_mask)
    _check_mods(q, k, window, softcap, alibi_slopes, bias, sinks)
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes are constants here (no gradient); pass alibi_slopes.detach()")
    window = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    return _run(q, k, v, key_padding_mask, causal, k.shape[2] - q.shape[2], scale, query_padding_mask,
                (window[0], window[1], float(softcap or 0.0), alibi_slopes, bias, sinks))


def attention_qkvpacked(
    qkv: Tensor,
    heads: int,
    *,
    kv_heads: Optional[int] = None,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    window: Optional[Tuple[int, int]] = None,
) -> Tensor:
    """Self-attention over one packed q/k/v projection (flash-attention's ``flash_attn_qkvpacked_func``):
    :func:`attention` of q = qkv[:, :, :H], k = qkv[:, :, H:H + Hkv], v = qkv[:, :, H + Hkv:], each transposed to
    (B, heads, N, D), returned as (B, N, H, D).

    Args:
        qkv: (B, N, H + 2 Hkv, D), e.g. a fused projection's (B, N, 3 C) output viewed as (B, N, 3 H, D).
        heads: H, the query heads. kv_heads: Hkv (default H), dividing H.
        causal, key_padding_mask, scale, window: as :func:`attention` (Nq = Nk = N).

    Returns:
        (B, N, H, D) in qkv's dtype; ``.reshape(B, N, H * D)`` is a view on CPU.

    On CPU (eager) the kernels read q, k, v in place from qkv, write the output in (B, N, H, D) order and the
    backward writes q's, k's and v's gradients straight into qkv's gradient, sparing the copies that separate
    views cost. Elsewhere (other devices, torch.compile) it is :func:`attention` of the three views.
    """
    if not isinstance(qkv, Tensor) or qkv.dim() != 4:
        got = tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must be a (B, N, H + 2 Hkv, D) tensor, got {got}")
    kv_heads = heads if kv_heads is None else kv_heads
    if (not isinstance(heads, int) or not isinstance(kv_heads, int) or heads < 1 or kv_heads < 1
            or heads % kv_heads or qkv.shape[2] != heads + 2 * kv_heads):
        raise ValueError(f"qkv's third dim ({qkv.shape[2]}) must be heads + 2 * kv_heads with kv_heads dividing "
                         f"heads; got heads={heads!r}, kv_heads={kv_heads!r}")
    q, k, v = _packed_views(qkv, heads, kv_heads)
    if window is not None:
        _check_mods(q, k, window, None, None, None, None)
    if (_device_type(qkv) != "cpu" or not _backend.native_available() or torch.compiler.is_compiling()
            or qkv.shape[0] * qkv.shape[1] * qkv.shape[3] == 0):
        return attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                         window=window).transpose(1, 2)
    _check_inputs(q, k, v, key_padding_mask, None)
    if causal is not False and causal is not True:
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = _check_scale(scale, qkv.shape[-1])
    _backend.log_path_once("attention", "cpu", True, "")
    wl, wr = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    if torch.is_grad_enabled() and qkv.requires_grad:
        return _PackedAttentionFunction.apply(qkv, heads, kv_heads, key_padding_mask, causal, scale, wl, wr)
    return _packed_forward(qkv, heads, kv_heads, key_padding_mask, causal, scale, _window_mods(wl, wr))[0]


def _attention_band(q: Tensor, k: Tensor, v: Tensor, lo: Optional[int], hi: Optional[int], *,
                    key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                    softcap: Optional[float] = None, bias: Optional[Tensor] = None,
                    sinks: Optional[Tensor] = None) -> Tensor:
    """attention() where query i sees keys i + lo <= j <= i + hi (None: unbounded on that side), a band on any
    diagonal: transformers' masks are aligned top-left with the cache's offsets, not bottom-right as attention()'s
    window is. The transformers backend's entry (minillm.integrations.transformers); lo <= hi."""
    _check_inputs(q, k, v, key_padding_mask, None)
    scale = _check_scale(scale, q.shape[-1])
    if hi is not None:  # the band's upper edge is the diagonal: causal_offset = hi, window (hi - lo, 0)
        off, window = hi, (-1 if lo is None else hi - lo, 0)
    elif lo is not None:
        off, window = lo, (0, -1)
    else:
        off, window = k.shape[2] - q.shape[2], (-1, -1)
    _check_mods(q, k, window, softcap, None, bias, sinks)
    if window == (-1, -1) and not softcap and bias is None and sinks is None:
        return _run(q, k, v, key_padding_mask, False, off, scale)
    return _run(q, k, v, key_padding_mask, False, off, scale, None,
                (window[0], window[1], float(softcap or 0.0), None, bias, sinks))


def _as_key_padding(attn_mask: Tensor, B: int, Nq: int, Nk: int) -> Optional[Tensor]:
    """(B, Nk) view of a boolean SDPA mask that only depends on (batch, key), else None."""
    if attn_mask.dtype != torch.bool or attn_mask.dim() > 4 or attn_mask.dim() == 0:
        return None
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if shape[0] not in (1, B) or shape[1] != 1 or shape[2] != 1 or shape[3] != Nk:
        return None
    return attn_mask.reshape(shape[0], Nk).expand(B, Nk)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.scaled_dot_product_attention`.

    Runs the native kernel when the arguments fit it: 4-D (B, H, N, D) inputs of one supported dtype,
    no dropout, and either no mask, ``is_causal`` (top-left aligned, as torch does), or a boolean
    ``attn_mask`` that depends only on (batch, key), e.g. shape (B, 1, 1, Nk) (a key-padding mask).
    Everything else (dense or float masks, dropout, other ranks) calls torch's function, and so do CUDA
    tensors unless the CUDA dispatch table has a measured row for the case (see :func:`attention`).
    Unlike torch, a query whose keys are all masked returns 0 rather than NaN (when the native kernel runs).
    """
    fits = (
        isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)
        and query.dim() == 4 and key.dim() == 4 and value.dim() == 4
        and query.dtype in _DTYPES and key.dtype == query.dtype and value.dtype == query.dtype
        and key.device == query.device and value.device == query.device
        and dropout_p == 0.0 and not (is_causal and attn_mask is not None)
        and key.shape[-1] == query.shape[-1] == value.shape[-1] and key.shape[2] == value.shape[2]
        and _choose(query, key, value, bool(is_causal), attn_mask is not None)[0]
    )
    kpm = None
    if fits and key.shape[1] != query.shape[1] and not enable_gqa:
        fits = False  # torch's function says what is wrong
    # enable_gqa with Hkv dividing H: the kernel reads each key/value head for its group of query heads.
    if fits and attn_mask is not None:
        kpm = _as_key_padding(attn_mask, query.shape[0], query.shape[2], key.shape[2])
        fits = kpm is not None
    if fits:
        try:
            _check_qkv(query, key, value)
            scale_v = _check_scale(scale, query.shape[-1])
        except (TypeError, ValueError):
            fits = False
    if not fits:
        kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}
        if isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor):
            query, key, value = sdpa_operand(query), sdpa_operand(key), sdpa_operand(value)  # torch's overlap bug
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, **kwargs)
    return _run(query, key, value, kpm, bool(is_causal), 0, scale_v)
