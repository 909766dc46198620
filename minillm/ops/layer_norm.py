"""LayerNorm over the last dimension on the native kernels (csrc/cpu/layer_norm.h), forward and backward.

    layer_norm(x, weight, bias, eps)   x: (..., C), weight: (C,), bias: (C,) or None -> (..., C)

float32/float64 CPU tensors with a weight run the kernels (as the custom op `minillm::layer_norm` in code
torch.compile traces); everything else calls F.layer_norm, which is also the twin the tests compare with.
Why a kernel: torch's took ~80 us forward and ~290 us forward + backward for a small GPT's (768, 128)
activations on two Zen 4 threads, and a training step normalises 2 L + 1 times.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minillm.ops import _backend

_DTYPES = (torch.float32, torch.float64)


def _reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _us(M: int, C: int, backward: bool = False) -> float:
    # One thread, L2-resident rows (Zen 4): ~0.35 ns a value forward, ~0.42 backward; a (768, 128) call is worth
    # one thread (a second one's wake-up, ~50 us with OMP_WAIT_POLICY=PASSIVE, took the backward from 41 to 89 us).
    return M * C / (2.4e3 if backward else 2.9e3)


def _rows(t: Tensor) -> Tuple[Tensor, int]:
    """(M, C) view of t (..., C) with unit stride along C and rows >= C apart (a copy otherwise), and its row stride."""
    C = t.shape[-1]
    t2 = t.reshape(-1, C)
    if t2.stride(-1) != 1 and C > 1:
        t2 = t2.contiguous()
    ld = t2.stride(0) if t2.shape[0] > 1 else C
    if ld < C:  # expanded (stride 0) or overlapping rows
        t2, ld = t2.contiguous(), C
    return t2, ld


def _forward_cpu(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                 y_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """y (M, C) contiguous, mean (M,), rstd (M,) for x (M, C); y in y_dtype (bfloat16 beside float32 x: rounded
    as it is stored) or x's dtype."""
    x2, ldx = _rows(x)
    M, C = x2.shape
    y_dtype = x2.dtype if y_dtype is None else y_dtype
    y = x2.new_empty((M, C), dtype=y_dtype)
    mean, rstd = x2.new_empty((M,)), x2.new_empty((M,))
    if M == 0:
        return y, mean, rstd
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    buf, dense = _backend.buf, _backend.dense_buf
    _backend._C.layer_norm_fwd(x=buf(x2), ldx=ldx, weight=dense(weight), bias=dense(bias), y=dense(y),
                               mean=dense(mean), rstd=dense(rstd), M=M, C=C, eps=float(eps),
                               dtype=_backend.DTYPE_CODE[x2.dtype], nthreads=_backend.threads_for(_us(M, C)),
                               y_dtype=_backend.DTYPE_CODE[y_dtype])
    return y, mean, rstd


def _backward_cpu(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, want: Tuple[bool, bool, bool]):
    """(dx (M, C) or None, dweight (C,) or None, dbias (C,) or None) of the forward at x (M, C); dy in x's dtype, or
    bfloat16 beside float32 x (the gradient of a bfloat16 y), widened exactly as it is read."""
    x2, ldx = _rows(x)
    dy2, lddy = _rows(dy)
    M, C = x2.shape
    dx = x2.new_empty((M, C)) if want[0] else None
    dw = x2.new_zeros((C,)) if want[1] else None
    db = x2.new_zeros((C,)) if want[2] else None
    if M == 0:
        return dx, dw, db
    buf, dense = _backend.buf, _backend.dense_buf
    _backend._C.layer_norm_bwd(dy=buf(dy2), lddy=lddy, x=buf(x2), ldx=ldx, weight=dense(weight.contiguous()),
                               mean=dense(mean.contiguous()), rstd=dense(rstd.contiguous()), dx=dense(dx),
                               dweight=dense(dw), dbias=dense(db), M=M, C=C, dtype=_backend.DTYPE_CODE[x2.dtype],
                               nthreads=_backend.threads_for(_us(M, C, backward=True)),
                               dy_dtype=_backend.DTYPE_CODE[dy2.dtype])
    return dx, dw, db


def _backward_twin(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, want):
    """The backward through F.layer_norm's own graph (and the cast to dy's dtype), built again from the saved
    inputs: differentiable any number of times (create_graph=True takes it; the kernel's backward is not)."""
    with torch.enable_grad():
        inputs = [t for t, w in zip((x, weight, bias), want) if w]
        y = _reference(x, weight, bias, eps).to(dy.dtype)
        got = iter(torch.autograd.grad(y, inputs, dy, create_graph=True))
    return tuple(next(got) if w else None for w in want)


