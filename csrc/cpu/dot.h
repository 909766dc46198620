// The dot-product register tile shared by top-k scoring and the few-row linear.
#pragma once
#include "cpu/vec.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// Y[i][j] = <X_i, W_j> for MR rows of X and NR rows of W (dot-product form); a scalar loop finishes
// K % W. Every pair is summed in the same order whatever MR and NR are, so equal rows give equal
// results (top-k's tie-breaking relies on it). Used by top-k scoring and the few-row linear.
template <typename T, int MR, int NR>
inline void dot_tile(int64_t K, const T* X, int64_t ldx, const T* Wm, int64_t ldw, T* Y, int64_t ldy) {
  typedef vec_t<T> V;
  constexpr int W = Vec<T>::W;
  V acc[MR][NR];
  MINILLM_UNROLL
  for (int i = 0; i < MR; ++i)
    MINILLM_UNROLL
    for (int j = 0; j < NR; ++j) acc[i][j] = V{};
  int64_t p = 0;
  for (; p + W <= K; p += W) {
    V w[NR];
    MINILLM_UNROLL
    for (int j = 0; j < NR; ++j) w[j] = vload(Wm + j * ldw + p);
    MINILLM_UNROLL
    for (int i = 0; i < MR; ++i) {
      const V xv = vload(X + i * ldx + p);
      MINILLM_UNROLL
      for (int j = 0; j < NR; ++j) acc[i][j] += xv * w[j];
    }
  }
  MINILLM_UNROLL
  for (int i = 0; i < MR; ++i)
    MINILLM_UNROLL
    for (int j = 0; j < NR; ++j) {
      T s = hsum<T>(acc[i][j]);
      for (int64_t q = p; q < K; ++q) s += X[i * ldx + q] * Wm[j * ldw + q];
      Y[i * ldy + j] = s;
    }
}

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
