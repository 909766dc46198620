// The only pybind11 file: minillm._C. Each op is one function named as the op, called from minillm/ops with
// keyword arguments named as the fields of its argument struct below (AttnFwdIn, ...):
//
//     _C.attention_fwd(q=buf(q), k=buf(k), ..., dtype=_C.DTYPES["float32"], nthreads=2)
//
// A buffer is (data pointer, bytes from it to the end of its storage), two Python ints (minillm/ops/_backend.py:
// `buf`). The function checks that every element the kernel will touch (sizes x strides) lies inside its buffer,
// fills the kernel's struct (csrc/kernels.h), releases the GIL and runs minillm::<op>, which picks the SIMD level
// and runs csrc/cpu/<op>.h. Argument semantics (dtypes, shapes, masks) are checked in Python, with messages in
// the user's terms; the checks here keep any call that reaches this module inside its tensors' memory.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels.h"
#include "py_args.h"
#ifdef MINILLM_WITH_CUDA
#include "cuda_api.h"
#endif

namespace py = pybind11;
using minillm::AttnBwdArgs;
using minillm::AttnFwdArgs;
using minillm::GemmArgs;
using minillm::LinearArgs;
using minillm::TopkArgs;

namespace {

using namespace minillm_py;
using minillm_py::convert;  // one overload set with gemm_pair's convert(GemmArgs) below

using Strides = std::array<int64_t, 3>;  // element strides of (b, h, n)
using Sizes = std::array<int64_t, 5>;    // B, H, Nq, Nk, D
using Strides4 = std::array<int64_t, 4>; // element strides of (b, h, i, j)

// Score modifiers (csrc/kernels.h, AttnMods): one keyword `mods`, None (plain attention: the default) or the tuple
// (window_left, window_right, softcap, alibi, bias, bias_strides, sinks, dbias) of these fields; sinks is the
// forward's, dbias the backward's. One keyword rather than eight: a plain call passes none, and Python spends no
// dict on building optional keywords (~0.5 us of a ~10 us call).
struct ModsIn {
  int64_t window_left = -1, window_right = -1;
  double softcap = 0;
  Buf alibi, bias;
  Strides4 bias_strides{};
  Buf sinks, dbias;
};

void convert(PyObject* o, ModsIn& out, const char* name) {
  out = ModsIn{};
  if (o == Py_None) return;
  if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != 8)
    type_error(std::string(name) + " must be None or (window_left, window_right, softcap, alibi, bias, bias_strides, "
               "sinks, dbias)");
  PyObject* const* f = &PyTuple_GET_ITEM(o, 0);
  convert(f[0], out.window_left, "mods.window_left");
  convert(f[1], out.window_right, "mods.window_right");
  convert(f[2], out.softcap, "mods.softcap");
  convert(f[3], out.alibi, "mods.alibi");
  convert(f[4], out.bias, "mods.bias");
  convert(f[5], out.bias_strides, "mods.bias_strides");
  convert(f[6], out.sinks, "mods.sinks");
  convert(f[7], out.dbias, "mods.dbias");
}

// ---- the ops' arguments, one struct per binding (names as the Python keywords) ----

struct AttnFwdIn {
  Buf q, k, v, out, lse, key_padding_mask, query_padding_mask;
  ModsIn mods;
  Sizes sizes;
  int64_t kv_heads = 0;    // grouped-query attention: k/v have this many heads (0: H)
  Strides q_strides, k_strides, v_strides;
  Strides out_strides{};   // {0, 0, 0}: out contiguous
  bool causal;
  int64_t causal_offset;
  double scale;
  int dtype;
  int nthreads = 1;
  int device = 0;          // CUDA only
  uintptr_t stream = 0;    // CUDA only
};

struct AttnBwdIn {
  Buf dout, q, k, v, out, lse, dlse, key_padding_mask, query_padding_mask, dq, dk, dv;
  ModsIn mods;
  Sizes sizes;
  int64_t kv_heads = 0;
  Strides dout_strides, q_strides, k_strides, v_strides, out_strides;
  Strides dq_strides{}, dk_strides{}, dv_strides{};  // {0, 0, 0}: contiguous
  bool causal;
  int64_t causal_offset;
  double scale;
  int dtype;
  int nthreads = 1;
  Buf delta;               // CUDA only: B * H * Nq floats of scratch
  int device = 0;          // CUDA only
  uintptr_t stream = 0;    // CUDA only
};

struct TopkIn {
  Buf queries, corpus;
  int64_t corpus_stride;
  int dtype;
  int64_t Q, N, d, k;
  int metric;
  Buf out_scores, out_idx;
  int nthreads = 1;
  Buf row_scale, row_norm2;  // int8 corpus only
  Buf workspace;             // CUDA only
  int device = 0;            // CUDA only
  uintptr_t stream = 0;      // CUDA only
};

struct LinearIn {
  Buf x, weight, bias, y;
  int64_t M, K, N, ldx;
  int dtype;
  int nthreads = 1;
};

struct LayerNormFwdIn {
  Buf x;
  int64_t ldx;
  Buf weight, bias, y, mean, rstd;
  int64_t M, C;
  double eps;
  int dtype;
  int nthreads = 1;
  int y_dtype = -1;  // -1: dtype; kBF16 with kF32 x (csrc/kernels.h)
};

struct LayerNormBwdIn {
  Buf dy;
  int64_t lddy;
  Buf x;
  int64_t ldx;
  Buf weight, mean, rstd, dx, dweight, dbias;
  int64_t M, C;
  int dtype;
  int nthreads = 1;
  int dy_dtype = -1;  // -1: dtype; kBF16 with kF32 x (csrc/kernels.h)
};

struct QLinearIn {
  Buf x, codes, scale, offset, bias, y;
  int64_t M, K, N, ldx;
  int bits;
  int64_t group = 0;
  int nthreads = 1;
};

struct DequantizeIn {
  Buf codes, scale, offset, out;
  int64_t N, K;
  int bits;
  int64_t group = 0;
  int nthreads = 1;
};

// decode_layers: each layer as the tuple (norm1, qkv, proj, norm2, fc, down, k_cache, v_cache), each weight as the
// tuple (bits, w, scale, offset, group) (bits 32: fp32 w, scale/offset/group unused).
struct WeightIn {
  int bits = 0;
  Buf w, scale, offset;
  int64_t group = 0;
};
struct LayerIn {
  Buf norm1;
  WeightIn qkv, proj;
  Buf norm2;
  WeightIn fc, down;
  Buf k_cache, v_cache;
};

