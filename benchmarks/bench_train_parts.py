"""The parts of a training step that minillm fuses, each against the unfused torch sequence it replaces, at nanoGPT's
baby GPT shapes (batch 12 x 64 tokens, d 128, 4 heads, 4 layers; options change them):

- clip+step: gradient clipping folded into fused AdamW's pass (`clip_grad_norm_and_step`) vs
  `clip_grad_norm_(foreach=True)` then `step()` (the weights after one step agree to rounding; checked first);
- attention packed: `attention_qkvpacked` forward + backward on one (B, N, 3H, D) projection vs `attention` of
  its three transposed views, the output transposed back to (B, N, C) (same output and gradient; checked first);
- layer_norm bf16: `layer_norm(..., out_dtype=torch.bfloat16)` forward + backward (bf16 gradient) vs
  `layer_norm(...).to(torch.bfloat16)` (bit for bit equal; checked first);
- bf16 step: the decoder's forward + backward under bf16 autocast with its pre-norm LayerNorms writing bf16 vs the
  norms followed by autocast's casts (the same loss bit for bit; checked first); `aten::_to_copy` calls per step
  of each are reported.

Times are medians of interleaved rounds (both contenders alike in a slow spell); ratio = unfused / fused.

    python benchmarks/bench_train_parts.py [--repeats 30] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import sys

from common import banner, interleaved_medians, print_table, write_json


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", help="write the results here")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    import torch

    from minillm.models import build_model, layers
    from minillm.ops import attention, attention_qkvpacked, layer_norm
    from minillm.training.optim import clip_grad_norm_and_step, make_adamw

    B, N, C, H = args.batch, args.block, args.d, args.heads
    info = banner("bench_train_parts: fused training-step parts vs the unfused torch sequence",
                  shape=f"batch {B} x {N}, d {C}, {H} heads, {args.layers} layers")
    torch.manual_seed(0)
    cfg = dict(model_type="decoder_only", vocab_size=65, d_model=C, num_heads=H, num_layers=args.layers,
               d_ff=4 * C, max_seq_len=N, dropout=0.0)
    model = build_model(cfg).train()
    ids = torch.randint(0, 65, (B, N))

    def grads_of(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = m(ids, labels=ids)
        loss.backward()
        return [p for p in m.parameters()]

    def check(name, ok, detail):
        if not ok:
            sys.exit(f"{name}: the fused path differs from the unfused one ({detail}); not timing")

    cases = {}

    # clip + step: two copies from the same weights and gradients, one step each, then compared
    fused_model, plain_model = model, copy.deepcopy(model)
    fused_params, plain_params = grads_of(fused_model), grads_of(plain_model)
    fused_opt, plain_opt = make_adamw(fused_model, 1e-3), make_adamw(plain_model, 1e-3)
    clip = 1e-3  # small enough that the clip coefficient is < 1 and matters
    clip_grad_norm_and_step(fused_opt, fused_params, clip)
    torch.nn.utils.clip_grad_norm_(plain_params, clip, foreach=True)
    plain_opt.step()
    diff = max((a - b).abs().max().item() for a, b in zip(fused_params, plain_params))
    check("clip+step", diff <= 1e-6, f"max weight difference {diff:.2e}")

    def plain_clip_step():
        torch.nn.utils.clip_grad_norm_(plain_params, clip, foreach=True)
        plain_opt.step()

    cases["clip+step"] = (lambda: clip_grad_norm_and_step(fused_opt, fused_params, clip), plain_clip_step)

    # attention over one packed projection, forward + backward
    qkv = torch.randn(B, N, 3 * H, C // H, requires_grad=True)
    dout = torch.randn(B, N, C)

    def packed():
        out = attention_qkvpacked(qkv, H, causal=True).reshape(B, N, C)  # (B, N, H, D) -> (B, N, C): a view
        return out, torch.autograd.grad(out, qkv, dout)[0]

    def views():
        t = qkv.transpose(1, 2)  # (B, 3H, N, D)
        out = attention(t[:, :H], t[:, H:2 * H], t[:, 2 * H:], causal=True).transpose(1, 2).reshape(B, N, C)
        return out, torch.autograd.grad(out, qkv, dout)[0]

    (o1, g1), (o2, g2) = packed(), views()
    diff = max((o1 - o2).abs().max().item(), (g1 - g2).abs().max().item())
    check("attention packed", diff <= 1e-5, f"max difference {diff:.2e}")
    cases["attention packed"] = (packed, views)

    # LayerNorm writing bf16, forward + backward with a bf16 gradient
    x = torch.randn(B * N, C, requires_grad=True)
    w, b = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
    dy = torch.randn(B * N, C).bfloat16()

    def ln(fused):
        y = layer_norm(x, w, b, out_dtype=torch.bfloat16) if fused else layer_norm(x, w, b).to(torch.bfloat16)
        return (y, *torch.autograd.grad(y, (x, w, b), dy))

    check("layer_norm bf16", all(torch.equal(a, c) for a, c in zip(ln(True), ln(False))), "not bit for bit")
    cases["layer_norm bf16"] = (lambda: ln(True), lambda: ln(False))

    # the bf16 step with and without the norms' fused casts
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(ids, labels=ids)
        loss.backward()
        return loss.detach()

    fused_norm = layers._norm_for_linear

    def unfused(norm, h):
        return norm(h)

    def plain_step():
        layers._norm_for_linear = unfused
        try:
            return step()
        finally:
            layers._norm_for_linear = fused_norm

    check("bf16 step", torch.equal(step(), plain_step()), "losses differ")

    def casts(fn):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    cast_counts = {"fused": casts(step), "unfused": casts(plain_step)}
    cases["bf16 step"] = (step, plain_step)

    rows, reasons = [], {}
    for name, (fused, plain) in cases.items():
        t = interleaved_medians({"fused": fused, "unfused": plain}, args.repeats, reasons, name)
        row = {"part": name, "minillm fused ms": 1e3 * t["fused"], "unfused ms": 1e3 * t["unfused"],
               "unfused / fused": t["unfused"] / t["fused"]}
        if name == "bf16 step":
            row["casts (fused / unfused)"] = f"{cast_counts['fused']} / {cast_counts['unfused']}"
        rows.append(row)
    columns = ["part", "minillm fused ms", "unfused ms", "unfused / fused", "casts (fused / unfused)"]
    print_table(rows, columns, floatfmt=".3f")
    write_json(args.json, {**info, "baseline_failures": reasons, "casts_per_step": cast_counts}, rows)


if __name__ == "__main__":
    main()
