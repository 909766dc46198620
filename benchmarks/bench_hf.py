"""minillm inside Hugging Face models, against transformers' own "sdpa".

Two minillm configurations: "minillm attn" (attn_implementation="minillm", the attention backend alone)
and "minillm attn+linear" (also `replace_linear(model)`: the linear layers on minillm's GEMM).
1. sentence-transformers all-MiniLM-L6-v2 on the 2,000 SQuAD sentences of bench_embeddings.py
   (sentences/s, same batch size and threads).
2. A GPT-2 configuration (random weights): forward + backward step time of a padded training batch.
Outputs are compared before anything is timed.

    python benchmarks/bench_hf.py [--n 2000] [--batch-size 32] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_embeddings import squad_sentences
from common import banner, median_time, print_table, write_json


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
    info = banner("bench_hf: minillm attention backend (+ replace_linear) vs transformers 'sdpa'",
                  batch_size=args.batch_size)
    sentences = squad_sentences(args.n)
    path = str(minilm_path())
    impls = ("sdpa", "minillm attn", "minillm attn+linear")
    st = {}
    for impl in impls:
        st[impl] = SentenceTransformer(path, device="cpu",
                                       model_kwargs={"attn_implementation": "sdpa" if impl == "sdpa" else "minillm"})
        if impl.endswith("linear"):
            mt.replace_linear(st[impl])
    emb = {impl: m.encode(sentences, batch_size=args.batch_size) for impl, m in st.items()}
    diff = max(float(np.abs(emb["sdpa"] - emb[impl]).max()) for impl in impls[1:])
    print(f"correctness: sentence embeddings max |diff| {diff:.2e} over {len(sentences)} sentences")
    if diff > 1e-4:
        sys.exit("minillm and sdpa embeddings differ; not timing")
    times = {impl: median_time(lambda m=m: m.encode(sentences, batch_size=args.batch_size), args.repeats, 0)
             for impl, m in st.items()}
    rows = [{"case": f"MiniLM sentences/s ({len(sentences)} SQuAD)",
             **{impl: len(sentences) / times[impl] for impl in impls},
             **{f"ratio {impl}": times["sdpa"] / times[impl] for impl in impls[1:]}}]

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=6, n_head=6, n_embd=384, vocab_size=8192, n_positions=512,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                  eos_token_id=None, pad_token_id=0)
    models = {}
    for impl in impls:
        torch.manual_seed(0)
        m = transformers.GPT2LMHeadModel(cfg).train()
        m.set_attn_implementation("sdpa" if impl == "sdpa" else "minillm")
        if impl.endswith("linear"):
            mt.replace_linear(m)
        models[impl] = m
    ids = torch.randint(1, 8192, (8, 256))
    mask = torch.ones_like(ids)
    lengths = torch.randint(64, 257, (8,))
    mask[torch.arange(256)[None, :] >= lengths[:, None]] = 0
    labels = ids.masked_fill(mask == 0, -100)
    losses = {impl: m(ids, attention_mask=mask, labels=labels).loss.item() for impl, m in models.items()}
    print("correctness: GPT-2 loss " + ", ".join(f"{impl} {loss:.6f}" for impl, loss in losses.items()))
    if max(abs(losses["sdpa"] - losses[impl]) for impl in impls[1:]) > 1e-4:
        sys.exit("GPT-2 losses differ; not timing")

    def step(m):
        m.zero_grad(set_to_none=True)
        m(ids, attention_mask=mask, labels=labels).loss.backward()

    t = {impl: median_time(lambda m=m: step(m), args.repeats + 2) for impl, m in models.items()}
    rows.append({"case": "GPT-2 (6x384, batch 8x256 padded) fwd+bwd ms", **{impl: 1000 * t[impl] for impl in impls},
                 **{f"ratio {impl}": t["sdpa"] / t[impl] for impl in impls[1:]}})
    print_table(rows, list(rows[0]), floatfmt=".4g")
    write_json(args.json, info, rows)


if __name__ == "__main__":
    main()
