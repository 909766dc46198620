// Vector types and helpers of one SIMD level: loads, broadcasts, horizontal sums and maxima, exp.
//
// The including file defines MINILLM_ISA (the namespace, e.g. avx512) and MINILLM_VBYTES (the
// vector width in bytes) and is compiled with the matching -m flags. The code uses GCC/Clang vector
// extensions, so one source gives AVX-512, AVX2 or baseline (SSE2 / NEON) code. Every helper has
// internal linkage inside minillm::MINILLM_ISA and no STL template is instantiated on a type shared
// between levels: otherwise the linker could keep an AVX-512 copy of an inline function and call it
// from the baseline path on a CPU without AVX-512.
//
// Naming: B batch, H heads, Nq / Nk query / key length, D head dim, Dp = D padded to whole vectors.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#if defined(_OPENMP)
#include <omp.h>
#endif
#include <chrono>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

constexpr int VB = MINILLM_VBYTES;

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
  static constexpr int W = VB / static_cast<int>(sizeof(T));
};
template <typename T>
using vec_t = typename Vec<T>::type;

// Padding unit for buffer columns: a whole float vector, which is also a whole double vector.
constexpr int64_t kPad = Vec<float>::W;
// Full unrolling of a register tile's loops (constant trip counts, at most 32). Without it GCC keeps the
// accumulator arrays in stack memory and promotes them to registers only inside the k loop, so every tile
// call stored and reloaded each accumulator twice (98 stack accesses around the 24 FMAs of a 6x4 fp32 tile).
#define MINILLM_UNROLL _Pragma("GCC unroll 32")
// For the kernels' once-per-work-item hooks (packing, loading): called out of line, the small attention
// calls ran 2-4% slower (B12 H4 D32 N = 64-128, in-process A/B on a Zen 4).
#define MINILLM_ALWAYS_INLINE inline __attribute__((always_inline))

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
inline vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, VB);
  return v;
}
template <typename T>
inline void vstore(T* p, vec_t<T> v) {
  std::memcpy(p, &v, VB);
}
// x - 0 rather than 0 + x: x - 0 is x for every x, so the compiler emits a bare broadcast (from memory when x
// is loaded), while 0 + x is not x for x = -0 and keeps a scalar add in front of every broadcast, one more
// uop per row of a GEMM tile (one-thread AVX2 attention forward at N = 1024: 31 -> 48 GFLOP/s without it).
template <typename T>
inline vec_t<T> vbcast(T x) {
  return x - vec_t<T>{};
}
// Horizontal sum and max, paid per row of a softmax and per (query, row) of a top-k scan: halving the
// vector log2(W) times makes a chain of 4 dependent steps for 16 floats instead of the 15 of a lane-by-lane
// loop, and each half is a register (a lane array went through the stack: stores, then reloads that wait
// on them, ~20% of a 16-bit top-k scan's samples on a Zen 5). Lane i of a step is lane i plus lane i + W/2,
// a fixed order, so equal inputs still give equal results.
template <typename T, int W>
struct Halves {
  typedef T Half __attribute__((vector_size(sizeof(T) * W / 2)));
  template <typename V, std::size_t... I>
  static Half lo(V v, std::index_sequence<I...>) { return __builtin_shufflevector(v, v, I...); }
  template <typename V, std::size_t... I>
  static Half hi(V v, std::index_sequence<I...>) { return __builtin_shufflevector(v, v, (I + W / 2)...); }
};
template <typename T, int W, typename V>
inline T hsum_n(V v) {
  if constexpr (W == 2) {
    return v[0] + v[1];
  } else {
    typedef Halves<T, W> H;
    return hsum_n<T, W / 2>(H::lo(v, std::make_index_sequence<W / 2>{}) + H::hi(v, std::make_index_sequence<W / 2>{}));
  }
}
template <typename T, int W, typename V>
inline T hmax_n(V v) {
  if constexpr (W == 2) {
    return v[1] > v[0] ? v[1] : v[0];
  } else {
    typedef Halves<T, W> H;
    const auto lo = H::lo(v, std::make_index_sequence<W / 2>{}), hi = H::hi(v, std::make_index_sequence<W / 2>{});
    return hmax_n<T, W / 2>(hi > lo ? hi : lo);
  }
}
template <typename T>
inline T hsum(vec_t<T> v) {
  return hsum_n<T, Vec<T>::W>(v);
}
template <typename T>
inline T hmax(vec_t<T> v) {
  return hmax_n<T, Vec<T>::W>(v);
}

