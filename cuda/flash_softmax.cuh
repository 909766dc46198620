// Online softmax on mma fragments: each lane holds two rows of a 16-row tile (g = lane / 4 and g + 8), their
// columns spread over the 4 lanes of its group, so a row's max or sum is a reduction over lanes with the
// same g (xor 1 and 2).
#pragma once

#include "common.cuh"

namespace minillm {
namespace cuda {

MINILLM_DEVICE float group4_max(float v) {
  v = nan_max(v, __shfl_xor_sync(kFullMask, v, 1));
  return nan_max(v, __shfl_xor_sync(kFullMask, v, 2));
}

MINILLM_DEVICE float group4_sum(float v) {
  v += __shfl_xor_sync(kFullMask, v, 1);
  return v + __shfl_xor_sync(kFullMask, v, 2);
}

// One key tile of the forward's online softmax. s: (kNB, 4) score fragments (z, or -inf where masked) become
// the probabilities exp(z - m); m, l: the two rows' running max and sum; o: (kOB, 4) output fragments,
// rescaled by exp(m_old - m_new). NaN scores propagate (nan_max), as in the CPU kernels.
template <int kNB, int kOB>
MINILLM_DEVICE void online_softmax_tile(float (*s)[4], float* m, float* l, float (*o)[4]) {
  MINILLM_UNROLL
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
    MINILLM_UNROLL
    for (int nb = 0; nb < kNB; ++nb) mx = nan_max(mx, nan_max(s[nb][2 * r], s[nb][2 * r + 1]));
    const float m_new = nan_max(m[r], group4_max(mx));
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // no visible key yet: every p is exp(-inf) = 0
    const float alpha = expf(m[r] - m_use);
    float sum = 0.0f;
    MINILLM_UNROLL
    for (int nb = 0; nb < kNB; ++nb)
      MINILLM_UNROLL
      for (int e = 0; e < 2; ++e) {
        const float p = expf(s[nb][2 * r + e] - m_use);
        s[nb][2 * r + e] = p;
        sum += p;
      }
    l[r] = l[r] * alpha + group4_sum(sum);
    m[r] = m_new;
    MINILLM_UNROLL
    for (int ob = 0; ob < kOB; ++ob) {
      o[ob][2 * r] *= alpha;
      o[ob][2 * r + 1] *= alpha;
    }
  }
}

}  // namespace cuda
}  // namespace minillm
