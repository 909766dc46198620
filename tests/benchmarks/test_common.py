import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import interleaved_medians  # noqa: E402


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
