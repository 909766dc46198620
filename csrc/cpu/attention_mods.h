// Score modifiers (csrc/kernels.h, AttnMods): soft-capping, ALiBi, an additive bias and sinks, applied to a
// row of scores between the q k^T product and the mask, the same code in the forward and the backward.
// Reference: minillm/ops/reference.py, attention_reference.
#pragma once
#include "cpu/attention_common.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// tanh for soft-capping: (1 - e) / (1 + e) with e = exp(-2|x|), and its odd series below |x| = 1/16, where
// 1 - e would cancel (the first term left out, 17 x^7 / 315, is below 3.3e-9 of tanh there).
inline vec_t<float> vtanh(vec_t<float> x) {
  typedef vec_t<float> V;
  const V a = x < 0 ? -x : x;
  const V e = vexp(a * -2.0f);
  const V big = (1.0f - e) / (1.0f + e);
  const V a2 = a * a;
  const V small = a * (1.0f + a2 * (-1.0f / 3 + a2 * (2.0f / 15)));
  const V t = a < 0.0625f ? small : big;
  return x < 0 ? -t : t;
}
// The fp64 instantiation exists for gradcheck.
inline vec_t<double> vtanh(vec_t<double> x) {
  for (int i = 0; i < Vec<double>::W; ++i) x[i] = std::tanh(x[i]);
  return x;
}

// The modifiers of one (b, h) pair.
template <typename T>
struct ScoreMods {
  typedef vec_t<T> V;
  static constexpr int W = Vec<T>::W;
  bool on = false;  // anything beyond the scale
  T cap = 0, inv_cap = 0;  // soft-capping (cap 0: none)
  T slope = 0;             // ALiBi slope (0: none)
  const T* bias = nullptr;  // bias[b, h, 0, 0]
  int64_t bs_i = 0, bs_j = 0;
  int64_t off = 0;
  T sink = -INFINITY;       // the sink logit (-inf: none)
  V iota;

  template <typename Args>
  ScoreMods(const Args& a, int64_t b, int64_t h) : off(a.causal_offset) {
    const AttnMods& md = a.mods;
    if (md.softcap > 0) {
      cap = static_cast<T>(md.softcap);
      inv_cap = static_cast<T>(1.0 / md.softcap);
    }
    if (md.alibi) slope = static_cast<const T*>(md.alibi)[b * a.H + h];
    if (md.bias) {
      bias = static_cast<const T*>(md.bias) + b * md.bias_stride[0] + h * md.bias_stride[1];
      bs_i = md.bias_stride[2];
      bs_j = md.bias_stride[3];
    }
    if (md.sinks) sink = static_cast<const T*>(md.sinks)[h];
    on = cap != 0 || slope != 0 || bias;
    for (int w = 0; w < W; ++w) iota[w] = static_cast<T>(w);
  }

  // Scores of query row i for keys j0 + c, c < cv (a multiple of W): s <- pre * s, soft-capped, minus the ALiBi
  // distance, plus the bias. The bias is read for keys below Nk only (the rest are masked afterwards, as every
  // key this must not see is: the mask comes after this, since soft-capping would turn -inf finite). tcap, if
  // given with soft-capping, receives tanh(pre s / cap) for the backward's chain rule.
  void apply(T* s, int64_t cv, T pre, int64_t i, int64_t j0, int64_t Nk, T* tcap) const {
    const int64_t nb = imax(0, imin(cv, Nk - j0));  // columns whose bias exists
    const T* brow = bias ? bias + i * bs_i + j0 * bs_j : nullptr;
    const V base = vbcast(static_cast<T>(i + off - j0));  // distance i + off - j at c = 0
    for (int64_t c = 0; c < cv; c += W) {
      V x = vload(s + c) * pre;
      if (cap != 0) {
        const V t = vtanh(x * inv_cap);
        if (tcap) vstore(tcap + c, t);
        x = t * cap;
      }
      if (slope != 0) {
        const V d = base - (vbcast(static_cast<T>(c)) + iota);
        x -= (d < 0 ? -d : d) * slope;
      }
      if (brow) {
        if (bs_j == 1 && c + W <= nb) {
          x += vload(brow + c);
        } else {
          for (int w = 0; w < W && c + w < nb; ++w) x[w] += brow[(c + w) * bs_j];
        }
      }
      vstore(s + c, x);
    }
  }
};

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
