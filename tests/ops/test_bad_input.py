"""Every argument error is a TypeError/ValueError naming the argument, on the native and torch paths."""
import importlib
import re

import numpy as np
import pytest
import torch

import minillm.ops
import minillm.ops.reference
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
# public functions never pass them). Buffers are valid (a zeroed one); only the named argument is wrong.
Z = (0, 0)  # an absent optional buffer
RAW_CASES = [
    ("attention_fwd B=0", "attention_fwd", lambda p: (p, p, p, p, p, Z, Z, (0, 1, 8, 8, 8), (64, 64, 8), (64, 64, 8),
                                                        (64, 64, 8), False, 0, 0.35, 0, 1)),
    ("attention_fwd D=0", "attention_fwd", lambda p: (p, p, p, p, p, Z, Z, (1, 1, 8, 8, 0), (64, 64, 8), (64, 64, 8),
                                                        (64, 64, 8), False, 0, 0.35, 0, 1)),
    ("attention_fwd dtype=9", "attention_fwd", lambda p: (p, p, p, p, p, Z, Z, (1, 1, 8, 8, 8), (64, 64, 8),
                                                            (64, 64, 8), (64, 64, 8), False, 0, 0.35, 9, 1)),
    ("attention_bwd Nk=0", "attention_bwd", lambda p: (p, p, p, p, p, p, Z, Z, Z, p, p, p, (1, 1, 8, 0, 8),
                                                         (64, 64, 8), (64, 64, 8), (64, 64, 8), (64, 64, 8),
                                                         (64, 64, 8), False, 0, 0.35, 0, 1)),
    ("topk Q=0", "topk", lambda p: (p, p, 8, 0, 0, 8, 8, 2, 0, p, p, 1)),
    ("topk k=0", "topk", lambda p: (p, p, 8, 0, 1, 8, 8, 0, 0, p, p, 1)),
    ("topk k>N", "topk", lambda p: (p, p, 8, 0, 1, 8, 8, 20, 0, p, p, 1)),
    ("topk dtype=9", "topk", lambda p: (p, p, 8, 9, 1, 8, 8, 2, 0, p, p, 1)),
    ("topk metric=9", "topk", lambda p: (p, p, 8, 0, 1, 8, 8, 2, 9, p, p, 1)),
    ("topk int8 without scales", "topk", lambda p: (p, p, 8, 4, 1, 8, 8, 2, 0, p, p, 1)),
    ("linear_small_m K=0", "linear_small_m", lambda p: (p, p, Z, p, 1, 0, 8, 8, 0, 1)),
    ("linear_small_m dtype=2", "linear_small_m", lambda p: (p, p, Z, p, 1, 8, 8, 8, 2, 1)),
    ("linear_quant bits=5", "linear_quant", lambda p: (p, p, p, p, Z, p, 1, 64, 8, 64, 5, 32, 1)),
    ("linear_quant M=0", "linear_quant", lambda p: (p, p, p, Z, Z, p, 0, 64, 8, 64, 8, 0, 1)),
    ("linear_quant 4-bit group=48", "linear_quant", lambda p: (p, p, p, p, Z, p, 1, 96, 8, 96, 4, 48, 1)),
    ("linear_quant 4-bit K % group", "linear_quant", lambda p: (p, p, p, p, Z, p, 1, 96, 8, 96, 4, 64, 1)),
    ("dequantize bits=3", "dequantize", lambda p: (p, p, p, p, 8, 64, 3, 32, 1)),
    ("dequantize N=0", "dequantize", lambda p: (p, p, p, p, 0, 64, 8, 0, 1)),
    ("gemm M=0", "gemm", lambda p: (p, 8, False, p, 8, False, Z, p, 0, 8, 8, 0, 1)),
    ("gemm N=0", "gemm", lambda p: (p, 8, False, p, 8, False, Z, p, 8, 0, 8, 0, 1)),
]


