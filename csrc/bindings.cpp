// The only pybind11 file. Functions take raw data pointers (Python ints), sizes and element strides,
// copy them into a plain struct while holding the GIL, then release the GIL for the kernel. Argument
// checking, allocation and dtype handling live in minillm/ops (Python), which alone calls this module.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
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

void copy3(int64_t* dst, const Strides& s) {
  for (int i = 0; i < 3; ++i) dst[i] = s[i];
}

// minillm/ops checks every public argument before it gets here, but the module is importable: a size or
// code the kernels do not handle raises ValueError (pybind11 maps std::invalid_argument) instead of
// dividing by zero or indexing past a table.
void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("minillm._C: ") + what);
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

AttnFwdArgs fwd_args(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t kpm,
                     uintptr_t qpm, const Sizes& sz, const Strides& qs, const Strides& ks, const Strides& vs, bool causal,
                     int64_t causal_offset, double scale, int dtype, int nthreads) {
  check_attention(sz, dtype);
  AttnFwdArgs a{};
  a.q = ptr<const void*>(q);
  a.k = ptr<const void*>(k);
  a.v = ptr<const void*>(v);
  a.out = ptr<void*>(out);
  a.lse = ptr<void*>(lse);
  a.kpm = ptr<const uint8_t*>(kpm);
  a.qpm = ptr<const uint8_t*>(qpm);
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

AttnBwdArgs bwd_args(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                     uintptr_t dlse, uintptr_t kpm, uintptr_t qpm, uintptr_t dq, uintptr_t dk, uintptr_t dv, const Sizes& sz,
                     const Strides& dos, const Strides& qs, const Strides& ks, const Strides& vs, const Strides& os,
                     bool causal, int64_t causal_offset, double scale, int dtype, int nthreads) {
  check_attention(sz, dtype);
  AttnBwdArgs a{};
  a.dout = ptr<const void*>(dout);
  a.q = ptr<const void*>(q);
  a.k = ptr<const void*>(k);
  a.v = ptr<const void*>(v);
  a.out = ptr<const void*>(out);
  a.lse = ptr<const void*>(lse);
  a.dlse = ptr<const void*>(dlse);
  a.kpm = ptr<const uint8_t*>(kpm);
  a.qpm = ptr<const uint8_t*>(qpm);
  a.dq = ptr<void*>(dq);
  a.dk = ptr<void*>(dk);
  a.dv = ptr<void*>(dv);
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

TopkArgs topk_args(uintptr_t queries, uintptr_t corpus, int64_t corpus_stride, int dtype, int64_t Q, int64_t N,
                   int64_t d, int64_t k, int metric, uintptr_t out_scores, uintptr_t out_idx, int nthreads,
                   uintptr_t row_scale = 0, uintptr_t row_norm2 = 0) {
  require(Q >= 1 && N >= 1 && d >= 1, "topk sizes Q, N and d must be >= 1");
  require(k >= 1 && k <= N, "topk needs 1 <= k <= N");
  require(dtype == minillm::kF32 || dtype == minillm::kBF16 || dtype == minillm::kF16 || dtype == minillm::kI8,
          "topk corpus dtype must be kF32, kBF16, kF16 or kI8");
  require(dtype != minillm::kI8 || (row_scale != 0 && row_norm2 != 0), "an int8 corpus needs row_scale and row_norm2");
  require(metric == minillm::kIP || metric == minillm::kCosine || metric == minillm::kL2,
          "topk metric must be kIP, kCosine or kL2");
  TopkArgs a{};
  a.row_scale = ptr<const float*>(row_scale);
  a.row_norm2 = ptr<const float*>(row_norm2);
  a.queries = ptr<const float*>(queries);
  a.corpus = ptr<const void*>(corpus);
  a.corpus_stride = corpus_stride;
  a.dtype = dtype;
  a.Q = Q, a.N = N, a.d = d, a.k = k;
  a.metric = metric;
  a.out_scores = ptr<float*>(out_scores);
  a.out_idx = ptr<int64_t*>(out_idx);
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

GemmArgs gemm_args(uintptr_t a, int64_t lda, bool a_colmajor, uintptr_t b, int64_t ldb, bool b_colmajor,
                   uintptr_t bias, uintptr_t c, int64_t M, int64_t N, int64_t K, int dtype, int nthreads) {
  require(M >= 1 && N >= 1 && K >= 1, "gemm sizes M, N and K must be >= 1 (empty products are answered in Python)");
  require(dtype == minillm::kF32 || dtype == minillm::kF64, "gemm dtype must be kF32 or kF64");
  GemmArgs g{};
  g.a = ptr<const void*>(a);
  g.lda = lda;
  g.a_colmajor = a_colmajor;
  g.b = ptr<const void*>(b);
  g.ldb = ldb;
  g.b_colmajor = b_colmajor;
  g.bias = ptr<const void*>(bias);
  g.c = ptr<void*>(c);
  g.M = M, g.N = N, g.K = K;
  g.dtype = dtype;
  g.nthreads = nthreads;
  return g;
}
using GemmTuple = std::tuple<uintptr_t, int64_t, bool, uintptr_t, int64_t, bool, uintptr_t, uintptr_t, int64_t,
                             int64_t, int64_t, int>;

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
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t kpm, uintptr_t qpm,
         const Sizes& sz,
         const Strides& qs, const Strides& ks, const Strides& vs, bool causal, int64_t causal_offset, double scale,
         int dtype, int nthreads) {
        check(run_attention_fwd(fwd_args(q, k, v, out, lse, kpm, qpm, sz, qs, ks, vs, causal, causal_offset, scale, dtype,
                                         nthreads)),
              "attention_fwd");
      },
      "Attention forward on raw pointers (see csrc/kernels.h).");

  m.def(
      "attention_bwd",
      [](uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t dlse,
         uintptr_t kpm, uintptr_t qpm, uintptr_t dq, uintptr_t dk, uintptr_t dv, const Sizes& sz, const Strides& dos,
         const Strides& qs, const Strides& ks, const Strides& vs, const Strides& os, bool causal,
         int64_t causal_offset, double scale, int dtype, int nthreads) {
        check(run_attention_bwd(bwd_args(dout, q, k, v, out, lse, dlse, kpm, qpm, dq, dk, dv, sz, dos, qs, ks, vs, os, causal,
                                         causal_offset, scale, dtype, nthreads)),
              "attention_bwd");
      },
      "Attention backward on raw pointers (see csrc/kernels.h).");

  m.def(
      "topk",
      [](uintptr_t queries, uintptr_t corpus, int64_t corpus_stride, int dtype, int64_t Q, int64_t N, int64_t d,
         int64_t k, int metric, uintptr_t out_scores, uintptr_t out_idx, int nthreads, uintptr_t row_scale,
         uintptr_t row_norm2) {
        check(run_topk(topk_args(queries, corpus, corpus_stride, dtype, Q, N, d, k, metric, out_scores, out_idx,
                                 nthreads, row_scale, row_norm2)),
              "topk");
      },
      py::arg("queries"), py::arg("corpus"), py::arg("corpus_stride"), py::arg("dtype"), py::arg("Q"), py::arg("N"),
      py::arg("d"), py::arg("k"), py::arg("metric"), py::arg("out_scores"), py::arg("out_idx"), py::arg("nthreads"),
      py::arg("row_scale") = 0, py::arg("row_norm2") = 0,
      "Top-k search on raw pointers (see csrc/kernels.h); row_scale/row_norm2 for an int8 corpus.");

  m.def(
      "linear_small_m",
      [](uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t y, int64_t M, int64_t K, int64_t N, int64_t ldx, int dtype,
         int nthreads) {
        require(M >= 1 && K >= 1 && N >= 1, "linear_small_m sizes M, K and N must be >= 1");
        require(dtype == minillm::kF32 || dtype == minillm::kF64, "linear_small_m dtype must be kF32 or kF64");
        LinearArgs a{};
        a.x = ptr<const void*>(x);
        a.w = ptr<const void*>(w);
        a.b = ptr<const void*>(b);
        a.y = ptr<void*>(y);
        a.M = M, a.K = K, a.N = N, a.ldx = ldx;
        a.dtype = dtype;
        a.nthreads = nthreads;
        check(run_linear(a), "linear_small_m");
      },
      "y = x W^T + b for few rows (see csrc/kernels.h).");

  m.def(
      "gemm",
      [](uintptr_t a, int64_t lda, bool a_colmajor, uintptr_t b, int64_t ldb, bool b_colmajor, uintptr_t bias,
         uintptr_t c, int64_t M, int64_t N, int64_t K, int dtype, int nthreads) {
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
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t kpm, uintptr_t qpm,
         const Sizes& sz,
         const Strides& qs, const Strides& ks, const Strides& vs, bool causal, int64_t causal_offset, double scale,
         int dtype, int device, uintptr_t stream) {
        const AttnFwdArgs a = fwd_args(q, k, v, out, lse, kpm, qpm, sz, qs, ks, vs, causal, causal_offset, scale, dtype, 0);
        run_cuda([&](std::string* e) { return minillm::cuda_api::attention_fwd(a, device, stream, e); });
      },
      "Attention forward on CUDA device pointers (see cuda/cuda_api.h).");
  m.def(
      "cuda_attention_bwd",
      [](uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t dlse,
         uintptr_t kpm, uintptr_t qpm, uintptr_t dq, uintptr_t dk, uintptr_t dv, const Sizes& sz, const Strides& dos,
         const Strides& qs, const Strides& ks, const Strides& vs, const Strides& os, bool causal,
         int64_t causal_offset, double scale, int dtype, uintptr_t delta, int device, uintptr_t stream) {
        const AttnBwdArgs a = bwd_args(dout, q, k, v, out, lse, dlse, kpm, qpm, dq, dk, dv, sz, dos, qs, ks, vs, os, causal,
                                       causal_offset, scale, dtype, 0);
        run_cuda([&](std::string* e) {
          return minillm::cuda_api::attention_bwd(a, ptr<float*>(delta), device, stream, e);
        });
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
      [](uintptr_t queries, uintptr_t corpus, int64_t corpus_stride, int dtype, int64_t Q, int64_t N, int64_t d,
         int64_t k, int metric, uintptr_t out_scores, uintptr_t out_idx, uintptr_t workspace, int device,
         uintptr_t stream) {
        const TopkArgs a = topk_args(queries, corpus, corpus_stride, dtype, Q, N, d, k, metric, out_scores, out_idx, 0);
        run_cuda([&](std::string* e) { return minillm::cuda_api::topk(a, ptr<void*>(workspace), device, stream, e); });
      },
      "Exact top-k on CUDA device pointers (see cuda/cuda_api.h).");
#else
  m.attr("cuda") = false;
#endif
}
