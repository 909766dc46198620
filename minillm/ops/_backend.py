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


def native_for(device: torch.device) -> bool:
    """True when ops on `device` run a native kernel (CPU today; CUDA once its kernels exist)."""
    return device.type == "cpu" and native_available()


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
    if torch.compiler.is_compiling():
        return
    key = (op, device.type, native)
    if key in _logged:
        return
    _logged.add(key)
    if native:
        log.info("minillm.ops.%s on %s: native C++ kernel (%s, %d threads)", op, device.type, simd_level(),
                 torch.get_num_threads())
    else:
        log.info("minillm.ops.%s on %s: plain torch (%s)", op, device.type, _why_torch(device))


def _why_torch(device: torch.device) -> str:
    if _C is None:
        return f"native extension unavailable: {_IMPORT_ERROR}"
    if _force_torch:
        return "MINILLM_FORCE_TORCH is set"
    return f"no native kernel for device type '{device.type}'"


def backend_info() -> dict:
    """What runs where: the extension, its SIMD level and threads, and each op's path per device type."""
    native_cpu = native_available()
    paths = {
        "cpu": f"native C++ ({simd_level()})" if native_cpu else "torch",
        "cuda": "torch",  # CUDA kernels arrive with cuda/; until then the torch path
        "mps": "torch",
        "other": "torch",
    }
    return {
        "native_extension": _C is not None,
        "import_error": _IMPORT_ERROR,
        "force_torch": _force_torch,
        "simd_level": simd_level(),
        "simd_levels": simd_levels(),
        "openmp": bool(_C.openmp) if _C is not None else False,
        "cuda_kernels_built": bool(_C.cuda) if _C is not None else False,
        "threads": torch.get_num_threads(),
        "ops": {"attention": dict(paths), "topk_search": dict(paths), "linear_small_m": dict(paths)},
    }
