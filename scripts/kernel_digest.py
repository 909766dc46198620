"""Digest of every CPU kernel's output over fixed test vectors, at every SIMD level.

A refactor of csrc/ must leave these bytes unchanged. Run it before and after and compare:

    python scripts/kernel_digest.py > before.txt   # on the old build
    python scripts/kernel_digest.py > after.txt    # on the new build
    diff before.txt after.txt

Each line is `level case sha256-prefix`. The inputs come from a seeded generator, so the lines only
change when a kernel's output bytes do. Special paths chosen at run time (AMX, vdpbf16ps, VNNI, scan
prefetch) follow the environment (MINILLM_NO_AMX, MINILLM_NO_BF16DOT, MINILLM_NO_VNNI,
MINILLM_SCAN_PREFETCH): run it once per setting to cover them.
"""
from __future__ import annotations

import hashlib
import itertools
import sys

import torch

import minillm.ops as ops


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def attention_cases():
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 1, 7, 64), (2, 3, 37, 53, 64), (1, 2, 130, 130, 16), (1, 2, 70, 300, 80), (2, 1, 65, 65, 128),
              (1, 1, 5, 9, 3), (1, 2, 300, 40, 64)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    for (B, H, Nq, Nk, D), dtype, causal, padded, strided in itertools.product(
            shapes, dtypes, (False, True), (False, True), (False, True)):
        if strided:  # (B, N, H, D) storage viewed as (B, H, N, D), as models produce
            q = torch.randn(B, Nq, H, D, generator=g).transpose(1, 2)
            k = torch.randn(B, Nk, H, D, generator=g).transpose(1, 2)
            v = torch.randn(B, Nk, H, D, generator=g).transpose(1, 2)
        else:
            q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Nq, Nk, Nk))
        q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
        kpm = qpm = None
        if padded:
            kpm = torch.rand(B, Nk, generator=g) > 0.3
            kpm[:, 0] = True
            qpm = torch.rand(B, Nq, generator=g) > 0.2
        out = ops.attention(q, k, v, causal=causal, key_padding_mask=kpm, query_padding_mask=qpm)
        dout = torch.randn(out.shape, generator=g).to(dtype)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        name = f"attn B{B}H{H}Nq{Nq}Nk{Nk}D{D} {str(dtype)[6:]} causal={int(causal)} pad={int(padded)} " \
               f"strided={int(strided)}"
        yield name + " fwd", digest(out)
        yield name + " bwd", digest(dq, dk, dv)
        # The registered op also returns the log-sum-exp, and its backward takes a gradient for it.
        o2, lse = torch.ops.minillm.attention_fwd(q.detach(), k.detach(), v.detach(), kpm, qpm, causal,
                                                   Nk - Nq, 1.0 / D ** 0.5)
        dlse = torch.randn(lse.shape, generator=g).to(lse.dtype)
        grads = torch.ops.minillm.attention_bwd(dout, q.detach(), k.detach(), v.detach(), o2, lse, dlse, kpm, qpm,
                                                causal, Nk - Nq, 1.0 / D ** 0.5)
        yield name + " lse", digest(lse)
        yield name + " bwd+dlse", digest(*grads)


def topk_cases():
    g = torch.Generator().manual_seed(1)
    for N, d in [(1000, 32), (5000, 100), (3000, 384), (777, 7)]:
        corpus = torch.randn(N, d, generator=g)
        tied = torch.randint(-2, 3, (N, d), generator=g).float()  # many equal scores: tie order matters
        for Q, k, metric, kind in itertools.product((1, 5, 16, 40, 300), (1, 10, 100), ("ip", "cosine", "l2"),
                                                   ("f32", "bf16", "f16", "tied", "strided")):
            if kind == "tied":
                c, q = tied, torch.randint(-2, 3, (Q, d), generator=g).float()
            else:
                c = corpus
                if kind == "strided":
                    c = torch.randn(N, d + 5, generator=g)[:, 2:d + 2]
                elif kind != "f32":
                    c = corpus.to(torch.bfloat16 if kind == "bf16" else torch.float16)
                q = torch.randn(Q, d, generator=g)
            s, i = ops.topk_search(q, c, k, metric)
            yield f"topk N{N} d{d} Q{Q} k{k} {metric} {kind}", digest(s, i)
        c8 = ops.Int8Corpus(corpus)
        for Q, metric in itertools.product((1, 16, 300), ("ip", "cosine", "l2")):
            q = torch.randn(Q, d, generator=g)
            s, i = torch.ops.minillm.topk_int8(q, c8.codes, c8.scales, c8.norm2, d, 50, metric)
            yield f"topk-int8 N{N} d{d} Q{Q} {metric}", digest(s, i)
    # Over kStreamedBytes (64 MiB): the streamed many-query path.
    big = torch.randn(180_000, 100, generator=g)
    for Q in (1, 64, 300):
        q = torch.randn(Q, 100, generator=g)
        yield f"topk streamed Q{Q}", digest(*ops.topk_search(q, big, 10, "ip"))


def linear_cases():
    g = torch.Generator().manual_seed(2)
    for M, K, N, dtype, bias in itertools.product((1, 3, 8, 50, 300), (7, 64, 300), (5, 128, 257),
                                                  (torch.float32, torch.float64), (False, True)):
        x = torch.randn(M, K, generator=g, dtype=dtype, requires_grad=True)
        w = torch.randn(N, K, generator=g, dtype=dtype, requires_grad=True)
        b = torch.randn(N, generator=g, dtype=dtype, requires_grad=True) if bias else None
        y = ops.linear(x, w, b)
        dy = torch.randn(y.shape, generator=g, dtype=dtype)
        grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
        yield f"linear M{M} K{K} N{N} {str(dtype)[6:]} bias={int(bias)}", digest(y, *grads)


def main() -> None:
    torch.set_num_threads(2)
    for level in ops.simd_levels():
        ops.set_simd_level(level)
        for case, h in itertools.chain(attention_cases(), topk_cases(), linear_cases()):
            print(level, case, h)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
