"""Every argument error is a TypeError/ValueError naming the argument, on the native and torch paths."""
import numpy as np
import pytest
import torch

from minillm.ops import attention, force_torch, topk_search


@pytest.fixture(params=["native", "torch"])
def path(request):
    if request.param == "torch":
        with force_torch():
            yield request.param
    else:
        yield request.param


def qkv(B=2, H=3, Nq=5, Nk=6, D=8, dtype=torch.float32):
    return torch.randn(B, H, Nq, D, dtype=dtype), torch.randn(B, H, Nk, D, dtype=dtype), torch.randn(B, H, Nk, D,
                                                                                                    dtype=dtype)


ATTENTION_CASES = [
    # (description, call, exception, words the message must contain)
    ("q not a tensor", lambda q, k, v: attention(q.numpy(), k, v), TypeError, ["q", "torch.Tensor"]),
    ("q 3-D", lambda q, k, v: attention(q[0], k, v), ValueError, ["q", "4-D"]),
    ("k 5-D", lambda q, k, v: attention(q, k[None], v), ValueError, ["k", "4-D"]),
    ("int dtype", lambda q, k, v: attention(q.int(), k.int(), v.int()), TypeError, ["q", "float32"]),
    ("mixed dtypes", lambda q, k, v: attention(q, k.double(), v), TypeError, ["dtype"]),
    ("B mismatch", lambda q, k, v: attention(q, k[:1], v[:1]), ValueError, ["B and H"]),
    ("H mismatch", lambda q, k, v: attention(q, k[:, :2], v[:, :2]), ValueError, ["B and H"]),
    ("k/v length mismatch", lambda q, k, v: attention(q, k, v[:, :, :4]), ValueError, ["Nk"]),
    ("D mismatch", lambda q, k, v: attention(q, k[..., :4], v), ValueError, ["head dim"]),
    ("D = 0", lambda q, k, v: attention(q[..., :0], k[..., :0], v[..., :0]), ValueError, ["head dim"]),
    ("scale inf", lambda q, k, v: attention(q, k, v, scale=float("inf")), ValueError, ["scale", "finite"]),
    ("scale nan", lambda q, k, v: attention(q, k, v, scale=float("nan")), ValueError, ["scale", "finite"]),
    ("scale str", lambda q, k, v: attention(q, k, v, scale="0.5"), TypeError, ["scale"]),
    ("causal not bool", lambda q, k, v: attention(q, k, v, causal=1), TypeError, ["causal"]),
    ("mask float", lambda q, k, v: attention(q, k, v, key_padding_mask=torch.ones(2, 6)), TypeError,
     ["key_padding_mask", "bool"]),
    ("mask shape", lambda q, k, v: attention(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)),
     ValueError, ["key_padding_mask", "(B, Nk)"]),
    ("mask 4-D", lambda q, k, v: attention(q, k, v, key_padding_mask=torch.ones(2, 1, 1, 6, dtype=torch.bool)),
     ValueError, ["key_padding_mask"]),
    ("mask list", lambda q, k, v: attention(q, k, v, key_padding_mask=[True] * 6), TypeError, ["key_padding_mask"]),
]


@pytest.mark.parametrize("desc,call,exc,words", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_bad_input(path, desc, call, exc, words):
    q, k, v = qkv()
    with pytest.raises(exc) as info:
        call(q, k, v)
    for w in words:
        assert w in str(info.value), f"{desc}: {w!r} not in {info.value}"


def test_attention_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="key_padding_mask must be on"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 6, dtype=torch.bool, device="meta"))


C = torch.randn(50, 8)
Q = torch.randn(3, 8)
TOPK_CASES = [
    ("k = 0", lambda: topk_search(Q, C, 0), ValueError, ["k", "1 <= k <= N"]),
    ("k < 0", lambda: topk_search(Q, C, -3), ValueError, ["k"]),
    ("k > N", lambda: topk_search(Q, C, 51), ValueError, ["k", "N = 50"]),
    ("k float", lambda: topk_search(Q, C, 2.0), TypeError, ["k", "int"]),
    ("k bool", lambda: topk_search(Q, C, True), TypeError, ["k", "int"]),
    ("empty corpus", lambda: topk_search(Q, C[:0], 1), ValueError, ["corpus", "empty"]),
    ("d mismatch", lambda: topk_search(Q[:, :4], C, 1), ValueError, ["d = 4", "d = 8"]),
    ("corpus 1-D", lambda: topk_search(Q, C[0], 1), ValueError, ["corpus", "2-D"]),
    ("queries 3-D", lambda: topk_search(Q[None], C, 1), ValueError, ["queries"]),
    ("corpus int", lambda: topk_search(Q, C.int(), 1), TypeError, ["corpus"]),
    ("corpus float64", lambda: topk_search(Q, C.double(), 1), TypeError, ["corpus", "float32"]),
    ("numpy int", lambda: topk_search(Q.numpy(), C.numpy().astype(np.int32), 1), TypeError, ["corpus"]),
    ("queries int", lambda: topk_search(Q.int(), C, 1), TypeError, ["queries"]),
    ("list input", lambda: topk_search([[1.0] * 8], C, 1), TypeError, ["queries", "numpy"]),
    ("metric", lambda: topk_search(Q, C, 1, "dot"), ValueError, ["metric", "cosine"]),
    ("nan query", lambda: topk_search(torch.full((1, 8), float("nan")), C, 1), ValueError, ["queries", "NaN"]),
    ("device", lambda: topk_search(Q, C.to("meta"), 1), ValueError, ["device", "meta"]),
]