@pytest.mark.parametrize("desc,fn,args", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_raw_bindings_reject_sizes_and_codes(desc, fn, args):
    from minillm.ops import _backend

    if _backend._C is None:
        pytest.skip("no native extension")
    buf = torch.zeros(1 << 16)
    with pytest.raises(ValueError, match="minillm._C"):
        getattr(_backend._C, fn)(*args(_backend.buf(buf)))


# The bindings' extent checks: every call below is well-formed except for one buffer, too small for the elements
# its sizes and strides reach (or a negative or overflowing stride). Before the checks each call read or wrote
# past that buffer. Buffers come from real tensors (a view's bytes run to the end of its storage).
def _f32(n):
    return torch.zeros(n)


S4 = (1, 1, 8, 8, 8)  # (B, H, Nq, Nk, D): 64 elements per operand
ST = (64, 64, 8)


def _fwd(q=64, k=64, v=64, out=64, lse=8, kpm=None, ks=ST, B=1):
    b = lambda n: (0, 0) if n is None else _backend_buf(_f32(n) if n > 0 else torch.zeros(-n, dtype=torch.uint8))
    return ("attention_fwd", (b(q), b(k), b(v), b(out), b(lse), b(kpm), (0, 0), (B,) + S4[1:], ST, ks, ST, False, 0,
                              0.35, 0, 1))


def _bwd(dq=64, dlse=None):
    b = lambda n: (0, 0) if n is None else _backend_buf(_f32(n))
    return ("attention_bwd", (b(64), b(64), b(64), b(64), b(64), b(8), b(dlse), (0, 0), (0, 0), b(dq), b(64), b(64),
                              S4, ST, ST, ST, ST, ST, False, 0, 0.35, 0, 1))


def _topk(corpus=None, stride=8, dtype=0, idx=16, scale=8, d=8):
    corpus = _f32(64) if corpus is None else corpus
    i8 = dtype == 4
    return ("topk", (_backend_buf(_f32(8 * d // 8)), _backend_buf(corpus), stride, dtype, 1, 8, d, 2, 0,
                     _backend_buf(_f32(2)), _backend_buf(torch.zeros(idx // 8, dtype=torch.int64)), 1,
                     _backend_buf(_f32(scale)) if i8 else (0, 0), _backend_buf(_f32(8)) if i8 else (0, 0)))


def _gemm(a=64, lda=8, b=64, ldb=8, b_col=False, c=64):
    return ("gemm", (_backend_buf(_f32(a)), lda, False, _backend_buf(_f32(b)), ldb, b_col, (0, 0), _backend_buf(_f32(c)),
                     8, 8, 8, 0, 1))


def _gemm_kw(**kw):
    """gemm's arguments as gemm_pair takes each product: a dict of gemm's keywords without nthreads."""
    names = ("a", "lda", "a_colmajor", "b", "ldb", "b_colmajor", "bias", "c", "M", "N", "K", "dtype")
    return dict(zip(names, _gemm(**kw)[1][:-1]))


def _ln_fwd(x=64, ldx=8, weight=8, bias=8, y=64, mean=8, rstd=8, dtype=0, y_dtype=-1):
    """layer_norm_fwd's positional arguments for (8, 8) rows, each buffer exactly as large as needed unless given
    (sizes in float32s)."""
    b = lambda n: _backend_buf(_f32(n))
    return "layer_norm_fwd", (b(x), ldx, b(weight), b(bias), b(y), b(mean), b(rstd), 8, 8, 1e-5, dtype, 1, y_dtype)


def _ln_bwd(dy=64, lddy=8, x=64, dx=64, dweight=8, rstd=8, dy_dtype=-1):
    b = lambda n: _backend_buf(_f32(n))
    return "layer_norm_bwd", (b(dy), lddy, b(x), 8, b(8), b(8), b(rstd), b(dx), b(dweight), b(8), 8, 8, 0, 1,
                              dy_dtype)


def _backend_buf(t):
    from minillm.ops import _backend

    _KEEP.append(t)  # alive until the call
    return _backend.buf(t)


_KEEP = []
EXTENT_CASES = [
    ("q one float short", lambda: _fwd(q=63), "q reaches 256 bytes"),
    ("k row stride past the end", lambda: _fwd(ks=(64, 64, 9)), "k reaches 284 bytes"),
    ("k negative stride", lambda: _fwd(ks=(64, 64, -8)), "strides >= 0"),
    ("k stride overflows", lambda: _fwd(q=256, v=256, out=256, lse=32, ks=(2 ** 62, 64, 8), B=4), "overflows"),
    ("out short", lambda: _fwd(out=32), "out reaches"),
    ("lse short", lambda: _fwd(lse=7), "lse reaches"),
    ("key mask short", lambda: _fwd(kpm=-7), "key_padding_mask reaches 8 bytes"),
    ("view at the end of its storage", lambda: ("attention_fwd", (_backend_buf(_f32(100)[40:]),) + _fwd()[1][1:]),
     "q reaches 256 bytes"),
    ("bwd dq short", lambda: _bwd(dq=60), "dq reaches"),
    ("bwd dlse short", lambda: _bwd(dlse=4), "dlse reaches"),
    ("corpus short", lambda: _topk(corpus=_f32(60)), "corpus reaches 256 bytes"),
    ("corpus stride past the end", lambda: _topk(stride=9), "corpus reaches"),
    ("int8 corpus read in 64-column blocks", lambda: _topk(corpus=torch.zeros(504, dtype=torch.int8), stride=64,
                                                            dtype=4), "corpus reaches 512 bytes"),
    ("int8 row_scale short", lambda: _topk(corpus=torch.zeros(512, dtype=torch.int8), stride=64, dtype=4, scale=7),
     "row_scale"),
    ("indices short", lambda: _topk(idx=8), "out_idx reaches 16 bytes"),
    ("gemm a short", lambda: _gemm(a=63), "a reaches"),
    ("gemm lda past the end", lambda: _gemm(lda=9), "a reaches"),
    ("gemm column-major b", lambda: _gemm(ldb=16, b_col=True, b=64), "b reaches"),
    ("gemm c short", lambda: _gemm(c=8), "c reaches"),
    ("gemm_pair second product", lambda: ("gemm_pair", (_gemm_kw(), _gemm_kw(c=8), 1)), "c reaches"),
    ("linear_small_m x row stride", lambda: ("linear_small_m", (_backend_buf(_f32(64)), _backend_buf(_f32(64)),
                                                                (0, 0), _backend_buf(_f32(64)), 8, 8, 8, 9, 0, 1)),
     "x reaches"),
    ("linear_quant int8 codes short", lambda: _quant(codes=8 * 64 - 1), "codes reaches 512 bytes"),
    ("linear_quant int8 scale short", lambda: _quant(scale=7), "scale reaches 32 bytes"),
    ("linear_quant int4 codes short", lambda: _quant(bits=4, codes=8 * 32 - 1), "codes reaches 256 bytes"),
    ("linear_quant int4 offset short", lambda: _quant(bits=4, offset=15), "offset reaches 64 bytes"),
    ("linear_quant int4 offset absent", lambda: _quant(bits=4, offset=0), "offset is a null pointer"),
    ("linear_quant grouped int8 codes short", lambda: _quant(group=32, codes=8 * 64 - 1), "codes reaches 512 bytes"),
    ("linear_quant grouped int8 scale short", lambda: _quant(group=32, scale=15), "scale reaches 64 bytes"),
    ("linear_quant grouped int8 offset short", lambda: _quant(group=32, offset=15), "offset reaches 64 bytes"),
    ("linear_quant grouped int8 offset absent", lambda: _quant(group=32, offset=0), "offset is a null pointer"),
    ("linear_quant int8 group not dividing K", lambda: _quant(group=48), "group that is a multiple of 32"),
    ("dequantize grouped int8 out short", lambda: ("dequantize", _quant(group=64, out=8 * 64 - 1)[1]),
     "out reaches 2048 bytes"),
    ("linear_quant x row stride", lambda: _quant(ldx=65), "x reaches"),
    ("linear_quant y short", lambda: _quant(y=15), "y reaches 64 bytes"),
    ("dequantize out short", lambda: ("dequantize", _quant(out=8 * 64 - 1)[1]), "out reaches 2048 bytes"),
    ("layer_norm x short", lambda: _ln_fwd(x=63), "x reaches 256 bytes"),
    ("layer_norm x row stride past the end", lambda: _ln_fwd(ldx=9), "x reaches"),
    ("layer_norm rows overlap", lambda: _ln_fwd(ldx=7), "ldx must be >= C"),
    ("layer_norm weight short", lambda: _ln_fwd(weight=7), "weight reaches 32 bytes"),
    ("layer_norm y short", lambda: _ln_fwd(y=60), "y reaches"),
    ("layer_norm rstd short", lambda: _ln_fwd(rstd=4), "rstd reaches"),
    ("layer_norm bf16 y short", lambda: _ln_fwd(y=31, y_dtype=1), "y reaches 128 bytes"),
    ("layer_norm bf16 y beside float64 x", lambda: _ln_fwd(x=128, weight=16, bias=16, mean=16, rstd=16, dtype=3,
                                                                   y_dtype=1),
     "y_dtype must be dtype, or kBF16 with kF32"),
    ("layer_norm float16 y", lambda: _ln_fwd(y_dtype=2), "y_dtype must be"),
    ("layer_norm bwd bf16 dy short", lambda: _ln_bwd(dy=31, dy_dtype=1), "dy reaches 128 bytes"),
    ("layer_norm bwd bf16 dy row stride", lambda: _ln_bwd(dy=32, lddy=9, dy_dtype=1), "dy reaches"),
    ("layer_norm bwd float64 dy beside float32 x", lambda: _ln_bwd(dy=128, dy_dtype=3), "dy_dtype must be"),
    ("layer_norm bwd dy row stride", lambda: _ln_bwd(lddy=9), "dy reaches"),
    ("layer_norm bwd dx short", lambda: _ln_bwd(dx=63), "dx reaches"),
    ("layer_norm bwd dweight short", lambda: _ln_bwd(dweight=7), "dweight reaches"),
    ("layer_norm bwd rstd short", lambda: _ln_bwd(rstd=7), "rstd reaches"),
]


def _quant(bits=8, codes=None, scale=None, offset=16, y=16, ldx=64, out=8 * 64, group=None):
    """linear_quant's positional arguments for x (2, 64) and an (8, 64) weight (4-bit: groups of 32; 8-bit: a scale
    per row, or groups of `group`), each buffer exactly as large as needed unless a size is given; with `out`,
    dequantize's arguments instead."""
    group = (32 if bits == 4 else 0) if group is None else group
    codes = codes if codes is not None else 8 * 64 // (2 if bits == 4 else 1)
    scale = scale if scale is not None else (8 * 64 // group if group else 8)
    c = _backend_buf(torch.zeros(codes, dtype=torch.int8 if bits == 8 else torch.uint8))
    sc = _backend_buf(_f32(scale))
    off = _backend_buf(_f32(offset)) if group and offset else (0, 0)
    if out != 8 * 64 or y == "dequantize":
        return "dequantize", (c, sc, off, _backend_buf(_f32(out)), 8, 64, bits, group, 1)
    return "linear_quant", (_backend_buf(_f32(2 * 64)), c, sc, off, (0, 0), _backend_buf(_f32(y)), 2, 64, 8, ldx,
                            bits, group, 1)


@pytest.mark.parametrize("desc,make,words", EXTENT_CASES, ids=[c[0] for c in EXTENT_CASES])
def test_raw_bindings_check_buffer_extents(desc, make, words):
    from minillm.ops import _backend

    if _backend._C is None:
        pytest.skip("no native extension")
    fn, args = make()
    try:
        with pytest.raises(ValueError, match="minillm._C") as info:
            getattr(_backend._C, fn)(*args)
        assert words in str(info.value), f"{desc}: {words!r} not in {info.value}"
    finally:
        _KEEP.clear()


def test_raw_bindings_run_with_exact_extents():
    from minillm.ops import _backend

    if _backend._C is None:
        pytest.skip("no native extension")
    try:
        for fn, args in (_fwd(), _bwd(dlse=8), _topk(), _topk(corpus=torch.zeros(8 * 64, dtype=torch.int8), stride=64,
                                                               dtype=4), _gemm(), _gemm(ldb=8, b_col=True),
                         _quant(), _quant(bits=4), _quant(y="dequantize"), _quant(bits=4, y="dequantize"),
                         _ln_fwd(), _ln_bwd()):
            getattr(_backend._C, fn)(*args)  # every buffer exactly as large as needed: no error
    finally:
        _KEEP.clear()


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


def test_bindings_take_keywords_named_as_the_kernel_fields():
    from minillm.ops import _backend

    if _backend._C is None:
        pytest.skip("no native extension")
    C = _backend._C
    q = torch.randn(1, 1, 8, 8)
    out, lse = torch.empty(1, 1, 8, 8), torch.empty(1, 1, 8)
    b = _backend.buf
    kw = dict(q=b(q), k=b(q), v=b(q), out=b(out), lse=b(lse), sizes=(1, 1, 8, 8, 8), q_strides=(64, 64, 8),
              k_strides=(64, 64, 8), v_strides=(64, 64, 8), causal=False, causal_offset=0, scale=0.25,
              dtype=C.DTYPES["float32"])
    C.attention_fwd(**kw)  # the optional masks and nthreads left out
    torch.testing.assert_close(out, minillm.ops.reference.attention_reference(q, q, q, scale=0.25))
    # Keyword names built at run time (not interned strings) are matched too, in any order.
    C.attention_fwd(**{"".join(["s", "cale"]): 0.25, **{n: v for n, v in reversed(list(kw.items())) if n != "scale"}})
    with pytest.raises(TypeError, match="unexpected keyword argument 'queries'"):
        C.attention_fwd(**kw, queries=b(q))
    with pytest.raises(TypeError, match="missing required argument 'lse'"):
        C.attention_fwd(**{n: v for n, v in kw.items() if n != "lse"})
    with pytest.raises(TypeError, match="multiple values for argument 'q'"):
        C.attention_fwd(b(q), **kw)
    with pytest.raises(TypeError, match="causal must be a bool"):
        C.attention_fwd(**{**kw, "causal": 1})
    with pytest.raises(TypeError, match="q must be a buffer"):
        C.attention_fwd(**{**kw, "q": q})
    with pytest.raises(TypeError, match="sizes must be a tuple of 5 ints"):
        C.attention_fwd(**{**kw, "sizes": (1, 1, 8, 8)})


def test_dtype_and_metric_codes_come_from_the_extension():
    from minillm.ops import _backend

    if _backend._C is None:
        pytest.skip("no native extension")
    assert _backend._C.DTYPES == {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3, "int8": 4}  # kernels.h
    assert _backend._C.METRICS == {"ip": 0, "cosine": 1, "l2": 2}
    assert _backend.DTYPE_CODE[torch.bfloat16] == 1 and _backend.METRIC_CODE["l2"] == 2
    assert _backend._C.I8_PAD == importlib.import_module("minillm.ops.topk")._I8_ALIGN


def test_attention_mods_keyword_checks_every_buffer_before_the_kernel():
    """The `mods` keyword (window, softcap, alibi, bias, sinks, dbias): wrong shapes of the tuple raise TypeError,
    buffers too small for what the kernel would read or write raise ValueError, nothing is touched."""
    from minillm.ops import _backend

    if _backend._C is None:
        pytest.skip("no native extension")
    C, b, d = _backend._C, _backend.buf, _backend.dense_buf
    q = torch.randn(2, 2, 8, 8)
    out, lse = torch.empty(2, 2, 8, 8), torch.empty(2, 2, 8)
    kw = dict(q=b(q), k=b(q), v=b(q), out=b(out), lse=b(lse), sizes=(2, 2, 8, 8, 8), q_strides=(128, 64, 8),
              k_strides=(128, 64, 8), v_strides=(128, 64, 8), causal=False, causal_offset=0, scale=0.25,
              dtype=C.DTYPES["float32"])
    none = (0, 0)
    good_bias = torch.randn(2, 8, 8)  # broadcast over batch: strides (0, 64, 8, 1)
    plain = (-1, -1, 0.0, none, none, (0, 0, 0, 0), none, none)
    C.attention_fwd(**kw, mods=plain)
    # Buffers are bare pointers: every tensor a call reads or writes is held in a name until the call returns.
    alibi, sinks, dbias = torch.rand(2, 2), torch.randn(2), torch.zeros(2, 2, 8, 8)
    C.attention_fwd(**kw, mods=(3, 0, 2.0, d(alibi), b(good_bias), (0, 64, 8, 1), d(sinks), none))
    with pytest.raises(TypeError, match="mods must be None or"):
        C.attention_fwd(**kw, mods=(-1, -1, 0.0))
    with pytest.raises(TypeError, match="mods.softcap must be a float"):
        C.attention_fwd(**kw, mods=(-1, -1, "x", none, none, (0, 0, 0, 0), none, none))
    bad = [
        ((-2, -1, 0.0, none, none, (0, 0, 0, 0), none, none), "window sides must be >= -1"),
        ((-1, -1, -1.0, none, none, (0, 0, 0, 0), none, none), "softcap must be finite"),
        ((-1, -1, 0.0, d(torch.rand(2)), none, (0, 0, 0, 0), none, none), "alibi reaches"),  # (B, H) = 4 floats
        ((-1, -1, 0.0, none, b(good_bias), (64, 64, 8, 1), none, none), "bias reaches"),  # batch stride past its end
        ((-1, -1, 0.0, none, b(torch.randn(8, 8)), (0, 64, 8, 1), none, none), "bias reaches"),  # one head's worth
        ((-1, -1, 0.0, none, none, (0, 0, 0, 0), d(torch.randn(1)), none), "sinks reaches"),
        ((-1, -1, 0.0, none, none, (0, 0, 0, 0), none, d(torch.empty(4))), "takes no mods.dbias"),
    ]
    for mods, match in bad:
        with pytest.raises(ValueError, match=match):
            C.attention_fwd(**kw, mods=mods)
    # the backward: dbias must hold (B, H, Nq, Nk), sinks are the forward's
    dq, dk, dv = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
    bkw = dict(dout=b(q), q=b(q), k=b(q), v=b(q), out=b(out), lse=b(lse), dq=b(dq), dk=b(dk), dv=b(dv),
               sizes=(2, 2, 8, 8, 8), dout_strides=(128, 64, 8), q_strides=(128, 64, 8), k_strides=(128, 64, 8),
               v_strides=(128, 64, 8), out_strides=(128, 64, 8), causal=False, causal_offset=0, scale=0.25,
               dtype=C.DTYPES["float32"])
    C.attention_fwd(**kw)
    C.attention_bwd(**bkw, mods=(-1, -1, 0.0, none, none, (0, 0, 0, 0), none, d(dbias)))
    with pytest.raises(ValueError, match="dbias reaches"):
        C.attention_bwd(**bkw, mods=(-1, -1, 0.0, none, none, (0, 0, 0, 0), none, d(torch.zeros(2, 2, 8, 7))))
    with pytest.raises(ValueError, match="takes no mods.sinks"):
        C.attention_bwd(**bkw, mods=(-1, -1, 0.0, none, none, (0, 0, 0, 0), d(torch.randn(2)), none))


def test_attention_output_strides_are_checked_before_the_kernel_writes():
    """out_strides (forward) and dq/dk/dv_strides (backward): strided outputs, e.g. slices of one packed buffer,
    are written row by row at those strides; a buffer too small for them, or strides under which two rows share
    memory (threads would race on them), raise ValueError before anything is written."""
    from minillm.ops import _backend

    if _backend._C is None:
        pytest.skip("no native extension")
    C, b = _backend._C, _backend.buf
    q = torch.randn(2, 2, 8, 8)  # (B, H, N, D)
    lse = torch.empty(2, 2, 8)
    kw = dict(q=b(q), k=b(q), v=b(q), lse=b(lse), sizes=(2, 2, 8, 8, 8), q_strides=(128, 64, 8),
              k_strides=(128, 64, 8), v_strides=(128, 64, 8), causal=True, causal_offset=0, scale=0.25,
              dtype=C.DTYPES["float32"])
    ref = minillm.ops.reference.attention_reference(q, q, q, causal=True, scale=0.25)
    packed = torch.full((2, 8, 2, 8), float("nan"))  # (B, N, H, D): out written as its (B, H, N, D) transpose
    C.attention_fwd(**kw, out=b(packed), out_strides=(128, 8, 16))
    torch.testing.assert_close(packed.transpose(1, 2), ref)
    bad = [
        (torch.empty(255), (128, 8, 16), "out reaches 1024 bytes"),  # one float short of the last row
        (torch.empty(256), (128, 8, 8), "out strides overlap"),  # two heads' rows on the same memory
        (torch.empty(256), (128, 64, 4), "out strides overlap"),  # rows half a row apart
        (torch.empty(256), (0, 64, 8), "out strides overlap"),  # both batches on one place
    ]
    for buf, strides, match in bad:
        with pytest.raises(ValueError, match=match):
            C.attention_fwd(**kw, out=b(buf), out_strides=strides)
    # the backward writes dq, dk, dv into one (B, N, 3, H, D) buffer: three interleaved strided outputs
    out = ref.contiguous()
    C.attention_fwd(**kw, out=b(out))
    dout = torch.randn(2, 2, 8, 8)
    dqkv = torch.full((2, 8, 3, 2, 8), float("nan"))
    st = (8 * 3 * 16, 8, 3 * 16)  # (b, h, n) strides of dqkv[:, :, i].transpose(1, 2)
    bkw = dict(dout=b(dout), q=b(q), k=b(q), v=b(q), out=b(out), lse=b(lse), sizes=(2, 2, 8, 8, 8),
               dout_strides=(128, 64, 8), q_strides=(128, 64, 8), k_strides=(128, 64, 8), v_strides=(128, 64, 8),
               out_strides=(128, 64, 8), causal=True, causal_offset=0, scale=0.25, dtype=C.DTYPES["float32"])
    views = [dqkv[:, :, i].transpose(1, 2) for i in range(3)]
    C.attention_bwd(**bkw, dq=b(views[0]), dk=b(views[1]), dv=b(views[2]), dq_strides=st, dk_strides=st,
                    dv_strides=st)
    x = q.clone().requires_grad_()
    expected = torch.autograd.grad(minillm.ops.reference.attention_reference(x, x, x, causal=True, scale=0.25), x,
                                   dout)[0]
    torch.testing.assert_close(sum(views), expected, rtol=1e-5, atol=1e-5)  # q, k and v are one tensor
    dense = [torch.empty_like(q) for _ in range(3)]
    with pytest.raises(ValueError, match="dv reaches"):
        C.attention_bwd(**bkw, dq=b(dense[0]), dk=b(dense[1]), dv=b(torch.empty(dqkv.numel() - 1)[32:]),
                        dv_strides=st)  # v's slice of a packed buffer one float short
    with pytest.raises(ValueError, match="dk strides overlap"):
        C.attention_bwd(**bkw, dq=b(dense[0]), dk=b(dense[1]), dv=b(dense[2]), dk_strides=(128, 64, 0))


def test_cuda_bindings_take_every_keyword_the_python_cuda_path_passes():
    """minillm/ops/attention.py calls the CUDA bindings with kv_heads and mods on every call; a binding that does not
    list them raised TypeError on every CUDA attention call. Checked here without a GPU: each keyword the CUDA path
    passes, given alone, is reported missing-others, never unexpected."""
    import inspect

    from minillm.ops import _backend

    attn = importlib.import_module("minillm.ops.attention")
    if _backend._C is None or not hasattr(_backend._C, "cuda_attention_fwd"):
        pytest.skip("extension built without CUDA")
    source = inspect.getsource(attn)
    for fn in ("cuda_attention_fwd", "cuda_attention_bwd"):
        call = source[source.index(f"_backend._C.{fn}("):]
        call = call[:call.index("\n\n")]
        names = set(re.findall(r"\b([a-z_]+)=", call))
        assert {"kv_heads", "mods", "sizes", "device", "stream"} <= names, names
        for name in names:
            with pytest.raises(TypeError) as info:
                getattr(_backend._C, fn)(**{name: None})
            assert "unexpected keyword" not in str(info.value), (fn, name, str(info.value))
