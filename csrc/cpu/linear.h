// Linear layers with few rows (decoding): each thread streams its slice of W once.
#pragma once
#include <type_traits>

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

// tile(j0, nr) for the row tiles j0 = 0, NR, 2 NR, ... of an (N, row_bytes) stream of weight rows (nr an
// integral_constant: NR, or 1 for each row past the last whole tile). Each thread owns a contiguous slice of the
// rows and streams it from memory once, requesting rows 8 KB ahead of use: the stream is the whole cost of a
// decoding step, and the hardware prefetcher alone left much of the memory bandwidth unused (on a Zen 5).
template <int NR, typename Tile>
inline void stream_row_tiles(int64_t N, int64_t row_bytes, const void* rows, int nthreads, const Tile& tile) {
  constexpr int64_t kPrefetchBytes = 8192;
  const int64_t tiles = N / NR, tile_bytes = NR * row_bytes, ahead = kPrefetchBytes / tile_bytes + 1;
  const char* base = static_cast<const char*>(rows);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t t = 0; t < tiles; ++t) {
    if (t + ahead < tiles) {
      const char* next = base + (t + ahead) * tile_bytes;
      for (int64_t b = 0; b < tile_bytes; b += 64) __builtin_prefetch(next + b);
    }
    tile(t * NR, std::integral_constant<int, NR>{});
  }
  for (int64_t j = tiles * NR; j < N; ++j) tile(j, std::integral_constant<int, 1>{});
}

// Streams W once whatever M is; a packed GEMM would first copy all of W, doubling the memory traffic that bounds
// decoding.
template <typename T>
int linear_impl(const LinearArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N;
  const T* X = static_cast<const T*>(a.x);
  const T* Wm = static_cast<const T*>(a.w);
  const T* bias = static_cast<const T*>(a.b);
  T* Y = static_cast<T*>(a.y);
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  stream_row_tiles<kLinNR>(N, K * static_cast<int64_t>(sizeof(T)), Wm, nt, [&](int64_t j0, auto nr) {
    skinny_rows<T, decltype(nr)::value>(M, K, X, a.ldx, Wm + j0 * K, K, Y + j0, N);
  });
  if (bias)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) Y[i * N + j] += bias[j];
  return kOk;
}

}  // namespace

// The entry point, linear_small_m, is in csrc/cpu/linear_quant.h, which adds the bf16 weights' kernel.

}  // namespace MINILLM_ISA
}  // namespace minillm
