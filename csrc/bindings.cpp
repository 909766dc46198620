// The only pybind11 file. Functions take buffers as (data pointer, bytes from it to the end of its storage)
// pairs of Python ints (minillm/ops/_backend.py: `buf`), sizes and element strides, check that every element
// the kernel will touch lies inside its buffer, copy them into a plain struct while holding the GIL, then
// release the GIL for the kernel. Allocation and dtype handling live in minillm/ops (Python), which alone
// calls this module; the extent checks here make sure no call from Python reaches memory outside a tensor.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <initializer_list>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"
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

using Strides = std::array<int64_t, 3>;
using Sizes = std::array<int64_t, 5>;  // B, H, Nq, Nk, D

template <typename P>
P ptr(uintptr_t p) {
  return reinterpret_cast<P>(p);
}

}  // namespace

// A buffer: (data pointer, bytes addressable from it), as minillm.ops._backend.buf(tensor) makes it from the
// tensor's storage (storage bytes - storage offset). (0, 0) stands for an absent optional buffer.
struct Buf {
  uintptr_t ptr;
  int64_t bytes;
};

// Python's (int, int) tuple to Buf directly: pybind11's generic std::pair caster cost ~0.25 us per buffer,
// a sixth of a small attention call with seven buffers.
namespace pybind11 {
namespace detail {
template <>
struct type_caster<Buf> {
  PYBIND11_TYPE_CASTER(Buf, const_name("tuple[int, int]"));
  bool load(handle src, bool) {
    PyObject* t = src.ptr();
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 2) return false;
    PyObject* p = PyTuple_GET_ITEM(t, 0);
    PyObject* n = PyTuple_GET_ITEM(t, 1);
    if (!PyLong_Check(p) || !PyLong_Check(n)) return false;
    const unsigned long long pv = PyLong_AsUnsignedLongLong(p);
    const long long nv = PyLong_AsLongLong(n);
    if (PyErr_Occurred()) {  // negative pointer or out-of-range int: not a buffer
      PyErr_Clear();
      return false;
    }
    value = Buf{static_cast<uintptr_t>(pv), static_cast<int64_t>(nv)};
    return true;
  }
  static handle cast(const Buf& b, return_value_policy, handle) {
    return make_tuple(b.ptr, b.bytes).release();
  }
};
}  // namespace detail
}  // namespace pybind11

