// Linear layers with few rows (decoding): each thread streams its slice of W once.
#pragma once
#include "cpu/dot.h"
#include "cpu/parallel.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// Rows of x per micro-kernel and weight rows per micro-kernel: 8 x 2 accumulators on AVX-512,
// 4 x 2 with 16 vector registers.
constexpr int kLinMR = VB >= 64 ? 8 : 4;
constexpr int kLinNR = 2;

template <typename T, int NR>
inline void skinny_rows(int64_t M, int64_t K, const T* X, int64_t ldx, const T* Wm, int64_t ldw, T* Y, int64_t ldy) {
  int64_t i = 0;
  for (; i + kLinMR <= M; i += kLinMR) dot_tile<T, kLinMR, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy);
  switch (M - i) {
    case 1: dot_tile<T, 1, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy); break;
    case 2: dot_tile<T, 2, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy); break;
    case 3: dot_tile<T, 3, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy); break;
    case 4: dot_tile<T, 4, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy); break;
    case 5: dot_tile<T, 5, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy); break;
    case 6: dot_tile<T, 6, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy); break;
    case 7: dot_tile<T, 7, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy); break;
    default: break;
  }
}

// Each thread owns a contiguous slice of W's rows and streams it from memory once, whatever M is;
// a packed GEMM would first copy all of W, doubling the memory traffic that bounds decoding.
template <typename T>
int linear_impl(const LinearArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N;
  const T* X = static_cast<const T*>(a.x);
  const T* Wm = static_cast<const T*>(a.w);
  const T* bias = static_cast<const T*>(a.b);
  T* Y = static_cast<T*>(a.y);
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  const int64_t pairs = N / kLinNR;
  // Weight rows are requested 8 KB ahead of use: the stream is the whole cost of a decoding step, and
  // the hardware prefetcher alone left much of the memory bandwidth unused (on a Zen 5).
  constexpr int64_t kPrefetchBytes = 8192;
  const int64_t pair_bytes = kLinNR * K * static_cast<int64_t>(sizeof(T));
  const int64_t ahead = kPrefetchBytes / pair_bytes + 1;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t jp = 0; jp < pairs; ++jp) {
    if (jp + ahead < pairs) {
      const char* next = reinterpret_cast<const char*>(Wm + (jp + ahead) * kLinNR * K);
      for (int64_t b = 0; b < pair_bytes; b += 64) __builtin_prefetch(next + b);
    }
    skinny_rows<T, kLinNR>(M, K, X, a.ldx, Wm + jp * kLinNR * K, K, Y + jp * kLinNR, N);
  }
  for (int64_t j = pairs * kLinNR; j < N; ++j) skinny_rows<T, 1>(M, K, X, a.ldx, Wm + j * K, K, Y + j, N);
  if (bias)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) Y[i * N + j] += bias[j];
  return kOk;
}

}  // namespace

// The entry point, linear_small_m, is in csrc/cpu/linear_quant.h, which adds the bf16 weights' kernel.

}  // namespace MINILLM_ISA
}  // namespace minillm