def _check_op_args(x, weight, bias) -> None:
    """The registered op's own checks (torch.ops.minillm.layer_norm can be called directly)."""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and x.dim() == 2 and weight.dim() == 1):
        raise ValueError("minillm::layer_norm: x must be 2-D (M, C) and weight 1-D (C,)")
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if tuple(t.shape) != (C,) or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"minillm::layer_norm: {name} must be ({C},) {x.dtype} on {x.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"minillm::layer_norm: dtype must be one of {sorted(map(str, _DTYPES))}, got {x.dtype}")


# ---- the custom ops (schema once; CPU implementation, fake and autograd beside each) ----


@torch.library.custom_op("minillm::layer_norm", mutates_args=(), device_types="cpu")
def _layer_norm_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """x: (M, C), weight: (C,), bias: (C,) or None -> (y (M, C), mean (M,), rstd (M,))."""
    _check_op_args(x, weight, bias)
    return _forward_cpu(x, weight, bias, eps)


@_layer_norm_op.register_fake
def _layer_norm_fake(x, weight, bias, eps):
    M, C = x.shape
    return x.new_empty((M, C)), x.new_empty((M,)), x.new_empty((M,))


@torch.library.custom_op("minillm::layer_norm_backward", mutates_args=(), device_types="cpu")
def _layer_norm_backward_op(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor,
                            rstd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx (M, C), dweight (C,), dbias (C,)): the bias's gradient costs one add a value, so it always comes."""
    _check_op_args(x, weight, None)
    return _backward_cpu(dy, x, weight, mean, rstd, (True, True, True))


@_layer_norm_backward_op.register_fake
def _layer_norm_backward_fake(dy, x, weight, mean, rstd):
    return x.new_empty(x.shape), x.new_empty(weight.shape), x.new_empty(weight.shape)


def _op_setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _op_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_backward_op(dy, x, weight, mean, rstd)
    return dx, dw, db if ctx.has_bias else None, None


_layer_norm_op.register_autograd(_op_backward, setup_context=_op_setup_context)


class _LayerNormFunction(torch.autograd.Function):
    """Eager CPU calls: the kernels and their autograd without the custom-op dispatch (~10-20 us a call, a large
    share of a (768, 128) layer norm); differentiable again through the torch-ops backward under create_graph."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, y_dtype=None):
        y, mean, rstd = _forward_cpu(x, weight, bias, eps, y_dtype)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if torch.is_grad_enabled():
            dx, dw, db = _backward_twin(dy, x, weight, bias, ctx.eps, want)
        else:
            dx, dw, db = _backward_cpu(dy, x, weight, mean, rstd, want)
        return dx, dw, db, None, None


# ---- public API ----


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """F.layer_norm(x, (C,), weight, bias, eps) over the last dimension C, on the native kernels for float32/
    float64 CPU tensors with a weight (any strides; rows are copied only when they overlap or are not unit-stride).

    out_dtype: F.layer_norm(...).to(out_dtype). torch.bfloat16 beside float32 x is fused on the native path: the
    result is rounded as it is stored and the backward reads a bfloat16 gradient, the same bits as the separate
    cast (what a linear layer under bf16 autocast does to its input, and to its input's gradient, next)."""
    if out_dtype is not None and (out_dtype == x.dtype or not (out_dtype == torch.bfloat16 and x.dtype == torch.float32)):
        return layer_norm(x, weight, bias, eps).to(out_dtype)
    C = x.shape[-1] if x.dim() >= 1 else 0
    if (
        weight is not None and x.dim() >= 1 and C > 0 and x.dtype in _DTYPES and weight.dtype == x.dtype
        and tuple(weight.shape) == (C,) and (bias is None or (bias.dtype == x.dtype and tuple(bias.shape) == (C,)))
        # float32/float64 inputs are what F.layer_norm computes in under autocast too (its fp32 policy)
        and x.is_cpu and weight.is_cpu and (bias is None or bias.is_cpu) and _backend.native_available()
    ):
        _backend.log_path_once("layer_norm", "cpu", True)
        x2 = x.reshape(-1, C)  # (M, C)
        if torch.compiler.is_compiling():
            y = _layer_norm_op(x2, weight, bias, eps)[0]
            y = y if out_dtype is None else y.to(out_dtype)
        elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            y = _LayerNormFunction.apply(x2, weight, bias, eps, out_dtype)
        else:
            y = _forward_cpu(x2, weight, bias, eps, out_dtype)[0]
        return y.reshape(x.shape)
    y = _reference(x, weight, bias, eps)
    return y if out_dtype is None else y.to(out_dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state_dict) whose forward uses :func:`layer_norm` when it normalises the
    last dimension with a weight."""

    def forward(self, x: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
        """out_dtype: as :func:`layer_norm`'s (the result cast to it, fused for bfloat16 beside float32)."""
        if len(self.normalized_shape) == 1 and self.weight is not None:
            return layer_norm(x, self.weight, self.bias, self.eps, out_dtype=out_dtype)
        y = super().forward(x)
        return y if out_dtype is None else y.to(out_dtype)
