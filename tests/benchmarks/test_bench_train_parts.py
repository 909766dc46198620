import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train_parts.py"


def test_tiny_run_checks_and_times_every_part(tmp_path):
    out = tmp_path / "parts.json"
    res = subprocess.run([sys.executable, str(BENCH), "--batch", "2", "--block", "16", "--d", "32", "--heads", "2",
                          "--layers", "1", "--repeats", "1", "--json", str(out)], capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), timeout=600)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    rows = {r["part"]: r for r in result["rows"]}
    assert set(rows) == {"clip+step", "attention packed", "layer_norm bf16", "bf16 step"}
    for r in rows.values():  # both sides compute the same thing here: none is nan
        assert r["minillm fused ms"] > 0 and r["unfused ms"] > 0 and not math.isnan(r["unfused / fused"])
    casts = result["info"]["casts_per_step"]
    assert casts["fused"] < casts["unfused"]  # the pre-norm LayerNorm's casts are gone (2 a norm: y and dy)
    assert result["info"]["baseline_failures"] == {}
