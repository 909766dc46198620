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
from minillm.ops.reference import attention_sdpa, sdpa_operand

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


# One preparation per direction for every device: kernel-ready inputs (unit stride along D, contiguous lse and
# masks), fresh contiguous outputs, the empty-shape answers, then the binding of the same name (csrc/bindings.cpp:
# keywords as its AttnFwdIn / AttnBwdIn). `cuda`: the CUDA binding's device index and stream, else the CPU kernel.
def _forward(q, k, v, key_padding_mask, query_padding_mask, causal, causal_offset, scale, cuda=None):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, Nq, D = q.shape  # q (B, H, Nq, D), k / v (B, H, Nk, D)
    Nk = k.shape[2]
    # Positional sizes: the tuple form of new_empty costs twice as much (~1.5 us each), a tenth of a small call.
    out = q.new_empty(B, H, Nq, D)
    lse = q.new_empty(B, H, Nq, dtype=_acc_dtype(q.dtype))
    if B * H * Nq * D == 0 or Nk == 0:
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    buf, dense = _backend.buf, _backend.dense_buf
    kpm, qpm = _mask(key_padding_mask), _mask(query_padding_mask)  # kept alive until the call returns
    if cuda is None:
        _backend._C.attention_fwd(
            q=buf(q), k=buf(k), v=buf(v), out=dense(out), lse=dense(lse), key_padding_mask=dense(kpm),
            query_padding_mask=dense(qpm), sizes=(B, H, Nq, Nk, D), q_strides=q.stride()[:3],
            k_strides=k.stride()[:3], v_strides=v.stride()[:3], causal=causal, causal_offset=causal_offset,
            scale=scale, dtype=_backend.DTYPE_CODE[q.dtype], nthreads=_threads(B * H * Nq * Nk * D),
            kv_heads=k.shape[1])
    else:
        _backend._C.cuda_attention_fwd(
            q=buf(q), k=buf(k), v=buf(v), out=dense(out), lse=dense(lse), key_padding_mask=dense(kpm),
            query_padding_mask=dense(qpm), sizes=(B, H, Nq, Nk, D), q_strides=q.stride()[:3],
            k_strides=k.stride()[:3], v_strides=v.stride()[:3], causal=causal, causal_offset=causal_offset,
            scale=scale, dtype=_backend.DTYPE_CODE[q.dtype], device=cuda[0], stream=cuda[1])
    return out, lse


