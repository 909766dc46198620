"""Which path each op takes: the native extension (`minillm._C`) or plain torch.

This is the only module that imports `minillm._C`. Environment overrides, read once at import:

* ``MINILLM_FORCE_TORCH=1``: every op takes the plain-torch path (`minillm.ops.reference`).
* ``MINILLM_SIMD=avx512|avx2|scalar``: run the C++ kernels at this SIMD level instead of the best one.
* ``MINILLM_CUDA_KERNELS=auto|on|off``: CUDA tensors take minillm's CUDA kernels only for the cases in
  :data:`CUDA_KERNEL_TABLE` (``auto``, the default), always where the kernel supports the arguments (``on``,
  for testing and measuring them), or never (``off``). Every other CUDA call runs torch.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

log = logging.getLogger("minillm.ops")

try:
    from minillm import _C
except ImportError as exc:  # a source checkout without a build, or a broken install
    _C = None
    _IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


_force_torch = _env_flag("MINILLM_FORCE_TORCH")
# With OMP_WAIT_POLICY=PASSIVE idle OpenMP threads sleep, and waking them costs ~50 us per parallel
# region; spinning threads (the default) answer in a few us.
_WAKE_US = 50.0 if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE" else 5.0
_logged: set = set()


def _apply_simd_env() -> None:
    level = os.environ.get("MINILLM_SIMD", "").strip().lower()
    if not level or _C is None:
        return
    try:
        _C.set_simd_level(level)
    except ValueError as exc:
        # Importing must not fail over a tuning knob; say so loudly and keep the best level.
        log.warning("ignoring MINILLM_SIMD=%r (%s); using %s", level, exc, _C.simd_level())


_apply_simd_env()
# The level, kept here as well so that code torch.compile traces (linear's choice of kernel) reads a Python
# value it can guard on rather than calling into the extension.
_simd = _C.simd_level() if _C is not None else "none"
# csrc/kernels.h's dtype and metric codes as the extension exports them: the one place they are defined.
DTYPE_CODE = {getattr(torch, name): code for name, code in _C.DTYPES.items()} if _C is not None else {}
METRIC_CODE = dict(_C.METRICS) if _C is not None else {}


def native_available() -> bool:
    """True when the C++ extension loaded and the torch path is not forced."""
    return _C is not None and not _force_torch


def cuda_kernels_built() -> bool:
    """True when the extension was compiled with the CUDA kernels of cuda/ (nvcc was found at build time)."""
    return _C is not None and bool(_C.cuda)


_cuda_capable: dict = {}


def cuda_device_ok(device: torch.device) -> bool:
    """True when `device` can run the CUDA kernels: built with them, a GPU present, compute capability >= 8.0
    (the kernels are compiled for sm_80 and sm_90, with PTX for newer devices)."""
    if not cuda_kernels_built() or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _cuda_capable.get(index)
    if ok is None:
        ok = _C.cuda_device_count() > index and torch.cuda.get_device_capability(index)[0] >= 8
        _cuda_capable[index] = ok
    return ok


def native_for(device: torch.device) -> bool:
    """True when ops without CUDA kernels (linear, the int8 top-k scan) run a native kernel on `device`:
    the C++ kernels on CPU. Attention and top-k on CUDA ask :func:`cuda_kernel_choice`."""
    return native_available() and device.type == "cpu"


# ---- CUDA dispatch: a minillm CUDA kernel runs only where it was measured faster than torch ----


@dataclass(frozen=True)
class KernelCase:
    """What the dispatch needs to know of one call. Attention: `dim` is the head dim D, `n` the keys Nk,
    `q` the queries Nq, `passes` "fwd" when no gradient is needed, else "fwd+bwd"; `padded`: a key or
    query padding mask was given. Top-k: `dim` is d, `n` the corpus rows N, `q` the queries Q, `passes`
    "search"."""

    op: str
    dtype: str
    dim: int
    n: int
    q: int
    passes: str
    causal: bool = False
    padded: bool = False

    def describe(self) -> str:
        if self.op == "attention":
            return (f"attention {self.passes} {self.dtype} D={self.dim} Nq={self.q} Nk={self.n}"
                    f"{' causal' if self.causal else ''}{' padded' if self.padded else ''}")
        return f"{self.op} {self.dtype} d={self.dim} N={self.n} Q={self.q}"


@dataclass(frozen=True)
class KernelRow:
    """A case where a minillm CUDA kernel was measured faster than torch on one GPU architecture, with the
    run that measured it. Ranges are inclusive; `causal` and `padded` None cover both."""

    op: str  # "attention" or "topk_search"
    dtype: str  # "float32", "bfloat16" or "float16" (top-k: the corpus dtype)
    arch: Tuple[int, int]  # compute capability (major, minor), matched exactly
    dim: Tuple[int, int]
    n: Tuple[int, int]
    q: Tuple[int, int]
    passes: str  # attention: "fwd" or "fwd+bwd"; top-k: "search"
    causal: Optional[bool] = None
    padded: Optional[bool] = None
    measured: str = ""  # device, date, command and ratio (torch time / kernel time)

    def covers(self, case: KernelCase, arch: Tuple[int, int]) -> bool:
        return (self.op == case.op and self.dtype == case.dtype and tuple(self.arch) == tuple(arch)
                and self.passes == case.passes
                and self.dim[0] <= case.dim <= self.dim[1] and self.n[0] <= case.n <= self.n[1]
                and self.q[0] <= case.q <= self.q[1]
                and (self.causal is None or self.causal == case.causal)
                and (self.padded is None or self.padded == case.padded))


# Rows come only from runs of scripts/gpu_check.sh on a GPU (scripts/gpu_table.py prints the rows its ratios
# justify); until a case is measured faster, CUDA calls run torch. Empty on purpose: on an NVIDIA H200 (sm_90,
# torch 2.11.0+cu130, 2026-12-04, `bash scripts/gpu_check.sh`) every kernel lost to torch: attention
# 0.006-0.124x SDPA in bf16/fp16 and 0.09-0.35x in fp32 (B4 H8, D 64/128, N 1k-8k, forward and forward +
# backward), top-k 0.03-0.28x mm + topk (1M x 384, Q 1-4096). Figures: README.md, section CUDA.
CUDA_KERNEL_TABLE: Tuple[KernelRow, ...] = ()

_CUDA_MODES = ("auto", "on", "off")


def _cuda_mode_from_env() -> str:
    mode = os.environ.get("MINILLM_CUDA_KERNELS", "").strip().lower() or "auto"
    if mode not in _CUDA_MODES:
        log.warning("ignoring MINILLM_CUDA_KERNELS=%r (expected auto, on or off); using auto", mode)
        return "auto"
    return mode


_cuda_mode = _cuda_mode_from_env()


def cuda_kernels_mode() -> str:
    """``auto`` (the dispatch table decides), ``on`` (always minillm's CUDA kernels where they support the
    arguments) or ``off`` (always torch): ``MINILLM_CUDA_KERNELS``, or :func:`cuda_kernels`."""
    return _cuda_mode


@contextlib.contextmanager
def cuda_kernels(mode: str) -> Iterator[None]:
    """Within the block, CUDA calls follow `mode` (``auto``, ``on`` or ``off``) instead of
    ``MINILLM_CUDA_KERNELS``; e.g. ``with cuda_kernels("on"):`` to test or time the kernels themselves."""
    global _cuda_mode
    if mode not in _CUDA_MODES:
        raise ValueError(f"mode must be one of {_CUDA_MODES}, got {mode!r}")
    before = _cuda_mode
    _cuda_mode = mode
    try:
        yield
    finally:
        _cuda_mode = before


def cuda_arch(device: torch.device) -> Tuple[int, int]:
    """Compute capability (major, minor) of a CUDA device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index))


