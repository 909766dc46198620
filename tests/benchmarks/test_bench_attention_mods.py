import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_attention_mods.py"


def test_tiny_run_checks_and_times_every_case(tmp_path):
    out = tmp_path / "mods.json"
    res = subprocess.run([sys.executable, str(BENCH), "--h", "4", "--hkv", "2", "--d", "16", "--n", "48",
                          "--window", "8", "--repeats", "1", "--json", str(out)], capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), timeout=600)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["case"], r["pass"]) for r in rows} == {
        (c, p) for c in ("gqa", "window", "softcap", "sinks", "alibi", "bias") for p in ("fwd", "fwd+bwd")}
    for r in rows:  # every baseline computes the same function here: none is nan
        assert r["minillm ms"] > 0 and r["torch ms"] > 0 and not math.isnan(r["torch / minillm"])
    assert result["info"]["baseline_failures"] == {}
