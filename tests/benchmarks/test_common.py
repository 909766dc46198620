import math
import os
import sys
import time
from pathlib import Path

import pytest

from common import interleaved_medians  # benchmarks/ is on sys.path (conftest.py)


def test_interleaved_medians_take_turns_and_record_failures():
    order = []

    def contender(name, seconds):
        def run():
            order.append(name)
            time.sleep(seconds)
        return run

    def broken():
        raise RuntimeError("no such backend")

    reasons = {}
    t = interleaved_medians({"a": contender("a", 0.002), "b": contender("b", 0.02), "bad": broken}, 4, reasons,
                            "N=8")
    assert math.isnan(t["bad"]) and "no such backend" in reasons["bad N=8"]
    assert 0.002 <= t["a"] < t["b"]
    # One warm-up each, then rounds that rotate the starting contender.
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]


PEAK_PROBE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from common import peak_extra_mb
held = []
def allocate_and_free():
    np.ones(20 * 2**20, dtype=np.uint8)  # 20 MB, freed on return
def allocate_and_keep():
    held.append(np.ones(20 * 2**20, dtype=np.uint8))
print(peak_extra_mb(allocate_and_free), peak_extra_mb(allocate_and_free), peak_extra_mb(lambda: None),
      peak_extra_mb(allocate_and_keep, held.clear))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads peak memory from Linux /proc")
def test_peak_extra_mb_sees_a_freed_peak_and_nothing_else():
    import subprocess

    from common import PEAK_MEMORY_ENV

    bench_dir = str(Path(__file__).resolve().parents[2] / "benchmarks")
    proc = subprocess.run([sys.executable, "-c", PEAK_PROBE, bench_dir], env={**os.environ, **PEAK_MEMORY_ENV},
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip(f"this kernel does not let a process reset its peak memory: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr
    freed, freed_again, nothing, kept = map(float, proc.stdout.split())
    # The 20 MB buffer, though it is gone when fn returns; again on the next reading (glibc's default
    # allocator would keep the freed block resident and reuse it: 0 MB the second time).
    assert 19 <= freed <= 23 and 19 <= freed_again <= 23, (freed, freed_again)
    assert nothing < 1, nothing
    assert 19 <= kept <= 23, kept  # the 20 MB the second call adds (prepare() dropped the first call's)
