"""One contender of bench_topk.py in its own process: builds the seeded corpus and queries, checks minillm's
answers against the plain-torch reference, then times each batch size (or reads each call's peak extra memory)
and writes <out>.json plus the ids of each batch (<out>-<Q>.npy).

    python benchmarks/topk_worker.py KIND --n N --d D --k K --data random|clustered --out PREFIX
        --queries 1,16,256 --q-all 256 [--mode time|memory]

Separate processes keep FAISS's and usearch's OpenMP runtimes from sharing torch's. Run it as a script (its
folder is then first on sys.path, so `common` imports as a sibling) from a folder other than the repository
root, so that the installed minillm is the one imported.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from common import interleaved_medians, peak_extra_mb

KINDS = ("minillm", "minillm-fp16", "minillm-bf16", "minillm-int8", "torch", "numpy", "faiss", "faiss-tuned", "usearch")
MM_TILE = 16384  # corpus rows per torch.mm in the mm-rate reading


def make_data(n: int, d: int, q_all: int, data: str):
    """The corpus X (n, d) and queries Q (q_all, d), unit rows; every worker draws the same ones."""
    rng = np.random.default_rng(0)
    if data == "clustered":  # 1000 centres, points near them: many close scores, like real embeddings
        centres = rng.standard_normal((1000, d), dtype=np.float32)
        X = centres[rng.integers(0, 1000, n)] + 0.3 * rng.standard_normal((n, d), dtype=np.float32)
    else:
        X = rng.standard_normal((n, d), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q = X[rng.integers(0, n, q_all)] + 0.1 * rng.standard_normal((q_all, d), dtype=np.float32)
    return X, Q


class Contender:
    """run(q) -> ids for one kind; minillm kinds also check(q) and the readings timed in turn with them."""

    def __init__(self, kind: str, X: np.ndarray, Q: np.ndarray, k: int):
        self.kind, self.k = kind, k
        self.check = None  # check(batch): the call's (scores, ids) against the reference, or exit
        self.extra = {}    # name -> (make(batch) -> a callable timed in turn with the search)
        d = X.shape[1]
        if kind.startswith("minillm"):
            self._minillm(X, Q, k)
        elif kind == "torch":
            import torch
            Xt = torch.from_numpy(X)
            self.run = lambda q: torch.topk(torch.from_numpy(q) @ Xt.T, k, dim=1).indices.numpy()
        elif kind == "numpy":
            def run(q):
                s = q @ X.T
                part = np.argpartition(-s, k - 1, axis=1)[:, :k]
                order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
                return np.take_along_axis(part, order, 1)
            self.run = run
        elif kind.startswith("faiss"):
            import faiss
            if kind == "faiss-tuned":
                faiss.cvar.distance_compute_blas_threshold = 0
            index = faiss.IndexFlatIP(d)
            index.add(X)
            self.run = lambda q: index.search(q, k)[1]
        elif kind == "usearch":
            from usearch.index import MetricKind, search
            self.run = lambda q: search(X, q, k, MetricKind.IP, exact=True).keys
        else:
            raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")

    def _minillm(self, X: np.ndarray, Q: np.ndarray, k: int) -> None:
        import torch

        import minillm.ops
        from minillm.ops.reference import topk_search_reference

        kind = self.kind
        storage = kind.split("-")[1] if "-" in kind else "fp32"
        if storage == "int8":
            C, stored = minillm.ops.Int8Corpus(X), torch.from_numpy(X)
        elif storage == "fp32":
            C = stored = X
        else:
            C = torch.from_numpy(X).to({"fp16": torch.float16, "bf16": torch.bfloat16}[storage])
            stored = C.float()  # the exact answer for a 16-bit corpus is the one over its stored values
        search = lambda q: minillm.ops.topk_search(q, C, k, "ip")  # noqa: E731
        self.run = lambda q: search(q)[1]
        n_check = min(8, len(Q))  # rows of each batch checked: a brute-force sort over N per row
        ref = {}  # the reference's top-k scores of those rows, computed once

        def check(q):
            # The batch's own call, so the path under test is the one timed. Tie-aware: the k best scores are
            # unique even when their ids are not, and every id returned must carry its own exact score. The
            # int8 scan is approximate by design: its rescored scores are exact, its recall is in the table.
            s, ids = search(q)
            s, ids = torch.as_tensor(s)[:n_check], torch.as_tensor(ids)[:n_check]
            own = (torch.as_tensor(stored)[ids].double() * torch.from_numpy(q[:n_check, None, :]).double()).sum(-1)
            if not torch.allclose(s.double(), own, atol=1e-4, rtol=1e-4):
                sys.exit(f"{kind}: returned scores are not the exact scores of the returned ids; not timing")
            if storage == "int8":
                return
            if "s" not in ref:
                ref["s"] = topk_search_reference(torch.from_numpy(Q[:n_check]), torch.as_tensor(stored), k, "ip")[0]
            want = ref["s"][:len(s)]
            if not torch.allclose(s, want, atol=1e-4, rtol=1e-4):
                sys.exit(f"{kind}: top-{k} scores differ from the reference by {(s - want).abs().max():.3g}")

        self.check = check
        if storage == "fp32":
            Xt = torch.from_numpy(X)
            # The bandwidth bound of a scan: torch's multithreaded sum of the corpus, read in turn with each search.
            self.extra["read"] = lambda batch: (lambda: float(Xt.sum()))

            # The GEMM bound of a many-query scan: the same products as torch.mm over corpus tiles, nothing
            # selected (each tile's (T, Q) scores land in one reused buffer).
            def mm(batch):
                qT = torch.from_numpy(batch).T.contiguous()
                buf = torch.empty(MM_TILE, len(batch))

                def run():
                    for i in range(0, len(Xt), MM_TILE):
                        rows = min(MM_TILE, len(Xt) - i)
                        torch.mm(Xt[i:i + rows], qT, out=buf[:rows])
                return run

            self.extra["mm"] = mm
        else:
            # The fp32 kernel on the same data, timed in turn with the compressed one in this process: their ratio
            # is the storage's speed-up, free of the drift between separate processes on a shared machine.
            self.extra["fp32"] = lambda batch: (lambda: minillm.ops.topk_search(batch, X, k, "ip"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--d", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--data", choices=["random", "clustered"], required=True)
    ap.add_argument("--out", required=True, help="prefix of the files written")
    ap.add_argument("--queries", required=True, help="comma-separated batch sizes")
    ap.add_argument("--q-all", type=int, required=True, help="the run's largest Q: every worker draws the same queries")
    ap.add_argument("--mode", choices=["time", "memory"], default="time",
                    help="time: medians, ids and the readings; memory: each Q's peak extra memory")
    args = ap.parse_args(argv)
    qs = [int(x) for x in args.queries.split(",")]
    X, Q = make_data(args.n, args.d, args.q_all, args.data)
    c = Contender(args.kind, X, Q, args.k)

    if args.mode == "memory":
        # Run under common.PEAK_MEMORY_ENV, so each call's high-water mark is its own; a one-query call first
        # keeps lazy initialisation (thread pools, first-call caches) out of every reading.
        c.run(np.ascontiguousarray(Q[:1]))
        res = {"extra_mb": {}}
        for q in qs:
            batch = np.ascontiguousarray(Q[:q])
            res["extra_mb"][str(q)] = peak_extra_mb(lambda: c.run(batch), warmup=False)
        json.dump(res, open(args.out + ".json", "w"))
        return

    res = {"ms": {}, "ms_fp32_same_process": {}, "read_gbs": {}, "mm_gflops": {}}
    for q in qs:
        batch = np.ascontiguousarray(Q[:q])
        if c.check is not None:
            c.check(batch)
        last = {}  # the search's ids from its latest call
        # Timed in turn, each round starting one further along (common.interleaved_medians): a slow spell, or
        # what one call leaves in the caches for the next, falls on every contender alike. Few-query calls are
        # short, so they get more rounds.
        fns = {"run": lambda: last.update(ids=c.run(batch))}
        fns.update({name: make(batch) for name, make in c.extra.items() if name != "mm" or q >= 16})
        failures = {}
        med = interleaved_medians(fns, 15 if q <= 16 else 3, failures)  # one warm-up call each
        if failures:
            raise RuntimeError(failures)
        res["ms"][str(q)] = 1000 * med["run"]
        if "read" in med:
            res["read_gbs"][str(q)] = X.nbytes / med["read"] / 1e9
        if "mm" in med:
            res["mm_gflops"][str(q)] = 2 * q * X.shape[0] * X.shape[1] / med["mm"] / 1e9
        if "fp32" in med:
            res["ms_fp32_same_process"][str(q)] = 1000 * med["fp32"]
        np.save(f"{args.out}-{q}.npy", np.asarray(last["ids"], dtype=np.int64).reshape(q, args.k))
    json.dump(res, open(args.out + ".json", "w"))


if __name__ == "__main__":
    main()
