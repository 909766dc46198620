"""minillm as a transformers attention backend, against transformers' own "sdpa".

1. sentence-transformers all-MiniLM-L6-v2 on the 2,000 SQuAD sentences of bench_embeddings.py, loaded twice:
   attn_implementation "sdpa" and "minillm" (sentences/s, same batch size and threads).
2. A GPT-2 configuration (random weights): forward + backward step time of a padded training batch.
Outputs are compared before anything is timed.

    python benchmarks/bench_hf.py [--n 2000] [--batch-size 32] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_embeddings import squad_sentences  # noqa: E402
from common import banner, median_time, print_table, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import numpy as np
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    import minillm.integrations.transformers as mt
    from minillm.models import minilm_path

    mt.register()
    info = banner("bench_hf: transformers attn_implementation 'minillm' vs 'sdpa'", batch_size=args.batch_size)
    sentences = squad_sentences(args.n)
    path = str(minilm_path())
    st = {impl: SentenceTransformer(path, device="cpu", model_kwargs={"attn_implementation": impl})
          for impl in ("sdpa", "minillm")}
    emb = {impl: m.encode(sentences, batch_size=args.batch_size) for impl, m in st.items()}
    diff = float(np.abs(emb["sdpa"] - emb["minillm"]).max())
    print(f"correctness: sentence embeddings max |diff| {diff:.2e} over {len(sentences)} sentences")
    if diff > 1e-4:
        sys.exit("minillm and sdpa embeddings differ; not timing")
    times = {impl: median_time(lambda m=m: m.encode(sentences, batch_size=args.batch_size), args.repeats, 0)
             for impl, m in st.items()}
    rows = [{"case": f"MiniLM sentences/s ({len(sentences)} SQuAD)", "minillm": len(sentences) / times["minillm"],
             "sdpa": len(sentences) / times["sdpa"], "ratio": times["sdpa"] / times["minillm"]}]

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=6, n_head=6, n_embd=384, vocab_size=8192, n_positions=512,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                  eos_token_id=None, pad_token_id=0)
    models = {}
    for impl in ("sdpa", "minillm"):
        torch.manual_seed(0)
        m = transformers.GPT2LMHeadModel(cfg).train()
        m.set_attn_implementation(impl)
        models[impl] = m
    ids = torch.randint(1, 8192, (8, 256))
    mask = torch.ones_like(ids)
    lengths = torch.randint(64, 257, (8,))
    mask[torch.arange(256)[None, :] >= lengths[:, None]] = 0
    labels = ids.masked_fill(mask == 0, -100)
    losses = {impl: m(ids, attention_mask=mask, labels=labels).loss.item() for impl, m in models.items()}
    print(f"correctness: GPT-2 loss sdpa {losses['sdpa']:.6f} vs minillm {losses['minillm']:.6f}")
    if abs(losses["sdpa"] - losses["minillm"]) > 1e-4:
        sys.exit("GPT-2 losses differ; not timing")

    def step(m):
        m.zero_grad(set_to_none=True)
        m(ids, attention_mask=mask, labels=labels).loss.backward()

    t = {impl: median_time(lambda m=m: step(m), args.repeats + 2) for impl, m in models.items()}
    rows.append({"case": "GPT-2 (6x384, batch 8x256 padded) fwd+bwd ms", "minillm": 1000 * t["minillm"],
                 "sdpa": 1000 * t["sdpa"], "ratio": t["sdpa"] / t["minillm"]})
    print_table(rows, ["case", "minillm", "sdpa", "ratio"], floatfmt=".4g")
    write_json(args.json, info, rows)


if __name__ == "__main__":
    main()