def _backward(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, causal, causal_offset, scale,
              cuda=None):
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:  # grouped-query attention: the backward kernels take a key/value head per query head (for now)
        G = H // Hkv
        dq, dk, dv = _backward(dout, q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1), out, lse, dlse,
                               key_padding_mask, query_padding_mask, causal, causal_offset, scale, cuda)
        B, _, Nk, D = k.shape
        # (B, H, Nk, D) -> (B, Hkv, G, Nk, D), summed over the group in fp32 (fp64 for fp64)
        acc = _acc_dtype(q.dtype)
        return (dq, dk.view(B, Hkv, G, Nk, D).to(acc).sum(2).to(k.dtype),
                dv.view(B, Hkv, G, Nk, D).to(acc).sum(2).to(v.dtype))
    dout, q, k, v, out = _unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(out)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    dq, dk, dv = q.new_empty(B, H, Nq, D), k.new_empty(B, H, Nk, D), v.new_empty(B, H, Nk, D)  # contiguous
    if B * H * Nq * D == 0 or Nk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    buf, dense = _backend.buf, _backend.dense_buf
    kpm, qpm = _mask(key_padding_mask), _mask(query_padding_mask)
    if cuda is None:
        _backend._C.attention_bwd(
            dout=buf(dout), q=buf(q), k=buf(k), v=buf(v), out=buf(out), lse=dense(lse), dlse=dense(dlse),
            key_padding_mask=dense(kpm), query_padding_mask=dense(qpm), dq=dense(dq), dk=dense(dk), dv=dense(dv),
            sizes=(B, H, Nq, Nk, D), dout_strides=dout.stride()[:3], q_strides=q.stride()[:3],
            k_strides=k.stride()[:3], v_strides=v.stride()[:3], out_strides=out.stride()[:3], causal=causal,
            causal_offset=causal_offset, scale=scale, dtype=_backend.DTYPE_CODE[q.dtype],
            nthreads=_threads(3 * B * H * Nq * Nk * D))
    else:
        delta = torch.empty(B * H * Nq, dtype=torch.float32, device=q.device)  # scratch
        _backend._C.cuda_attention_bwd(
            dout=buf(dout), q=buf(q), k=buf(k), v=buf(v), out=buf(out), lse=dense(lse), dlse=dense(dlse),
            key_padding_mask=dense(kpm), query_padding_mask=dense(qpm), dq=dense(dq), dk=dense(dk), dv=dense(dv),
            sizes=(B, H, Nq, Nk, D), dout_strides=dout.stride()[:3], q_strides=q.stride()[:3],
            k_strides=k.stride()[:3], v_strides=v.stride()[:3], out_strides=out.stride()[:3], causal=causal,
            causal_offset=causal_offset, scale=scale, dtype=_backend.DTYPE_CODE[q.dtype], delta=dense(delta),
            device=cuda[0], stream=cuda[1])
    return dq, dk, dv


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
) -> Tuple[Tensor, Tensor]:
    """Returns out (B, H, Nq, D) and the log-sum-exp (B, H, Nq) in fp32 (fp64 for fp64 inputs);
    lse is +inf for a query that sees no key or is padding."""
    _check_op_args(q, k, v, key_padding_mask, query_padding_mask, scale)
    return _forward(q, k, v, key_padding_mask, query_padding_mask, causal, causal_offset, scale)


def _check_op_args(q, k, v, key_padding_mask, query_padding_mask, scale) -> None:
    """The registered ops' own checks: torch.ops.minillm.* can be called directly (torch.compile, torch.library
    tooling, users), and the kernels take raw pointers, so a mismatch must stop here. The public attention()
    makes the same checks before its eager path, which skips the op."""
    _check_inputs(q, k, v, key_padding_mask, query_padding_mask)
    _check_scale(scale, q.shape[-1])


