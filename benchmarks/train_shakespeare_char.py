"""nanoGPT's CPU "baby GPT" on Tiny Shakespeare (character level): minillm vs the same model in plain PyTorch.

Configuration as nanoGPT's shakespeare_char CPU example: 90/10 split by position, n_layer 4, n_head 4,
n_embd 128, block 64, batch 12, 2000 iterations, lr 1e-3 -> 1e-4 cosine with 100 warmup, AdamW betas
(0.9, 0.99), weight decay 0.1, grad clip 1.0, dropout 0, no biases. Both runs draw the same batches
from the same seed; minillm's model trains with minillm's optimizer step as the Trainer runs it (make_adamw:
fused, with the clip coefficient applied in its pass, clip_grad_norm_and_step), the plain one with torch's AdamW
and clip_grad_norm_ as nanoGPT runs them on a CPU. Reports minillm's validation loss after --iters
iterations (mean over --eval-iters batches; --plain-full-run trains the plain model as long for its loss too)
and ms per iteration of both, measured side by side in alternating rounds.

    python benchmarks/train_shakespeare_char.py --data ../shared/data/tinyshakespeare/input.txt
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from common import DATA_DIR, banner, print_table, write_json


def build_plain_gpt(vocab: int, n_layer: int, n_head: int, n_embd: int, block: int):
    """nanoGPT's GPT in plain PyTorch (F.scaled_dot_product_attention), bias-free, dropout 0."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class LayerNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = LayerNorm(n_embd), LayerNorm(n_embd)
            self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
            self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
            self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
            self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(n_embd, dim=2)
            q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + self.c_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = LayerNorm(n_embd)
            self.lm_head = nn.Linear(n_embd, vocab, bias=False)
            self.lm_head.weight = self.wte.weight
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for b in self.blocks:
                x = b(x)
            logits = self.lm_head(self.ln_f(x))
            return logits, F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    return GPT()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA_DIR / "tinyshakespeare" / "input.txt"))
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--eval-iters", type=int, default=200, help="validation batches for the final loss")
    ap.add_argument("--timing-iters", type=int, default=200,
                    help="timed iterations per model, run side by side in alternating rounds of 20")
    ap.add_argument("--plain-full-run", action="store_true",
                    help="also train the plain-PyTorch model for --iters iterations and report its val loss")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--streaming", action="store_true",
                    help="tokenize once into token files (minillm.training.TokenDataset) and read every batch from "
                         "their memory maps, as nanoGPT's train.bin (same batches, so the same losses)")
    ap.add_argument("--bf16", action="store_true",
                    help="train minillm's model under bf16 autocast (Trainer(bf16=True)); the plain model is timed "
                         "both in fp32 (nanoGPT on a CPU) and under bf16 autocast, the ratio against its faster")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import numpy as np
    import torch

    from minillm.models import DecoderOnlyModel
    from minillm.tokenizers import CharTokenizer
    from minillm.training.optim import clip_grad_norm_and_step, make_adamw

    if not os.path.isfile(args.data):
        sys.exit(f"no data at {args.data}")
    text = open(args.data, encoding="utf-8").read()
    tok = CharTokenizer.from_texts(text, special_tokens={})  # nanoGPT's 65-character vocabulary
    data = np.array(tok.encode(text), dtype=np.int64)
    n = int(0.9 * len(data))
    train_data, val_data = data[:n], data[n:]
    if args.streaming:  # the same split, from token files read through np.memmap
        import tempfile

        from minillm.training import TokenDataset

        token_dir = tempfile.mkdtemp(prefix="minillm-shakespeare-")
        # one character per token: the split by position is a split of the text at the same index
        train_data = TokenDataset.build([text[:n]], tok, os.path.join(token_dir, "train.bin"), block_size=65,
                                        append_eos=False).tokens()
        val_data = TokenDataset.build([text[n:]], tok, os.path.join(token_dir, "val.bin"), block_size=65,
                                      append_eos=False).tokens()
        assert np.array_equal(train_data, data[:n]) and np.array_equal(val_data, data[n:])
    del data
    block, batch, n_layer, n_head, n_embd = 64, 12, 4, 4, 128
    info = banner("train_shakespeare_char: nanoGPT baby GPT, minillm vs plain PyTorch",
                  data=f"{args.data}: {len(text)} characters, vocab {tok.vocab_size}, {len(train_data)} train / "
                       f"{len(val_data)} val tokens" + (" (token files, memory-mapped)" if args.streaming else ""),
                  config=f"n_layer {n_layer}, n_head {n_head}, n_embd {n_embd}, block {block}, batch {batch}, "
                         f"{args.iters} iters")

    def get_batch(split, gen):
        d = train_data if split == "train" else val_data
        ix = torch.randint(len(d) - block, (batch,), generator=gen)
        x = torch.stack([torch.from_numpy(d[i:i + block].astype(np.int64)) for i in ix.tolist()])
        y = torch.stack([torch.from_numpy(d[i + 1:i + 1 + block].astype(np.int64)) for i in ix.tolist()])
        return x, y

    def lr_at(it):
        warmup, lr, min_lr = 100, 1e-3, 1e-4
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = min(1.0, (it - warmup) / max(1, args.iters - warmup))  # the timing rounds may run past --iters
        return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)

    class Run:
        """One model's training loop (nanoGPT's: AdamW, no decay on norms, cosine lr, clipping), steppable."""

        def __init__(self, model, forward, minillm_optimizer, bf16=False):
            self.model, self.forward, self.it, self.times = model, forward, 0, []
            self.bf16 = bf16  # bf16 autocast (fp32 weights and optimizer), as Trainer(bf16=True)
            if minillm_optimizer:  # as minillm's Trainer trains: its AdamW (fused) and clipping
                self.opt, self.fold_clip = make_adamw(model, 1e-3, 0.1, (0.9, 0.99)), True
            else:  # as nanoGPT's loop on a CPU: torch's AdamW as it runs there by default (not fused)
                decay = [p for p in model.parameters() if p.dim() >= 2]
                no_decay = [p for p in model.parameters() if p.dim() < 2]
                self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                              {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
                self.fold_clip = False
            self.gen = torch.Generator().manual_seed(args.seed)

        def steps(self, n):
            for _ in range(n):
                for g in self.opt.param_groups:
                    g["lr"] = lr_at(self.it)
                x, y = get_batch("train", self.gen)
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                    loss = self.forward(self.model, x, y)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.fold_clip:  # as the Trainer steps: the clip coefficient applied in the fused AdamW's pass
                    clip_grad_norm_and_step(self.opt, self.model.parameters(), 1.0)
                else:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                    self.opt.step()
                self.times.append(time.perf_counter() - t0)
                self.it += 1

        def val_loss(self):
            self.model.eval()
            vgen = torch.Generator().manual_seed(args.seed + 1)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                val = float(np.mean([self.forward(self.model, *get_batch("val", vgen)).item()
                                     for _ in range(args.eval_iters)]))
            self.model.train()
            return val

        def ms_per_iter(self, skip=0):
            return 1000 * float(np.median(self.times[skip:]))

    torch.manual_seed(args.seed)
    ours = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": tok.vocab_size, "d_model": n_embd,
                             "num_heads": n_head, "num_layers": n_layer, "max_seq_len": block, "dropout": 0.0,
                             "bias": False})
    torch.manual_seed(args.seed)
    plain = build_plain_gpt(tok.vocab_size, n_layer, n_head, n_embd, block)

    # Correctness before timing: with identical weights the two models give the same loss.
    with torch.no_grad():
        src = dict(plain.named_parameters())
        mapping = {"embed.tok.weight": "wte.weight", "embed.pos.weight": "wpe.weight", "norm_f.weight": "ln_f.weight"}
        for i in range(n_layer):
            for a, b in [("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv", "c_attn"), ("attn.proj", "c_proj"),
                         ("mlp.fc", "c_fc"), ("mlp.proj", "mlp_proj")]:
                mapping[f"blocks.{i}.{a}.weight"] = f"blocks.{i}.{b}.weight"
        probe = DecoderOnlyModel(ours.config)
        for name, p in probe.named_parameters():
            p.copy_(src[mapping[name]])
        x, y = get_batch("train", torch.Generator().manual_seed(0))
        diff = abs(probe(x, targets=y)[1].item() - plain(x, y)[1].item())
    print(f"correctness: loss of identical weights differs by {diff:.2e}")
    if diff > 1e-4:
        sys.exit("the two models disagree; not timing")

    def forward_ours(m, x, y):
        return m(x, targets=y)[1]

    def forward_plain(m, x, y):
        return m(x, y)[1]

    t0 = time.perf_counter()
    full = Run(ours, forward_ours, True, args.bf16)
    full.steps(args.iters)
    val_ours = full.val_loss()
    print(f"minillm{' (bf16 autocast)' if args.bf16 else ''}: {args.iters} iters, val loss {val_ours:.4f}, {full.ms_per_iter(20):.2f} ms/iter "
          f"({time.perf_counter() - t0:.0f} s)")
    val_plain = math.nan
    if args.plain_full_run:
        plain_full = Run(build_plain_gpt(tok.vocab_size, n_layer, n_head, n_embd, block), forward_plain, False)
        plain_full.steps(args.iters)
        val_plain = plain_full.val_loss()
        print(f"plain PyTorch: {args.iters} iters, val loss {val_plain:.4f}")

    # Speed, side by side: fresh models train in alternating rounds of 20 iterations (after 20 warm-up
    # iterations each), so that both see the same phases of a shared machine's load.
    # With --bf16 the plain model is also timed under bf16 autocast, and the ratio is against its faster form.
    torch.manual_seed(args.seed)
    runs = {"minillm": Run(DecoderOnlyModel(ours.config), forward_ours, True, args.bf16)}
    runs["plain PyTorch"] = Run(plain, forward_plain, False)
    if args.bf16:
        runs["plain PyTorch bf16"] = Run(build_plain_gpt(tok.vocab_size, n_layer, n_head, n_embd, block),
                                         forward_plain, False, True)
    for r in runs.values():
        r.steps(20)
    rounds = max(1, args.timing_iters // 20)
    for _ in range(rounds):
        for r in runs.values():
            r.steps(20)
    ms = {name: r.ms_per_iter(20) for name, r in runs.items()}
    print(f"side by side, {rounds} rounds of 20 iterations each: "
          + ", ".join(f"{name} {v:.2f} ms/iter" for name, v in ms.items()))
    ms_ours, ms_plain = ms["minillm"], min(v for name, v in ms.items() if name != "minillm")
    row = {"iters": args.iters, "precision": "bf16 autocast" if args.bf16 else "fp32",
           "minillm val loss": val_ours, "nanoGPT reference val loss": 1.886, "plain val loss": val_plain,
           **{f"{name} ms/iter": v for name, v in ms.items()}, "speed ratio": ms_plain / ms_ours}
    print_table([row], list(row), floatfmt=".4g")
    write_json(args.json, info, [row])


if __name__ == "__main__":
    main()
