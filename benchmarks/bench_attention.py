"""minillm.ops.attention vs torch's scaled_dot_product_attention (default CPU backend and the math
backend) vs a naive softmax(QK^T)V, side by side in one run. With --device cuda the contenders are
minillm as dispatched ("minillm": its CUDA kernel only where the dispatch table says it was measured faster,
else torch's SDPA with minillm's masks), minillm's CUDA kernel forced ("kernel", MINILLM_CUDA_KERNELS=on)
and torch's SDPA (FlashAttention / cuDNN / memory-efficient, as torch picks); the "kernel vs sdpa" ratios
are what the dispatch table's rows are made from (scripts/gpu_check.sh).

For each N: causal and bidirectional, forward and forward+backward, plus a key-padding case (the last
25% of keys padded, as in a right-padded batch, given to torch as the equivalent boolean mask) and a
variable-length batch (lengths uniform in [N/8, N]; minillm skips padded queries and keys, torch gets the
boolean key mask and computes every row). Every case is checked against the fp64
reference before it is timed. GFLOP/s count 4*B*H*N^2*D for the forward (halved for causal) and 2.5x
that for the backward; a torch.mm rate of the same run gives the machine's matmul ceiling. The MB
columns are the peak resident memory each call adds (its outputs, gradients and scratch), read in a
second process whose allocator returns freed blocks to the system (--no-memory skips them).

    python benchmarks/bench_attention.py [--n 128 512 1024] [--d 64] [--dtype float32] [--json out.json] [--plot p.png]
    python benchmarks/bench_attention.py --device cuda --dtype bfloat16 --n 1024 2048 4096 8192 --d 128 --no-memory
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

from common import (PEAK_MEMORY_ENV, banner, interleaved_medians, median_time, peak_extra_mb, plot,
                    print_table, write_json)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--b", type=int, default=4)
    ap.add_argument("--h", type=int, default=8)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--n", type=int, nargs="+", default=[128, 512, 1024, 2048])
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a machine with a GPU")
    ap.add_argument("--contenders", nargs="+", choices=ALL_CONTENDERS,
                    help="default: minillm sdpa math naive on cpu, minillm kernel sdpa on cuda")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns (a second process)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a PNG of the forward GFLOP/s")
    ap.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


ALL_CONTENDERS = ("minillm", "kernel", "sdpa", "math", "naive")
MODES = ("fwd", "fwd+bwd")


def contender_names(args) -> tuple:
    if args.contenders:
        names = tuple(c for c in ALL_CONTENDERS if c in args.contenders)
    else:
        names = ("minillm", "kernel", "sdpa") if args.device.startswith("cuda") else ("minillm", "sdpa", "math", "naive")
    if "kernel" in names and not args.device.startswith("cuda"):
        sys.exit("--contenders kernel: minillm's CUDA kernel needs --device cuda")
    return names


def cases(N: int, B: int, H: int, D: int, dev, dtype):
    """Inputs of one N and its cases: (q, k, v, grad, [(name, causal, key mask, query mask)])."""
    import torch

    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, N, D, device=dev, dtype=dtype)
    keep = (torch.arange(N, device=dev) < N - N // 4).expand(B, N)  # the last 25% of keys are padding
    # A variable-length batch: lengths uniform in [N/8, N], padded to N (torch gets the same bool mask).
    gen = torch.Generator().manual_seed(N)
    lengths = torch.randint(max(1, N // 8), N + 1, (B,), generator=gen).to(dev)
    varlen = torch.arange(N, device=dev)[None, :] < lengths[:, None]
    # varlen: padded queries are skipped too (their rows come back 0; torch computes them)
    return q, k, v, grad, [("bidir", False, None, None), ("causal", True, None, None),
                           ("pad25%", False, keep, None), ("varlen", False, varlen, varlen)]


def contenders(q, k, v, causal: bool, mask, qmask, names=ALL_CONTENDERS) -> dict:
    """name -> forward call for one case: minillm (as dispatched), minillm's CUDA kernel forced, torch SDPA
    (default backend), SDPA math, naive."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from minillm.ops import _backend, attention

    tmask = mask[:, None, None, :] if mask is not None else None  # (B, 1, 1, N): SDPA's boolean key mask

    def math_backend():
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=tmask, is_causal=causal)

    def naive():
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        if tmask is not None:
            s = s.masked_fill(~tmask, float("-inf"))
        return torch.softmax(s, -1) @ v

    def mine():
        return attention(q, k, v, causal=causal, key_padding_mask=mask, query_padding_mask=qmask)

    def kernel():
        with _backend.cuda_kernels("on"):
            return mine()

    calls = {
        "minillm": mine,
        "kernel": kernel,
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=tmask, is_causal=causal),
        "math": math_backend,
        "naive": naive,
    }
    return {name: calls[name] for name in names}