void convert(PyObject* o, WeightIn& out, const char* name) {
  if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != 5)
    type_error(std::string(name) + " must be a tuple (bits, w, scale, offset, group)");
  PyObject* const* f = &PyTuple_GET_ITEM(o, 0);
  convert(f[0], out.bits, name);
  convert(f[1], out.w, name);
  convert(f[2], out.scale, name);
  convert(f[3], out.offset, name);
  convert(f[4], out.group, name);
}

void convert(PyObject* o, std::vector<LayerIn>& out, const char* name) {
  if (!PyList_Check(o)) type_error(std::string(name) + " must be a list of layer tuples");
  out.assign(PyList_GET_SIZE(o), LayerIn{});
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(o); ++i) {
    PyObject* t = PyList_GET_ITEM(o, i);
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 8)
      type_error(std::string(name) + " items must be (norm1, qkv, proj, norm2, fc, down, k_cache, v_cache)");
    PyObject* const* f = &PyTuple_GET_ITEM(t, 0);
    LayerIn& l = out[i];
    convert(f[0], l.norm1, "layers.norm1");
    convert(f[1], l.qkv, "layers.qkv");
    convert(f[2], l.proj, "layers.proj");
    convert(f[3], l.norm2, "layers.norm2");
    convert(f[4], l.fc, "layers.fc");
    convert(f[5], l.down, "layers.down");
    convert(f[6], l.k_cache, "layers.k_cache");
    convert(f[7], l.v_cache, "layers.v_cache");
  }
}

struct DecodeIn {
  Buf x, cos, sin, key_padding_mask, scratch;
  std::vector<LayerIn> layers;
  int64_t B, C, H, kv_heads, head_dim, d_ff, cache_len, capacity;
  double eps, scale;
  int cache_dtype = 0;  // minillm::kF32 or kBF16
  int linear_threads = 1, attn_threads = 1;
};

struct GemmIn {
  Buf a;
  int64_t lda;
  bool a_colmajor;
  Buf b;
  int64_t ldb;
  bool b_colmajor;
  Buf bias, c;
  int64_t M, N, K;
  int dtype;
  int nthreads = 1;
};

bool float_dtype(int dtype) {
  return dtype == minillm::kF32 || dtype == minillm::kBF16 || dtype == minillm::kF16 || dtype == minillm::kF64;
}

// ---- attention ----

// The attention operands' extents: (B, H, n, D) with element strides for (b, h, n) and unit stride along D
// (csrc/kernels.h), the outputs and log-sum-exps contiguous, the masks (B, n) bytes.
struct AttnShape {
  Sizes sz;
  int64_t item, acc;  // bytes of an element and of an accumulator (lse)
  AttnShape(const Sizes& s, int dtype) : sz(s), item(minillm::elem_size(dtype)), acc(dtype == minillm::kF64 ? 8 : 4) {
    require(sz[0] >= 1 && sz[1] >= 1 && sz[2] >= 1 && sz[3] >= 1 && sz[4] >= 1,
            "attention sizes (B, H, Nq, Nk, D) must all be >= 1 (empty inputs are answered in Python)");
    require(float_dtype(dtype), "attention dtype must be a float code of csrc/kernels.h (kF32, kBF16, kF16, kF64)");
  }
  const void* strided(const Buf& b, const char* name, int64_t n, const Strides& s, int64_t heads = 0) const {
    return checked<const void*>(b, name, item, {{sz[0], s[0]}, {heads ? heads : sz[1], s[1]}, {n, s[2]}, {sz[4], 1}});
  }
  void* dense_out(const Buf& b, const char* name, int64_t n, int64_t heads = 0) const {
    return checked<void*>(b, name, item, {dense({sz[0], heads ? heads : sz[1], n, sz[4]})});
  }
  // An output (B, heads, n, D) written with element strides s for (b, h, n) and unit stride along D, or contiguous
  // when s is {0, 0, 0}. Its rows are written by several threads, so no two elements may share an address: the
  // strides, sorted, must each step past everything the smaller ones span.
  void* strided_out(const Buf& b, const char* name, int64_t n, const Strides& s, int64_t heads = 0) const {
    if (s[0] == 0 && s[1] == 0 && s[2] == 0) return dense_out(b, name, n, heads);
    const int64_t h = heads ? heads : sz[1];
    std::array<std::pair<int64_t, int64_t>, 3> dims = {{{s[0], sz[0]}, {s[1], h}, {s[2], n}}};  // (stride, size)
    std::sort(dims.begin(), dims.end());
    int64_t span = sz[4];  // elements 0 .. span - 1 reached by the dims so far (a row of D)
    for (const auto& d : dims) {
      if (d.second == 1) continue;
      if (d.first < span) fail(std::string(name) + " strides overlap: the kernel writes every element once");
      span = d.first * (d.second - 1) + span;
    }
    return checked<void*>(b, name, item, {{sz[0], s[0]}, {h, s[1]}, {n, s[2]}, {sz[4], 1}});
  }
  template <typename P>
  P lse(const Buf& b, const char* name, bool optional = false) const {
    return checked<P>(b, name, acc, {dense({sz[0], sz[1], sz[2]})}, optional);
  }
  const uint8_t* mask(const Buf& b, const char* name, int64_t n) const {
    return checked<const uint8_t*>(b, name, 1, {dense({sz[0], n})}, true);
  }
  minillm::AttnMods mods(const ModsIn& in) const {
    require(in.window_left >= -1 && in.window_right >= -1, "attention window sides must be >= -1 (-1: unbounded)");
    require(in.softcap >= 0 && in.softcap < std::numeric_limits<double>::infinity(),
            "attention softcap must be finite and >= 0 (0: none)");
    minillm::AttnMods m{};
    m.window_left = in.window_left;
    m.window_right = in.window_right;
    m.softcap = in.softcap;
    m.alibi = checked<const void*>(in.alibi, "alibi", acc, {dense({sz[0], sz[1]})}, true);
    const Strides4& bs = in.bias_strides;
    m.bias = checked<const void*>(in.bias, "bias", acc, {{sz[0], bs[0]}, {sz[1], bs[1]}, {sz[2], bs[2]}, {sz[3], bs[3]}},
                                  true);
    for (int i = 0; i < 4; ++i) m.bias_stride[i] = bs[i];
    return m;
  }
};

void copy3(int64_t* dst, const Strides& s) {
  for (int i = 0; i < 3; ++i) dst[i] = s[i];
}