def cuda_kernel_choice(case: KernelCase, device: torch.device) -> Tuple[bool, str]:
    """(run minillm's CUDA kernel?, why) for one call on a CUDA device whose arguments the kernel supports."""
    if not native_available():
        return False, _why_torch(device)
    if not cuda_device_ok(device):
        return False, _why_not_cuda()
    if _cuda_mode == "off":
        return False, "MINILLM_CUDA_KERNELS=off"
    if _cuda_mode == "on":
        return True, "MINILLM_CUDA_KERNELS=on"
    arch = cuda_arch(device)
    for row in CUDA_KERNEL_TABLE:
        if row.covers(case, arch):
            return True, f"measured faster than torch ({row.measured})"
    return False, (f"no row of the CUDA dispatch table covers {case.describe()} on sm_{arch[0]}{arch[1]}, so torch "
                   f"(measured at least as fast); MINILLM_CUDA_KERNELS=on forces the kernel")


def cuda_stream(t: torch.Tensor) -> int:
    """The current CUDA stream of `t`'s device as an integer handle for the launchers."""
    return torch.cuda.current_stream(t.device).cuda_stream


def buf(t: Optional[torch.Tensor]) -> Tuple[int, int]:
    """A buffer as the bindings take it: (data pointer, bytes from it to the end of the tensor's storage), or
    (0, 0) for None. csrc/bindings.cpp checks every element a kernel will touch (sizes x strides) against it."""
    if t is None:
        return 0, 0
    return t.data_ptr(), t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()


