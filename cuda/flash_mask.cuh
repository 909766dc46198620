// Scores and visibility of the tensor-core attention kernels, element by element on mma fragments (the
// semantics of csrc/kernels.h's AttnMods, as the CPU kernels apply them in csrc/cpu/attention_mods.h):
//   z_ij = softcap * tanh(scale s_ij / softcap)   (softcap > 0; else scale s_ij)
//          - alibi[b, h] * |i + off - j|
// and key j is visible to query i when j < Nk, kpm[b, j] != 0, qpm[b, i] != 0, and j lies in the band
// [i + lo_off, i + hi_off] that the causal flag and the window give (either side open when unset).
#pragma once

#include "common.cuh"

namespace minillm {
namespace cuda {

struct FlashBand {
  bool lo, hi;
  int64_t lo_off, hi_off;
  template <typename Args>
  MINILLM_DEVICE explicit FlashBand(const Args& a) {
    int64_t right = a.mods.window_right;  // -1: unbounded
    if (a.causal) right = 0;  // causal caps the right side at the diagonal
    hi = right >= 0;
    hi_off = a.causal_offset + right;
    lo = a.mods.window_left >= 0;
    lo_off = a.causal_offset - a.mods.window_left;
  }
  MINILLM_DEVICE bool sees(int64_t i, int64_t j) const { return (!lo || j >= i + lo_off) && (!hi || j <= i + hi_off); }
  // Keys [first(i), end(i)) of row i within [0, Nk).
  MINILLM_DEVICE int64_t first(int64_t i) const { return lo ? max64(0, i + lo_off) : 0; }
  MINILLM_DEVICE int64_t end(int64_t i, int64_t Nk) const { return hi ? max64(0, min64(Nk, i + hi_off + 1)) : Nk; }
  // Queries [qfirst(j), qend(j)) that see key j within [0, Nq).
  MINILLM_DEVICE int64_t qfirst(int64_t j) const { return hi ? max64(0, j - hi_off) : 0; }
  MINILLM_DEVICE int64_t qend(int64_t j, int64_t Nq) const { return lo ? max64(0, min64(Nq, j - lo_off + 1)) : Nq; }
};

// The score modifiers of one (b, h).
struct FlashScore {
  float scale, softcap, slope;
  int64_t off;
  template <typename Args>
  MINILLM_DEVICE FlashScore(const Args& a, int64_t b, int64_t h)
      : scale(float(a.scale)),
        softcap(float(a.mods.softcap)),
        slope(a.mods.alibi ? static_cast<const float*>(a.mods.alibi)[b * a.H + h] : 0.0f),
        off(a.causal_offset) {}

  // z from the raw product s = q.k; *dz_ds gets dz/ds divided by scale (1 - tanh^2 under a softcap, else 1).
  MINILLM_DEVICE float apply(float s, int64_t i, int64_t j, float* dz_ds) const {
    float z = s * scale;
    *dz_ds = 1.0f;
    if (softcap > 0.0f) {
      const float t = tanhf(z / softcap);
      z = softcap * t;
      *dz_ds = 1.0f - t * t;
    }
    if (slope != 0.0f) {
      const int64_t dist = i + off - j;
      z -= slope * float(dist < 0 ? -dist : dist);
    }
    return z;
  }
};

}  // namespace cuda
}  // namespace minillm
