"""One contender of bench_index.py in its own process: a FlatIndex (float32, float16 or int8 storage) or a
FAISS IndexFlatIP (default or tuned) over the seeded corpus; times add() and each batch size's search and
writes <out>.json plus the ids of each batch (<out>-<Q>.npy).

    python benchmarks/index_worker.py KIND --n N --dim D --k K --out PREFIX --queries 1,16,256
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

# minillm's storage variants ("minillm" is float32) and the FAISS baselines.
KINDS = ("minillm", "minillm-float16", "minillm-int8", "faiss", "faiss-tuned")


def make_index(kind: str, d: int):
    if kind.startswith("minillm"):
        import minillm
        return minillm.FlatIndex(d, "ip", dtype=kind.split("-")[1] if "-" in kind else "float32")
    import faiss
    if kind == "faiss-tuned":
        faiss.cvar.distance_compute_blas_threshold = 0
    return faiss.IndexFlatIP(d)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--out", required=True, help="prefix of the files written")
    ap.add_argument("--queries", required=True, help="comma-separated batch sizes")
    args = ap.parse_args(argv)
    qs = [int(x) for x in args.queries.split(",")]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q = X[rng.integers(0, args.n, max(qs))] + 0.1 * rng.standard_normal((max(qs), args.dim), dtype=np.float32)
    index = make_index(args.kind, args.dim)
    t = time.perf_counter()
    index.add(X)
    res = {"add_s": time.perf_counter() - t, "search_ms": {}}
    for q in qs:
        index.search(Q[:q], args.k)  # warm-up
        times = []
        for _ in range(5 if q > 16 else 9):
            t = time.perf_counter()
            _, ids = index.search(Q[:q], args.k)
            times.append(time.perf_counter() - t)
        res["search_ms"][str(q)] = 1000 * statistics.median(times)
        np.save(f"{args.out}-{q}.npy", ids)
    json.dump(res, open(args.out + ".json", "w"))


if __name__ == "__main__":
    main()