def dense_buf(t: Optional[torch.Tensor]) -> Tuple[int, int]:
    """buf() for a contiguous tensor (an output the caller allocated, a mask it made contiguous): its own bytes
    bound what the kernel may touch, which costs a third of buf()'s storage query on small calls."""
    if t is None:
        return 0, 0
    return t.data_ptr(), t.nbytes


def threads_for(single_thread_us: float) -> int:
    """Threads for a kernel call whose work would take `single_thread_us` on one thread: one thread
    when waking the others would cost more than it saves (decode-sized work), else torch's count."""
    n = torch.get_num_threads()
    return 1 if n > 1 and single_thread_us < 2 * _WAKE_US else n


def simd_level() -> str:
    """SIMD level the C++ kernels run at (``avx512``, ``avx2`` or ``scalar``); ``none`` without the extension."""
    return _simd


def simd_levels() -> list:
    """SIMD levels this build and CPU support, best first."""
    return list(_C.simd_levels()) if _C is not None else []


def set_simd_level(level: str) -> None:
    """Run the C++ kernels at `level` (one of :func:`simd_levels`) from now on."""
    if _C is None:
        raise RuntimeError(f"the minillm native extension is not available ({_IMPORT_ERROR})")
    global _simd
    _C.set_simd_level(level)
    _simd = _C.simd_level()


@contextlib.contextmanager
def force_torch(enabled: bool = True) -> Iterator[None]:
    """Within the block, every op takes (or, with ``enabled=False``, may leave) the plain-torch path."""
    global _force_torch
    before = _force_torch
    _force_torch = enabled
    try:
        yield
    finally:
        _force_torch = before


def log_path_once(op: str, device, native: bool, why: str = "") -> None:
    """One INFO line the first time `op` takes a path on a device type, naming the path and why. `device`: a
    torch.device, or its type as a string (CPU callers pass "cpu": building a tensor's torch.device costs 0.3 us,
    and after the first call this function is only the set lookup)."""
    key = (op, device if isinstance(device, str) else device.type, native)
    if key in _logged or torch.compiler.is_compiling():
        return
    _logged.add(key)
    device = torch.device(device) if isinstance(device, str) else device
    if native and device.type == "cuda":
        log.info("minillm.ops.%s on %s: native CUDA kernel (%s)", op, device, why or "supported")
    elif native:
        log.info("minillm.ops.%s on %s: native C++ kernel (%s, %d threads)", op, device.type, simd_level(),
                 torch.get_num_threads())
    else:
        log.info("minillm.ops.%s on %s: plain torch (%s)", op, device.type, why or _why_torch(device))