namespace {

void copy3(int64_t* dst, const Strides& s) {
  for (int i = 0; i < 3; ++i) dst[i] = s[i];
}

// minillm/ops checks every public argument before it gets here, but the module is importable: a size or
// code the kernels do not handle raises ValueError (pybind11 maps std::invalid_argument) instead of
// dividing by zero or indexing past a table.
[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("minillm._C: " + what); }

// A literal message, so a passing check builds no string (they run on every call).
void require(bool ok, const char* what) {
  if (!ok) fail(what);
}

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

// a * b for non-negative a, b, or -1 when it overflows int64.
int64_t mul_or_neg(int64_t a, int64_t b) { return (b != 0 && a > kMax / b) ? -1 : a * b; }

// One dimension of an array as a kernel walks it: `size` elements `stride` elements apart.
struct Dim {
  int64_t size, stride;
};

// Checks that every element of an array of `itemsize`-byte elements with these dims (sizes >= 1, strides >= 0),
// first element at b's pointer, lies inside b, and returns the pointer. An optional buffer may be (0, 0): then
// nothing is touched and nullptr comes back. This is the extent check of every pointer this module passes on.
template <typename P>
P checked(const Buf& b, const char* name, int64_t itemsize, std::initializer_list<Dim> dims, bool optional = false) {
  if (b.ptr == 0) {
    if (!optional) fail(std::string(name) + " is a null pointer");
    return nullptr;
  }
  int64_t last = 0;  // element offset of the farthest element touched
  for (const Dim& d : dims) {
    if (d.size < 1 || d.stride < 0) fail(std::string(name) + ": sizes must be >= 1 and strides >= 0");
    const int64_t step = mul_or_neg(d.size - 1, d.stride);
    if (step < 0 || last > kMax - step) fail(std::string(name) + ": extent overflows int64");
    last += step;
  }
  const int64_t need = last < kMax ? mul_or_neg(last + 1, itemsize) : -1;
  if (need < 0 || b.bytes < need)
    fail(std::string(name) + " reaches " + std::to_string(need) + " bytes past its pointer, but its storage holds " +
         std::to_string(b.bytes) + " from there");
  return ptr<P>(b.ptr);
}

// Elements of a contiguous array of these sizes (each >= 1), as one Dim.
Dim dense(std::initializer_list<int64_t> sizes) {
  int64_t n = 1;
  for (int64_t s : sizes) {
    n = s >= 0 ? mul_or_neg(n, s) : -1;
    require(n >= 0, "array size overflows int64");
  }
  return {n, 1};
}

bool float_dtype(int dtype) { return dtype == minillm::kF32 || dtype == minillm::kBF16 || dtype == minillm::kF16 || dtype == minillm::kF64; }

void check_attention(const Sizes& sz, int dtype) {
  require(sz[0] >= 1 && sz[1] >= 1 && sz[2] >= 1 && sz[3] >= 1 && sz[4] >= 1,
          "attention sizes (B, H, Nq, Nk, D) must all be >= 1 (empty inputs are answered in Python)");
  require(float_dtype(dtype), "attention dtype must be a float code of csrc/kernels.h (kF32, kBF16, kF16, kF64)");
}

void check(int status, const char* what) {
  if (status == minillm::kOutOfMemory) throw std::bad_alloc();
  if (status != minillm::kOk) throw std::runtime_error(std::string(what) + ": kernel failed");
}

// The attention operands' extents: (B, H, n, D) with element strides for (b, h, n) and unit stride along D
// (csrc/kernels.h), the outputs and log-sum-exps contiguous, the masks (B, n) bytes.
struct AttnShape {
  Sizes sz;
  int64_t item, acc;  // bytes of an element and of an accumulator (lse)
  const void* strided(const Buf& b, const char* name, int64_t n, const Strides& s) const {
    return checked<const void*>(b, name, item, {{sz[0], s[0]}, {sz[1], s[1]}, {n, s[2]}, {sz[4], 1}});
  }
  void* dense_out(const Buf& b, const char* name, int64_t n) const {
    return checked<void*>(b, name, item, {dense({sz[0], sz[1], n, sz[4]})});
  }
  template <typename P>
  P lse(const Buf& b, const char* name, bool optional = false) const {
    return checked<P>(b, name, acc, {dense({sz[0], sz[1], sz[2]})}, optional);
  }
  const uint8_t* mask(const Buf& b, const char* name, int64_t n) const {
    return checked<const uint8_t*>(b, name, 1, {dense({sz[0], n})}, true);
  }
};

AttnShape attn_shape(const Sizes& sz, int dtype) {
  check_attention(sz, dtype);
  return {sz, minillm::elem_size(dtype), dtype == minillm::kF64 ? 8 : 4};
}

AttnFwdArgs fwd_args(const Buf& q, const Buf& k, const Buf& v, const Buf& out, const Buf& lse, const Buf& kpm,
                     const Buf& qpm, const Sizes& sz, const Strides& qs, const Strides& ks, const Strides& vs,
                     bool causal, int64_t causal_offset, double scale, int dtype, int nthreads) {
  const AttnShape s = attn_shape(sz, dtype);
  AttnFwdArgs a{};
  a.q = s.strided(q, "q", sz[2], qs);
  a.k = s.strided(k, "k", sz[3], ks);
  a.v = s.strided(v, "v", sz[3], vs);
  a.out = s.dense_out(out, "out", sz[2]);
  a.lse = s.lse<void*>(lse, "lse");
  a.kpm = s.mask(kpm, "key_padding_mask", sz[3]);
  a.qpm = s.mask(qpm, "query_padding_mask", sz[2]);
  a.B = sz[0], a.H = sz[1], a.Nq = sz[2], a.Nk = sz[3], a.D = sz[4];
  copy3(a.q_stride, qs);
  copy3(a.k_stride, ks);
  copy3(a.v_stride, vs);
  a.causal = causal;
  a.causal_offset = causal_offset;
  a.scale = scale;
  a.dtype = dtype;
  a.nthreads = nthreads;
  return a;
}

AttnBwdArgs bwd_args(const Buf& dout, const Buf& q, const Buf& k, const Buf& v, const Buf& out, const Buf& lse,
                     const Buf& dlse, const Buf& kpm, const Buf& qpm, const Buf& dq, const Buf& dk, const Buf& dv,
                     const Sizes& sz, const Strides& dos, const Strides& qs, const Strides& ks, const Strides& vs,
                     const Strides& os, bool causal, int64_t causal_offset, double scale, int dtype, int nthreads) {
  const AttnShape s = attn_shape(sz, dtype);
  AttnBwdArgs a{};
  a.dout = s.strided(dout, "dout", sz[2], dos);
  a.q = s.strided(q, "q", sz[2], qs);
  a.k = s.strided(k, "k", sz[3], ks);
  a.v = s.strided(v, "v", sz[3], vs);
  a.out = s.strided(out, "out", sz[2], os);
  a.lse = s.lse<const void*>(lse, "lse");
  a.dlse = s.lse<const void*>(dlse, "dlse", true);
  a.kpm = s.mask(kpm, "key_padding_mask", sz[3]);
  a.qpm = s.mask(qpm, "query_padding_mask", sz[2]);
  a.dq = s.dense_out(dq, "dq", sz[2]);
  a.dk = s.dense_out(dk, "dk", sz[3]);
  a.dv = s.dense_out(dv, "dv", sz[3]);
  a.B = sz[0], a.H = sz[1], a.Nq = sz[2], a.Nk = sz[3], a.D = sz[4];
  copy3(a.do_stride, dos);
  copy3(a.q_stride, qs);
  copy3(a.k_stride, ks);
  copy3(a.v_stride, vs);
  copy3(a.o_stride, os);
  a.causal = causal;
  a.causal_offset = causal_offset;
  a.scale = scale;
  a.dtype = dtype;
  a.nthreads = nthreads;
  return a;
}

TopkArgs topk_args(const Buf& queries, const Buf& corpus, int64_t corpus_stride, int dtype, int64_t Q, int64_t N,
                   int64_t d, int64_t k, int metric, const Buf& out_scores, const Buf& out_idx, int nthreads,
                   const Buf& row_scale = {0, 0}, const Buf& row_norm2 = {0, 0}) {
  require(Q >= 1 && N >= 1 && d >= 1, "topk sizes Q, N and d must be >= 1");
  require(k >= 1 && k <= N, "topk needs 1 <= k <= N");
  require(dtype == minillm::kF32 || dtype == minillm::kBF16 || dtype == minillm::kF16 || dtype == minillm::kI8,
          "topk corpus dtype must be kF32, kBF16, kF16 or kI8");
  const bool i8 = dtype == minillm::kI8;
  require(!i8 || (row_scale.ptr != 0 && row_norm2.ptr != 0), "an int8 corpus needs row_scale and row_norm2");
  require(metric == minillm::kIP || metric == minillm::kCosine || metric == minillm::kL2,
          "topk metric must be kIP, kCosine or kL2");
  // the columns a corpus row is read over: int8 codes in whole kI8Pad blocks
  const int64_t width = i8 ? (d + minillm::kI8Pad - 1) / minillm::kI8Pad * minillm::kI8Pad : d;
  TopkArgs a{};
  a.queries = checked<const float*>(queries, "queries", 4, {dense({Q, d})});
  a.corpus = checked<const void*>(corpus, "corpus", minillm::elem_size(dtype), {{N, corpus_stride}, {width, 1}});
  a.row_scale = i8 ? checked<const float*>(row_scale, "row_scale", 4, {{N, 1}}) : nullptr;
  a.row_norm2 = i8 ? checked<const float*>(row_norm2, "row_norm2", 4, {{N, 1}}) : nullptr;
  a.corpus_stride = corpus_stride;
  a.dtype = dtype;
  a.Q = Q, a.N = N, a.d = d, a.k = k;
  a.metric = metric;
  a.out_scores = checked<float*>(out_scores, "out_scores", 4, {dense({Q, k})});
  a.out_idx = checked<int64_t*>(out_idx, "out_idx", 8, {dense({Q, k})});
  a.nthreads = nthreads;
  return a;
}

#ifdef MINILLM_WITH_CUDA
// Runs a CUDA launcher without the GIL; its message becomes a RuntimeError.
template <typename F>
void run_cuda(F&& launch) {
  std::string error;
  int status;
  {
    py::gil_scoped_release nogil;
    status = launch(&error);
  }
  if (status != 0) throw std::runtime_error(error);
}
#endif

int run_attention_fwd(AttnFwdArgs a) {
  py::gil_scoped_release nogil;
  return minillm::dispatch_attention_fwd(a);
}
int run_attention_bwd(AttnBwdArgs a) {
  py::gil_scoped_release nogil;
  return minillm::dispatch_attention_bwd(a);
}
int run_topk(TopkArgs a) {
  py::gil_scoped_release nogil;
  return minillm::dispatch_topk(a);
}

int run_linear(LinearArgs a) {
  py::gil_scoped_release nogil;
  return minillm::dispatch_linear_small_m(a);
}

// A GEMM operand of `rows` x `cols` elements, row-major with row stride ld (colmajor: column stride ld).
const void* operand(const Buf& b, const char* name, int64_t itemsize, int64_t rows, int64_t cols, int64_t ld,
                    bool colmajor) {
  return colmajor ? checked<const void*>(b, name, itemsize, {{cols, ld}, {rows, 1}})
                  : checked<const void*>(b, name, itemsize, {{rows, ld}, {cols, 1}});
}

GemmArgs gemm_args(const Buf& a, int64_t lda, bool a_colmajor, const Buf& b, int64_t ldb, bool b_colmajor,
                   const Buf& bias, const Buf& c, int64_t M, int64_t N, int64_t K, int dtype, int nthreads) {
  require(M >= 1 && N >= 1 && K >= 1, "gemm sizes M, N and K must be >= 1 (empty products are answered in Python)");
  require(dtype == minillm::kF32 || dtype == minillm::kF64, "gemm dtype must be kF32 or kF64");
  const int64_t item = minillm::elem_size(dtype);
  GemmArgs g{};
  g.a = operand(a, "a", item, M, K, lda, a_colmajor);
  g.lda = lda;
  g.a_colmajor = a_colmajor;
  g.b = operand(b, "b", item, K, N, ldb, b_colmajor);
  g.ldb = ldb;
  g.b_colmajor = b_colmajor;
  g.bias = checked<const void*>(bias, "bias", item, {{N, 1}}, true);
  g.c = checked<void*>(c, "c", item, {dense({M, N})});
  g.M = M, g.N = N, g.K = K;
  g.dtype = dtype;
  g.nthreads = nthreads;
  return g;
}
using GemmTuple = std::tuple<Buf, int64_t, bool, Buf, int64_t, bool, Buf, Buf, int64_t, int64_t, int64_t, int>;

int run_gemm(GemmArgs g) {
  py::gil_scoped_release nogil;
  return minillm::dispatch_gemm(g);
}

int isa_from_name(const std::string& name) {
  for (int isa = minillm::kScalar; isa <= minillm::kAvx512; ++isa)
    if (name == minillm::isa_name(isa)) return isa;
  throw py::value_error("unknown SIMD level '" + name + "'; expected one of avx512, avx2, scalar");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "minillm native kernels (raw-pointer interface; use minillm.ops instead)";

  m.def(
      "attention_fwd",
      [](const Buf& q, const Buf& k, const Buf& v, const Buf& out, const Buf& lse, const Buf& kpm, const Buf& qpm,
         const Sizes& sz, const Strides& qs, const Strides& ks, const Strides& vs, bool causal, int64_t causal_offset,
         double scale, int dtype, int nthreads) {
        check(run_attention_fwd(fwd_args(q, k, v, out, lse, kpm, qpm, sz, qs, ks, vs, causal, causal_offset, scale, dtype,
                                         nthreads)),
              "attention_fwd");
      },
      "Attention forward on raw pointers (see csrc/kernels.h).");

  m.def(
      "attention_bwd",
      [](const Buf& dout, const Buf& q, const Buf& k, const Buf& v, const Buf& out, const Buf& lse, const Buf& dlse,
         const Buf& kpm, const Buf& qpm, const Buf& dq, const Buf& dk, const Buf& dv, const Sizes& sz,
         const Strides& dos, const Strides& qs, const Strides& ks, const Strides& vs, const Strides& os, bool causal,
         int64_t causal_offset, double scale, int dtype, int nthreads) {
        check(run_attention_bwd(bwd_args(dout, q, k, v, out, lse, dlse, kpm, qpm, dq, dk, dv, sz, dos, qs, ks, vs, os, causal,
                                         causal_offset, scale, dtype, nthreads)),
              "attention_bwd");
      },
      "Attention backward on raw pointers (see csrc/kernels.h).");

  m.def(
      "topk",
      [](const Buf& queries, const Buf& corpus, int64_t corpus_stride, int dtype, int64_t Q, int64_t N, int64_t d,
         int64_t k, int metric, const Buf& out_scores, const Buf& out_idx, int nthreads, const Buf& row_scale,
         const Buf& row_norm2) {
        check(run_topk(topk_args(queries, corpus, corpus_stride, dtype, Q, N, d, k, metric, out_scores, out_idx,
                                 nthreads, row_scale, row_norm2)),
              "topk");
      },
      py::arg("queries"), py::arg("corpus"), py::arg("corpus_stride"), py::arg("dtype"), py::arg("Q"), py::arg("N"),
      py::arg("d"), py::arg("k"), py::arg("metric"), py::arg("out_scores"), py::arg("out_idx"), py::arg("nthreads"),
      py::arg("row_scale") = Buf{0, 0}, py::arg("row_norm2") = Buf{0, 0},
      "Top-k search on raw pointers (see csrc/kernels.h); row_scale/row_norm2 for an int8 corpus.");

  m.def(
      "linear_small_m",
      [](const Buf& x, const Buf& w, const Buf& b, const Buf& y, int64_t M, int64_t K, int64_t N, int64_t ldx,
         int dtype, int nthreads) {
        require(M >= 1 && K >= 1 && N >= 1, "linear_small_m sizes M, K and N must be >= 1");
        require(dtype == minillm::kF32 || dtype == minillm::kF64, "linear_small_m dtype must be kF32 or kF64");
        const int64_t item = minillm::elem_size(dtype);
        LinearArgs a{};
        a.x = checked<const void*>(x, "x", item, {{M, ldx}, {K, 1}});
        a.w = checked<const void*>(w, "weight", item, {dense({N, K})});
        a.b = checked<const void*>(b, "bias", item, {{N, 1}}, true);
        a.y = checked<void*>(y, "y", item, {dense({M, N})});
        a.M = M, a.K = K, a.N = N, a.ldx = ldx;
        a.dtype = dtype;
        a.nthreads = nthreads;
        check(run_linear(a), "linear_small_m");
      },
      "y = x W^T + b for few rows (see csrc/kernels.h).");

  m.def(
      "gemm",
      [](const Buf& a, int64_t lda, bool a_colmajor, const Buf& b, int64_t ldb, bool b_colmajor, const Buf& bias,
         const Buf& c, int64_t M, int64_t N, int64_t K, int dtype, int nthreads) {
        check(run_gemm(gemm_args(a, lda, a_colmajor, b, ldb, b_colmajor, bias, c, M, N, K, dtype, nthreads)), "gemm");
      },
      "C = A B + bias on raw pointers (see csrc/kernels.h).");
  m.def(
      "gemm_pair",
      [](const GemmTuple& x, const GemmTuple& y, int nthreads) {
        const GemmArgs g1 = std::apply(gemm_args, std::tuple_cat(x, std::make_tuple(1)));
        const GemmArgs g2 = std::apply(gemm_args, std::tuple_cat(y, std::make_tuple(1)));
        int status;
        {
          py::gil_scoped_release nogil;
          status = minillm::dispatch_gemm_pair(g1, g2, nthreads);
        }
        check(status, "gemm_pair");
      },
      "Two independent gemm calls, each given as the arguments of gemm without nthreads, one per thread.");

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
  // The same raw-pointer interface on device pointers, plus the device index and the caller's stream.
  m.def("cuda_device_count", [] { return minillm::cuda_api::device_count(); }, "CUDA devices visible (0 without a driver).");
  m.def(
      "cuda_attention_fwd",
      [](const Buf& q, const Buf& k, const Buf& v, const Buf& out, const Buf& lse, const Buf& kpm, const Buf& qpm,
         const Sizes& sz, const Strides& qs, const Strides& ks, const Strides& vs, bool causal, int64_t causal_offset,
         double scale, int dtype, int device, uintptr_t stream) {
        const AttnFwdArgs a = fwd_args(q, k, v, out, lse, kpm, qpm, sz, qs, ks, vs, causal, causal_offset, scale, dtype, 0);
        run_cuda([&](std::string* e) { return minillm::cuda_api::attention_fwd(a, device, stream, e); });
      },
      "Attention forward on CUDA device pointers (see cuda/cuda_api.h).");
  m.def(
      "cuda_attention_bwd",
      [](const Buf& dout, const Buf& q, const Buf& k, const Buf& v, const Buf& out, const Buf& lse, const Buf& dlse,
         const Buf& kpm, const Buf& qpm, const Buf& dq, const Buf& dk, const Buf& dv, const Sizes& sz,
         const Strides& dos, const Strides& qs, const Strides& ks, const Strides& vs, const Strides& os, bool causal,
         int64_t causal_offset, double scale, int dtype, const Buf& delta, int device, uintptr_t stream) {
        const AttnBwdArgs a = bwd_args(dout, q, k, v, out, lse, dlse, kpm, qpm, dq, dk, dv, sz, dos, qs, ks, vs, os, causal,
                                       causal_offset, scale, dtype, 0);
        float* scratch = checked<float*>(delta, "delta", 4, {dense({sz[0], sz[1], sz[2]})});
        run_cuda([&](std::string* e) { return minillm::cuda_api::attention_bwd(a, scratch, device, stream, e); });
      },
      "Attention backward on CUDA device pointers; delta: B*H*Nq floats of scratch.");
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
      "Device scratch bytes cuda_topk needs for these sizes.");
  m.def(
      "cuda_topk",
      [](const Buf& queries, const Buf& corpus, int64_t corpus_stride, int dtype, int64_t Q, int64_t N, int64_t d,
         int64_t k, int metric, const Buf& out_scores, const Buf& out_idx, const Buf& workspace, int device,
         uintptr_t stream) {
        const TopkArgs a = topk_args(queries, corpus, corpus_stride, dtype, Q, N, d, k, metric, out_scores, out_idx, 0);
        require(workspace.bytes >= 0 && (workspace.ptr != 0 || workspace.bytes == 0), "workspace: bad buffer");
        // The launcher compares the workspace's bytes with what its plan needs (cuda_topk_workspace).
        run_cuda([&](std::string* e) {
          return minillm::cuda_api::topk(a, ptr<void*>(workspace.ptr), workspace.bytes, device, stream, e);
        });
      },
      "Exact top-k on CUDA device pointers (see cuda/cuda_api.h).");
#else
  m.attr("cuda") = false;
#endif
}