def in_mode(fn, mode: str, grad):
    """The timed call: the forward under no_grad, or forward + backward of `grad`."""
    import torch

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn()
        return run
    return lambda: fn().backward(grad)


def memory_worker(args) -> None:
    """Run under PEAK_MEMORY_ENV by main(): prints {"N|case|pass|contender": MB} as one JSON line."""
    import torch

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out, errors = {}, {}
    for N in args.n:
        q, k, v, grad, todo = cases(N, args.b, args.h, args.d, dev, dtype)

        def drop_grads():
            q.grad = k.grad = v.grad = None

        for name, causal, mask, qmask in todo:
            for cname, fn in contenders(q, k, v, causal, mask, qmask, contender_names(args)).items():
                for mode in MODES:
                    key = f"{N}|{name}|{mode}|{cname}"
                    try:
                        out[key] = peak_extra_mb(in_mode(fn, mode, grad), drop_grads)
                    except Exception as exc:  # nan, and the reason goes to the parent's failure list
                        out[key] = math.nan
                        errors[key] = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"mb": out, "errors": errors}))


def peak_memory(args, reasons: dict) -> dict:
    """Peak extra MB of every call, measured in a second process (see PEAK_MEMORY_ENV); {} if skipped."""
    if args.no_memory:
        return {}
    if args.device != "cpu":
        reasons["peak memory"] = "measured from /proc for CPU runs only"
        return {}
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", "--b", str(args.b), "--h", str(args.h),
           "--d", str(args.d), "--dtype", args.dtype, "--n", *map(str, args.n),
           "--contenders", *contender_names(args)]
    proc = subprocess.run(cmd, env={**os.environ, **PEAK_MEMORY_ENV}, capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        reasons["peak memory"] = err[-1] if err else f"exit {proc.returncode}"
        print(f"  peak memory not measured: {reasons['peak memory']}")
        return {}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, why in res["errors"].items():
        reasons[f"peak memory {key}"] = why
    return res["mb"]


def main() -> None:
    args = parse_args()
    if args.memory_worker:
        memory_worker(args)
        return

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available here")
    names = contender_names(args)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    a = torch.randn(2048, 2048, device=dev, dtype=dtype)
    mm_s = median_time(lambda: a @ a, 3)
    mm_gflops = 2 * 2048 ** 3 / mm_s / 1e9
    gpu = {}
    if dev.type == "cuda":
        gpu = {"gpu": torch.cuda.get_device_name(dev), "arch": list(torch.cuda.get_device_capability(dev)),
               "cuda_kernels_mode": os.environ.get("MINILLM_CUDA_KERNELS", "auto")}
    info = banner("bench_attention: minillm vs torch SDPA (flash / math) vs naive", dtype=args.dtype,
                  shape=f"B={args.b} H={args.h} D={args.d}", head_dim=args.d, device=args.device,
                  torch_mm_gflops=f"{mm_gflops:.3g} (2048^3, same run)", **gpu)
    B, H, D = args.b, args.h, args.d
    rows, reasons = [], {}
    memory = peak_memory(args, reasons)

    for N in args.n:
        q, k, v, grad, todo = cases(N, B, H, D, dev, dtype)
        for name, causal, mask, qmask in todo:
            calls = contenders(q, k, v, causal, mask, qmask, names)
            for cname in ("minillm", "kernel"):
                if cname in calls:
                    check(calls[cname], q, k, v, causal, mask, qmask, f"N={N} {name} {cname}")
            fwd_flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
            for mode in MODES:
                flops = fwd_flops * (1 if mode == "fwd" else 3.5)
                t = interleaved_medians({c: in_mode(fn, mode, grad) for c, fn in calls.items()}, args.repeats,
                                        reasons, f"N={N} {name} {mode}")
                row = {"N": N, "case": name, "pass": mode, **{f"{c} ms": 1000 * t[c] for c in names}}
                for c in names:
                    if c in ("minillm", "kernel", "sdpa"):
                        row[f"{c} GFLOP/s"] = flops / t[c] / 1e9
                for c, base in (("minillm", "sdpa"), ("minillm", "math"), ("kernel", "sdpa")):
                    if c in names and base in names:
                        # minillm's columns keep their names of CPU runs: "vs sdpa", "vs math"
                        row[f"{'' if c == 'minillm' else c + ' '}vs {base}"] = t[base] / t[c]
                if memory:
                    row.update({f"{c} MB": memory.get(f"{N}|{name}|{mode}|{c}", math.nan) for c in names})
                rows.append(row)
                print_table(rows[-1:], list(rows[-1]), floatfmt=".3g")
                write_json(args.json, {**info, "baseline_failures": reasons}, rows, quiet=True)
    print()
    print_table(rows, list(rows[0]), floatfmt=".3g")
    if memory:
        print("MB: peak resident memory a call adds (outputs, gradients and scratch), measured in a second process")
    overhead = call_overhead_us(dev, dtype)
    print("call overhead on (1, 1, 8, 8) inputs, us per call (median of 2000): " +
          ", ".join(f"{k} {v:.1f}" for k, v in overhead.items()))
    info["call_overhead_us"] = overhead
    write_json(args.json, {**info, "baseline_failures": reasons}, rows)
    fwd = [r for r in rows if r["pass"] == "fwd" and r["case"] == "bidir"]
    plot(args.plot, fwd, "N", ["minillm GFLOP/s", "sdpa GFLOP/s"], "attention forward, bidirectional", "GFLOP/s")


def call_overhead_us(dev, dtype) -> dict:
    """Per-call cost where the math is negligible: minillm.ops.attention, its raw kernel binding (no Python
    wrapper, CPU only), and torch SDPA, forward and forward + backward."""
    import statistics
    import time

    import torch
    import torch.nn.functional as F

    from minillm.ops import _backend, attention

    q, k, v = (torch.randn(1, 1, 8, 8, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(1, 1, 8, 8, device=dev, dtype=dtype)

    def per_call(fn, n=2000):
        for _ in range(200):
            fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(times)

    out = {}
    with torch.no_grad():
        out["minillm fwd"] = per_call(lambda: attention(q, k, v))
        out["sdpa fwd"] = per_call(lambda: F.scaled_dot_product_attention(q, k, v))
    out["minillm fwd+bwd"] = per_call(lambda: attention(q, k, v).backward(g))
    out["sdpa fwd+bwd"] = per_call(lambda: F.scaled_dot_product_attention(q, k, v).backward(g))
    if dev.type == "cpu" and _backend.native_available() and dtype == torch.float32:
        o, lse = torch.empty(1, 1, 8, 8), torch.empty(1, 1, 8)
        buf = _backend.buf
        args = (buf(q), buf(k), buf(v), buf(o), buf(lse), (0, 0), (0, 0), (1, 1, 8, 8, 8),
                (64, 64, 8), (64, 64, 8), (64, 64, 8), False, 0, 8 ** -0.5, 0, 1)
        out["raw kernel fwd"] = per_call(lambda: _backend._C.attention_fwd(*args))
    return out


def check(fn, q, k, v, causal: bool, mask, qmask, label: str) -> None:
    """Exits (nothing is timed) unless fn()'s output matches the fp64 reference on the rows minillm computes
    (padded queries come back 0 there; torch computes them). On a GPU the check covers batch 0 and the first
    two heads: the fp64 reference of a whole N = 8192 batch would need tens of GB."""
    import torch

    from minillm.ops.reference import attention_reference

    with torch.no_grad():
        out = fn().double()
        if q.is_cuda:
            out, q, k, v = out[:1, :2], q[:1, :2], k[:1, :2], v[:1, :2]
            mask = mask[:1] if mask is not None else None
            qmask = qmask[:1] if qmask is not None else None
        ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=mask)
    diff = out - ref
    if qmask is not None:
        diff = diff[qmask[:, None, :, None].expand_as(diff)]
    err = diff.abs().max().item() if diff.numel() else 0.0
    tol = 1e-4 if q.dtype == torch.float32 else 5e-2
    if not err <= tol:  # NaN fails too
        sys.exit(f"{label}: differs from the reference by {err:.2e} (tolerance {tol:g}); not timing")


if __name__ == "__main__":
    main()
