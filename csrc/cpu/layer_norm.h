// LayerNorm over the last dimension of M rows of C values, forward and backward. Reference: F.layer_norm
// (the Python twin, minillm/ops/layer_norm.py: _reference).
//
//   forward:  mean = sum(x) / C,  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps),  y = (x - mean) rstd w + b
//   backward: xhat = (x - mean) rstd,  g = dy w,
//             dx = rstd (g - mean(g) - xhat mean(g xhat)),  dw = sum over rows of dy xhat,  db = sum of dy
//
// One row is a few KB (it stays in L1 between the passes), so a row takes two passes for the statistics (the
// variance about the mean, not E[x^2] - mean^2, which cancels for rows far from zero) and one for the output.
// torch's kernel took ~80 us forward and ~290 us forward + backward at a small GPT's (768, 128) on two Zen 4
// threads, mostly fixed costs; a training step calls it 2 L + 1 times. dw and db are summed per thread over its
// rows, then across threads in thread order (the same result for the same thread count).
// Under bf16 autocast the norm's output feeds a linear layer that casts it to bf16 (and its gradient comes back in
// bf16): y_dtype / dy_dtype kBF16 fuse those casts, y rounded to nearest even as it is stored and dy widened
// exactly as it is read, so the results are bit for bit those of the separate casts.
#pragma once
#include <memory>
#include <new>
#include "cpu/convert.h"
#include "cpu/parallel.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

template <typename T>
inline T ln_sum(const T* x, int64_t C) {
  constexpr int W = Vec<T>::W;
  vec_t<T> acc0{}, acc1{};
  int64_t c = 0;
  for (; c + 2 * W <= C; c += 2 * W) {
    acc0 += vload(x + c);
    acc1 += vload(x + c + W);
  }
  for (; c + W <= C; c += W) acc0 += vload(x + c);
  T s = hsum<T>(acc0 + acc1);
  for (; c < C; ++c) s += x[c];
  return s;
}

template <typename T>
inline T ln_sq_dev(const T* x, int64_t C, T mean) {
  constexpr int W = Vec<T>::W;
  const vec_t<T> m = vbcast(mean);
  vec_t<T> acc0{}, acc1{};
  int64_t c = 0;
  for (; c + 2 * W <= C; c += 2 * W) {
    const vec_t<T> d0 = vload(x + c) - m, d1 = vload(x + c + W) - m;
    acc0 += d0 * d0;
    acc1 += d1 * d1;
  }
  for (; c + W <= C; c += W) {
    const vec_t<T> d = vload(x + c) - m;
    acc0 += d * d;
  }
  T s = hsum<T>(acc0 + acc1);
  for (; c < C; ++c) s += (x[c] - mean) * (x[c] - mean);
  return s;
}

// A row of y rounded to bf16: one instruction per 16 values where the CPU has AVX512-BF16 (a (768, 128) forward:
// 50 us, against 60 us rounding in software).
template <typename T>
inline void ln_store_bf16(const T* src, int64_t n, uint16_t* dst) {
#if defined(__AVX512BW__)
  if constexpr (std::is_same<T, float>::value) {
    if (use_bf16_dot()) return f32_to_bf16_row(src, n, dst);
  }
#endif
  store_row<T>(src, n, T(1), kBF16, dst);
}

template <typename T>
int layer_norm_fwd_rows(const LayerNormFwdArgs& a, int64_t r0, int64_t r1) {
  constexpr int W = Vec<T>::W;
  const int64_t C = a.C;
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  const bool to_bf16 = a.y_dtype == kBF16;
  std::unique_ptr<T[]> row;  // the fp32 row before its rounding to bf16
  if (to_bf16) {
    row.reset(new (std::nothrow) T[C]);
    if (!row) return kOutOfMemory;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.ldx;
    T* y = to_bf16 ? row.get() : static_cast<T*>(a.y) + r * C;
    const T mean = ln_sum(x, C) / static_cast<T>(C);
    const T rstd = T(1) / std::sqrt(ln_sq_dev(x, C, mean) / static_cast<T>(C) + static_cast<T>(a.eps));
    static_cast<T*>(a.mean)[r] = mean;
    static_cast<T*>(a.rstd)[r] = rstd;
    const vec_t<T> m = vbcast(mean), s = vbcast(rstd);
    int64_t c = 0;
    if (b) {
      for (; c + W <= C; c += W) vstore(y + c, (vload(x + c) - m) * s * vload(w + c) + vload(b + c));
      for (; c < C; ++c) y[c] = (x[c] - mean) * rstd * w[c] + b[c];
    } else {
      for (; c + W <= C; c += W) vstore(y + c, (vload(x + c) - m) * s * vload(w + c));
      for (; c < C; ++c) y[c] = (x[c] - mean) * rstd * w[c];
    }
    if (to_bf16) ln_store_bf16<T>(y, C, static_cast<uint16_t*>(a.y) + r * C);
  }
  return kOk;
}