AttnFwdArgs fwd_args(const AttnFwdIn& in) {
  const Sizes& sz = in.sizes;
  const AttnShape s(sz, in.dtype);
  const int64_t Hkv = in.kv_heads ? in.kv_heads : sz[1];
  require(Hkv >= 1 && sz[1] % Hkv == 0, "attention kv_heads must divide the query heads H");
  AttnFwdArgs a{};
  a.q = s.strided(in.q, "q", sz[2], in.q_strides);
  a.k = s.strided(in.k, "k", sz[3], in.k_strides, Hkv);
  a.v = s.strided(in.v, "v", sz[3], in.v_strides, Hkv);
  a.Hkv = Hkv;
  a.out = s.strided_out(in.out, "out", sz[2], in.out_strides);
  a.lse = s.lse<void*>(in.lse, "lse");
  a.kpm = s.mask(in.key_padding_mask, "key_padding_mask", sz[3]);
  a.qpm = s.mask(in.query_padding_mask, "query_padding_mask", sz[2]);
  a.B = sz[0], a.H = sz[1], a.Nq = sz[2], a.Nk = sz[3], a.D = sz[4];
  copy3(a.q_stride, in.q_strides);
  copy3(a.k_stride, in.k_strides);
  copy3(a.v_stride, in.v_strides);
  copy3(a.o_stride, in.out_strides);
  a.causal = in.causal;
  a.causal_offset = in.causal_offset;
  a.scale = in.scale;
  a.mods = s.mods(in.mods);
  require(in.mods.dbias.ptr == 0, "attention_fwd takes no mods.dbias");
  a.mods.sinks = checked<const void*>(in.mods.sinks, "sinks", s.acc, {dense({sz[1]})}, true);
  a.dtype = in.dtype;
  a.nthreads = in.nthreads;
  return a;
}

AttnBwdArgs bwd_args(const AttnBwdIn& in) {
  const Sizes& sz = in.sizes;
  const AttnShape s(sz, in.dtype);
  const int64_t Hkv = in.kv_heads ? in.kv_heads : sz[1];
  require(Hkv >= 1 && sz[1] % Hkv == 0, "attention kv_heads must divide the query heads H");
  AttnBwdArgs a{};
  a.dout = s.strided(in.dout, "dout", sz[2], in.dout_strides);
  a.q = s.strided(in.q, "q", sz[2], in.q_strides);
  a.k = s.strided(in.k, "k", sz[3], in.k_strides, Hkv);
  a.v = s.strided(in.v, "v", sz[3], in.v_strides, Hkv);
  a.Hkv = Hkv;
  a.out = s.strided(in.out, "out", sz[2], in.out_strides);
  a.lse = s.lse<const void*>(in.lse, "lse");
  a.dlse = s.lse<const void*>(in.dlse, "dlse", true);
  a.kpm = s.mask(in.key_padding_mask, "key_padding_mask", sz[3]);
  a.qpm = s.mask(in.query_padding_mask, "query_padding_mask", sz[2]);
  a.dq = s.strided_out(in.dq, "dq", sz[2], in.dq_strides);
  a.dk = s.strided_out(in.dk, "dk", sz[3], in.dk_strides, Hkv);
  a.dv = s.strided_out(in.dv, "dv", sz[3], in.dv_strides, Hkv);
  a.B = sz[0], a.H = sz[1], a.Nq = sz[2], a.Nk = sz[3], a.D = sz[4];
  copy3(a.do_stride, in.dout_strides);
  copy3(a.q_stride, in.q_strides);
  copy3(a.k_stride, in.k_strides);
  copy3(a.v_stride, in.v_strides);
  copy3(a.o_stride, in.out_strides);
  copy3(a.dq_stride, in.dq_strides);
  copy3(a.dk_stride, in.dk_strides);
  copy3(a.dv_stride, in.dv_strides);
  a.causal = in.causal;
  a.causal_offset = in.causal_offset;
  a.scale = in.scale;
  a.mods = s.mods(in.mods);
  require(in.mods.sinks.ptr == 0, "attention_bwd takes no mods.sinks (their gradient follows from lse)");
  a.mods.dbias = checked<void*>(in.mods.dbias, "dbias", s.acc, {dense({sz[0], sz[1], sz[2], sz[3]})}, true);
  a.dtype = in.dtype;
  a.nthreads = in.nthreads;
  return a;
}

#define MINILLM_ATTN_FWD_FIELDS(In)                                                                           \
  MINILLM_FIELD(In, q), MINILLM_FIELD(In, k), MINILLM_FIELD(In, v), MINILLM_FIELD(In, out), MINILLM_FIELD(In, lse), \
      MINILLM_OPTIONAL(In, key_padding_mask), MINILLM_OPTIONAL(In, query_padding_mask), MINILLM_FIELD(In, sizes), \
      MINILLM_FIELD(In, q_strides), MINILLM_FIELD(In, k_strides), MINILLM_FIELD(In, v_strides),                 \
      MINILLM_FIELD(In, causal), MINILLM_FIELD(In, causal_offset), MINILLM_FIELD(In, scale), MINILLM_FIELD(In, dtype)

std::array<Field<AttnFwdIn>, 19> attention_fwd_fields = {{MINILLM_ATTN_FWD_FIELDS(AttnFwdIn),
                                                           MINILLM_OPTIONAL(AttnFwdIn, nthreads),
                                                           MINILLM_OPTIONAL(AttnFwdIn, kv_heads),
                                                           MINILLM_OPTIONAL(AttnFwdIn, mods),
                                                           MINILLM_OPTIONAL(AttnFwdIn, out_strides)}};

void attention_fwd(const AttnFwdIn& in) {
  const AttnFwdArgs a = fwd_args(in);
  int status;
  {
    py::gil_scoped_release nogil;
    status = minillm::attention_fwd(a);
  }
  check(status, "attention_fwd");
}

#define MINILLM_ATTN_BWD_FIELDS(In)                                                                               \
  MINILLM_FIELD(In, dout), MINILLM_FIELD(In, q), MINILLM_FIELD(In, k), MINILLM_FIELD(In, v), MINILLM_FIELD(In, out),   \
      MINILLM_FIELD(In, lse), MINILLM_OPTIONAL(In, dlse), MINILLM_OPTIONAL(In, key_padding_mask),                     \
      MINILLM_OPTIONAL(In, query_padding_mask), MINILLM_FIELD(In, dq), MINILLM_FIELD(In, dk), MINILLM_FIELD(In, dv),  \
      MINILLM_FIELD(In, sizes), MINILLM_FIELD(In, dout_strides), MINILLM_FIELD(In, q_strides),                        \
      MINILLM_FIELD(In, k_strides), MINILLM_FIELD(In, v_strides), MINILLM_FIELD(In, out_strides),                     \
      MINILLM_FIELD(In, causal), MINILLM_FIELD(In, causal_offset), MINILLM_FIELD(In, scale), MINILLM_FIELD(In, dtype)

