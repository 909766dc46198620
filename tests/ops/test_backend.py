"""backend_info(), the environment overrides and the one-line path log."""
import json
import logging
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import minillm
from minillm.ops import _backend, attention, backend_info, topk_search


def run_python(code, **env):
    full_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **env}
    # cwd outside the repository, so that the installed package is imported, not the source tree.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, check=True,
                         cwd=tempfile.gettempdir())
    return out.stdout.strip().splitlines()[-1], out.stderr


def test_backend_info_describes_every_op_and_device():
    info = backend_info()
    assert set(info["ops"]) == {"attention", "topk_search", "linear", "layer_norm"}
    for paths in info["ops"].values():
        assert set(paths) == {"cpu", "cuda", "mps", "other"}
        assert paths["mps"] == "torch"
    assert info["threads"] == torch.get_num_threads()
    if _backend.native_available():
        assert info["native_extension"] and info["simd_level"] in info["simd_levels"]
        assert info["ops"]["attention"]["cpu"].startswith("native C++")
    json.dumps(info)  # plain data, printable by benchmarks


@pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")
def test_force_torch_env_switches_every_op_to_torch():
    code = (
        "import json, torch, minillm\n"
        "from minillm.ops import backend_info, attention\n"
        "torch.manual_seed(0); q = torch.randn(1, 2, 5, 8)\n"
        "print(json.dumps([backend_info(), attention(q, q, q, causal=True).sum().item()]))\n"
    )
    line, _ = run_python(code, MINILLM_FORCE_TORCH="1")
    info, forced = json.loads(line)
    assert info["force_torch"] and info["ops"]["attention"]["cpu"] == "torch"
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 8)
    assert forced == pytest.approx(attention(q, q, q, causal=True).sum().item(), abs=1e-5)


@pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")
def test_simd_env_selects_a_level_and_ignores_bad_values():
    line, _ = run_python("import minillm; print(minillm.ops.simd_level())", MINILLM_SIMD="scalar")
    assert line == "scalar"
    line, err = run_python("import minillm; print(minillm.ops.simd_level())", MINILLM_SIMD="sse9")
    assert line == _backend.simd_levels()[0] and "MINILLM_SIMD" in err


@pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_scan_prefetch_env_switch_keeps_results(dtype):
    # Prefetching only moves data earlier: forced on and forced off, the compressed few-query scans
    # (every row of the corpus, right up to its last) return the same scores and ids.
    code = (
        "import json, torch, minillm\n"
        "from minillm.ops import backend_info, topk_search, Int8Corpus\n"
        "g = torch.Generator().manual_seed(0)\n"
        "c = torch.randn(3001, 72, generator=g); q = torch.randn(3, 72, generator=g)\n"
        f"corpus = Int8Corpus(c) if '{dtype}' == 'int8' else c.to(torch.{dtype})\n"
        "out = [topk_search(q[:n], corpus, k=7, metric=m) for n in (1, 3) for m in ('ip', 'l2')]\n"
        "print(json.dumps([backend_info()['scan_prefetch'], [[s.tolist(), i.tolist()] for s, i in out]]))\n"
    )
    on, off = (json.loads(run_python(code, MINILLM_SCAN_PREFETCH=flag)[0]) for flag in ("1", "0"))
    assert on[0] is True and off[0] is False
    assert on[1] == off[1]


@pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")
def test_set_simd_level_rejects_unknown_levels():
    with pytest.raises(ValueError, match="avx512, avx2, scalar"):
        minillm.ops.set_simd_level("neon9")


def test_one_log_line_per_op_and_device(caplog):
    _backend._logged.clear()
    q = torch.randn(1, 1, 3, 4)
    with caplog.at_level(logging.INFO, logger="minillm.ops"):
        attention(q, q, q)
        attention(q, q, q)
        topk_search(q[0, 0], q[0, 0], 1)
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if "attention on cpu" in m]) == 1
    assert len([m for m in lines if "topk_search on cpu" in m]) == 1
