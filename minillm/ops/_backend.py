"""Which path each op takes: the native extension (`minillm._C`) or plain torch.

This is the only module that imports `minillm._C`. Environment overrides, read once at import:

* ``MINILLM_FORCE_TORCH=1``: every op takes the plain-torch path (`minillm.ops.reference`).
* ``MINILLM_SIMD=avx512|avx2|scalar``: run the C++ kernels at this SIMD level instead of the best one.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

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


def native_for(device: torch.device, cuda: bool = False) -> bool:
    """True when ops on `device` run a native kernel: the C++ kernels on CPU and, for ops that have them
    (`cuda=True`), the CUDA kernels on a capable GPU."""
    if not native_available():
        return False
    if device.type == "cpu":
        return True
    return cuda and device.type == "cuda" and cuda_device_ok(device)


def cuda_stream(t: torch.Tensor) -> int:
    """The current CUDA stream of `t`'s device as an integer handle for the launchers."""
    return torch.cuda.current_stream(t.device).cuda_stream


def threads_for(single_thread_us: float) -> int:
    """Threads for a kernel call whose work would take `single_thread_us` on one thread: one thread
    when waking the others would cost more than it saves (decode-sized work), else torch's count."""
    n = torch.get_num_threads()
    return 1 if n > 1 and single_thread_us < 2 * _WAKE_US else n


def simd_level() -> str:
    """SIMD level the C++ kernels run at (``avx512``, ``avx2`` or ``scalar``); ``none`` without the extension."""
    return _C.simd_level() if _C is not None else "none"


def simd_levels() -> list:
    """SIMD levels this build and CPU support, best first."""
    return list(_C.simd_levels()) if _C is not None else []


def set_simd_level(level: str) -> None:
    """Run the C++ kernels at `level` (one of :func:`simd_levels`) from now on."""
    if _C is None:
        raise RuntimeError(f"the minillm native extension is not available ({_IMPORT_ERROR})")
    _C.set_simd_level(level)


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


def log_path_once(op: str, device: torch.device, native: bool) -> None:
    """One INFO line the first time `op` runs on a device type, naming the path it takes."""
    key = (op, device.type, native)
    if key in _logged or torch.compiler.is_compiling():
        return
    _logged.add(key)
    if native and device.type == "cuda":
        log.info("minillm.ops.%s on %s: native CUDA kernel", op, device)
    elif native:
        log.info("minillm.ops.%s on %s: native C++ kernel (%s, %d threads)", op, device.type, simd_level(),
                 torch.get_num_threads())
    else:
        log.info("minillm.ops.%s on %s: plain torch (%s)", op, device.type, _why_torch(device))


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
    return "this op or its arguments have no CUDA kernel, or the GPU's compute capability is below 8.0"


def _linear_cpu_path(native_cpu: bool) -> str:
    if not native_cpu:
        return "torch"
    if simd_level() == "avx512":
        return "native C++ (avx512): streaming kernel up to 16 rows, packed GEMM beyond"
    return f"native C++ ({simd_level()}) up to 16 rows, torch (F.linear) beyond: the GEMM needs avx512"


def backend_info() -> dict:
    """What runs where: the extension, its SIMD level and threads, and each op's path per device type."""
    native_cpu = native_available()
    cuda_devices = _C.cuda_device_count() if cuda_kernels_built() else 0
    cuda_native = native_cpu and cuda_devices > 0 and torch.cuda.is_available() and cuda_device_ok(torch.device("cuda"))
    paths = {
        "cpu": f"native C++ ({simd_level()})" if native_cpu else "torch",
        "cuda": "native CUDA" if cuda_native else f"torch ({_why_torch(torch.device('cuda'))})",
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
        "threads": torch.get_num_threads(),
        "ops": {"attention": dict(paths), "topk_search": dict(paths),
                "linear": {**paths, "cpu": _linear_cpu_path(native_cpu), "cuda": "torch (F.linear)"}},
    }
