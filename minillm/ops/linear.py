"""Linear layers and their gradients on the native GEMM: `minillm::linear` and `minillm::matmul`.

Two kernels sit behind `minillm::linear`:
- few rows (M <= SMALL_M, KV-cache decoding): the step's cost is reading the weights, so each weight row
  is streamed once, with no packed copy;
- more rows (training, prompt processing, embedding batches): a packed, register-blocked GEMM
  (csrc/cpu/gemm.h, `gemm_impl`). On this project's AVX-512 machine (AMD Zen 5) torch's fp32 `addmm`
  runs at ~210-230 GFLOP/s at every size; benchmarks/bench_linear.py measured this GEMM at 1.2-1.9x it
  forward and 1.8-1.95x forward + backward on the models' layer shapes.

Backward runs on the same GEMM through `minillm::matmul`: dx = dy W, dW = dy^T x (a transposed view,
read in place). Shapes: x (..., K), weight (N, K), bias (N,) -> (..., N), as in torch.nn.functional.linear.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minillm.ops import _backend

# Up to this many rows the streaming kernel beats the GEMM; beyond, weights are reused enough for packing to pay.
SMALL_M = 16
_DTYPES = (torch.float32, torch.float64)  # what the kernels take (codes: _backend.DTYPE_CODE)


def _small_m_us(M: int, N: int, K: int, itemsize: int) -> float:
    # One thread streams ~15 GB/s of weights and does ~20 GMAC/s of small-M work.
    return itemsize * N * K / 1.5e4 + M * N * K / 2e4


def _gemm_us(M: int, N: int, K: int) -> float:
    # ~100 GMAC/s per AVX-512 thread once the tiles are full.
    return M * N * K / 1e5


def _operand(t: Tensor) -> Tuple[Tensor, int, bool]:
    """(tensor, leading dim, column-major?) for a 2-D GEMM operand (rows, cols >= 1). The kernel takes BLAS
    layouts: unit stride along one dim and a leading dim at least the other's extent. Anything else (an
    expanded operand's stride 0, overlapping rows, no unit stride) is copied: a stride-0 row once became
    leading dim 1 here, and the product read past the buffer."""
    rows, cols = t.shape
    s0, s1 = t.stride()
    if (s1 == 1 or cols == 1) and (rows == 1 or s0 >= cols):
        return t, (s0 if rows > 1 else cols), False
    if (s0 == 1 or rows == 1) and (cols == 1 or s1 >= rows):
        return t, (s1 if cols > 1 else rows), True
    t = t.contiguous()
    return t, cols, False


def _gemm_call(a: Tensor, b: Tensor, bias: Optional[Tensor]):
    """(output (M, N), the gemm binding's keywords without nthreads, tensors to keep alive), or (output, None,
    None) when the shapes need no kernel (empty, or K = 0)."""
    M, K = a.shape
    N = b.shape[1]
    c = a.new_empty((M, N))
    if M == 0 or N == 0:
        return c, None, None
    if K == 0:
        return (c.zero_() if bias is None else c.copy_(bias.expand(M, N))), None, None
    a, lda, a_col = _operand(a)
    b, ldb, b_col = _operand(b)
    bias = bias.contiguous() if bias is not None else None
    buf, dense = _backend.buf, _backend.dense_buf
    args = dict(a=buf(a), lda=lda, a_colmajor=a_col, b=buf(b), ldb=ldb, b_colmajor=b_col, bias=dense(bias), c=dense(c),
                M=M, N=N, K=K, dtype=_backend.DTYPE_CODE[a.dtype])
    return c, args, (a, b, bias)


def _gemm_threads(args: dict) -> int:
    return _backend.threads_for(_gemm_us(args["M"], args["N"], args["K"]))


def _gemm(a: Tensor, b: Tensor, bias: Optional[Tensor]) -> Tensor:
    """a (M, K) @ b (K, N) + bias (N,) -> contiguous (M, N) on the native GEMM."""
    c, args, _keep = _gemm_call(a, b, bias)
    if args is not None:
        _backend._C.gemm(**args, nthreads=_gemm_threads(args))
    return c


def _gemm_pair(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor) -> Tuple[Tensor, Tensor]:
    """a1 @ b1 and a2 @ b2 (no bias), one product per thread when both are worth a thread."""
    c1, args1, _keep1 = _gemm_call(a1, b1, None)
    c2, args2, _keep2 = _gemm_call(a2, b2, None)
    if args1 is None or args2 is None:
        for args in (args1, args2):
            if args is not None:
                _backend._C.gemm(**args, nthreads=_gemm_threads(args))
        return c1, c2
    _backend._C.gemm_pair(first=args1, second=args2, nthreads=min(_gemm_threads(args1), _gemm_threads(args2)))
    return c1, c2


# ---- custom ops (schema once; CPU implementation, fake and autograd beside each) ----


@torch.library.custom_op("minillm::linear", mutates_args=(), device_types="cpu")
def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x: (M, K), weight: (N, K), bias: (N,) or None -> (M, N)."""
    _check_op_args("linear", x, weight.t() if isinstance(weight, Tensor) and weight.dim() == 2 else weight, bias)
    return _linear_cpu(x, weight, bias)


