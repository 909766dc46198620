"""Retrieval quality of the document store: BEIR SciFact (nDCG@10, recall@100) and SQuAD v1.1 dev
paragraph retrieval (recall@1, @5), for each search mode (dense, lexical = BM25 by SQLite FTS5, hybrid =
reciprocal rank fusion of both) with all-MiniLM-L6-v2 (minillm's encoder) and the hashing embedder.

    python benchmarks/eval_retrieval.py [--embedders minilm hashing-1024] [--modes dense lexical hybrid] [--json out.json]

Reference: all-MiniLM-L6-v2 scores 0.645 nDCG@10 on SciFact in the MTEB paper; BM25 0.665 (BEIR).
Targets: SciFact nDCG@10 lexical >= 0.64, hybrid >= 0.69 (with MiniLM).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections import defaultdict

from common import DATA_DIR, banner, print_table, write_json


def ndcg_at_k(ranked, relevant: dict, k: int) -> float:
    dcg = sum(relevant.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def make_embedder(name: str):
    from minillm.rag import HashingEmbedder, SentenceEncoderEmbedder

    return SentenceEncoderEmbedder() if name == "minilm" else HashingEmbedder(int(name.split("-")[1]) if "-" in name else 1024)


def build_store(embedder, ids, texts, batch_size):
    from minillm.rag import SimpleDocumentStore

    store = SimpleDocumentStore(embedding_dim=embedder.dim, embedder=embedder)
    store.add_documents(texts, ids=ids)
    t0 = time.perf_counter()
    store.compute_embeddings(batch_size=batch_size, show_progress=True)
    return store, time.perf_counter() - t0


def ranked_ids(store, queries, k, mode, batch_size):
    """Each query's top-k ids: queries embedded in batches of batch_size (and searched together)."""
    out = []
    for i in range(0, len(queries), batch_size):
        out += [[h["id"] for h in hits] for hits in store.search_batch(queries[i:i + batch_size], k, mode=mode)]
    return out


def scifact(store, mode, batch_size):
    root = DATA_DIR / "scifact"
    queries = {q["_id"]: q["text"] for q in map(json.loads, open(root / "queries.jsonl", encoding="utf-8"))}
    qrels = defaultdict(dict)
    with open(root / "qrels" / "test.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels[row["query-id"]][row["corpus-id"]] = int(row["score"])
    qids = sorted(qrels)
    t0 = time.perf_counter()
    rankings = ranked_ids(store, [queries[q] for q in qids], 100, mode, batch_size)
    ndcg, recall = [], []
    for qid, ranked in zip(qids, rankings):
        ndcg.append(ndcg_at_k(ranked, qrels[qid], 10))
        rel = {d for d, s in qrels[qid].items() if s > 0}
        recall.append(len(rel & set(ranked)) / len(rel))
    return {"dataset": "SciFact test", "mode": mode, "docs": len(store), "queries": len(qids),
            "nDCG@10": sum(ndcg) / len(ndcg), "recall@100": sum(recall) / len(recall),
            "recall@1": math.nan, "recall@5": math.nan,
            "search ms/query": 1000 * (time.perf_counter() - t0) / len(qids)}


def scifact_corpus():
    corpus = [json.loads(line) for line in open(DATA_DIR / "scifact" / "corpus.jsonl", encoding="utf-8")]
    return [d["_id"] for d in corpus], [(d.get("title", "") + " " + d["text"]).strip() for d in corpus]


def squad_data():
    data = json.loads((DATA_DIR / "squad_v1.1" / "dev-v1.1.json").read_text())["data"]
    paragraphs, questions = [], []
    for article in data:
        for para in article["paragraphs"]:
            pid = str(len(paragraphs))
            paragraphs.append(para["context"])
            questions.extend((q["question"], pid) for q in para["qas"])
    return paragraphs, questions


def squad(store, questions, mode, batch_size):
    t0 = time.perf_counter()
    rankings = ranked_ids(store, [q for q, _ in questions], 5, mode, batch_size)
    hits1 = sum(ranked[:1] == [pid] for (_, pid), ranked in zip(questions, rankings))
    hits5 = sum(pid in ranked for (_, pid), ranked in zip(questions, rankings))
    return {"dataset": "SQuAD v1.1 dev", "mode": mode, "docs": len(store), "queries": len(questions),
            "nDCG@10": math.nan, "recall@100": math.nan,
            "recall@1": hits1 / len(questions), "recall@5": hits5 / len(questions),
            "search ms/query": 1000 * (time.perf_counter() - t0) / len(questions)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedders", nargs="+", default=["minilm", "hashing-1024"],
                    help="minilm and/or hashing-DIM (default: minilm hashing-1024)")
    ap.add_argument("--datasets", nargs="+", default=["scifact", "squad"])
    ap.add_argument("--modes", nargs="+", default=["dense", "lexical", "hybrid"], choices=["dense", "lexical", "hybrid"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not (DATA_DIR / "scifact").is_dir():
        sys.exit(f"data not found under {DATA_DIR}; set MINILLM_DATA")
    info = banner("eval_retrieval: document store retrieval quality", embedders=args.embedders, modes=args.modes,
                  reference="all-MiniLM-L6-v2 SciFact nDCG@10 0.645 (MTEB); BM25 0.665 (BEIR)",
                  targets="SciFact nDCG@10: lexical >= 0.64, hybrid (MiniLM) >= 0.69")
    rows = []
    for name in args.embedders:
        embedder = make_embedder(name)
        for ds in args.datasets:
            if ds == "scifact":
                ids, texts = scifact_corpus()
            else:
                paragraphs, questions = squad_data()
                ids, texts = [str(i) for i in range(len(paragraphs))], paragraphs
            store, t_embed = build_store(embedder, ids, texts, args.batch_size)
            for mode in args.modes:
                if mode == "lexical" and name != args.embedders[0]:
                    continue  # BM25 does not depend on the embedder: once is enough
                row = scifact(store, mode, args.batch_size) if ds == "scifact" else \
                    squad(store, questions, mode, args.batch_size)
                row = {"embedder": embedder.name if mode != "lexical" else "-", **row, "embed s": t_embed}
                rows.append(row)
                print_table(rows[-1:], list(rows[-1]), floatfmt=".4f")
    print()
    print_table(rows, list(rows[0]), floatfmt=".4f")
    write_json(args.json, info, rows)


if __name__ == "__main__":
    main()