// exp for softmax arguments (x <= 0 in practice): round x/ln2 to n, exp of the remainder r (|r| <= ln2/2)
// by a degree-5 polynomial, times 2^n: 16 AVX2 instructions, 9 of them multiplies (Cephes' degree-7 form
// with a final select: 22 by the same count). The coefficients are a minimax fit of the relative error
// (9e-8; 1.8e-7 in fp32 arithmetic over [-87, 0]). NaN stays NaN: every comparison with NaN is false.
// Below AVX-512 the rounding constant leaves n in the low mantissa bits of t, so 2^n is built in the
// exponent bits without a float-to-int conversion; x <= -88 gives n = -127, an all-zero scale and exactly 0
// (so exp(-inf) = 0). AVX-512 rounds with vrndscaleps and scales with vscalefps (three instructions fewer;
// docs/performance.md, "exp"); there lanes below -87 are zeroed by the masked vscalefps.
#if defined(__AVX512F__) && MINILLM_VBYTES == 64
#define MINILLM_EXP_SCALEF 1
#else
#define MINILLM_EXP_SCALEF 0
#endif
inline vec_t<float> vexp(vec_t<float> x) {
  typedef vec_t<float> V;
#if MINILLM_EXP_SCALEF
  constexpr float kExpLo = -87.0f;  // exp(-87) = 1.6e-38 > FLT_MIN: results stay normal
  // max(lo, x) and min(hi, x) return x when x is NaN (the second operand): one instruction each, where the
  // selects below compile to a compare and a masked move (bf16 forward 1.04x slower that way).
  // No lower clamp: lanes below kExpLo (-inf included, whose remainder is NaN) are zeroed at the end.
  const V xc = (V)_mm512_min_ps(_mm512_set1_ps(88.0f), (__m512)x);
  const __m512 nv =
      _mm512_roundscale_ps((__m512)(xc * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V n = (V)nv;
#else
  const V lo = vbcast(-88.0f), hi = vbcast(88.0f);
  V xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V magic = vbcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const V t = xc * 1.44269504088896341f + magic;
  const V n = t - magic;
#endif
  V r = xc - n * 0.693359375f;  // ln 2 in two parts: n * 0.693359375 is exact
  r = r - n * -2.12194440e-4f;
  V p = vbcast(8.290315047e-3f);
  p = p * r + 4.189793020e-2f;
  p = p * r + 1.666763574e-1f;
  p = p * r + 4.999915063e-1f;
  p = p * r + 9.999997020e-1f;
  p = p * r + 1.0f;
#if MINILLM_EXP_SCALEF
  // p * 2^n, and exactly 0 below kExpLo (masked scores, -inf): a denormal or underflowing result would take
  // a microcode assist on Intel cores (the causal N = 64 forward ran 1.5x slower than the bidirectional one).
  const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(kExpLo), _CMP_NLT_UQ);  // NaN kept
  return (V)_mm512_maskz_scalef_ps(keep, (__m512)p, nv);
#else
  typedef uint32_t VU __attribute__((vector_size(VB)));
  VU bits;
  std::memcpy(&bits, &t, VB);
  bits = (bits + 127u) << 23;  // the low mantissa bits of t hold n (two's complement); n + 127 is the exponent
  V scale;
  std::memcpy(&scale, &bits, VB);
  return p * scale;
#endif
}
#undef MINILLM_EXP_SCALEF
// The fp64 instantiation exists for gradcheck; exactness matters more than speed there.
inline vec_t<double> vexp(vec_t<double> x) {
  for (int i = 0; i < Vec<double>::W; ++i) x[i] = std::exp(x[i]);
  return x;
}

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