// Rows [r0, r1) of the backward; dw_acc / db_acc (C each, or null) collect this thread's sums.
template <typename T>
int layer_norm_bwd_rows(const LayerNormBwdArgs& a, int64_t r0, int64_t r1, T* dw_acc, T* db_acc) {
  constexpr int W = Vec<T>::W;
  const int64_t C = a.C;
  const T* w = static_cast<const T*>(a.weight);
  const T inv_c = T(1) / static_cast<T>(C);
  const bool from_bf16 = a.dy_dtype == kBF16;
  std::unique_ptr<T[]> row;  // a bf16 dy row, widened
  if (from_bf16) {
    row.reset(new (std::nothrow) T[C]);
    if (!row) return kOutOfMemory;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.ldx;
    const T* dy = static_cast<const T*>(a.dy) + r * a.lddy;
    if (from_bf16) {
      load_row<T>(static_cast<const uint16_t*>(a.dy) + r * a.lddy, kBF16, C, C, T(1), row.get());
      dy = row.get();
    }
    const T mean = static_cast<const T*>(a.mean)[r], rstd = static_cast<const T*>(a.rstd)[r];
    const vec_t<T> m = vbcast(mean), s = vbcast(rstd);
    // sums of g = dy w and of g xhat over the row
    vec_t<T> sg{}, sgx{};
    int64_t c = 0;
    for (; c + W <= C; c += W) {
      const vec_t<T> xh = (vload(x + c) - m) * s, g = vload(dy + c) * vload(w + c);
      sg += g;
      sgx += g * xh;
      if (dw_acc) vstore(dw_acc + c, vload(dw_acc + c) + vload(dy + c) * xh);
      if (db_acc) vstore(db_acc + c, vload(db_acc + c) + vload(dy + c));
    }
    T sum_g = hsum<T>(sg), sum_gx = hsum<T>(sgx);
    for (; c < C; ++c) {
      const T xh = (x[c] - mean) * rstd, g = dy[c] * w[c];
      sum_g += g;
      sum_gx += g * xh;
      if (dw_acc) dw_acc[c] += dy[c] * xh;
      if (db_acc) db_acc[c] += dy[c];
    }
    if (!a.dx) continue;
    T* dx = static_cast<T*>(a.dx) + r * C;
    if (C == 1) {  // the output is the constant b: exactly no gradient (the formula below would return
      dx[0] = 0;   // rstd = 1/sqrt(eps) times the rounding of dy w, which FMA contraction leaves in g - mean(g))
      continue;
    }
    const T mg = sum_g * inv_c, mgx = sum_gx * inv_c;
    const vec_t<T> vmg = vbcast(mg), vmgx = vbcast(mgx);
    c = 0;
    for (; c + W <= C; c += W) {
      const vec_t<T> xh = (vload(x + c) - m) * s;
      vstore(dx + c, s * (vload(dy + c) * vload(w + c) - vmg - xh * vmgx));
    }
    for (; c < C; ++c) dx[c] = rstd * (dy[c] * w[c] - mg - (x[c] - mean) * rstd * mgx);
  }
  return kOk;
}

template <typename T>
int layer_norm_fwd_impl(const LayerNormFwdArgs& a) {
  const int nt = static_cast<int>(imax(1, imin(a.nthreads > 0 ? a.nthreads : 1, a.M)));
  if (nt == 1) return layer_norm_fwd_rows<T>(a, 0, a.M);
  int status = kOk;
#pragma omp parallel num_threads(nt)
  {
#if defined(_OPENMP)
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
#else
    const int t = 0, n = 1;
#endif
    const int st = layer_norm_fwd_rows<T>(a, a.M * t / n, a.M * (t + 1) / n);
    if (st != kOk) {
#pragma omp critical(minillm_layer_norm_status)
      status = st;
    }
  }
  return status;
}

template <typename T>
int layer_norm_bwd_impl(const LayerNormBwdArgs& a) {
  const int64_t C = a.C, Cp = round_up(C, kPad);
  const int nt = static_cast<int>(imax(1, imin(a.nthreads > 0 ? a.nthreads : 1, a.M)));
  const bool want_w = a.dweight != nullptr, want_b = a.dbias != nullptr;
  // Per-thread sums of dw and db, C (padded) each.
  std::unique_ptr<T[]> acc;
  if (want_w || want_b) {
    acc.reset(new (std::nothrow) T[static_cast<size_t>(nt) * 2 * Cp]());
    if (!acc) return kOutOfMemory;
  }
  int status = kOk;
  auto run = [&](int t, int n) {
    T* dw_acc = want_w ? acc.get() + static_cast<int64_t>(t) * 2 * Cp : nullptr;
    T* db_acc = want_b ? acc.get() + static_cast<int64_t>(t) * 2 * Cp + Cp : nullptr;
    const int st = layer_norm_bwd_rows<T>(a, a.M * t / n, a.M * (t + 1) / n, dw_acc, db_acc);
    if (st != kOk) {
#pragma omp critical(minillm_layer_norm_status)
      status = st;
    }
  };
  if (nt == 1) {
    run(0, 1);
  } else {
#pragma omp parallel num_threads(nt)
    {
#if defined(_OPENMP)
      run(omp_get_thread_num(), omp_get_num_threads());
#else
      run(0, 1);
#endif
    }
  }
  if (status != kOk) return status;
  for (int part = 0; part < 2; ++part) {
    T* out = static_cast<T*>(part == 0 ? a.dweight : a.dbias);
    if (!out) continue;
    for (int64_t c = 0; c < C; ++c) {
      T s = 0;
      for (int t = 0; t < nt; ++t) s += acc[static_cast<int64_t>(t) * 2 * Cp + part * Cp + c];
      out[c] = s;
    }
  }
  return kOk;
}

}  // namespace

int layer_norm_fwd(const LayerNormFwdArgs& a) {
  switch (a.dtype) {
    case kF32: return layer_norm_fwd_impl<float>(a);
    case kF64: return layer_norm_fwd_impl<double>(a);
    default: return kBadArgs;
  }
}

int layer_norm_bwd(const LayerNormBwdArgs& a) {
  switch (a.dtype) {
    case kF32: return layer_norm_bwd_impl<float>(a);
    case kF64: return layer_norm_bwd_impl<double>(a);
    default: return kBadArgs;
  }
}

}  // namespace MINILLM_ISA
}  // namespace minillm
