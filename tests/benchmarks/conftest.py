"""The benchmark scripts run as scripts (`python benchmarks/bench_topk.py`), importing `common` and their workers
as siblings; their tests import them the same way, with benchmarks/ on sys.path."""
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
