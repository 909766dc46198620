"""minillm.ops with CUDA: what runs without a GPU (import, backend_info, clean errors), the Python glue of the
CUDA custom-op kernels (checked on CPU tensors by routing the CUDA bindings to the CPU kernels, which take
the same raw-pointer arguments), and, on a machine with a GPU, the real kernels against the reference."""
import importlib
import pathlib
import subprocess
import sys
import tempfile
import types

import pytest
import torch

from minillm.ops import _backend, attention, backend_info, topk_search
from minillm.ops.reference import attention_reference, topk_search_reference

# The package re-exports functions named like these modules, so fetch the modules themselves.
attention_mod = importlib.import_module("minillm.ops.attention")
topk_mod = importlib.import_module("minillm.ops.topk")
needs_ext = pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")
has_gpu = torch.cuda.is_available()


@needs_ext
def test_backend_info_reports_the_cuda_path():
    info = backend_info()
    assert info["cuda_kernels_built"] == bool(_backend._C.cuda)
    cuda_path = info["ops"]["attention"]["cuda"]
    if has_gpu and info["cuda_kernels_built"]:
        # The dispatch table (or MINILLM_CUDA_KERNELS) decides; either way the entry says which and why.
        assert cuda_path.startswith(("torch (no case in the CUDA dispatch table", "native CUDA", "torch (MINILLM"))
    else:
        assert cuda_path.startswith("torch (") and info["cuda_devices"] == 0
    assert info["ops"]["linear"]["cuda"].startswith("torch")


@needs_ext
@pytest.mark.skipif(has_gpu, reason="checks the behaviour without a GPU")
def test_cuda_bindings_fail_cleanly_without_a_gpu():
    if not _backend.cuda_kernels_built():
        pytest.skip("extension built without CUDA kernels")
    assert _backend._C.cuda_device_count() == 0
    with pytest.raises(RuntimeError, match="cudaSetDevice"):
        _backend._C.cuda_topk_workspace(1, 100, 10, 0)
    with pytest.raises(RuntimeError, match="cudaSetDevice"):
        _backend._C.cuda_attention_fwd(0, 0, 0, 0, 0, 0, 0, (1, 1, 1, 1, 8), (8, 8, 8), (8, 8, 8), (8, 8, 8),
                                       False, 0, 1.0, 0, 0, 0)
    # and the process is fine afterwards
    q = torch.randn(1, 1, 4, 8)
    torch.testing.assert_close(attention(q, q, q), attention_reference(q, q, q))


class CpuShim(types.SimpleNamespace):
    """Stands in for minillm._C: the cuda_* entry points forward their raw-pointer arguments to the CPU
    kernels, so the CUDA glue in minillm.ops runs end to end on CPU tensors."""

    def __init__(self, real):
        super().__init__(real=real, calls=[])

    def __getattr__(self, name):  # everything else: the real extension
        return getattr(self.real, name)

    def cuda_attention_fwd(self, *args):
        *kernel_args, device, stream = args
        self.calls.append(("fwd", device, stream))
        self.real.attention_fwd(*kernel_args, 1)

    def cuda_attention_bwd(self, *args):
        *kernel_args, delta, device, stream = args
        self.calls.append(("bwd", device, stream))
        assert delta != 0
        self.real.attention_bwd(*kernel_args, 1)

    def cuda_topk_workspace(self, Q, N, k, device):
        return Q * k * 12

    def cuda_topk(self, *args):
        *kernel_args, workspace, device, stream = args
        self.calls.append(("topk", device, stream))
        self.real.topk(*kernel_args, 1)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_glue_passes_consistent_arguments(monkeypatch, dtype):
    shim = CpuShim(_backend._C)
    monkeypatch.setattr(_backend, "_C", shim)
    monkeypatch.setattr(_backend, "cuda_stream", lambda t: 1234)
    B, H, Nq, Nk, D = 2, 3, 9, 13, 16
    qkv = torch.randn(B, Nk, 3, H, D, dtype=dtype)
    q = qkv[:, -Nq:, 0].transpose(1, 2)  # strided views, as a fused projection gives
    k, v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    mask = torch.rand(B, Nk) > 0.3
    mask[:, 0] = True
    dout = torch.randn(B, H, Nq, D, dtype=dtype)
    dlse = torch.randn(B, H, Nq)
    qmask = torch.rand(B, Nq) > 0.2
    out, lse = attention_mod._attention_fwd_cuda(q, k, v, mask, qmask, True, Nk - Nq, 0.25)
    want_out, want_lse = attention_mod._attention_fwd(q, k, v, mask, qmask, True, Nk - Nq, 0.25)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    grads = attention_mod._attention_bwd_cuda(dout, q, k, v, out, lse, dlse, mask, qmask, True, Nk - Nq, 0.25)
    want = attention_mod._attention_bwd(dout, q, k, v, out, lse, dlse, mask, qmask, True, Nk - Nq, 0.25)
    for g, w in zip(grads, want):
        assert g.is_contiguous() and torch.equal(g, w)
    corpus = torch.randn(300, 40)[:, :24]
    queries = torch.randn(5, 24)
    scores, idx = topk_mod._topk_search_cuda(queries, corpus, 7, "cosine")
    want_scores, want_idx = topk_mod._topk_search(queries, corpus, 7, "cosine")
    assert torch.equal(scores, want_scores) and torch.equal(idx, want_idx)
    assert [c[0] for c in shim.calls] == ["fwd", "bwd", "topk"]
    assert all(c[2] == 1234 for c in shim.calls)


@pytest.mark.skipif(has_gpu, reason="checks the refusal without a GPU")
@pytest.mark.parametrize("script", ["bench_attention.py", "bench_topk.py"])
def test_benchmarks_refuse_device_cuda_cleanly_without_a_gpu(script):
    bench = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / script
    res = subprocess.run([sys.executable, str(bench), "--device", "cuda"], capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), timeout=120)
    assert res.returncode == 1
    assert "--device cuda: no CUDA device is available here" in res.stderr
    assert "Traceback" not in res.stderr
