"""minillm.FlatIndex (float32, float16 and int8 storage) vs faiss.IndexFlatIP (defaults, and tuned), each in
its own process.

In one process with torch, FAISS and torch would share one OpenMP runtime, which distorts both, so
every contender runs in a fresh subprocess on the same seeded data and writes its ids to disk; the
parent checks the ids against minillm's (recall@k) and prints the table.

"tuned" FAISS sets distance_compute_blas_threshold = 0 (this wheel only uses BLAS from Q >= 128000
otherwise) and OPENBLAS_CORETYPE for the CPU's vector unit (SkylakeX with AVX-512, Haswell with AVX2: its
bundled OpenBLAS detects an AVX-512 Zen 5 as Prescott).

    python benchmarks/bench_index.py [--n 1000000] [--dim 384] [--queries 1 16 256] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

from common import banner, openblas_coretype, print_table, write_json
from index_worker import KINDS

# Each contender runs index_worker.py in a fresh process; "x/minillm" columns are time ratios against minillm
# float32 (above 1: slower than it), recall is against its ids.
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "index_worker.py")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import numpy as np

    info = banner("bench_index: FlatIndex vs FAISS IndexFlatIP, separate processes", n=args.n, dim=args.dim, k=args.k)
    tmp = tempfile.mkdtemp()
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    results, reasons = {}, {}
    coretype = openblas_coretype()
    for kind in KINDS:
        e = dict(env, OPENBLAS_CORETYPE=coretype) if kind == "faiss-tuned" and coretype else env
        out = os.path.join(tmp, kind)
        proc = subprocess.run([sys.executable, WORKER, kind, "--n", str(args.n), "--dim", str(args.dim),
                               "--k", str(args.k), "--out", out, "--queries", ",".join(map(str, args.queries))],
                              env=e, capture_output=True, text=True, cwd=tempfile.gettempdir())
        if proc.returncode != 0:
            reasons[kind] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            print(f"  {kind} failed: {reasons[kind]}")
            continue
        results[kind] = json.load(open(out + ".json"))
    rows = []
    for q in args.queries:
        row = {"Q": q}
        mine = results.get("minillm", {}).get("search_ms", {}).get(str(q), math.nan)
        row["minillm ms"] = mine
        base = np.load(os.path.join(tmp, f"minillm-{q}.npy")) if "minillm" in results else None
        for kind in KINDS[1:]:
            ms = results.get(kind, {}).get("search_ms", {}).get(str(q), math.nan)
            row[f"{kind} ms"] = ms
            row[f"{kind}/minillm"] = ms / mine if mine == mine else math.nan
            if base is not None and kind in results:
                other = np.load(os.path.join(tmp, f"{kind}-{q}.npy"))
                row[f"{kind} recall"] = float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(base, other)]))
        rows.append(row)
    print_table(rows, list(rows[0]), floatfmt=".3g")
    for kind, r in results.items():
        print(f"{kind}: add {r['add_s']:.2f} s")
    write_json(args.json, {**info, "baseline_failures": reasons, "add_s": {k: r["add_s"] for k, r in results.items()}},
               rows)


if __name__ == "__main__":
    main()
