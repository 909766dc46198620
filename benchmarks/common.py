"""Shared benchmark plumbing: the banner, medians of timed repeats, tables with ratios, JSON, plots.

Every benchmark checks correctness before it times anything, warms up, reports medians, and measures
the baseline side by side in the same run. A baseline that fails is recorded as nan with the reason.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MINILLM_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def openblas_coretype() -> Optional[str]:
    """The OPENBLAS_CORETYPE for this CPU's widest vector unit, for a bundled OpenBLAS that does not know
    the CPU (faiss-cpu's detects an AVX-512 Zen 5 as Prescott). Forcing SkylakeX kernels on a CPU without
    AVX-512 dies on an illegal instruction, so the name follows the CPU's flags; None off x86."""
    flags = cpu_flags()
    if "avx512f" in flags:
        return "SkylakeX"
    if "avx2" in flags and "fma" in flags:
        return "Haswell"
    return None


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "faiss", "usearch", "transformers", "sentence_transformers"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


def banner(title: str, **extra) -> Dict[str, object]:
    """Prints and returns what a reader needs to judge the numbers below it."""
    import torch

    import minillm

    info = {
        "benchmark": title,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "versions": {**versions(), "minillm": minillm.__version__},
        "backend": minillm.ops.backend_info(),
        **extra,
    }
    print(f"== {title}")
    dots = [name for name, on in info["backend"].get("dot_products", {}).items() if on]
    print(f"cpu: {info['cpu']} | threads: {info['threads']} | simd: {info['backend']['simd_level']}"
          f" | dot products: {', '.join(dots) or 'none'}"
          f" | scan prefetch: {'on' if info['backend'].get('scan_prefetch') else 'off'}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print("minillm paths: " + json.dumps(info["backend"]["ops"]))
    for k, v in extra.items():
        print(f"{k}: {v}")
    return info


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds over `repeats` runs after `warmup` runs (GPU work included:
    CUDA launches are asynchronous, so the device is synchronised around each run)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int, reasons: Dict[str, str],
                        label: str = "", warmup: int = 1) -> Dict[str, float]:
    """Median wall time in seconds of each fn, the contenders taking turns: round r runs every fn once,
    starting one further along each round. A shared machine's slow spells then fall on all of them alike
    instead of on whichever ran during the spell (timing one contender's repeats, then the next, moved
    ratios by 20-30% between runs here). A contender that fails is nan, with its reason in `reasons`."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    live = []
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            live.append(name)
        except Exception as exc:  # a baseline's failure is data, not a crash of the benchmark
            reasons[f"{name} {label}".strip()] = f"{type(exc).__name__}: {exc}"
            print(f"  {name} {label} failed: {type(exc).__name__}: {exc}")
    for r in range(repeats):
        for i in range(len(live)):
            name = live[(r + i) % len(live)]
            _sync()
            t0 = time.perf_counter()
            fns[name]()
            _sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) if t else math.nan for name, t in times.items()}


# Environment for a process that reads peak memory off /proc: glibc then serves every block of 64 KB or
# more with its own mmap and unmaps it on free, so resident memory falls back after each call and the
# high-water mark of the next call is that call's own. Timing runs keep the default allocator (its reuse of
# freed blocks is part of every contender's speed).
PEAK_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def peak_extra_mb(fn: Callable[[], object], prepare: Optional[Callable[[], object]] = None,
                  warmup: bool = True) -> float:
    """MB of resident memory fn() adds at its peak (Linux; meaningful under PEAK_MEMORY_ENV). fn runs once
    first (unless warmup=False: the caller has warmed up with a cheaper call), so lazy initialisation
    (thread pools, first-call caches) is not counted; prepare() runs before each reading, e.g. to drop
    gradients left by the previous call."""
    if warmup:
        fn()
    if prepare is not None:
        prepare()
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # reset VmHWM to the current resident size
    base = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - base) / 1024


def _sync() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def try_baseline(fn: Callable[[], float], reasons: Dict[str, str], name: str) -> float:
    """Runs a baseline measurement; a failure becomes nan with its reason recorded."""
    try:
        return fn()
    except Exception as exc:  # a baseline's failure is data, not a crash of the benchmark
        reasons[name] = f"{type(exc).__name__}: {exc}"
        print(f"  baseline {name} failed: {reasons[name]}")
        return math.nan


def print_table(rows: List[Dict[str, object]], columns: Sequence[str], floatfmt: str = ".2f") -> None:
    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else format(v, floatfmt)
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_json(path: Optional[str], info: Dict[str, object], rows: List[Dict[str, object]],
               quiet: bool = False) -> None:
    """Writes {"info", "rows"} to `path` (if given). Benchmarks that may be stopped by a time limit call it
    after every row with quiet=True, so the rows measured so far are kept."""
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps({"info": info, "rows": rows}, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        if not quiet:
            print(f"wrote {path}")


def plot(path: Optional[str], rows: List[Dict[str, object]], x: str, ys: Sequence[str], title: str,
         ylabel: str, log: bool = False) -> None:
    """Line plot of columns `ys` against `x`, log-log with `log` (matplotlib optional: skipped with a note
    if absent). nan points (failed baselines) are left out of their line."""
    if not path:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot written")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for y in ys:
        ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o", label=y)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