std::array<Field<AttnBwdIn>, 28> attention_bwd_fields = {{MINILLM_ATTN_BWD_FIELDS(AttnBwdIn),
                                                           MINILLM_OPTIONAL(AttnBwdIn, nthreads),
                                                           MINILLM_OPTIONAL(AttnBwdIn, kv_heads),
                                                           MINILLM_OPTIONAL(AttnBwdIn, mods),
                                                           MINILLM_OPTIONAL(AttnBwdIn, dq_strides),
                                                           MINILLM_OPTIONAL(AttnBwdIn, dk_strides),
                                                           MINILLM_OPTIONAL(AttnBwdIn, dv_strides)}};

void attention_bwd(const AttnBwdIn& in) {
  const AttnBwdArgs a = bwd_args(in);
  int status;
  {
    py::gil_scoped_release nogil;
    status = minillm::attention_bwd(a);
  }
  check(status, "attention_bwd");
}

// ---- top-k ----

TopkArgs topk_args(const TopkIn& in) {
  const int64_t Q = in.Q, N = in.N, d = in.d, k = in.k;
  const int dtype = in.dtype, metric = in.metric;
  require(Q >= 1 && N >= 1 && d >= 1, "topk sizes Q, N and d must be >= 1");
  require(k >= 1 && k <= N, "topk needs 1 <= k <= N");
  require(dtype == minillm::kF32 || dtype == minillm::kBF16 || dtype == minillm::kF16 || dtype == minillm::kI8,
          "topk corpus dtype must be kF32, kBF16, kF16 or kI8");
  const bool i8 = dtype == minillm::kI8;
  require(!i8 || (in.row_scale.ptr != 0 && in.row_norm2.ptr != 0), "an int8 corpus needs row_scale and row_norm2");
  require(metric == minillm::kIP || metric == minillm::kCosine || metric == minillm::kL2,
          "topk metric must be kIP, kCosine or kL2");
  // the columns a corpus row is read over: int8 codes in whole kI8Pad blocks
  const int64_t width = i8 ? (d + minillm::kI8Pad - 1) / minillm::kI8Pad * minillm::kI8Pad : d;
  TopkArgs a{};
  a.queries = checked<const float*>(in.queries, "queries", 4, {dense({Q, d})});
  a.corpus = checked<const void*>(in.corpus, "corpus", minillm::elem_size(dtype), {{N, in.corpus_stride}, {width, 1}});
  a.row_scale = i8 ? checked<const float*>(in.row_scale, "row_scale", 4, {{N, 1}}) : nullptr;
  a.row_norm2 = i8 ? checked<const float*>(in.row_norm2, "row_norm2", 4, {{N, 1}}) : nullptr;
  a.corpus_stride = in.corpus_stride;
  a.dtype = dtype;
  a.Q = Q, a.N = N, a.d = d, a.k = k;
  a.metric = metric;
  a.out_scores = checked<float*>(in.out_scores, "out_scores", 4, {dense({Q, k})});
  a.out_idx = checked<int64_t*>(in.out_idx, "out_idx", 8, {dense({Q, k})});
  a.nthreads = in.nthreads;
  return a;
}

#define MINILLM_TOPK_FIELDS(In)                                                                                 \
  MINILLM_FIELD(In, queries), MINILLM_FIELD(In, corpus), MINILLM_FIELD(In, corpus_stride), MINILLM_FIELD(In, dtype), \
      MINILLM_FIELD(In, Q), MINILLM_FIELD(In, N), MINILLM_FIELD(In, d), MINILLM_FIELD(In, k),                        \
      MINILLM_FIELD(In, metric), MINILLM_FIELD(In, out_scores), MINILLM_FIELD(In, out_idx)

std::array<Field<TopkIn>, 14> topk_fields = {{MINILLM_TOPK_FIELDS(TopkIn), MINILLM_OPTIONAL(TopkIn, nthreads),
                                              MINILLM_OPTIONAL(TopkIn, row_scale), MINILLM_OPTIONAL(TopkIn, row_norm2)}};

void topk(const TopkIn& in) {
  const TopkArgs a = topk_args(in);
  int status;
  {
    py::gil_scoped_release nogil;
    status = minillm::topk(a);
  }
  check(status, "topk");
}

// ---- linear layers ----

std::array<Field<LinearIn>, 10> linear_small_m_fields = {{
    MINILLM_FIELD(LinearIn, x), MINILLM_FIELD(LinearIn, weight), MINILLM_OPTIONAL(LinearIn, bias),
    MINILLM_FIELD(LinearIn, y), MINILLM_FIELD(LinearIn, M), MINILLM_FIELD(LinearIn, K), MINILLM_FIELD(LinearIn, N),
    MINILLM_FIELD(LinearIn, ldx), MINILLM_FIELD(LinearIn, dtype), MINILLM_OPTIONAL(LinearIn, nthreads)}};

void linear_small_m(const LinearIn& in) {
  const int64_t M = in.M, K = in.K, N = in.N;
  require(M >= 1 && K >= 1 && N >= 1, "linear_small_m sizes M, K and N must be >= 1");
  require(in.dtype == minillm::kF32 || in.dtype == minillm::kF64 || in.dtype == minillm::kBF16,
          "linear_small_m dtype must be kF32, kF64 or kBF16");
  const int64_t item = minillm::elem_size(in.dtype);
  LinearArgs a{};
  a.x = checked<const void*>(in.x, "x", item, {{M, in.ldx}, {K, 1}});
  a.w = checked<const void*>(in.weight, "weight", item, {dense({N, K})});
  a.b = checked<const void*>(in.bias, "bias", item, {{N, 1}}, true);
  a.y = checked<void*>(in.y, "y", item, {dense({M, N})});
  a.M = M, a.K = K, a.N = N, a.ldx = in.ldx;
  a.dtype = in.dtype;
  a.nthreads = in.nthreads;
  int status;
  {
    py::gil_scoped_release nogil;
    status = minillm::linear_small_m(a);
  }
  check(status, "linear_small_m");
}

// ---- layer norm ----

