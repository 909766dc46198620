"""Linear layers: minillm.ops.linear (native GEMM) vs torch F.linear (MKL addmm) vs oneDNN.

Shapes are the linear layers of the models this package trains and serves: the nanoGPT-sized
shakespeare GPT (768 tokens, width 128), MiniLM sentence embeddings (~1,500 tokens, width 384,
MLP 1,536), GPT-2 small (1,024 tokens, width 768). Each shape is timed forward, and forward + backward
(dx, dW, db). The oneDNN column calls torch's bundled oneDNN (`torch.ops.mkldnn._linear_pointwise`,
forward only; the GEMM torch.compile's CPU backend picks), recorded as nan where this torch lacks it.
Results are checked against F.linear before anything is timed.

    python benchmarks/bench_linear.py [--repeats 20] [--json out.json] [--plot out.png]
"""
from __future__ import annotations

import argparse
import math
import sys

from common import banner, median_time, plot, print_table, try_baseline, write_json

SHAPES = [  # (model, layer, M tokens, K in, N out)
    ("shakespeare GPT", "qkv", 768, 128, 384),
    ("shakespeare GPT", "mlp fc", 768, 128, 512),
    ("shakespeare GPT", "mlp proj", 768, 512, 128),
    ("MiniLM", "qkv", 1536, 384, 1152),
    ("MiniLM", "mlp fc", 1536, 384, 1536),
    ("MiniLM", "mlp proj", 1536, 1536, 384),
    ("GPT-2 small", "qkv", 1024, 768, 2304),
    ("GPT-2 small", "mlp proj", 1024, 3072, 768),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a PNG of forward GFLOP/s per shape")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from minillm.ops import linear

    info = banner("bench_linear: minillm linear vs F.linear (MKL) and oneDNN, fp32")
    reasons: dict = {}
    rows = []
    for model, layer, M, K, N in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(M, K, requires_grad=True)
        w = (torch.randn(N, K) / K ** 0.5).requires_grad_()
        b = torch.randn(N, requires_grad=True)
        dy = torch.randn(M, N)
        out = linear(x, w, b)
        grads = torch.autograd.grad(out, (x, w, b), dy)
        ref = F.linear(x, w, b)
        ref_grads = torch.autograd.grad(ref, (x, w, b), dy)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-4)

        def fwd(f):
            with torch.no_grad():
                return median_time(lambda: f(x, w, b), args.repeats, warmup=3)

        def fwd_bwd(f):
            return median_time(lambda: torch.autograd.grad(f(x, w, b), (x, w, b), dy), args.repeats, warmup=3)

        def onednn(x, w, b):
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

        t_ours, t_torch = fwd(linear), fwd(F.linear)
        t_dnn = try_baseline(lambda: fwd(onednn), reasons, "oneDNN")
        tb_ours, tb_torch = fwd_bwd(linear), fwd_bwd(F.linear)
        gflop = 2 * M * K * N / 1e9
        rows.append({
            "model": model, "layer": layer, "M,K,N": f"{M},{K},{N}",
            "minillm GFLOP/s": gflop / t_ours, "torch GFLOP/s": gflop / t_torch, "oneDNN GFLOP/s": gflop / t_dnn,
            "fwd vs torch": t_torch / t_ours, "fwd vs oneDNN": t_dnn / t_ours,
            "fwd+bwd ms": 1e3 * tb_ours, "torch fwd+bwd ms": 1e3 * tb_torch, "fwd+bwd vs torch": tb_torch / tb_ours,
        })
    print_table(rows, list(rows[0]))
    ratios = [r["fwd+bwd vs torch"] for r in rows]
    print(f"median fwd+bwd ratio vs torch: {sorted(ratios)[len(ratios) // 2]:.2f}"
          f" (min {min(ratios):.2f}); oneDNN failures: {reasons or 'none'}")
    write_json(args.json, {**info, "baseline_failures": reasons}, rows)
    for i, r in enumerate(rows):
        r["shape"] = i
    plot(args.plot, rows, "shape", ["minillm GFLOP/s", "torch GFLOP/s", "oneDNN GFLOP/s"],
         "linear forward, fp32 (shapes in the table's order)", "GFLOP/s")
    if any(math.isnan(r["minillm GFLOP/s"]) for r in rows):
        sys.exit("a minillm measurement failed")


if __name__ == "__main__":
    main()
