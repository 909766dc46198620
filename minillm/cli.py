"""The `minillm` command line. `minillm demo` shows the kernels at work on this machine."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from minillm import ops


def _median_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def demo(args: argparse.Namespace) -> int:
    """Runs each op once against its torch counterpart: the answer is checked, then both are timed."""
    torch.manual_seed(0)
    print("minillm", __import__("minillm").__version__, "| torch", torch.__version__)
    print("backend:", json.dumps(ops.backend_info(), indent=2))

    B, H, N, D = 4, 8, args.seq_len, 64
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    lengths = torch.randint(N // 2, N + 1, (B,))
    keep = torch.arange(N)[None, :] < lengths[:, None]  # (B, N) key padding
    print(f"\nattention  B={B} H={H} N={N} D={D}, fp32, {torch.get_num_threads()} threads")
    print(f"{'case':<22}{'minillm ms':>12}{'torch ms':>10}{'ratio':>8}{'max |diff|':>12}")
    cases = [
        ("bidirectional", dict(causal=False), dict(is_causal=False)),
        ("causal", dict(causal=True), dict(is_causal=True)),
        ("key padding", dict(key_padding_mask=keep), dict(attn_mask=keep[:, None, None, :])),
    ]
    for name, ours_kw, torch_kw in cases:
        ours = lambda: ops.attention(q, k, v, **ours_kw)  # noqa: E731
        theirs = lambda: F.scaled_dot_product_attention(q, k, v, **torch_kw)  # noqa: E731
        diff = (ours() - theirs()).abs().max().item()
        t_ours, t_theirs = _median_ms(ours), _median_ms(theirs)
        print(f"{name:<22}{t_ours:>12.2f}{t_theirs:>10.2f}{t_theirs / t_ours:>7.2f}x{diff:>12.2e}")

    n, d, nq, topk = args.corpus_size, 384, 16, 10
    corpus = F.normalize(torch.randn(n, d), dim=1)
    queries = F.normalize(corpus[torch.randint(0, n, (nq,))] + 0.1 * torch.randn(nq, d), dim=1)
    print(f"\ntop-{topk} search  N={n} d={d} Q={nq}, inner product")
    ours = lambda: ops.topk_search(queries, corpus, topk, "ip")  # noqa: E731
    theirs = lambda: torch.topk(queries @ corpus.T, topk, dim=1)  # noqa: E731
    same = (ours()[1] == theirs().indices).float().mean().item()
    t_ours, t_theirs = _median_ms(ours), _median_ms(theirs)
    print(f"{'minillm ms':>12}{'torch ms':>10}{'ratio':>8}{'same ids':>10}")
    print(f"{t_ours:>12.2f}{t_theirs:>10.2f}{t_theirs / t_ours:>7.2f}x{same:>10.1%}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (which kernel path runs)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="check and time the kernels against torch on random data")
    p.add_argument("--seq-len", type=int, default=512, help="attention sequence length N (default 512)")
    p.add_argument("--corpus-size", type=int, default=200_000, help="top-k corpus rows (default 200000)")
    p.set_defaults(func=demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"minillm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
