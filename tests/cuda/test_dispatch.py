"""minillm.ops with CUDA: what runs without a GPU (import, backend_info, clean errors), the Python glue of the
CUDA custom-op kernels (checked on CPU tensors by routing the CUDA bindings to the CPU kernels, which take
the same raw-pointer arguments), and, on a machine with a GPU, the real kernels against the reference."""
import dataclasses
import importlib
import os
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
        t = torch.zeros(8)
        b = _backend.buf(t)
        _backend._C.cuda_attention_fwd(b, b, b, b, b, (0, 0), (0, 0), (1, 1, 1, 1, 8), (8, 8, 8), (8, 8, 8),
                                       (8, 8, 8), False, 0, 1.0, 0, 0, 0)
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

    def cuda_attention_fwd(self, **kw):
        device, stream = kw.pop("device"), kw.pop("stream")
        self.calls.append(("fwd", device, stream))
        self.real.attention_fwd(**kw, nthreads=1)

    def cuda_attention_bwd(self, **kw):
        delta, device, stream = kw.pop("delta"), kw.pop("device"), kw.pop("stream")
        self.calls.append(("bwd", device, stream))
        assert delta[0] != 0 and delta[1] >= 4 * 2 * 3 * 9  # B * H * Nq floats
        self.real.attention_bwd(**kw, nthreads=1)

    def cuda_topk_workspace(self, Q, N, k, device):
        return Q * k * 12

    def cuda_topk(self, **kw):
        workspace, device, stream = kw.pop("workspace"), kw.pop("device"), kw.pop("stream")
        self.calls.append(("topk", device, stream))
        self.real.topk(**kw, nthreads=1)


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


@needs_ext
def test_cuda_glue_carries_grouped_heads_and_modifiers(monkeypatch):
    """bf16 with grouped-query heads, a window, softcap, ALiBi and sinks reach the CUDA binding in one call (the
    tensor-core kernels take them), as the CPU op computes them; what no CUDA kernel takes is refused by name."""
    shim = CpuShim(_backend._C)
    monkeypatch.setattr(_backend, "_C", shim)
    monkeypatch.setattr(_backend, "cuda_stream", lambda t: 1234)
    monkeypatch.setattr(_backend, "cuda_arch", lambda device: (9, 0))
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 9, 13, 16
    dtype = torch.bfloat16
    q = torch.randn(B, H, Nq, D, dtype=dtype)
    k, v = (torch.randn(B, Hkv, Nk, D, dtype=dtype) for _ in range(2))
    mask = torch.rand(B, Nk) > 0.3
    mask[:, -1] = True
    mods = (4, -1, 5.0, torch.rand(H) * 0.3, None, torch.randn(H))
    out, lse = attention_mod._attention_fwd_cuda(q, k, v, mask, None, True, Nk - Nq, 0.25, *mods)
    want_out, want_lse = attention_mod._attention_fwd(q, k, v, mask, None, True, Nk - Nq, 0.25, *mods)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    dout = torch.randn(B, H, Nq, D, dtype=dtype)
    grads = attention_mod._attention_bwd_cuda(dout, q, k, v, out, lse, None, mask, None, True, Nk - Nq, 0.25, *mods[:5])
    want = attention_mod._attention_bwd(dout, q, k, v, out, lse, None, mask, None, True, Nk - Nq, 0.25, *mods[:5])
    for g, w in zip(grads[:3], want[:3]):
        assert g.shape == w.shape
        torch.testing.assert_close(g.float(), w.float(), atol=1e-2, rtol=1e-2)
    assert [c[0] for c in shim.calls] == ["fwd", "bwd"]  # no repeat_interleave: one call each, grouped in place
    with pytest.raises(ValueError, match="no CUDA kernel takes these arguments"):  # fp32 with modifiers
        attention_mod._attention_fwd_cuda(q.float(), k.float(), v.float(), mask, None, True, Nk - Nq, 0.25, *mods)
    with pytest.raises(ValueError, match="no CUDA kernel takes these arguments"):  # an additive bias
        attention_mod._attention_fwd_cuda(q, k, v, mask, None, True, Nk - Nq, 0.25, -1, -1, 0.0, None,
                                          torch.zeros(Nq, Nk), None)
    q_odd = torch.randn(B, H, Nq, D + 1, dtype=dtype)[..., :D]  # rows not on 16 bytes
    with pytest.raises(ValueError, match="no CUDA kernel takes these arguments"):
        attention_mod._attention_fwd_cuda(q_odd, k, v, mask, None, True, Nk - Nq, 0.25, *mods)
    monkeypatch.setattr(_backend, "cuda_arch", lambda device: (7, 5))  # no tensor cores of this kind
    with pytest.raises(ValueError, match="no CUDA kernel takes these arguments"):
        attention_mod._attention_fwd_cuda(q, k, v, mask, None, True, Nk - Nq, 0.25, *mods)


