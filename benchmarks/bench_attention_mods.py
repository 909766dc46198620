"""minillm.ops.attention with the modern models' attention variants vs what a torch user runs for each, side by
side in one run: grouped-query heads (torch SDPA with enable_gqa), a sliding window (Mistral: SDPA with the dense
window mask), soft-capping (Gemma 2: transformers' eager formula, SDPA cannot), attention sinks (gpt-oss: the
eager formula with a sink column), ALiBi (SDPA with the materialised (H, N, N) bias) and an additive bias (T5:
SDPA with the float mask; fwd+bwd includes the bias's gradient). Decoder shapes: causal, H query heads over Hkv
key/value heads.

Every case is checked against the fp64 reference (minillm.ops.reference.attention_reference) before it is
timed, minillm and the baseline both; a baseline that fails records nan with its reason.

    python benchmarks/bench_attention_mods.py [--n 1024 4096] [--window 256] [--dtype float32] [--json out.json]
"""
from __future__ import annotations

import argparse
import math
import sys

from common import banner, interleaved_medians, print_table, write_json


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--b", type=int, default=1)
    ap.add_argument("--h", type=int, default=8)
    ap.add_argument("--hkv", type=int, default=2)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--window", type=int, default=256, help="sliding window (keys per query, Mistral's W)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--json", help="write the results here")
    return ap.parse_args(argv)


CASES = ("gqa", "window", "softcap", "sinks", "alibi", "bias")


def make_case(name, q, k, v, W):
    """(minillm's call, the baseline's call, the reference's keywords, bias tensor or None) for one case."""
    import torch
    import torch.nn.functional as F

    from minillm.ops import attention

    B, H, N, D = q.shape
    G = H // k.shape[1]
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    causal_mask = j <= i

    def eager(s_extra=None, softcap=None, sinks=None, mask=causal_mask):
        # transformers' eager attention: repeated K/V, scores, softcap, mask, (sink column), softmax, p v
        kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        s = (q @ kr.transpose(-1, -2)) * D ** -0.5
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if s_extra is not None:
            s = s + s_extra
        s = s.masked_fill(~mask, float("-inf"))
        if sinks is not None:
            s = torch.cat([s, sinks[None, :, None, None].to(s.dtype).expand(B, H, N, 1)], -1)
        p = torch.softmax(s.float(), -1).to(q.dtype)
        return p[..., :N] @ vr

    if name == "gqa":
        return (lambda: attention(q, k, v, causal=True),
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), {}, None)
    if name == "window":
        band = causal_mask & (j > i - W)
        return (lambda: attention(q, k, v, causal=True, window=(W - 1, 0)),
                lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True),
                {"window": (W - 1, 0)}, None)
    if name == "softcap":
        return (lambda: attention(q, k, v, causal=True, softcap=20.0), lambda: eager(softcap=20.0),
                {"softcap": 20.0}, None)
    if name == "sinks":
        sinks = torch.randn(H)
        return (lambda: attention(q, k, v, causal=True, sinks=sinks), lambda: eager(sinks=sinks), {"sinks": sinks},
                None)
    if name == "alibi":
        slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
        dense = (-slopes[:, None, None] * (i - j).abs()).masked_fill(~causal_mask, float("-inf")).to(q.dtype)
        return (lambda: attention(q, k, v, causal=True, alibi_slopes=slopes),
                lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True),
                {"alibi_slopes": slopes}, None)
    if name == "bias":
        bias = torch.randn(1, H, N, N, dtype=q.dtype, requires_grad=True)
        return (lambda: attention(q, k, v, bias=bias),
                lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True),
                {"bias": bias}, bias)
    raise ValueError(name)


def main() -> None:
    args = parse_args()
    import torch

    from minillm.ops.reference import attention_reference

    dtype = getattr(torch, args.dtype)
    info = banner("bench_attention_mods: minillm's attention variants vs torch", dtype=args.dtype,
                  shape=f"B={args.b} H={args.h} Hkv={args.hkv} D={args.d}", window=args.window)
    rows, reasons = [], {}
    torch.manual_seed(0)
    for N in args.n:
        q = torch.randn(args.b, args.h, N, args.d, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(args.b, args.hkv, N, args.d, dtype=dtype, requires_grad=True) for _ in range(2))
        grad = torch.randn_like(q)
        for name in args.cases:
            mine, base, ref_kw, bias = make_case(name, q, k, v, args.window)
            causal = name != "bias"
            with torch.no_grad():
                want = attention_reference(q.double(), k.double(), v.double(), causal=causal,
                                           **{n: (t.double() if isinstance(t, torch.Tensor) else t)
                                              for n, t in ref_kw.items()})
                tol = 1e-4 if dtype == torch.float32 else 5e-2
                err = (mine().double() - want).abs().max().item()
                if not err <= tol:
                    sys.exit(f"N={N} {name}: minillm differs from the reference by {err:.2e}; not timing")
                try:
                    base_err = (base().double() - want).abs().max().item()
                except Exception as exc:  # noqa: BLE001 - the baseline is timed as nan
                    base_err, reasons[f"N={N} {name}"] = math.nan, repr(exc)
                if not base_err <= tol:
                    base = None
                    reasons.setdefault(f"N={N} {name}", f"baseline differs from the reference by {base_err:.2e}")
            leaves = [q, k, v] + ([bias] if bias is not None else [])
            for mode in ("fwd", "fwd+bwd"):
                def timed(fn):
                    if fn is None:
                        return None
                    if mode == "fwd":
                        def run():
                            with torch.no_grad():
                                fn()
                    else:
                        def run():
                            torch.autograd.grad(fn(), leaves, grad)
                    return run
                fns = {c: timed(f) for c, f in (("minillm", mine), ("torch", base)) if f is not None}
                t = interleaved_medians(fns, args.repeats, reasons, f"N={N} {name} {mode}")
                t_torch = t.get("torch", math.nan)
                row = {"N": N, "case": name, "pass": mode, "minillm ms": 1000 * t["minillm"],
                       "torch ms": 1000 * t_torch, "torch / minillm": t_torch / t["minillm"]}
                rows.append(row)
                print_table(rows[-1:], list(rows[-1]), floatfmt=".3g")
                write_json(args.json, {**info, "baseline_failures": reasons}, rows, quiet=True)
    print()
    print_table(rows, list(rows[0]), floatfmt=".3g")
    if reasons:
        print("baseline failures (nan):", reasons)
    write_json(args.json, {**info, "baseline_failures": reasons}, rows)


if __name__ == "__main__":
    main()