@pytest.mark.parametrize("desc,call,exc,words", TOPK_CASES, ids=[c[0] for c in TOPK_CASES])
def test_topk_bad_input(path, desc, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), f"{desc}: {w!r} not in {info.value}"


# The private raw-pointer bindings: sizes and codes the kernels do not handle raise instead of crashing (the
# public functions never pass them). Pointers are valid (a zeroed buffer); only the named argument is wrong.
RAW_CASES = [
    ("attention_fwd B=0", "attention_fwd", lambda p: (p, p, p, p, p, 0, 0, (0, 1, 8, 8, 8), (64, 64, 8), (64, 64, 8),
                                                        (64, 64, 8), False, 0, 0.35, 0, 1)),
    ("attention_fwd D=0", "attention_fwd", lambda p: (p, p, p, p, p, 0, 0, (1, 1, 8, 8, 0), (64, 64, 8), (64, 64, 8),
                                                        (64, 64, 8), False, 0, 0.35, 0, 1)),
    ("attention_fwd dtype=9", "attention_fwd", lambda p: (p, p, p, p, p, 0, 0, (1, 1, 8, 8, 8), (64, 64, 8),
                                                            (64, 64, 8), (64, 64, 8), False, 0, 0.35, 9, 1)),
    ("attention_bwd Nk=0", "attention_bwd", lambda p: (p, p, p, p, p, p, 0, 0, 0, p, p, p, (1, 1, 8, 0, 8),
                                                         (64, 64, 8), (64, 64, 8), (64, 64, 8), (64, 64, 8),
                                                         (64, 64, 8), False, 0, 0.35, 0, 1)),
    ("topk Q=0", "topk", lambda p: (p, p, 8, 0, 0, 8, 8, 2, 0, p, p, 1)),
    ("topk k=0", "topk", lambda p: (p, p, 8, 0, 1, 8, 8, 0, 0, p, p, 1)),
    ("topk k>N", "topk", lambda p: (p, p, 8, 0, 1, 8, 8, 20, 0, p, p, 1)),
    ("topk dtype=9", "topk", lambda p: (p, p, 8, 9, 1, 8, 8, 2, 0, p, p, 1)),
    ("topk metric=9", "topk", lambda p: (p, p, 8, 0, 1, 8, 8, 2, 9, p, p, 1)),
    ("topk int8 without scales", "topk", lambda p: (p, p, 8, 4, 1, 8, 8, 2, 0, p, p, 1)),
    ("linear_small_m K=0", "linear_small_m", lambda p: (p, p, 0, p, 1, 0, 8, 8, 0, 1)),
    ("linear_small_m dtype=1", "linear_small_m", lambda p: (p, p, 0, p, 1, 8, 8, 8, 1, 1)),
    ("gemm M=0", "gemm", lambda p: (p, 8, False, p, 8, False, 0, p, 0, 8, 8, 0, 1)),
    ("gemm N=0", "gemm", lambda p: (p, 8, False, p, 8, False, 0, p, 8, 0, 8, 0, 1)),
]


@pytest.mark.parametrize("desc,fn,args", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_raw_bindings_reject_sizes_and_codes(desc, fn, args):
    from minillm.ops import _backend

    if _backend._C is None:
        pytest.skip("no native extension")
    buf = torch.zeros(1 << 16)
    with pytest.raises(ValueError, match="minillm._C"):
        getattr(_backend._C, fn)(*args(buf.data_ptr()))


def test_registered_ops_check_their_arguments():
    # torch.ops.minillm.* are reachable directly (torch.compile, torch.library tooling, users); the kernels take
    # raw pointers, so a mismatch raises before any is touched. This call read past the 4 x 4 corpus before.
    ops = torch.ops.minillm
    bad = [
        lambda: ops.topk_search(torch.randn(1, 65536), torch.randn(4, 4), 1, "ip"),
        lambda: ops.topk_search(torch.randn(2, 4), torch.randn(4, 4), 5, "ip"),
        lambda: ops.topk_search(torch.randn(2, 4), torch.randn(4, 4), 1, "dot"),
        lambda: ops.topk_search(torch.randn(2, 4, dtype=torch.float64), torch.randn(4, 4), 1, "ip"),
        lambda: ops.topk_int8(torch.randn(2, 100), torch.zeros(4, 64, dtype=torch.int8), torch.ones(4),
                              torch.ones(4), 100, 1, "ip"),
        lambda: ops.topk_int8(torch.randn(2, 8), torch.zeros(4, 64, dtype=torch.int8), torch.ones(3),
                              torch.ones(4), 8, 1, "ip"),
        lambda: ops.attention_fwd(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16),
                                  None, None, False, 0, 1.0),
        lambda: ops.attention_fwd(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8),
                                  torch.ones(1, 4, dtype=torch.bool), None, False, 0, 1.0),
        lambda: ops.attention_bwd(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8),
                                  torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 3), None,
                                  None, None, False, 0, 1.0),
        lambda: ops.linear(torch.randn(3, 8), torch.randn(5, 9), None),
        lambda: ops.linear(torch.randn(3, 8), torch.randn(5, 8), torch.randn(4)),
        lambda: ops.matmul(torch.randn(3, 8), torch.randn(7, 5)),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(ValueError, match="minillm::|must|q, k and v"):
            call()
    # and well-formed direct calls still run
    s, i = ops.topk_search(torch.randn(2, 4), torch.randn(6, 4), 3, "l2")
    assert s.shape == (2, 3)
    out, lse = ops.attention_fwd(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8),
                                 torch.ones(1, 5, dtype=torch.bool), None, True, 1, 0.3)
    assert out.shape == (1, 2, 4, 8) and lse.shape == (1, 2, 4)