@pytest.mark.skipif(has_gpu, reason="checks the refusal without a GPU")
@pytest.mark.parametrize("script", ["bench_attention.py", "bench_topk.py"])
def test_benchmarks_refuse_device_cuda_cleanly_without_a_gpu(script):
    bench = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / script
    res = subprocess.run([sys.executable, str(bench), "--device", "cuda"], capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), timeout=120)
    assert res.returncode == 1
    assert "--device cuda: no CUDA device is available here" in res.stderr
    assert "Traceback" not in res.stderr


# ---- the dispatch table, with the device query faked (no GPU needed) ----

ROW = _backend.KernelRow("attention", "float32", (9, 0), dim=(16, 64), n=(32, 256), q=(1, 256), passes="fwd",
                         causal=None, padded=False, measured="test row")
CASE = _backend.KernelCase("attention", "float32", 32, 100, 50, "fwd", causal=True, padded=False)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A capable sm_90 GPU as far as the dispatch can tell, the dispatch table empty and the mode auto."""
    monkeypatch.setattr(_backend, "cuda_device_ok", lambda device: True)
    monkeypatch.setattr(_backend, "cuda_arch", lambda device: (9, 0))
    monkeypatch.setattr(_backend, "CUDA_KERNEL_TABLE", ())
    monkeypatch.setattr(_backend, "_cuda_mode", "auto")
    monkeypatch.setattr(_backend, "_force_torch", False)


@needs_ext
def test_empty_table_sends_cuda_to_torch(fake_gpu):
    native, why = _backend.cuda_kernel_choice(CASE, torch.device("cuda"))
    assert not native and "no row of the CUDA dispatch table covers attention fwd float32 D=32" in why


@needs_ext
def test_a_table_row_sends_exactly_its_cases_to_the_kernel(fake_gpu, monkeypatch):
    monkeypatch.setattr(_backend, "CUDA_KERNEL_TABLE", (ROW,))
    dev = torch.device("cuda")
    native, why = _backend.cuda_kernel_choice(CASE, dev)
    assert native and "test row" in why
    for change in ({"n": 257}, {"dim": 8}, {"q": 300}, {"dtype": "bfloat16"}, {"passes": "fwd+bwd"},
                   {"padded": True}, {"op": "topk_search"}):
        assert not _backend.cuda_kernel_choice(dataclasses.replace(CASE, **change), dev)[0], change
    monkeypatch.setattr(_backend, "cuda_arch", lambda device: (8, 0))  # measured on sm_90 only
    assert not _backend.cuda_kernel_choice(CASE, dev)[0]


@needs_ext
def test_override_on_and_off(fake_gpu, monkeypatch):
    dev = torch.device("cuda")
    with _backend.cuda_kernels("on"):
        assert _backend.cuda_kernel_choice(CASE, dev) == (True, "MINILLM_CUDA_KERNELS=on")
        assert _backend.backend_info()["cuda_kernels"] == "on"
    monkeypatch.setattr(_backend, "CUDA_KERNEL_TABLE", (ROW,))
    with _backend.cuda_kernels("off"):
        assert _backend.cuda_kernel_choice(CASE, dev) == (False, "MINILLM_CUDA_KERNELS=off")
    with pytest.raises(ValueError, match="auto"):
        with _backend.cuda_kernels("maybe"):
            pass


@pytest.mark.parametrize("value,mode", [("on", "on"), ("OFF", "off"), ("", "auto"), ("sometimes", "auto")])
def test_environment_variable(value, mode):
    code = "from minillm.ops import _backend; print(_backend.cuda_kernels_mode())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                         env={**os.environ, "MINILLM_CUDA_KERNELS": value}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == mode
    assert ("ignoring MINILLM_CUDA_KERNELS" in res.stderr) == (value == "sometimes")


@pytest.fixture
def cpu_as_cuda(fake_gpu, monkeypatch):
    """CPU tensors routed as if they were CUDA tensors; records which path each call took."""
    taken = []
    monkeypatch.setattr(attention_mod, "_device_type", lambda t: "cuda")
    monkeypatch.setattr(topk_mod, "_device_type", lambda t: "cuda")
    for mod, name, label in ((attention_mod, "attention_sdpa", "torch"), (attention_mod, "_attention_fwd", "kernel"),
                             (topk_mod, "topk_search_torch", "torch"), (topk_mod, "_topk_search", "kernel")):
        real = getattr(mod, name)

        def spy(*args, _real=real, _label=label, **kwargs):
            taken.append(_label)
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, name, spy)
    return taken


@needs_ext
@pytest.mark.parametrize("with_row", [False, True])
def test_attention_routing_follows_the_table(cpu_as_cuda, monkeypatch, with_row):
    if with_row:
        monkeypatch.setattr(_backend, "CUDA_KERNEL_TABLE", (dataclasses.replace(ROW, passes="fwd+bwd"),))
    q, k, v = (torch.randn(2, 3, n, 32, requires_grad=True) for n in (50, 100, 100))
    out = attention(q, k, v, causal=True)
    out.backward(torch.ones_like(out))
    assert cpu_as_cuda == ["kernel" if with_row else "torch"]
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = attention_reference(*ref, causal=True)
    want.backward(torch.ones_like(want))
    for g, w in zip((out, q.grad, k.grad, v.grad), (want, *(t.grad for t in ref))):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-4)
    # Outside the row's sizes (Nk = 300 > 256), torch again.
    cpu_as_cuda.clear()
    with torch.no_grad():
        attention(q, torch.randn(2, 3, 300, 32), torch.randn(2, 3, 300, 32))
    assert cpu_as_cuda == ["torch"]


@needs_ext
@pytest.mark.parametrize("with_row", [False, True])
def test_topk_routing_follows_the_table(cpu_as_cuda, monkeypatch, with_row):
    if with_row:
        monkeypatch.setattr(_backend, "CUDA_KERNEL_TABLE", (_backend.KernelRow(
            "topk_search", "float32", (9, 0), dim=(1, 512), n=(1, 10**6), q=(1, 16), passes="search"),))
    corpus, queries = torch.randn(500, 24), torch.randn(5, 24)
    scores, idx = topk_search(queries, corpus, 7, "l2")
    assert cpu_as_cuda == ["kernel" if with_row else "torch"]
    want_scores, want_idx = topk_search_reference(queries, corpus, 7, "l2")
    torch.testing.assert_close(scores, want_scores, atol=1e-4, rtol=1e-4)
    cpu_as_cuda.clear()
    topk_search(torch.randn(17, 24), corpus, 7, "l2")  # Q = 17: outside the row
    topk_search(queries, torch.randn(2000, 24), 1025, "l2")  # k beyond the kernel's 1024
    assert cpu_as_cuda == ["torch", "torch"]


@needs_ext
def test_backend_info_and_log_line_say_which_path_and_why(fake_gpu, monkeypatch, caplog):
    monkeypatch.setattr(_backend, "_C", types.SimpleNamespace(**{n: getattr(_backend._C, n) for n in dir(_backend._C)
                                                                  if not n.startswith("__")}))
    monkeypatch.setattr(_backend._C, "cuda", True)
    monkeypatch.setattr(_backend._C, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    info = _backend.backend_info()
    assert info["ops"]["attention"]["cuda"].startswith("torch (no case in the CUDA dispatch table for sm_90")
    assert info["cuda_dispatch_table"] == [] and info["cuda_kernels"] == "auto"
    monkeypatch.setattr(_backend, "CUDA_KERNEL_TABLE", (ROW,))
    info = _backend.backend_info()
    assert info["ops"]["topk_search"]["cuda"].startswith("native CUDA for the 1 case(s)")
    assert info["cuda_dispatch_table"][0]["measured"] == "test row"
    monkeypatch.setattr(_backend, "_logged", set())
    with caplog.at_level("INFO", logger="minillm.ops"):
        _backend.log_path_once("attention", torch.device("cuda"), False, "no row covers this")
        _backend.log_path_once("attention", torch.device("cuda"), False, "no row covers this")
    assert [r.getMessage() for r in caplog.records] == ["minillm.ops.attention on cuda: plain torch (no row covers this)"]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modifiers_route_to_the_kernel_where_the_tensor_cores_take_them(cpu_as_cuda, monkeypatch, dtype):
    monkeypatch.setattr(_backend, "_cuda_mode", "on")
    real_reference = attention_mod.attention_reference  # the torch path of calls with modifiers

    def spy(*args, **kwargs):
        cpu_as_cuda.append("torch")
        return real_reference(*args, **kwargs)

    monkeypatch.setattr(attention_mod, "attention_reference", spy)
    q = torch.randn(1, 4, 20, 32, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, 2, 20, 32, dtype=dtype, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, requires_grad=True)
    out = attention(q, k, v, causal=True, window=(5, -1), softcap=4.0, sinks=sinks)
    out.float().sum().backward()
    assert cpu_as_cuda == ["kernel" if dtype == torch.bfloat16 else "torch"]
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    want = attention_reference(*ref[:3], causal=True, window=(5, -1), softcap=4.0, sinks=ref[3])
    want.sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for g, w in zip((out, q.grad, k.grad, v.grad, sinks.grad), (want, *(t.grad for t in ref))):
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol)