std::array<Field<LayerNormFwdIn>, 13> layer_norm_fwd_fields = {{
    MINILLM_FIELD(LayerNormFwdIn, x), MINILLM_FIELD(LayerNormFwdIn, ldx), MINILLM_FIELD(LayerNormFwdIn, weight),
    MINILLM_OPTIONAL(LayerNormFwdIn, bias), MINILLM_FIELD(LayerNormFwdIn, y), MINILLM_FIELD(LayerNormFwdIn, mean),
    MINILLM_FIELD(LayerNormFwdIn, rstd), MINILLM_FIELD(LayerNormFwdIn, M), MINILLM_FIELD(LayerNormFwdIn, C),
    MINILLM_FIELD(LayerNormFwdIn, eps), MINILLM_FIELD(LayerNormFwdIn, dtype), MINILLM_OPTIONAL(LayerNormFwdIn, nthreads),
    MINILLM_OPTIONAL(LayerNormFwdIn, y_dtype)}};

void require_layer_norm_sizes(int64_t M, int64_t C, int dtype) {
  require(M >= 1 && C >= 1, "layer_norm sizes M and C must be >= 1");
  require(dtype == minillm::kF32 || dtype == minillm::kF64, "layer_norm dtype must be kF32 or kF64");
}

// The dtype of y (forward) or dy (backward): the input dtype, or bf16 beside fp32 inputs.
int layer_norm_io_dtype(int io, int dtype, const char* name) {
  if (io < 0) return dtype;
  require(io == dtype || (io == minillm::kBF16 && dtype == minillm::kF32), name);
  return io;
}

void layer_norm_fwd(const LayerNormFwdIn& in) {
  const int64_t M = in.M, C = in.C;
  require_layer_norm_sizes(M, C, in.dtype);
  require(in.ldx >= C, "layer_norm_fwd ldx must be >= C (rows may not overlap)");
  const int64_t item = minillm::elem_size(in.dtype);
  minillm::LayerNormFwdArgs a{};
  a.x = checked<const void*>(in.x, "x", item, {{M, in.ldx}, {C, 1}});
  a.ldx = in.ldx;
  a.weight = checked<const void*>(in.weight, "weight", item, {{C, 1}});
  a.bias = checked<const void*>(in.bias, "bias", item, {{C, 1}}, true);
  a.y_dtype = layer_norm_io_dtype(in.y_dtype, in.dtype, "layer_norm_fwd y_dtype must be dtype, or kBF16 with kF32");
  a.y = checked<void*>(in.y, "y", minillm::elem_size(a.y_dtype), {dense({M, C})});
  a.mean = checked<void*>(in.mean, "mean", item, {{M, 1}});
  a.rstd = checked<void*>(in.rstd, "rstd", item, {{M, 1}});
  a.M = M, a.C = C, a.eps = in.eps, a.dtype = in.dtype, a.nthreads = in.nthreads;
  int status;
  {
    py::gil_scoped_release nogil;
    status = minillm::layer_norm_fwd(a);
  }
  check(status, "layer_norm_fwd");
}

std::array<Field<LayerNormBwdIn>, 15> layer_norm_bwd_fields = {{
    MINILLM_FIELD(LayerNormBwdIn, dy), MINILLM_FIELD(LayerNormBwdIn, lddy), MINILLM_FIELD(LayerNormBwdIn, x),
    MINILLM_FIELD(LayerNormBwdIn, ldx), MINILLM_FIELD(LayerNormBwdIn, weight), MINILLM_FIELD(LayerNormBwdIn, mean),
    MINILLM_FIELD(LayerNormBwdIn, rstd), MINILLM_OPTIONAL(LayerNormBwdIn, dx), MINILLM_OPTIONAL(LayerNormBwdIn, dweight),
    MINILLM_OPTIONAL(LayerNormBwdIn, dbias), MINILLM_FIELD(LayerNormBwdIn, M), MINILLM_FIELD(LayerNormBwdIn, C),
    MINILLM_FIELD(LayerNormBwdIn, dtype), MINILLM_OPTIONAL(LayerNormBwdIn, nthreads),
    MINILLM_OPTIONAL(LayerNormBwdIn, dy_dtype)}};

void layer_norm_bwd(const LayerNormBwdIn& in) {
  const int64_t M = in.M, C = in.C;
  require_layer_norm_sizes(M, C, in.dtype);
  require(in.ldx >= C && in.lddy >= C, "layer_norm_bwd ldx and lddy must be >= C (rows may not overlap)");
  const int64_t item = minillm::elem_size(in.dtype);
  minillm::LayerNormBwdArgs a{};
  a.dy_dtype = layer_norm_io_dtype(in.dy_dtype, in.dtype, "layer_norm_bwd dy_dtype must be dtype, or kBF16 with kF32");
  a.dy = checked<const void*>(in.dy, "dy", minillm::elem_size(a.dy_dtype), {{M, in.lddy}, {C, 1}});
  a.lddy = in.lddy;
  a.x = checked<const void*>(in.x, "x", item, {{M, in.ldx}, {C, 1}});
  a.ldx = in.ldx;
  a.weight = checked<const void*>(in.weight, "weight", item, {{C, 1}});
  a.mean = checked<const void*>(in.mean, "mean", item, {{M, 1}});
  a.rstd = checked<const void*>(in.rstd, "rstd", item, {{M, 1}});
  a.dx = checked<void*>(in.dx, "dx", item, {dense({M, C})}, true);
  a.dweight = checked<void*>(in.dweight, "dweight", item, {{C, 1}}, true);
  a.dbias = checked<void*>(in.dbias, "dbias", item, {{C, 1}}, true);
  a.M = M, a.C = C, a.dtype = in.dtype, a.nthreads = in.nthreads;
  int status;
  {
    py::gil_scoped_release nogil;
    status = minillm::layer_norm_bwd(a);
  }
  check(status, "layer_norm_bwd");
}

// A quantized weight's buffers, extent-checked for its layout (csrc/kernels.h: QuantWeight).
minillm::QuantWeight quant_weight(const Buf& codes, const Buf& scale, const Buf& offset, int64_t N, int64_t K, int bits,
                                  int64_t group) {
  require(N >= 1 && K >= 1, "quantized weight sizes N and K must be >= 1");
  require(bits == 8 || bits == 4, "bits must be 8 or 4");
  minillm::QuantWeight q{};
  q.N = N, q.K = K, q.bits = bits, q.group = group;
  if (bits == 8 && group == 0) {  // one scale per row
    q.codes = checked<const void*>(codes, "codes", 1, {dense({N, K})});
    q.scale = checked<const float*>(scale, "scale", 4, {{N, 1}});
  } else {
    require(group >= 32 && group % 32 == 0 && K % group == 0,
            "grouped weights need a group that is a multiple of 32 and divides K (8-bit: or group 0, a scale per row)");
    q.codes = checked<const void*>(codes, "codes", 1, {dense({N, bits == 8 ? K : K / 2})});
    q.scale = checked<const float*>(scale, "scale", 4, {dense({N, K / group})});
    q.offset = checked<const float*>(offset, "offset", 4, {dense({N, K / group})});
  }
  return q;
}

