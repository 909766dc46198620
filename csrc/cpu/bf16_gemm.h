// bf16 products on AVX512-BF16 (vdpbf16ps): the register tile and its panel drivers.
#pragma once
#include "cpu/gemm_ukernel.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

#if defined(__AVX512BW__)
// ---- bf16 attention forward with AVX512-BF16 dot products ----
// vdpbf16ps adds a[2i] * b[2i] + a[2i + 1] * b[2i + 1] into fp32 lane i: twice the multiply-adds of an fp32
// FMA per instruction, products exact, accumulation in fp32. Operands travel as 32-bit words holding a
// bf16 pair: the broadcast side pairs consecutive elements of a row (q along D, p along keys), the vector
// side is packed so that word j of a vector pairs the same two K indices for output column j:
// K^T as (D / 2, keys) words (a 32-bit transpose of K), V as (keys / 2, D) words (two V rows interleaved).
// q k^T is scaled in fp32 (scaling q first would round it once more); p is rounded to bf16 for p v,
// as torch's bf16 flash kernel does.


// C (MR, NV * 16) (+)= A (MR, KP pairs) B (KP pairs, NV * 16): A row-major words (lda words per row), B rows of ldb words.
template <int MR, int NV>
__attribute__((target("avx512bf16,avx512bw,avx512f"))) inline void bf16_tile(
    int64_t KP, const uint32_t* A, int64_t lda, const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
    bool accumulate) {
  __m512 c[MR][NV];
  MINILLM_UNROLL
  for (int i = 0; i < MR; ++i)
    MINILLM_UNROLL
    for (int v = 0; v < NV; ++v) c[i][v] = accumulate ? _mm512_loadu_ps(C + i * ldc + v * 16) : _mm512_setzero_ps();
  for (int64_t p = 0; p < KP; ++p) {
    __m512i b[NV];
    MINILLM_UNROLL
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(B + p * ldb + v * 16);
    MINILLM_UNROLL
    for (int i = 0; i < MR; ++i) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(A[i * lda + p]));
      MINILLM_UNROLL
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_dpbf16_ps(c[i][v], (__m512bh)a, (__m512bh)b[v]);
    }
  }
  MINILLM_UNROLL
  for (int i = 0; i < MR; ++i)
    MINILLM_UNROLL
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + i * ldc + v * 16, c[i][v]);
}

template <int NV>
inline void bf16_panel(int64_t M, int64_t KP, const uint32_t* A, int64_t lda, const uint32_t* B, int64_t ldb,
                       float* C, int64_t ldc, bool acc) {
  int64_t i = 0;
  for (; i + kMR <= M; i += kMR) bf16_tile<kMR, NV>(KP, A + i * lda, lda, B, ldb, C + i * ldc, ldc, acc);
  A += i * lda;
  C += i * ldc;
  switch (M - i) {
    case 1: bf16_tile<1, NV>(KP, A, lda, B, ldb, C, ldc, acc); break;
    case 2: bf16_tile<2, NV>(KP, A, lda, B, ldb, C, ldc, acc); break;
    case 3: bf16_tile<3, NV>(KP, A, lda, B, ldb, C, ldc, acc); break;
    case 4: bf16_tile<4, NV>(KP, A, lda, B, ldb, C, ldc, acc); break;
    case 5: bf16_tile<5, NV>(KP, A, lda, B, ldb, C, ldc, acc); break;
    default: break;
  }
}

// C (M, N) (+)= A (M, KP pairs) B, N a multiple of 16.
inline void bf16_gemm(int64_t M, int64_t N, int64_t KP, const uint32_t* A, int64_t lda, const uint32_t* B,
                      int64_t ldb, float* C, int64_t ldc, bool acc) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) bf16_panel<4>(M, KP, A, lda, B + j, ldb, C + j, ldc, acc);
  switch ((N - j) / 16) {
    case 1: bf16_panel<1>(M, KP, A, lda, B + j, ldb, C + j, ldc, acc); break;
    case 2: bf16_panel<2>(M, KP, A, lda, B + j, ldb, C + j, ldc, acc); break;
    case 3: bf16_panel<3>(M, KP, A, lda, B + j, ldb, C + j, ldc, acc); break;
    default: break;
  }
}
#endif

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
