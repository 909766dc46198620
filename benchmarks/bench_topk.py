"""Exact top-k search: minillm.ops.topk_search vs torch (mm + topk), numpy (argpartition), FAISS IndexFlatIP
(defaults and tuned) and usearch exact search, every contender in its own subprocess on the same seeded data.
minillm also runs on compressed corpus storage: fp16, bf16, and int8 codes with exact rescoring (Int8Corpus);
their "x/minillm" columns are time ratios against the fp32 kernel (below 1 = faster) and recall is against it.

Separate processes keep FAISS's and usearch's OpenMP runtimes from sharing torch's. minillm's workers check
their results against the plain-torch reference (minillm.ops.reference) before timing. Each worker writes its
ids; the parent computes recall@k against minillm's exact result (ties aside, every exact method scores 1.0)
and prints ms per batch, queries/s, corpus GB/s scanned and the peak extra memory of each call ("MB"
columns), read in a second worker per contender whose allocator returns freed blocks (--no-memory skips it).
A baseline that would need a score matrix over --max-score-gb, or that fails, is nan with the reason.

    python benchmarks/bench_topk.py [--n 100000 1000000] [--d 384] [--queries 1 16 256] [--data random clustered]
    python benchmarks/bench_topk.py --device cuda --n 1000000 --queries 1 16 256 4096 --corpus-dtype float32 bfloat16
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

from common import PEAK_MEMORY_ENV, banner, openblas_coretype, plot, print_table, write_json
from topk_worker import KINDS

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "topk_worker.py")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--d", type=int, nargs="+", default=[384])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--data", nargs="+", default=["random"], choices=["random", "clustered"])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--max-score-gb", type=float, default=4.0, help="skip baselines needing a bigger Q x N matrix")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu (every contender, own processes) or cuda: minillm vs torch on the GPU, in process")
    ap.add_argument("--corpus-dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"],
                    help="--device cuda: corpus storage dtypes to time (the CPU run's minillm-fp16/-bf16 kinds)")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the peak-memory columns (a second worker per contender)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a PNG of queries/s against Q, every contender (the last data, d and N)")
    args = ap.parse_args()
    if args.device == "cuda":
        cuda_main(args)
        return

    import numpy as np

    coretype = openblas_coretype()
    info = banner("bench_topk: exact top-k, each contender in its own process", k=args.k,
                  faiss_tuning=f"distance_compute_blas_threshold=0, OPENBLAS_CORETYPE={coretype}")
    tmp = tempfile.mkdtemp()
    rows, reasons = [], {}
    for data in args.data:
        for d in args.d:
            for n in args.n:
                results = {}
                for kind in args.kinds:
                    qs = [q for q in args.queries
                          if kind.startswith("minillm") or kind in ("faiss", "faiss-tuned", "usearch")
                          or q * n * 4 / 1e9 <= args.max_score_gb]
                    for q in set(args.queries) - set(qs):
                        reasons[f"{kind} n={n} d={d} Q={q}"] = f"needs a {q * n * 4 / 1e9:.1f} GB score matrix"
                    if not qs:
                        continue
                    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
                    if kind == "faiss-tuned" and coretype:
                        env["OPENBLAS_CORETYPE"] = coretype
                    out = os.path.join(tmp, f"{kind}-{data}-{d}-{n}")

                    def launch(batch_sizes, mode="time"):
                        """Runs the worker on these Qs: (its results, None) or (None, the failure's last line)."""
                        dest = out + ("-memory" if mode == "memory" else "")
                        proc = subprocess.run([sys.executable, WORKER, kind, "--n", str(n), "--d", str(d),
                                               "--k", str(args.k), "--data", data, "--out", dest,
                                               "--queries", ",".join(map(str, batch_sizes)),
                                               "--q-all", str(max(args.queries)), "--mode", mode],
                                              env={**env, **PEAK_MEMORY_ENV} if mode == "memory" else env,
                                              capture_output=True, text=True, cwd=tempfile.gettempdir())
                        if proc.returncode == 0:
                            return json.load(open(dest + ".json")), None
                        err = proc.stderr.strip()
                        return None, err.splitlines()[-1] if err else f"exit {proc.returncode}"

                    def launch_all(mode, qs):
                        """Every Q in one worker; if that fails, each Q on its own (only the failing ones are
                        nan): one Q can take the whole process down (usearch aborts on std::bad_alloc at
                        Q=4096 x 1M)."""
                        res, last = launch(qs, mode)
                        if res is not None or len(qs) == 1:
                            return res, last
                        print(f"  {kind} n={n} d={d} failed ({last}); running each Q on its own")
                        for q in qs:
                            one, last_q = launch([q], mode)
                            if one is None:
                                if mode == "time":
                                    reasons[f"{kind} n={n} d={d} Q={q}"] = last_q
                                print(f"  {kind} n={n} d={d} Q={q} failed: {last_q}")
                            elif res is None:
                                res = one
                            else:
                                for key, part in one.items():
                                    res[key].update(part)
                        return res, last

                    res, last = launch_all("time", qs)
                    if res is None:
                        reasons[f"{kind} n={n} d={d}"] = last
                        print(f"  {kind} n={n} d={d} failed: {last}")
                        continue
                    # Peak memory in a second worker whose allocator returns freed blocks (PEAK_MEMORY_ENV),
                    # apart from the timings, which keep the default allocator.
                    timed = [q for q in qs if str(q) in res["ms"]]
                    mem = launch_all("memory", timed)[0] if args.memory else None
                    res["extra_mb"] = mem["extra_mb"] if mem else {}
                    results[kind] = (res, out)
                for q in args.queries:
                    row = {"data": data, "N": n, "d": d, "Q": q}
                    mine = results.get("minillm")
                    ref = np.load(f"{mine[1]}-{q}.npy") if mine else None
                    t_mine = mine[0]["ms"].get(str(q), math.nan) if mine else math.nan
                    for kind in args.kinds:
                        r = results.get(kind)
                        ms = r[0]["ms"].get(str(q), math.nan) if r else math.nan
                        row[f"{kind} ms"] = ms
                        row[f"{kind} MB"] = r[0]["extra_mb"].get(str(q), math.nan) if r else math.nan
                        if kind != "minillm":
                            row[f"{kind}/minillm"] = ms / t_mine
                        if kind.startswith("minillm-"):  # speed-up over fp32, both timed in one process
                            fp32 = r[0]["ms_fp32_same_process"].get(str(q), math.nan) if r else math.nan
                            row[f"{kind} speed-up (same process)"] = fp32 / ms
                        if r and ref is not None and str(q) in r[0]["ms"]:
                            ids = np.load(f"{r[1]}-{q}.npy")
                            row[f"{kind} recall"] = float(np.mean([len(set(a) & set(b)) / args.k
                                                                   for a, b in zip(ref, ids)]))
                    row["minillm GB/s"] = n * d * 4 / (t_mine / 1000) / 1e9
                    # A plain read of the corpus (torch sum), timed in turn with minillm's search in its process.
                    row["read GB/s"] = mine[0]["read_gbs"].get(str(q), math.nan) if mine else math.nan
                    row["minillm/read"] = row["minillm GB/s"] / row["read GB/s"]
                    # The GEMM bound (Q >= 16): torch.mm over corpus tiles, the same products with nothing selected,
                    # timed in turn with the search; the ratio of the rates is the search's share of it.
                    row["mm GFLOP/s"] = mine[0]["mm_gflops"].get(str(q), math.nan) if mine else math.nan
                    row["minillm/mm rate"] = (2 * q * n * d / (t_mine / 1000) / 1e9) / row["mm GFLOP/s"]
                    row["minillm q/s"] = q / (t_mine / 1000)
                    rows.append(row)
                cols = list(rows[-1])
                print_table(rows[-len(args.queries):], [c for c in cols if not c.endswith(("recall", " MB"))]
                            + [c for c in cols if c.endswith("recall")] + [c for c in cols if c.endswith(" MB")],
                            floatfmt=".3g")
    write_json(args.json, {**info, "baseline_failures": reasons}, rows)
    if rows:
        last = rows[-len(args.queries):]
        qps = [{"Q": r["Q"], **{kind: r["Q"] / (r[f"{kind} ms"] / 1000) for kind in args.kinds}} for r in last]
        plot(args.plot, qps, "Q", list(args.kinds),
             f"exact top-{args.k}, {last[0]['data']} N={last[0]['N']} d={last[0]['d']}", "queries/s", log=True)
    for key, why in reasons.items():
        print(f"nan: {key}: {why}")


def cuda_main(args) -> None:
    """On one GPU, in this process: minillm as dispatched ("minillm": its CUDA kernel only where the dispatch
    table says it was measured faster, else tiled mm + torch.topk with ties to the lower index), minillm's CUDA
    kernel forced ("kernel", MINILLM_CUDA_KERNELS=on), and plain torch (mm in the corpus dtype + topk, chunked
    to --max-score-gb), for each --corpus-dtype. Checked against the exact scores before timing."""
    import torch

    if not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available here")
    from common import interleaved_medians

    import minillm
    from minillm.ops import _backend
    from minillm.ops.reference import topk_search_torch

    if not _backend.cuda_kernels_built():
        sys.exit("--device cuda: minillm was built without its CUDA kernels (install with nvcc on PATH)")
    info = banner("bench_topk --device cuda: minillm (dispatched / kernel) vs torch mm+topk", k=args.k,
                  gpu=torch.cuda.get_device_name(), arch=list(torch.cuda.get_device_capability()),
                  cuda_kernels_mode=os.environ.get("MINILLM_CUDA_KERNELS", "auto"))
    dev, rows, reasons = torch.device("cuda"), [], {}
    gen = torch.Generator(device=dev).manual_seed(0)
    for d in args.d:
        for n in args.n:
            X32 = torch.randn(n, d, device=dev, generator=gen)
            X32 /= X32.norm(dim=1, keepdim=True)
            for dtype_name in args.corpus_dtype:
                X = X32.to(getattr(torch, dtype_name))
                for q in args.queries:
                    Q = X32[torch.randint(0, n, (q,), device=dev, generator=gen)] + 0.1 * torch.randn(
                        q, d, device=dev, generator=gen)
                    step = max(1, int(args.max_score_gb * 1e9 / (X.element_size() * n)))

                    def plain():
                        # What a torch user writes: scores in the corpus dtype, the top k of each row.
                        Qc = Q.to(X.dtype)
                        return torch.cat([torch.topk(Qc[i:i + step] @ X.T, args.k, dim=1).indices
                                          for i in range(0, q, step)])

                    def mine():
                        return minillm.ops.topk_search(Q, X, args.k, "ip")

                    def kernel():
                        with _backend.cuda_kernels("on"):
                            return mine()

                    label = f"{dtype_name} N={n} d={d} Q={q}"
                    want = topk_search_torch(Q, X, args.k, "ip")[0]  # exact fp32 scores of the stored corpus
                    for name, fn in (("minillm", mine), ("kernel", kernel)):
                        s, ids = fn()
                        own = (X[ids].float() * Q[:, None, :]).sum(-1)  # each id's own exact score
                        if not (torch.allclose(s, want, atol=1e-4, rtol=1e-4)
                                and torch.allclose(s, own, atol=1e-4, rtol=1e-4)):
                            sys.exit(f"{label}: {name} differs from the exact top-{args.k} by "
                                     f"{(s - want).abs().max().item():.3g}; not timing")
                    ids = kernel()[1]
                    recall = (ids[:, :, None] == plain()[:, None, :]).any(-1).float().mean().item()
                    t = interleaved_medians({"minillm": mine, "kernel": kernel, "torch": plain},
                                            10 if q <= 16 else 3, reasons, label)
                    rows.append({"dtype": dtype_name, "N": n, "d": d, "Q": q, "minillm ms": 1000 * t["minillm"],
                                 "kernel ms": 1000 * t["kernel"], "torch ms": 1000 * t["torch"],
                                 "torch/minillm": t["torch"] / t["minillm"], "torch/kernel": t["torch"] / t["kernel"],
                                 "kernel GB/s": X.numel() * X.element_size() / t["kernel"] / 1e9,
                                 "torch recall vs exact": recall})
                    print_table(rows[-1:], list(rows[-1]), floatfmt=".3g")
                    write_json(args.json, {**info, "baseline_failures": reasons}, rows, quiet=True)
    print()
    print_table(rows, list(rows[0]), floatfmt=".3g")
    for key, why in reasons.items():
        print(f"nan: {key}: {why}")
    write_json(args.json, {**info, "baseline_failures": reasons}, rows)


if __name__ == "__main__":
    main()