std::array<Field<QLinearIn>, 13> linear_quant_fields = {{
    MINILLM_FIELD(QLinearIn, x), MINILLM_FIELD(QLinearIn, codes), MINILLM_FIELD(QLinearIn, scale),
    MINILLM_OPTIONAL(QLinearIn, offset), MINILLM_OPTIONAL(QLinearIn, bias), MINILLM_FIELD(QLinearIn, y),
    MINILLM_FIELD(QLinearIn, M), MINILLM_FIELD(QLinearIn, K), MINILLM_FIELD(QLinearIn, N),
    MINILLM_FIELD(QLinearIn, ldx), MINILLM_FIELD(QLinearIn, bits), MINILLM_OPTIONAL(QLinearIn, group),
    MINILLM_OPTIONAL(QLinearIn, nthreads)}};

void linear_quant(const QLinearIn& in) {
  const int64_t M = in.M, K = in.K, N = in.N;
  require(M >= 1, "linear_quant size M must be >= 1");
  minillm::QLinearArgs a{};
  a.w = quant_weight(in.codes, in.scale, in.offset, N, K, in.bits, in.group);
  a.x = checked<const void*>(in.x, "x", 4, {{M, in.ldx}, {K, 1}});
  a.bias = checked<const float*>(in.bias, "bias", 4, {{N, 1}}, true);
  a.y = checked<void*>(in.y, "y", 4, {dense({M, N})});
  a.ldx = in.ldx, a.M = M, a.nthreads = in.nthreads;
  int status;
  {
    py::gil_scoped_release nogil;
    status = minillm::linear_quant(a);
  }
  check(status, "linear_quant");
}

std::array<Field<DequantizeIn>, 9> dequantize_fields = {{
    MINILLM_FIELD(DequantizeIn, codes), MINILLM_FIELD(DequantizeIn, scale), MINILLM_OPTIONAL(DequantizeIn, offset),
    MINILLM_FIELD(DequantizeIn, out), MINILLM_FIELD(DequantizeIn, N), MINILLM_FIELD(DequantizeIn, K),
    MINILLM_FIELD(DequantizeIn, bits), MINILLM_OPTIONAL(DequantizeIn, group), MINILLM_OPTIONAL(DequantizeIn, nthreads)}};

void dequantize(const DequantizeIn& in) {
  const minillm::QuantWeight q = quant_weight(in.codes, in.scale, in.offset, in.N, in.K, in.bits, in.group);
  float* out = checked<float*>(in.out, "out", 4, {dense({in.N, in.K})});
  int status;
  {
    py::gil_scoped_release nogil;
    status = minillm::dequantize(q, out, in.nthreads);
  }
  check(status, "dequantize");
}

// ---- a decoding step through every layer ----

std::array<Field<DecodeIn>, 19> decode_layers_fields = {{
    MINILLM_FIELD(DecodeIn, x), MINILLM_FIELD(DecodeIn, cos), MINILLM_FIELD(DecodeIn, sin),
    MINILLM_OPTIONAL(DecodeIn, key_padding_mask), MINILLM_FIELD(DecodeIn, scratch), MINILLM_FIELD(DecodeIn, layers),
    MINILLM_FIELD(DecodeIn, B), MINILLM_FIELD(DecodeIn, C), MINILLM_FIELD(DecodeIn, H), MINILLM_FIELD(DecodeIn, kv_heads),
    MINILLM_FIELD(DecodeIn, head_dim), MINILLM_FIELD(DecodeIn, d_ff), MINILLM_FIELD(DecodeIn, cache_len),
    MINILLM_FIELD(DecodeIn, capacity), MINILLM_FIELD(DecodeIn, eps), MINILLM_FIELD(DecodeIn, scale),
    MINILLM_OPTIONAL(DecodeIn, linear_threads), MINILLM_OPTIONAL(DecodeIn, attn_threads),
    MINILLM_OPTIONAL(DecodeIn, cache_dtype)}};

// A decode_layers weight of N x K, extent-checked for its format.
minillm::DecodeWeight decode_weight(const WeightIn& in, int64_t N, int64_t K) {
  minillm::DecodeWeight w{};
  w.bits = in.bits, w.N = N, w.K = K, w.group = in.group;
  if (in.bits == 32 || in.bits == 16) {
    w.w = checked<const void*>(in.w, "layers weight", in.bits / 8, {dense({N, K})});
  } else {
    const minillm::QuantWeight q = quant_weight(in.w, in.scale, in.offset, N, K, in.bits, in.group);
    w.w = q.codes, w.scale = q.scale, w.offset = q.offset;
  }
  return w;
}

void decode_layers(const DecodeIn& in) {
  const int64_t B = in.B, C = in.C, H = in.H, Hkv = in.kv_heads, Dh = in.head_dim, F = in.d_ff;
  require(B >= 1 && C >= 1 && H >= 1 && Hkv >= 1 && Dh >= 2 && F >= 1, "decode_layers sizes must be >= 1");
  require(H % Hkv == 0 && Dh % 2 == 0, "decode_layers needs H % kv_heads == 0 and an even head_dim");
  require(in.cache_len >= 0 && in.cache_len < in.capacity, "decode_layers needs 0 <= cache_len < capacity");
  require(in.cache_dtype == minillm::kF32 || in.cache_dtype == minillm::kBF16,
          "decode_layers cache_dtype must be kF32 or kBF16");
  const int64_t csize = minillm::elem_size(in.cache_dtype);
  const int64_t T = in.cache_len + 1, QKV = (H + 2 * Hkv) * Dh;
  minillm::DecodeArgs a{};
  a.x = checked<float*>(in.x, "x", 4, {dense({B, C})});
  a.cos = checked<const float*>(in.cos, "cos", 4, {dense({B, Dh})});
  a.sin = checked<const float*>(in.sin, "sin", 4, {dense({B, Dh})});
  a.kpm = checked<const uint8_t*>(in.key_padding_mask, "key_padding_mask", 1, {dense({B, T})}, true);
  a.scratch = checked<float*>(in.scratch, "scratch", 4, {{minillm::decode_scratch_floats(B, C, H, Hkv, Dh, F), 1}});
  std::vector<minillm::DecodeLayer> layers(in.layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerIn& l = in.layers[i];
    minillm::DecodeLayer& d = layers[i];
    d.norm1 = checked<const float*>(l.norm1, "layers.norm1", 4, {{C, 1}});
    d.norm2 = checked<const float*>(l.norm2, "layers.norm2", 4, {{C, 1}});
    d.qkv = decode_weight(l.qkv, QKV, C);
    d.proj = decode_weight(l.proj, C, H * Dh);
    d.fc = decode_weight(l.fc, 2 * F, C);
    d.down = decode_weight(l.down, C, F);
    d.k_cache = checked<void*>(l.k_cache, "layers.k_cache", csize, {dense({B, Hkv, in.capacity, Dh})});
    d.v_cache = checked<void*>(l.v_cache, "layers.v_cache", csize, {dense({B, Hkv, in.capacity, Dh})});
  }
  a.layers = layers.data();
  a.L = static_cast<int64_t>(layers.size());
  a.B = B, a.C = C, a.H = H, a.Hkv = Hkv, a.Dh = Dh, a.F = F, a.cache_len = in.cache_len, a.capacity = in.capacity;
  a.eps = in.eps, a.scale = in.scale, a.cache_dtype = in.cache_dtype;
  a.linear_threads = in.linear_threads, a.attn_threads = in.attn_threads;
  int status;
  {
    py::gil_scoped_release nogil;
    status = minillm::decode_layers(a);
  }
  check(status, "decode_layers");
}

