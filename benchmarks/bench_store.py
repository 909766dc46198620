"""The document store at scale: N x 384 vectors (default 1M), without the embedding model.

Vectors are precomputed (random, normalised; a lookup "embedder" hands them to the store), so the
numbers are the store's own: adding documents, indexing vectors, saving, loading (memory-mapped),
memory after load, and query latency at top_k 10 with and without a metadata filter. Search results
are checked against brute force before latencies are taken.

    python benchmarks/bench_store.py [--n 1000000] [--dim 384] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time

from common import banner, print_table, write_json


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LookupEmbedder:
    """Returns precomputed vectors for texts "doc <i>" (and any vector for other texts)."""

    def __init__(self, vectors):
        self.vectors, self.dim, self.name = vectors, vectors.shape[1], f"lookup-{vectors.shape[1]}"

    def encode(self, texts, batch_size=32, show_progress=False):
        return self.vectors[[int(t.split()[1]) for t in texts]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import numpy as np

    from minillm.rag import SimpleDocumentStore

    info = banner("bench_store: SimpleDocumentStore at scale (model excluded)", n=args.n, dim=args.dim)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    emb = LookupEmbedder(vectors)
    texts = [f"doc {i}" for i in range(args.n)]
    metas = [{"shard": i % 10} for i in range(args.n)]
    rows = []

    store = SimpleDocumentStore(embedding_dim=args.dim, embedder=emb)
    t0 = time.perf_counter()
    store.add_documents(texts, metadatas=metas, ids=[str(i) for i in range(args.n)])
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.compute_embeddings(batch_size=4096, show_progress=False)
    t_index = time.perf_counter() - t0
    rows.append({"step": "add_documents", "seconds": t_add, "per second": args.n / t_add})
    rows.append({"step": "compute_embeddings (lookup, no model)", "seconds": t_index, "per second": args.n / t_index})

    queries = vectors[rng.integers(0, args.n, args.queries)] + 0.05 * rng.standard_normal(
        (args.queries, args.dim), dtype=np.float32)
    # Correctness first: the store's top 10 is brute force's top 10.
    for q in queries[:3]:
        want = np.argsort(-(vectors @ (q / np.linalg.norm(q))), kind="stable")[:10]
        got = [int(h["id"]) for h in store.search(q, top_k=10)]
        assert got == want.tolist(), "store search differs from brute force"
    print("correctness: top-10 equals brute force on 3 queries")

    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "store")
    t0 = time.perf_counter()
    store.save(path)
    t_save = time.perf_counter() - t0
    rows.append({"step": "save", "seconds": t_save, "per second": args.n / t_save})
    del store
    before = rss_mb()
    t0 = time.perf_counter()
    loaded = SimpleDocumentStore.load(path, embedder=emb, mmap=True)
    t_load = time.perf_counter() - t0
    after = rss_mb()
    rows.append({"step": "load (mmap)", "seconds": t_load, "per second": args.n / t_load})

    def latency(**kw):
        times = []
        for q in queries:
            t = time.perf_counter()
            loaded.search(q, top_k=10, **kw)
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times[3:])

    lat = latency()
    lat_f = latency(filter={"shard": 3})
    rows.append({"step": "query top_k=10 (median ms)", "seconds": lat / 1000, "per second": 1000 / lat})
    rows.append({"step": "query top_k=10, filter shard=3 (10%) (median ms)", "seconds": lat_f / 1000,
                 "per second": 1000 / lat_f})
    print_table(rows, ["step", "seconds", "per second"], floatfmt=".4g")
    vec_mb = args.n * args.dim * 4 / 2**20
    print(f"memory: RSS {before:.0f} MB before load, {after:.0f} MB after (vectors on disk: {vec_mb:.0f} MB, "
          f"memory-mapped), after queries {rss_mb():.0f} MB")
    write_json(args.json, {**info, "rss_mb_before_load": before, "rss_mb_after_load": after,
                           "vectors_mb": vec_mb}, rows)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
