"""KV-cache decoding speed: minillm's DecoderOnlyModel vs Hugging Face GPT2LMHeadModel (sdpa).

Both models hold the same random GPT-2 weights (copied from the HF model), so the benchmark first
checks that their prompt logits agree and that greedy decoding produces the same tokens; then it
times greedy generation of --new-tokens tokens after a --prompt-len prompt at each batch size.

    python benchmarks/bench_generate.py [--layers 6 --heads 6 --width 384 --vocab 8192] [--json out.json]
"""
from __future__ import annotations

import argparse
import math
import sys

from common import banner, median_time, print_table, try_baseline, write_json


def gpt2_to_minillm(hf_model, max_seq_len: int):
    """A DecoderOnlyModel with the weights of a transformers GPT2LMHeadModel (minillm.models.hf_gpt2's mapping)."""
    from minillm.models import DecoderOnlyModel
    from minillm.models.hf_gpt2 import gpt2_config, gpt2_weights

    model = DecoderOnlyModel(gpt2_config(hf_model.config.to_dict(), max_seq_len))
    sd = hf_model.transformer.state_dict()
    model.load_state_dict(gpt2_weights(sd.__getitem__, hf_model.config.n_layer), strict=False)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import torch
    import transformers

    torch.manual_seed(0)
    n_pos = 1024
    hf_config = transformers.GPT2Config(vocab_size=args.vocab, n_positions=n_pos, n_embd=args.width,
                                        n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf.set_attn_implementation("sdpa")
    ours = gpt2_to_minillm(hf, n_pos)
    info = banner("bench_generate: greedy KV-cache decoding, minillm DecoderOnlyModel vs transformers GPT2 (sdpa)",
                  model=f"{args.layers} layers, {args.heads} heads, width {args.width}, vocab {args.vocab}",
                  decoding=f"{args.prompt_len}-token prompt, {args.new_tokens} new tokens, greedy")

    prompt = torch.randint(0, args.vocab, (max(args.batch_sizes), args.prompt_len))
    with torch.inference_mode():
        diff = (hf(prompt).logits - ours(prompt)[0]).abs().max().item()
        a = ours.generate(prompt[:2], max_new_tokens=64, temperature=0)
        b = hf.generate(prompt[:2], max_new_tokens=64, min_new_tokens=64, do_sample=False)
    print(f"correctness: prompt logits max |diff| {diff:.2e}; greedy 64 tokens identical: {torch.equal(a, b)}")
    if diff > 1e-3 or not torch.equal(a, b):
        sys.exit("minillm and transformers disagree; not timing")

    rows, reasons = [], {}
    for bs in args.batch_sizes:
        p = prompt[:bs]
        n = args.new_tokens
        with torch.inference_mode():
            t_ours = median_time(lambda: ours.generate(p, max_new_tokens=n, temperature=0), args.repeats)
            t_hf = try_baseline(lambda: median_time(
                lambda: hf.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False), args.repeats),
                reasons, f"transformers batch {bs}")
        rows.append({
            "batch": bs,
            "minillm tok/s": bs * n / t_ours,
            "transformers tok/s": bs * n / t_hf,
            "minillm ms/step": 1000 * t_ours / n,
            "transformers ms/step": 1000 * t_hf / n,
            "ratio": t_hf / t_ours if not math.isnan(t_hf) else math.nan,
        })
    print_table(rows, list(rows[0]))
    write_json(args.json, {**info, "baseline_failures": reasons}, rows)


if __name__ == "__main__":
    main()