def _check_op_args(op: str, a, b, bias) -> None:
    """The registered ops' own checks (torch.ops.minillm.* can be called directly; the kernels take raw
    pointers): a (M, K), b (K, N), bias (N,) or None, one supported dtype, one device."""
    if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() == 2 and b.dim() == 2):
        raise ValueError(f"minillm::{op}: operands must be 2-D tensors")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"minillm::{op}: inner sizes differ: {tuple(a.shape)} and {tuple(b.shape)} (as (K, N))")
    if a.dtype not in _DTYPES or b.dtype != a.dtype or a.device != b.device:
        raise ValueError(f"minillm::{op}: operands must share one dtype of {sorted(map(str, _DTYPES))} and "
                         f"one device, got {a.dtype} on {a.device} and {b.dtype} on {b.device}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (b.shape[1],)
                             or bias.dtype != a.dtype or bias.device != a.device):
        raise ValueError(f"minillm::{op}: bias must be ({b.shape[1]},) {a.dtype} on {a.device}")


def _linear_cpu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    M, K = x.shape
    N = weight.shape[0]
    if (M > SMALL_M or K == 0) and x.dtype != torch.bfloat16:  # bf16: the streaming kernel only (linear() checks M)
        return _gemm(x, weight.t(), bias)  # weight.t(): (K, N), column-major, packed by the kernel
    x = x if x.stride(-1) == 1 or K == 1 else x.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = x.new_empty((M, N))
    if M == 0 or N == 0:
        return y
    buf, dense = _backend.buf, _backend.dense_buf
    _backend._C.linear_small_m(x=buf(x), weight=dense(weight), bias=dense(bias), y=dense(y), M=M, K=K, N=N,
                               ldx=x.stride(0), dtype=_backend.DTYPE_CODE[x.dtype],
                               nthreads=_backend.threads_for(_small_m_us(M, N, K, weight.element_size())))
    return y


@_linear.register_fake
def _linear_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("minillm::matmul", mutates_args=(), device_types="cpu")
def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """a: (M, K), b: (K, N), any strides -> contiguous (M, N)."""
    _check_op_args("matmul", a, b, None)
    return _gemm(a, b, None)


@_matmul.register_fake
def _matmul_fake(a, b):
    return a.new_empty((a.shape[0], b.shape[1]))


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx = _matmul(dy, weight) if ctx.needs_input_grad[0] else None      # (M, N) @ (N, K)
    dw = _matmul(dy.t(), x) if ctx.needs_input_grad[1] else None       # (N, M) @ (M, K)
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


_linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def _matmul_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _matmul_backward(ctx, dc):
    a, b = ctx.saved_tensors
    da = _matmul(dc, b.t()) if ctx.needs_input_grad[0] else None  # (M, N) @ (N, K)
    db = _matmul(a.t(), dc) if ctx.needs_input_grad[1] else None  # (K, M) @ (M, N)
    return da, db


_matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)