def _why_torch(device: torch.device) -> str:
    if _C is None:
        return f"native extension unavailable: {_IMPORT_ERROR}"
    if _force_torch:
        return "MINILLM_FORCE_TORCH is set"
    if device.type == "cuda":
        return _why_not_cuda()
    return f"no native kernel for device type '{device.type}'"


def _why_not_cuda() -> str:
    if not cuda_kernels_built():
        return "the extension was built without CUDA kernels (no nvcc at build time, or MINILLM_CUDA=OFF)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return "the GPU's compute capability is below 8.0 (the kernels are built for sm_80 and sm_90)"


def _linear_cpu_path(native_cpu: bool) -> str:
    if not native_cpu:
        return "torch"
    if simd_level() == "avx512":
        return "native C++ (avx512): streaming kernel up to 16 rows, packed GEMM beyond"
    return f"native C++ ({simd_level()}) up to 16 rows, torch (F.linear) beyond: the GEMM needs avx512"


def _cuda_path(native_cpu: bool, cuda_devices: int) -> str:
    """The CUDA entry of backend_info's ops (attention and top-k): which path, and why."""
    device = torch.device("cuda")
    if not (native_cpu and cuda_devices > 0 and torch.cuda.is_available() and cuda_device_ok(device)):
        return f"torch ({_why_torch(device)})"
    if _cuda_mode == "off":
        return "torch (MINILLM_CUDA_KERNELS=off)"
    if _cuda_mode == "on":
        return "native CUDA (MINILLM_CUDA_KERNELS=on), torch where the kernel does not support the arguments"
    arch = cuda_arch(device)
    rows = [r for r in CUDA_KERNEL_TABLE if tuple(r.arch) == arch]
    if not rows:
        return (f"torch (no case in the CUDA dispatch table for sm_{arch[0]}{arch[1]}: minillm's kernels were not "
                f"measured faster there; MINILLM_CUDA_KERNELS=on forces them)")
    return (f"native CUDA for the {len(rows)} case(s) of the dispatch table measured faster on "
            f"sm_{arch[0]}{arch[1]}, torch otherwise")


def backend_info() -> dict:
    """What runs where: the extension, its SIMD level and threads, and each op's path per device type."""
    native_cpu = native_available()
    cuda_devices = _C.cuda_device_count() if cuda_kernels_built() else 0
    cuda = _cuda_path(native_cpu, cuda_devices)
    paths = {
        "cpu": f"native C++ ({simd_level()})" if native_cpu else "torch",
        "cuda": cuda,
        "mps": "torch",
        "other": "torch",
    }
    return {
        "native_extension": _C is not None,
        "import_error": _IMPORT_ERROR,
        "force_torch": _force_torch,
        "simd_level": simd_level(),
        "simd_levels": simd_levels(),
        # AMX tiles or vdpbf16ps (bf16 attention) and vpdpbusd (int8 top-k) at the avx512 level;
        # MINILLM_NO_AMX=1, MINILLM_NO_BF16DOT=1 and MINILLM_NO_VNNI=1 turn them off.
        "dot_products": dict(_C.dot_products()) if _C is not None else {},
        # Software prefetch in the few-query top-k scans (MINILLM_SCAN_PREFETCH=0|1 overrides).
        "scan_prefetch": bool(_C.scan_prefetch()) if _C is not None else False,
        "openmp": bool(_C.openmp) if _C is not None else False,
        "cuda_kernels_built": cuda_kernels_built(),
        "cuda_devices": cuda_devices,
        # MINILLM_CUDA_KERNELS, and the measured cases where CUDA calls take minillm's kernels under "auto".
        "cuda_kernels": _cuda_mode,
        "cuda_dispatch_table": [dict(vars(r)) for r in CUDA_KERNEL_TABLE],
        "threads": torch.get_num_threads(),
        "ops": {"attention": dict(paths), "topk_search": dict(paths),
                "linear": {**paths, "cpu": _linear_cpu_path(native_cpu), "cuda": "torch (F.linear)"},
                "layer_norm": {**paths, "cuda": "torch (F.layer_norm)"}},
    }