// A GEMM operand of `rows` x `cols` elements, row-major with row stride ld (colmajor: column stride ld).
const void* operand(const Buf& b, const char* name, int64_t itemsize, int64_t rows, int64_t cols, int64_t ld,
                    bool colmajor) {
  return colmajor ? checked<const void*>(b, name, itemsize, {{cols, ld}, {rows, 1}})
                  : checked<const void*>(b, name, itemsize, {{rows, ld}, {cols, 1}});
}

GemmArgs gemm_args(const GemmIn& in) {
  const int64_t M = in.M, N = in.N, K = in.K;
  require(M >= 1 && N >= 1 && K >= 1, "gemm sizes M, N and K must be >= 1 (empty products are answered in Python)");
  require(in.dtype == minillm::kF32 || in.dtype == minillm::kF64, "gemm dtype must be kF32 or kF64");
  const int64_t item = minillm::elem_size(in.dtype);
  GemmArgs g{};
  g.a = operand(in.a, "a", item, M, K, in.lda, in.a_colmajor);
  g.lda = in.lda;
  g.a_colmajor = in.a_colmajor;
  g.b = operand(in.b, "b", item, K, N, in.ldb, in.b_colmajor);
  g.ldb = in.ldb;
  g.b_colmajor = in.b_colmajor;
  g.bias = checked<const void*>(in.bias, "bias", item, {{N, 1}}, true);
  g.c = checked<void*>(in.c, "c", item, {dense({M, N})});
  g.M = M, g.N = N, g.K = K;
  g.dtype = in.dtype;
  g.nthreads = in.nthreads;
  return g;
}

std::array<Field<GemmIn>, 13> gemm_fields = {{
    MINILLM_FIELD(GemmIn, a), MINILLM_FIELD(GemmIn, lda), MINILLM_FIELD(GemmIn, a_colmajor), MINILLM_FIELD(GemmIn, b),
    MINILLM_FIELD(GemmIn, ldb), MINILLM_FIELD(GemmIn, b_colmajor), MINILLM_OPTIONAL(GemmIn, bias),
    MINILLM_FIELD(GemmIn, c), MINILLM_FIELD(GemmIn, M), MINILLM_FIELD(GemmIn, N), MINILLM_FIELD(GemmIn, K),
    MINILLM_FIELD(GemmIn, dtype), MINILLM_OPTIONAL(GemmIn, nthreads)}};

void gemm(const GemmIn& in) {
  const GemmArgs g = gemm_args(in);
  int status;
  {
    py::gil_scoped_release nogil;
    status = minillm::gemm(g);
  }
  check(status, "gemm");
}

// gemm_pair(first, second, nthreads): two dicts of gemm's keywords (without nthreads).
struct GemmPairIn {
  GemmArgs first, second;
  int nthreads = 1;
};

void convert(PyObject* o, GemmArgs& out, const char* name) {
  GemmIn in;
  parse_dict(name, gemm_fields, o, in);
  out = gemm_args(in);
}

std::array<Field<GemmPairIn>, 3> gemm_pair_fields = {{MINILLM_FIELD(GemmPairIn, first), MINILLM_FIELD(GemmPairIn, second),
                                                       MINILLM_OPTIONAL(GemmPairIn, nthreads)}};

void gemm_pair(const GemmPairIn& in) {
  int status;
  {
    py::gil_scoped_release nogil;
    status = minillm::gemm_pair(in.first, in.second, in.nthreads);
  }
  check(status, "gemm_pair");
}

// The CUDA bindings (compiled when nvcc was found): cuda_attention_fwd, cuda_attention_bwd, cuda_topk.
#include "bindings_cuda.h"


int isa_from_name(const std::string& name) {
  for (int isa = minillm::kScalar; isa <= minillm::kAvx512; ++isa)
    if (name == minillm::isa_name(isa)) return isa;
  throw py::value_error("unknown SIMD level '" + name + "'; expected one of avx512, avx2, scalar");
}

// The entry point CPython calls for binding `name`: keywords parsed against name_fields, then name(in).
using FastFn = PyObject* (*)(PyObject*, PyObject* const*, Py_ssize_t, PyObject*);
#define MINILLM_ENTRY(name, In)                                                                          \
  PyObject* name##_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {        \
    return binding<In, std::tuple_size<decltype(name##_fields)>::value, name>(#name, name##_fields, args, nargs, \
                                                                              kwnames);                   \
  }
MINILLM_ENTRY(attention_fwd, AttnFwdIn)
MINILLM_ENTRY(attention_bwd, AttnBwdIn)
MINILLM_ENTRY(topk, TopkIn)
MINILLM_ENTRY(linear_small_m, LinearIn)
MINILLM_ENTRY(linear_quant, QLinearIn)
MINILLM_ENTRY(dequantize, DequantizeIn)
MINILLM_ENTRY(decode_layers, DecodeIn)
MINILLM_ENTRY(gemm, GemmIn)
MINILLM_ENTRY(gemm_pair, GemmPairIn)
MINILLM_ENTRY(layer_norm_fwd, LayerNormFwdIn)
MINILLM_ENTRY(layer_norm_bwd, LayerNormBwdIn)
#ifdef MINILLM_WITH_CUDA
MINILLM_ENTRY(cuda_attention_fwd, AttnFwdIn)
MINILLM_ENTRY(cuda_attention_bwd, AttnBwdIn)
MINILLM_ENTRY(cuda_topk, TopkIn)
#endif
#undef MINILLM_ENTRY

