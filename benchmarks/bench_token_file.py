"""Token files at scale: tokenize a large corpus into a memory-mapped token file (minillm.training.TokenDataset)
and read training batches back, with the peak memory each phase adds.

The corpus is --corpus, or Tiny Shakespeare repeated to --gb gigabytes (documents of 40 lines) written to a
temporary folder. Build: tokens/s and the peak resident memory the build added (ru_maxrss). Read: random
block_size windows through a DataLoader with the clm collator, tokens/s and the memory reading added. The
baseline column is what holding the corpus as one int64 tensor (torch.tensor of the token list, the in-memory
alternative) would take.

    python benchmarks/bench_token_file.py --gb 2
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time

from common import DATA_DIR, banner, print_table, write_json


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", help="a text file (default: Tiny Shakespeare repeated to --gb)")
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--read-batches", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers of the read phase")
    ap.add_argument("--build-workers", type=int, default=None,
                    help="TokenDataset.build's tokenizing processes (default: its own, the CPUs up to 8; 0: in-process)")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="then train a small GPT (4 layers, d 128) this many steps with the Trainer on the token file")
    ap.add_argument("--keep", action="store_true", help="keep the generated corpus and token file")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import torch
    from torch.utils.data import DataLoader

    from minillm.tokenizers import CharTokenizer
    from minillm.training import Collator, TokenDataset

    work = tempfile.mkdtemp(prefix="minillm-token-file-")
    try:
        shakespeare = (DATA_DIR / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
        corpus = args.corpus
        if corpus is None:
            corpus = os.path.join(work, "corpus.txt")
            lines = shakespeare.splitlines(keepends=True)
            docs = ["".join(lines[i:i + 40]).strip("\n") + "\n\n" for i in range(0, len(lines), 40)]
            block = "".join(docs)
            with open(corpus, "w", encoding="utf-8") as f:
                for _ in range(max(1, int(args.gb * 1e9 / len(block)))):
                    f.write(block)
        size = os.path.getsize(corpus)
        tok = CharTokenizer.from_texts(shakespeare if args.corpus is None else open(corpus, encoding="utf-8").read(1 << 24))
        info = banner("bench_token_file: a corpus tokenized into a memory-mapped token file, and read back",
                      corpus=f"{corpus}: {size / 1e9:.2f} GB", tokenizer=f"characters, vocab {tok.vocab_size}",
                      threads=torch.get_num_threads())

        base = peak_mb()
        t0 = time.perf_counter()
        ds = TokenDataset.build(corpus, tok, os.path.join(work, "train.bin"), block_size=args.block_size,
                                num_workers=args.build_workers)
        build_s = time.perf_counter() - t0
        build_peak = peak_mb() - base
        print(f"build: {ds.n_tokens:,} tokens in {build_s:.1f} s, peak memory +{build_peak:.0f} MB")

        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0),
                            collate_fn=Collator(tok, "clm"), num_workers=args.workers)
        base = peak_mb()
        t0 = time.perf_counter()
        n = 0
        for i, batch in enumerate(loader):
            n += batch["input_ids"].numel()
            if i + 1 >= args.read_batches:
                break
        read_s = time.perf_counter() - t0
        read_peak = peak_mb() - base
        print(f"read: {n:,} tokens in {read_s:.2f} s, peak memory +{read_peak:.0f} MB")
        row = {"corpus GB": size / 1e9, "tokens": ds.n_tokens, "token file GB": os.path.getsize(ds.path) / 1e9,
               "build tokens/s": ds.n_tokens / build_s, "build peak MB": build_peak,
               "read tokens/s": n / read_s, "read peak MB": read_peak,
               "int64 tensor MB (baseline)": ds.n_tokens * 8 / 1e6}
        if args.train_steps > 0:
            from minillm.models import DecoderOnlyModel
            from minillm.training import Trainer

            torch.manual_seed(0)
            model = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": tok.vocab_size, "d_model": 128,
                                      "num_heads": 4, "num_layers": 4, "max_seq_len": args.block_size,
                                      "dropout": 0.0})
            trainer = Trainer(model, loader, None, learning_rate=1e-3, checkpoint_dir=None, max_steps=args.train_steps,
                              eval_interval=args.train_steps, progress=False)
            base = peak_mb()
            t0 = time.perf_counter()
            res = trainer.train(epochs=1)
            train_s = time.perf_counter() - t0
            row["train tokens/s"] = res["steps"] * args.batch_size * args.block_size / train_s
            row["train peak MB"] = peak_mb() - base
            print(f"train: {res['steps']} steps in {train_s:.1f} s, peak memory +{row['train peak MB']:.0f} MB")
        print_table([row], list(row), floatfmt=".4g")
        write_json(args.json, info, [row])
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
