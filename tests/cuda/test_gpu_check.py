"""scripts/gpu_check.sh (the GPU check, run on a machine with a GPU) and scripts/gpu_table.py (the dispatch-table
rows its ratios justify), checked where CI runs: the script parses, its dry run prints every step, and the
table rows come only from cases the kernel won, over the sizes measured."""
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def test_gpu_check_parses_and_dry_run_prints_its_steps():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    full = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True, timeout=60)
    steps = [line for line in full.stdout.splitlines() if line.startswith("== ")]
    assert steps[0].startswith("== build") and steps[1].startswith("== tests/cuda on the GPU")
    assert steps[-1].startswith("== dispatch-table rows")
    for dtype in ("bfloat16", "float16", "float32"):
        for d in (64, 128):
            assert f"== bench_attention {dtype} D={d} " in full.stdout
    assert "--queries 1 16 256 4096 --corpus-dtype float32 bfloat16 float16" in full.stdout
    assert "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=" in full.stdout and "--no-build-isolation" in full.stdout
    quick = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--quick"], capture_output=True, text=True, check=True,
                           timeout=60)
    assert quick.stdout.count("== bench_attention") == 1 and "--queries 1 256" in quick.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument '--fast'" in bad.stderr


def _attention_run(ratios):
    """A bench_attention --device cuda JSON: bf16 D=64 on sm_90, kernel times giving these torch/kernel ratios."""
    rows = []
    for N, r in ratios.items():
        for case in ("bidir", "causal", "pad25%", "varlen"):
            for mode in ("fwd", "fwd+bwd"):
                rows.append({"N": N, "case": case, "pass": mode, "sdpa ms": 1.0, "minillm ms": 1.2,
                             "kernel ms": 1.0 / r if case == "bidir" and mode == "fwd" else 5.0})
    return {"info": {"dtype": "bfloat16", "head_dim": 64, "gpu": "NVIDIA H200", "arch": [9, 0]}, "rows": rows}


def test_gpu_table_prints_rows_only_for_measured_wins(tmp_path):
    attn = tmp_path / "a.json"
    # The kernel wins at N = 2048 and 4096 (1.5x, 1.2x), loses at 1024 and 8192, and wins nothing else.
    attn.write_text(json.dumps(_attention_run({1024: 0.9, 2048: 1.5, 4096: 1.2, 8192: 1.05})))
    topk = tmp_path / "t.json"
    topk.write_text(json.dumps({"info": {"gpu": "NVIDIA H200", "arch": [9, 0]}, "rows": [
        {"dtype": "float32", "N": 10 ** 6, "d": 384, "Q": q, "minillm ms": 2.0, "kernel ms": k, "torch ms": 1.0}
        for q, k in ((1, 0.5), (16, 0.8), (256, 3.0))]}))
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_table.py"), "--attention", str(attn),
                          str(tmp_path / "missing.json"), "--topk", str(topk), "--date", "2026-12-04",
                          "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, check=True, timeout=60)
    rows = [line for line in out.stdout.splitlines() if line.startswith("KernelRow(")]
    assert len(rows) == 2, out.stdout
    assert ('KernelRow("attention", "bfloat16", (9, 0), dim=(64, 64), n=(2048, 4096), q=(2048, 4096), '
            'passes="fwd", causal=False, padded=False, measured="NVIDIA H200, 2026-12-04') in rows[0]
    assert ">= 1.20x torch" in rows[0]
    # Top-k: the kernel beats torch (1.0 ms) and minillm's torch path (2.0 ms) at Q 1-16 only.
    assert 'KernelRow("topk_search", "float32", (9, 0), dim=(384, 384), n=(1000000, 1000000), q=(1, 16)' in rows[1]
    assert ">= 1.25x torch" in rows[1]
    assert (tmp_path / "out" / "dispatch_rows.txt").read_text().count("KernelRow(") == 2
    assert len(json.loads((tmp_path / "out" / "attention.json").read_text())) == 1
    # The printed rows are valid constructor calls.
    from minillm.ops._backend import KernelRow  # noqa: F401  (eval needs the name)
    for row in rows:
        assert isinstance(eval(row.rstrip(",")), KernelRow)
