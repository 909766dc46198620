// The fp32/fp64 GEMM register tile and its panel drivers (plain and packed B).
#pragma once
#include "cpu/vec.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// Register tile of the GEMM micro-kernel: kMR rows x kNV vectors. 6x4 zmm accumulators fit the 32
// AVX-512 registers; with 16 registers (AVX2, SSE2, NEON) 6x2.
constexpr int kMR = 6;
constexpr int kNV = VB >= 64 ? 4 : 2;

// ---- GEMM: C[M x N] (+)= A[M x K] * B[K x N], B and C row-major, N a multiple of the vector width ----
// A is row-major (element (i, p) at A[i * lda + p]) or, with ColA, column-major (at A[i + p * lda]),
// as in dW = dY^T X where the broadcast operand is a transposed view.
template <typename T, int MR, int NV, bool ColA = false>
inline void gemm_tile(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                      bool accumulate) {
  typedef vec_t<T> V;
  constexpr int W = Vec<T>::W;
  V c[MR][NV];
  MINILLM_UNROLL
  for (int i = 0; i < MR; ++i)
    MINILLM_UNROLL
    for (int v = 0; v < NV; ++v) c[i][v] = accumulate ? vload(C + i * ldc + v * W) : V{};
  for (int64_t p = 0; p < K; ++p) {
    V b[NV];
    MINILLM_UNROLL
    for (int v = 0; v < NV; ++v) b[v] = vload(B + p * ldb + v * W);
    MINILLM_UNROLL
    for (int i = 0; i < MR; ++i) {
      const V a = vbcast(ColA ? A[i + p * lda] : A[i * lda + p]);
      MINILLM_UNROLL
      for (int v = 0; v < NV; ++v) c[i][v] += a * b[v];
    }
  }
  MINILLM_UNROLL
  for (int i = 0; i < MR; ++i)
    MINILLM_UNROLL
    for (int v = 0; v < NV; ++v) vstore(C + i * ldc + v * W, c[i][v]);
}

// Rows per tile for a panel of NV vectors: narrow panels (head dims of 32 or 48, a few queries) take more
// rows so that ~24 accumulators stay in flight and broadcasts do not outnumber the FMAs they feed.
constexpr int panel_rows(int nv) { return VB >= 64 ? (nv >= 4 ? kMR : nv == 3 ? 8 : 12) : kMR; }

template <typename T, int NV, bool ColA = false>
inline void gemm_panel(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                       int64_t ldc, bool acc) {
  constexpr int MR = panel_rows(NV);
  // Row i of A starts at A + i * (ColA ? 1 : lda).
  const int64_t row = ColA ? 1 : lda;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) gemm_tile<T, MR, NV, ColA>(K, A + i * row, lda, B, ldb, C + i * ldc, ldc, acc);
  for (; MR > kMR && i + kMR <= M; i += kMR)
    gemm_tile<T, kMR, NV, ColA>(K, A + i * row, lda, B, ldb, C + i * ldc, ldc, acc);
  A += i * row;
  C += i * ldc;
  switch (M - i) {
    case 1: gemm_tile<T, 1, NV, ColA>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 2: gemm_tile<T, 2, NV, ColA>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 3: gemm_tile<T, 3, NV, ColA>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 4: gemm_tile<T, 4, NV, ColA>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 5: gemm_tile<T, 5, NV, ColA>(K, A, lda, B, ldb, C, ldc, acc); break;
    default: break;
  }
}

// The column panels of C (+)= A B: panel j (columns [j, j + kNV W), or the narrower tail) reads B from
// panel_b(j) with rows ldb apart.
template <typename T, bool ColA, typename PanelB>
inline void gemm_panels(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, PanelB panel_b, int64_t ldb,
                        T* C, int64_t ldc, bool acc) {
  constexpr int W = Vec<T>::W;
  int64_t j = 0;
  for (; j + kNV * W <= N; j += kNV * W) gemm_panel<T, kNV, ColA>(M, K, A, lda, panel_b(j), ldb, C + j, ldc, acc);
  switch ((N - j) / W) {
    case 1: gemm_panel<T, 1, ColA>(M, K, A, lda, panel_b(j), ldb, C + j, ldc, acc); break;
    case 2: gemm_panel<T, 2, ColA>(M, K, A, lda, panel_b(j), ldb, C + j, ldc, acc); break;
    case 3: gemm_panel<T, 3, ColA>(M, K, A, lda, panel_b(j), ldb, C + j, ldc, acc); break;
    default: break;
  }
}

template <typename T, bool ColA = false>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
          bool acc) {
  gemm_panels<T, ColA>(M, N, K, A, lda, [B](int64_t j) { return B + j; }, ldb, C, ldc, acc);
}

// Width of one GEMM panel (kNV vectors) and C (+)= A B for B packed panel by panel: columns [j, j + kPanel)
// of B are one contiguous (K, kPanel) block at Bp + (j / kPanel) * K * kPanel, so each k-step of the
// micro-kernel reads the next cache line instead of a line a whole row of B away (a 4 KB stride at
// N = 1024, a new page per k-step). Measurements: docs/performance.md, "Packed panels".
template <typename T>
constexpr int64_t kPanel = kNV * Vec<T>::W;

// Element (p, j) of a packed B with K rows is packed_at(Bp, K, j)[p * kPanel]; for a j that starts a panel,
// packed_at(Bp, K, j) is that panel's block.
template <typename T>
inline T* packed_at(T* Bp, int64_t K, int64_t j) {
  constexpr int64_t P = kPanel<T>;
  return Bp + (j / P) * K * P + j % P;
}

template <typename T>
void gemm_packed(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc,
                 bool acc) {
  gemm_panels<T, false>(M, N, K, A, lda, [Bp, K](int64_t j) { return packed_at(Bp, K, j); }, kPanel<T>, C, ldc,
                        acc);
}

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