// A METH_FASTCALL | METH_KEYWORDS function as PyMethodDef stores it.
PyCFunction as_cfunction(FastFn f) { return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f)); }

// Adds the function to the module; the definition must outlive it (static).
void add_function(py::module_& m, PyMethodDef* def) {
  m.attr(def->ml_name) = py::reinterpret_steal<py::object>(PyCFunction_NewEx(def, nullptr, m.attr("__name__").ptr()));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "minillm native kernels (raw-pointer interface; use minillm.ops instead)";
  constexpr int kFast = METH_FASTCALL | METH_KEYWORDS;
  static PyMethodDef defs[] = {
      {"attention_fwd", as_cfunction(attention_fwd_entry), kFast,
       "Attention forward (csrc/kernels.h: AttnFwdArgs); keywords as AttnFwdIn in csrc/bindings.cpp."},
      {"attention_bwd", as_cfunction(attention_bwd_entry), kFast,
       "Attention backward (csrc/kernels.h: AttnBwdArgs); keywords as AttnBwdIn in csrc/bindings.cpp."},
      {"topk", as_cfunction(topk_entry), kFast,
       "Exact top-k (csrc/kernels.h: TopkArgs); keywords as TopkIn; row_scale/row_norm2 for an int8 corpus."},
      {"linear_small_m", as_cfunction(linear_small_m_entry), kFast,
       "y = x W^T + b for few rows (csrc/kernels.h: LinearArgs); keywords as LinearIn."},
      {"linear_quant", as_cfunction(linear_quant_entry), kFast,
       "y = x W^T + b for few rows, W as int8 or 4-bit codes (csrc/kernels.h: QLinearArgs); keywords as QLinearIn."},
      {"dequantize", as_cfunction(dequantize_entry), kFast,
       "W (N, K) fp32 from int8 or 4-bit codes (csrc/kernels.h: QuantWeight); keywords as DequantizeIn."},
      {"decode_layers", as_cfunction(decode_layers_entry), kFast,
       "One decoding step through every layer of a Llama-family stack (csrc/kernels.h: DecodeArgs); keywords as "
       "DecodeIn."},
      {"layer_norm_fwd", as_cfunction(layer_norm_fwd_entry), kFast,
       "LayerNorm over the last dimension (csrc/kernels.h: LayerNormFwdArgs); keywords as LayerNormFwdIn."},
      {"layer_norm_bwd", as_cfunction(layer_norm_bwd_entry), kFast,
       "LayerNorm backward (csrc/kernels.h: LayerNormBwdArgs); keywords as LayerNormBwdIn."},
      {"gemm", as_cfunction(gemm_entry), kFast, "C = A B + bias (csrc/kernels.h: GemmArgs); keywords as GemmIn."},
      {"gemm_pair", as_cfunction(gemm_pair_entry), kFast,
       "Two independent gemm calls (first, second: dicts of gemm's keywords), one per thread."},
#ifdef MINILLM_WITH_CUDA
      {"cuda_attention_fwd", as_cfunction(cuda_attention_fwd_entry), kFast,
       "attention_fwd on CUDA device pointers, plus device and stream (cuda/cuda_api.h)."},
      {"cuda_attention_bwd", as_cfunction(cuda_attention_bwd_entry), kFast,
       "attention_bwd on CUDA device pointers, plus delta (B*H*Nq floats of scratch), device and stream."},
      {"cuda_topk", as_cfunction(cuda_topk_entry), kFast,
       "topk on CUDA device pointers, plus workspace (cuda_topk_workspace bytes), device and stream."},
#endif
  };
  for (PyMethodDef& def : defs) add_function(m, &def);

  // The codes of csrc/kernels.h, the one place minillm/ops reads them from.
  py::dict dtypes;
  dtypes["float32"] = int(minillm::kF32);
  dtypes["bfloat16"] = int(minillm::kBF16);
  dtypes["float16"] = int(minillm::kF16);
  dtypes["float64"] = int(minillm::kF64);
  dtypes["int8"] = int(minillm::kI8);
  m.attr("DTYPES") = dtypes;
  py::dict metrics;
  metrics["ip"] = int(minillm::kIP);
  metrics["cosine"] = int(minillm::kCosine);
  metrics["l2"] = int(minillm::kL2);
  m.attr("METRICS") = metrics;
  m.attr("I8_PAD") = minillm::kI8Pad;

  m.def(
      "dot_products",
      [] {
        py::dict d;
        d["avx512_bf16"] = minillm::use_bf16_dot();
        d["avx512_vnni"] = minillm::use_vnni();
        d["amx_bf16"] = minillm::use_amx();
        return d;
      },
      "Dot-product instructions the AVX-512 kernels use (bf16 attention: AMX tiles or vdpbf16ps; int8 top-k).");
  m.def("scan_prefetch", [] { return minillm::use_scan_prefetch(); },
        "Whether the few-query top-k scans (fp32 rows read in place, fp16, bf16, int8) request rows ahead of use.");
  m.def("simd_level", [] { return std::string(minillm::isa_name(minillm::current_isa())); },
        "SIMD level the kernels run at now.");
  m.def(
      "simd_levels",
      [] {
        std::vector<std::string> out;
        for (int isa = minillm::kAvx512; isa >= minillm::kScalar; --isa)
          if (minillm::isa_supported(isa)) out.emplace_back(minillm::isa_name(isa));
        return out;
      },
      "SIMD levels compiled in and supported by this CPU, best first.");
  m.def(
      "set_simd_level",
      [](const std::string& name) {
        const int isa = isa_from_name(name);
        if (!minillm::isa_supported(isa))
          throw py::value_error("SIMD level '" + name + "' is not supported by this CPU or build");
        minillm::set_isa(isa);
      },
      "Select the SIMD level (one of simd_levels()).");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
#ifdef MINILLM_WITH_CUDA
  m.attr("cuda") = true;
  m.def("cuda_device_count", [] { return minillm::cuda_api::device_count(); }, "CUDA devices visible (0 without a driver).");
  m.def(
      "cuda_topk_workspace",
      [](int64_t Q, int64_t N, int64_t k, int device) {
        std::string error;
        int64_t bytes;
        {
          py::gil_scoped_release nogil;
          bytes = minillm::cuda_api::topk_workspace_bytes(Q, N, k, device, &error);
        }
        if (bytes < 0) throw std::runtime_error(error);
        return bytes;
      },
      py::arg("Q"), py::arg("N"), py::arg("k"), py::arg("device"), "Device scratch bytes cuda_topk needs for these sizes.");
#else
  m.attr("cuda") = false;
#endif
}
