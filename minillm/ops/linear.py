"""Linear layers with few rows (KV-cache decoding): `minillm::linear_small_m`.

A decode step multiplies a handful of rows by every weight matrix of the model, so its speed is
the speed of reading the weights. The kernel streams each weight once; a GEMM library packs (copies)
the weight first or takes a gemv path that is slower for nn.Linear's (N, K) layout.
Shapes: x (..., K), weight (N, K), bias (N,) -> (..., N), as in torch.nn.functional.linear.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minillm.ops import _backend

# Up to this many rows the kernel beats the GEMM; beyond, weights are reused enough for packing to pay.
SMALL_M = 16
_DTYPE_CODE = {torch.float32: 0, torch.float64: 3}


def _single_thread_us(M: int, N: int, K: int, itemsize: int) -> float:
    # One thread streams ~15 GB/s of weights and does ~20 GMAC/s of small-M work.
    return itemsize * N * K / 1.5e4 + M * N * K / 2e4


@torch.library.custom_op("minillm::linear_small_m", mutates_args=(), device_types="cpu")
def _linear_small_m(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x: (M, K), weight: (N, K), bias: (N,) or None -> (M, N)."""
    x = x if x.stride(-1) == 1 or x.size(-1) == 1 else x.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    M, K = x.shape
    N = weight.shape[0]
    y = x.new_empty((M, N))
    if M == 0 or N == 0 or K == 0:
        return y.zero_() + (bias if bias is not None else 0)
    _backend._C.linear_small_m(x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else 0,
                               y.data_ptr(), M, K, N, x.stride(0), _DTYPE_CODE[x.dtype],
                               _backend.threads_for(_single_thread_us(M, N, K, weight.element_size())))
    return y


@_linear_small_m.register_fake
def _linear_small_m_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    return dy @ weight, dy.T @ x, (dy.sum(0) if ctx.has_bias else None)


_linear_small_m.register_autograd(_backward, setup_context=_setup_context)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """torch.nn.functional.linear, with the native kernel when x has at most SMALL_M rows.

    x: (..., K), weight: (N, K), bias: (N,) -> (..., N). The kernel runs for float32/float64 CPU
    tensors; everything else calls F.linear.
    """
    K = weight.shape[-1] if weight.dim() == 2 else -1
    if (
        weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == K and K > 0
        and x.numel() // K <= SMALL_M and x.dtype in _DTYPE_CODE and weight.dtype == x.dtype
        and (bias is None or (bias.dtype == x.dtype and bias.shape == (weight.shape[0],)))
        and _backend.native_for(x.device) and weight.device == x.device
        and not torch.compiler.is_compiling()
    ):
        y = _linear_small_m(x.reshape(-1, K), weight, bias)  # (M, N)
        return y.reshape(x.shape[:-1] + (weight.shape[0],))
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state_dict) whose forward uses :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
