import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_token_file.py"
SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data/tinyshakespeare")
def test_tiny_run_builds_reads_and_reports(tmp_path):
    out = tmp_path / "tokens.json"
    res = subprocess.run([sys.executable, str(BENCH), "--gb", "0.003", "--read-batches", "5", "--json", str(out)],
                         capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=600)
    assert res.returncode == 0, res.stderr
    row = json.loads(out.read_text())["rows"][0]
    assert row["tokens"] > 2_000_000 and row["token file GB"] == row["tokens"] * 2 / 1e9  # uint16
    assert row["build tokens/s"] > 0 and row["read tokens/s"] > 0 and row["build peak MB"] >= 0