class _MatmulFunction(torch.autograd.Function):
    """Eager twin of `minillm::matmul` with its autograd (see _LinearFunction); differentiable any number of times."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _gemm(a, b, None)

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        da = _MatmulFunction.apply(dc, b.t()) if ctx.needs_input_grad[0] else None
        db = _MatmulFunction.apply(a.t(), dc) if ctx.needs_input_grad[1] else None
        return da, db


class _LinearFunction(torch.autograd.Function):
    """Eager CPU calls: `minillm::linear`'s kernels and autograd without the custom-op dispatch, which costs
    ~8 us per forward and ~23 us per forward + backward here (measured on a (20, 8) input: op 17 / 54 us,
    this class 9 / 31 us), close to a tenth of a linear layer's time at the shapes of a small GPT's training
    step. Code that torch.compile traces goes through the custom op."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear_cpu(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and not torch.is_grad_enabled():
            # Both products at once, one per thread (create_graph=True takes the differentiable path below).
            dx, dw = _gemm_pair(dy, weight, dy.t(), x)  # (M, N) @ (N, K), (N, M) @ (M, K)
        else:
            dx = _MatmulFunction.apply(dy, weight) if ctx.needs_input_grad[0] else None
            dw = _MatmulFunction.apply(dy.t(), x) if ctx.needs_input_grad[1] else None
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


# ---- public API ----


def gemm_native(device: torch.device) -> bool:
    """True when linear layers with more than SMALL_M rows run the native GEMM on `device`: CPU at the
    AVX-512 level, where it was measured ahead of torch's BLAS. Below that level F.linear runs. Pure Python
    over _backend's settings, so torch.compile traces it and guards on them (no call into the extension).
    """
    return _backend.native_for(device) and _backend.simd_level() == "avx512"


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """torch.nn.functional.linear on the native kernels, forward and backward.

    x: (..., K), weight: (N, K), bias: (N,) -> (..., N). float32/float64 CPU tensors run the native
    kernels (few rows: the streaming kernel at every SIMD level; more rows: the GEMM, see
    :func:`gemm_native`), as the custom op `minillm::linear` in code torch.compile traces; everything
    else calls F.linear, and so does every call under torch.autocast (which then runs it in its dtype).
    """
    if torch.is_autocast_enabled(x.device.type):
        # Under autocast F.linear runs in autocast's dtype (bf16/fp16), as nn.Linear would; the native kernels
        # would keep fp32 inputs in fp32, and autocast never sees a custom op.
        return F.linear(x, weight, bias)
    K = weight.shape[-1] if weight.dim() == 2 else -1
    if (
        weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == K and K > 0
        and x.dtype in _DTYPES and weight.dtype == x.dtype
        and (bias is None or (bias.dtype == x.dtype and bias.shape == (weight.shape[0],) and bias.is_cpu))
        # native_for(x.device) without building torch.device objects (0.3 us each; a (1, 64) x (64, 64) call is ~12 us)
        and x.is_cpu and weight.is_cpu and _backend.native_available()
        # Few rows stream the weight row by row, so a transposed view (GPT-2's Conv1D) would need a copy of
        # the whole weight per call; F.linear multiplies it in place (measured at a decode step of
        # (1, 768) x (768, 2304)^T: 89 us vs 794 us through the copy).
        and (weight.is_contiguous() if x.numel() // K <= SMALL_M else gemm_native(x.device))
    ):
        _backend.log_path_once("linear", "cpu", True)
        x2 = x.reshape(-1, K)  # (M, K)
        if torch.compiler.is_compiling():
            y = _linear(x2, weight, bias)
        elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            y = _LinearFunction.apply(x2, weight, bias)
        else:
            y = _linear_cpu(x2, weight, bias)  # nothing to differentiate: no autograd node to build
        return y.reshape(x.shape[:-1] + (weight.shape[0],))
    if (x.dtype == torch.bfloat16 and weight.dtype == x.dtype and weight.dim() == 2 and x.dim() >= 1 and K > 0
            and x.shape[-1] == K and x.numel() // K <= SMALL_M and weight.is_contiguous()
            and (bias is None or (bias.dtype == x.dtype and bias.shape == (weight.shape[0],)))
            and x.is_cpu and weight.is_cpu and (bias is None or bias.is_cpu) and _backend.native_available()
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))):
        # bf16 decoding: the streaming kernel reads the bf16 weight (half fp32's bytes), sums in fp32 and rounds
        # once, as torch's bf16 GEMM does; measured ahead of F.linear's (benchmarks/bench_llm.py, bf16 rows).
        _backend.log_path_once("linear_bf16", "cpu", True)
        return _linear_cpu(x.reshape(-1, K), weight, bias).reshape(x.shape[:-1] + (weight.shape[0],))
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state_dict) whose forward uses :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
