"""all-MiniLM-L6-v2 sentence embeddings: minillm's encoder vs sentence-transformers.

Same 2,000 real sentences (SQuAD v1.1 dev questions and two-sentence context pieces), same batch
size, max length and threads. Embeddings are compared (cosine) before anything is timed.

    python benchmarks/bench_embeddings.py [--n 2000] [--batch-size 32] [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import DATA_DIR, banner, median_time, print_table, try_baseline, write_json


def squad_sentences(n: int) -> list:
    path = DATA_DIR / "squad_v1.1" / "dev-v1.1.json"
    if not path.is_file():
        sys.exit(f"SQuAD not found at {path}; set MINILLM_DATA to the folder holding squad_v1.1/")
    out = []
    for article in json.loads(path.read_text())["data"]:
        for para in article["paragraphs"]:
            sents = re.split(r"(?<=[.!?])\s+", para["context"].strip())
            out.extend(" ".join(sents[i:i + 2]) for i in range(0, len(sents), 2))
            out.extend(q["question"] for q in para["qas"])
            if len(out) >= n:
                return out[:n]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of sentences")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over all sentences (median)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import numpy as np
    import torch

    from minillm.models import SentenceEncoder, minilm_path

    sentences = squad_sentences(args.n)
    ours = SentenceEncoder.from_pretrained()
    lengths = [len(ours.tokenizer.encode(s, add_special_tokens=True)) for s in sentences]
    info = banner("bench_embeddings: all-MiniLM-L6-v2, minillm vs sentence-transformers",
                  sentences=f"{len(sentences)} SQuAD dev questions + 2-sentence contexts, tokens median "
                            f"{int(np.median(lengths))}, p90 {int(np.percentile(lengths, 90))}, max {max(lengths)}",
                  batch_size=args.batch_size, max_length=ours.max_length)
    reasons: dict = {}
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(minilm_path()), device="cpu")
        st.max_seq_length = ours.max_length
    except Exception as exc:
        st = None
        reasons["sentence-transformers"] = f"{type(exc).__name__}: {exc}"

    mine = ours.encode(sentences, batch_size=args.batch_size)
    worst_cos = math.nan
    if st is not None:
        theirs = st.encode(sentences, batch_size=args.batch_size)
        worst_cos = float(((mine * theirs).sum(1) / (np.linalg.norm(mine, axis=1) * np.linalg.norm(theirs, axis=1))).min())
        print(f"correctness: worst cosine vs sentence-transformers over {len(sentences)} sentences = {worst_cos:.7f}")
        if worst_cos < 0.9999:
            sys.exit("embeddings differ from sentence-transformers; not timing")

    with torch.inference_mode():
        t_ours = median_time(lambda: ours.encode(sentences, batch_size=args.batch_size), args.repeats, warmup=0)
        t_st = try_baseline(
            lambda: median_time(lambda: st.encode(sentences, batch_size=args.batch_size), args.repeats, warmup=0),
            reasons, "sentence-transformers") if st is not None else math.nan
    row = {
        "sentences": len(sentences),
        "minillm sent/s": len(sentences) / t_ours,
        "sentence-transformers sent/s": len(sentences) / t_st,
        "ratio": t_st / t_ours,
        "worst cosine": worst_cos,
    }
    print_table([row], list(row), floatfmt=".4g")
    write_json(args.json, {**info, "baseline_failures": reasons}, [row])


if __name__ == "__main__":
    main()
