// The online-softmax step of the fp32/fp64 forward (row maxima, rescaling, exponentials).
#pragma once
#include "cpu/vec.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// Maximum of a row of cv scores (cv a multiple of the vector width; -inf when every score is -inf): four
// running maxima, since one would wait out the max latency (4 cycles) on every vector.
template <typename T>
inline T row_max(const T* s, int64_t cv) {
  typedef vec_t<T> V;
  constexpr int W = Vec<T>::W;
  V m0 = vbcast<T>(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  int64_t c = 0;
  for (; c + 4 * W <= cv; c += 4 * W) {
    const V x0 = vload(s + c), x1 = vload(s + c + W), x2 = vload(s + c + 2 * W), x3 = vload(s + c + 3 * W);
    m0 = x0 > m0 ? x0 : m0;
    m1 = x1 > m1 ? x1 : m1;
    m2 = x2 > m2 ? x2 : m2;
    m3 = x3 > m3 ? x3 : m3;
  }
  for (; c < cv; c += W) {
    const V x = vload(s + c);
    m0 = x > m0 ? x : m0;
  }
  m0 = m1 > m0 ? m1 : m0;
  m2 = m3 > m2 ? m3 : m2;
  return hmax<T>(m2 > m0 ? m2 : m0);
}

// End of an online-softmax step for row r: l takes the rescaled old sum plus this block's, and the row's
// acc (Dp wide) is rescaled by alpha = exp(m_old - m_new) unless this was its first visible block.
template <typename T>
inline void finish_softmax_row(int64_t r, T alpha, bool first, vec_t<T> sum, T* l, T* acc, int64_t Dp) {
  constexpr int W = Vec<T>::W;
  l[r] = l[r] * alpha + hsum<T>(sum);
  if (!first && alpha != T(1)) {
    T* ar = acc + r * Dp;
    const vec_t<T> av = vbcast(alpha);
    for (int64_t d = 0; d < Dp; d += W) vstore(ar + d, vload(ar + d) * av);
  }
}

// Online-softmax step for rows [r0, r0 + tr) (tr <= kMR) of S, cv columns (masked entries already -inf):
// multiplies the scores by `scale` (unless 1), updates the running maxima m and sums l, rescales the rows'
// acc (Dp wide), and leaves the probabilities in S. All rows' maxima come first, then their exponentials in
// one loop nest, so that the rows' exp chains overlap instead of waiting on one row's max and sum in turn.
// Out of line, as a clone for scale = 1 (GCC's choice before the forward's block loop was shared; inlined
// into that loop the small forward calls ran ~3% slower).
template <typename T>
__attribute__((noinline)) void softmax_tile(T* S, int64_t lds, int64_t r0, int64_t tr, int64_t cv, T scale, T* m, T* l,
                                          T* acc, int64_t Dp) {
  typedef vec_t<T> V;
  constexpr int W = Vec<T>::W;
  V shift[kMR], sum[kMR];
  T m_new[kMR], alpha[kMR];
  bool first[kMR];
  for (int64_t i = 0; i < tr; ++i) {
    const int64_t r = r0 + i;
    T* s = S + r * lds;
    if (scale != T(1)) {
      const V sc = vbcast(scale);
      for (int64_t c = 0; c < cv; c += W) vstore(s + c, vload(s + c) * sc);
    }
    const T bmax = row_max<T>(s, cv);
    m_new[i] = bmax > m[r] ? bmax : m[r];
    // With no visible key yet, shift by 0 so that exp(-inf - shift) is 0, not NaN.
    const T sh = m_new[i] == -INFINITY ? T(0) : m_new[i];
    // A row's first visible block rescales nothing (acc and l are 0): skip the libm call.
    first[i] = m[r] == -INFINITY;
    alpha[i] = first[i] ? T(0) : std::exp(m[r] - sh);
    shift[i] = vbcast(sh);
    sum[i] = V{};
  }
  for (int64_t c = 0; c < cv; c += W)
    for (int64_t i = 0; i < tr; ++i) {
      T* s = S + (r0 + i) * lds + c;
      const V p = vexp(vload(s) - shift[i]);
      vstore(s, p);
      sum[i] += p;
    }
  for (int64_t i = 0; i < tr; ++i) {
    m[r0 + i] = m_new[i];
    finish_softmax_row<T>(r0 + i, alpha[i], first[i], sum[i], l, acc, Dp);
  }
}

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