def _check_bwd_args(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, scale) -> None:
    _check_op_args(q, k, v, key_padding_mask, query_padding_mask, scale)
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
def _attention_fwd_fake(q, k, v, key_padding_mask, query_padding_mask, causal, causal_offset, scale):
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
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of attention_fwd given the gradients of both of its outputs."""
    _check_bwd_args(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, scale)
    return _backward(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, causal, causal_offset, scale)


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, causal, causal_offset,
                        scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# CUDA kernels (cuda/attention.cuh): fp32/bf16/fp16 with fp32 accumulation, head dims up to 256.
_CUDA_MAX_D = 256


def _cuda_fits(q: Tensor, k: Optional[Tensor] = None) -> bool:
    return q.dtype != torch.float64 and q.shape[-1] <= _CUDA_MAX_D and (k is None or k.shape[1] == q.shape[1])


@_attention_fwd.register_kernel("cuda")
def _attention_fwd_cuda(q, k, v, key_padding_mask, query_padding_mask, causal, causal_offset, scale):
    _check_op_args(q, k, v, key_padding_mask, query_padding_mask, scale)
    if not _cuda_fits(q, k):
        raise ValueError(f"minillm::attention_fwd on CUDA takes float32/bfloat16/float16 with D <= {_CUDA_MAX_D} and "
                         f"one key/value head per query head, got {q.dtype} D={q.shape[-1]}, H={q.shape[1]}, "
                         f"Hkv={k.shape[1]}")
    return _forward(q, k, v, key_padding_mask, query_padding_mask, causal, causal_offset, scale,
                    cuda=(q.device.index, _backend.cuda_stream(q)))


@_attention_bwd.register_kernel("cuda")
def _attention_bwd_cuda(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, causal, causal_offset,
                        scale):
    _check_bwd_args(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, scale)
    return _backward(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, causal, causal_offset, scale,
                     cuda=(q.device.index, _backend.cuda_stream(q)))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, query_padding_mask, causal, causal_offset, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, query_padding_mask)
    ctx.causal, ctx.causal_offset, ctx.scale = causal, causal_offset, scale


def _grads(ctx, dout, dlse, attention_bwd):
    """(dq, dk, dv, None x 5) from the saved context, through `attention_bwd` (the op, or its CPU body)."""
    q, k, v, out, lse, key_padding_mask, query_padding_mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, ctx.causal,
                               ctx.causal_offset, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


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


def _cuda_choice(q: Tensor, k: Tensor, v: Tensor, causal: bool, padded: bool) -> Tuple[bool, str]:
    """(take the CUDA kernel?, why): only for arguments it supports and cases the dispatch table has
    measured faster than torch (see minillm.ops._backend.CUDA_KERNEL_TABLE and MINILLM_CUDA_KERNELS)."""
    if not _cuda_fits(q, k):
        return False, f"the CUDA kernel takes float32/bfloat16/float16 with D <= {_CUDA_MAX_D}, no grouped-query heads"
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    case = _backend.KernelCase("attention", str(q.dtype).replace("torch.", ""), q.shape[-1], k.shape[2],
                               q.shape[2], "fwd+bwd" if grad else "fwd", causal, padded)
    return _backend.cuda_kernel_choice(case, q.device)


def _choose(q: Tensor, k: Tensor, v: Tensor, causal: bool, padded: bool) -> Tuple[bool, str]:
    """(native kernel?, why) for this call: the C++ kernels take every CPU call, the CUDA kernels what
    _cuda_choice allows, other devices run torch."""
    dev = _device_type(q)
    if dev == "cpu":
        return _backend.native_available(), ""
    if dev == "cuda":
        return _cuda_choice(q, k, v, causal, padded)
    return False, ""


def _run(q, k, v, key_padding_mask, causal: bool, causal_offset: int, scale: float,
         query_padding_mask: Optional[Tensor] = None) -> Tensor:
    cpu = _device_type(q) == "cpu"
    if cpu:  # the C++ kernels take every CPU call
        native, why = _backend.native_available(), ""
        _backend.log_path_once("attention", "cpu", native, why)
    else:
        native, why = _choose(q, k, v, causal, key_padding_mask is not None or query_padding_mask is not None)
        _backend.log_path_once("attention", q.device, native, why)
    if native:
        args = (q, k, v, key_padding_mask, query_padding_mask, causal, causal_offset, scale)
        if cpu and not torch.compiler.is_compiling():
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                return _AttentionFunction.apply(*args)[0]
            return _forward(*args)[0]  # nothing to differentiate: no autograd node to build
        return _attention_fwd(*args)[0]
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

    Returns:
        (B, H, Nq, D) in the input dtype. A query row that sees no key is 0 (never NaN).
        NaN or inf in a visible position propagates to the outputs that attend to it.

    CPU tensors run the C++ kernel (fp32 accumulation for 16-bit inputs, O(N) extra memory). CUDA tensors
    run minillm's CUDA kernel only for the cases measured faster than torch on that GPU architecture
    (``minillm.ops._backend.CUDA_KERNEL_TABLE``; ``MINILLM_CUDA_KERNELS=on|off`` overrides); every other
    call runs :func:`minillm.ops.reference.attention_sdpa`: torch's scaled_dot_product_attention with the
    same masks and semantics.
    """
    _check_inputs(q, k, v, key_padding_mask, query_padding_mask)
    if causal is not False and causal is not True:
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = _check_scale(scale, q.shape[-1])
    return _run(q, k, v, key_padding_mask, causal, k.shape[2] - q.shape[2], scale, query_padding_mask)


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
