// Row layouts and the softmax step of the bf16 attention kernels (pair words, base-2 exp).
#pragma once
#include "cpu/attention_common.h"
#include "cpu/convert.h"
#include "cpu/softmax.h"
#include "cpu/amx.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

#if defined(__AVX512BW__)
// Row `src` of D bf16 values into dst (Dp values, zero-padded), so that pairs are whole aligned words.
inline void bf16_row(const void* src, int64_t D, int64_t Dp, uint16_t* dst) {
  std::memcpy(dst, src, sizeof(uint16_t) * D);
  std::memset(dst + D, 0, sizeof(uint16_t) * (Dp - D));
}

// The first n (< 16) floats at p as a vector, the other lanes 0.
inline vec_t<float> vload_partial(const float* p, int64_t n) {
  return (vec_t<float>)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}

// 2^y for y <= 0 (NaN stays NaN), for probabilities that are rounded to bf16 next: n = round(y), 2^(y - n) by
// a degree-4 polynomial (a relative-error fit on [-1/2, 1/2]: 2.9e-6 in fp32 arithmetic, 1/1300 of bf16's
// rounding step), times 2^n by vscalefps. 8 instructions where vexp (fp32 accuracy, natural base, x scaled
// by 1/ln2 first) takes 11 (+1 each for the zeroing mask below).
__attribute__((target("avx512f"))) inline __m512 vexp2_bf16(__m512 y) {
  // Below -126 the result is 0 (not a denormal, which would take a microcode assist on Intel cores).
  // No clamp needed: -inf and huge negatives give NaN or 0 in p * 2^n, and those lanes are zeroed.
  const __mmask16 keep = _mm512_cmp_ps_mask(y, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);  // NaN kept
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(9.583242237567902e-3f), f, _mm512_set1_ps(5.5905524641275406e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4024079740047455e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931242942810059e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// Rows per softmax_tile_bf16 call: a quarter of an AMX row tile (kMR would leave a 2-row remainder).
constexpr int64_t kSoftRows = 8;

// softmax_tile for bf16 scores (tr <= kSoftRows rows): the scale enters the exponent (one pass fewer over S),
// which is taken in base 2 (vexp2_bf16), and p goes straight to bf16 rows of Pb (ldp apart), the operand of
// p v; l sums the fp32 p, as in softmax_tile.
__attribute__((target("avx512bf16,avx512bw,avx512f"))) inline void softmax_tile_bf16(
    float* S, int64_t lds, int64_t r0, int64_t tr, int64_t cv, float scale, float* m, float* l, float* acc,
    int64_t Dp, uint16_t* Pb, int64_t ldp) {
  typedef vec_t<float> V;
  constexpr int W = 16;
  // A scale <= 0 would turn masked -inf scores into +inf or NaN in the exponent: apply it first, keeping -inf.
  const float k = scale > 0 ? scale : 1.0f;
  V sum[kSoftRows];
  float alpha[16];  // one vector: the partial load and store below cover kSoftRows <= 16 lanes
  bool first[kSoftRows];
  constexpr float kLog2e = 1.44269504088896341f;
  const __m512 k2 = _mm512_set1_ps(k * kLog2e);
  const V ninf = vbcast(-INFINITY);
  __m512 shift2[kSoftRows];
  for (int64_t i = 0; i < tr; ++i) {
    const int64_t r = r0 + i;
    float* s = S + r * lds;
    if (scale <= 0)
      for (int64_t c = 0; c < cv; c += W) {
        const V x = vload(s + c);
        vstore(s + c, x == ninf ? x : x * vbcast(scale));
      }
    const float bmax = row_max<float>(s, cv) * k;
    const float m_new = bmax > m[r] ? bmax : m[r];
    const float sh = m_new == -INFINITY ? 0.0f : m_new;  // no visible key yet: exp(-inf) stays 0
    first[i] = m[r] == -INFINITY;
    alpha[i] = first[i] ? -INFINITY : m[r] - sh;  // exponentiated below, all rows in one vexp
    shift2[i] = _mm512_set1_ps(sh * kLog2e);
    sum[i] = V{};
    m[r] = m_new;
  }
  int64_t c = 0;
  for (; c + 2 * W <= cv; c += 2 * W)  // two vectors per conversion (vcvtne2ps2bf16: 2 uops for 32 values)
    for (int64_t i = 0; i < tr; ++i) {
      const float* srow = S + (r0 + i) * lds + c;
      const __m512 p0 = vexp2_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(srow), k2, shift2[i]));
      const __m512 p1 = vexp2_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(srow + W), k2, shift2[i]));
      _mm512_storeu_si512(Pb + (r0 + i) * ldp + c, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
      sum[i] += (V)_mm512_add_ps(p0, p1);
    }
  for (; c < cv; c += W)
    for (int64_t i = 0; i < tr; ++i) {
      const __m512 p = vexp2_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(S + (r0 + i) * lds + c), k2, shift2[i]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(Pb + (r0 + i) * ldp + c), (__m256i)_mm512_cvtneps_pbh(p));
      sum[i] += (V)p;
    }
  {
    const __m512 av = (__m512)vexp(vload_partial(alpha, tr));
    _mm512_mask_storeu_ps(alpha, static_cast<__mmask16>((1u << tr) - 1), av);
  }
  for (int64_t i = 0; i < tr; ++i) finish_softmax_row<float>(r0 + i, alpha[i], first[i], sum[i], l, acc, Dp);
}

// Keys [j, j + 16) of one (b, h) as padded bf16 rows (Dp values): k rows into K16, v rows into V16; keys
// past `limit` or padded (kpm) are zeros, so whatever they hold (NaN, inf) is never read as data.
// k and v point at the (b, h) pair's first row; ks and vs are the row strides (elements).
inline void load_kv_rows16(const void* k, int64_t ks, const void* v, int64_t vs, int64_t j, int64_t limit,
                           const uint8_t* kpm, int64_t D, int64_t Dp, uint16_t* K16, uint16_t* V16) {
  for (int64_t t = 0; t < 16; ++t) {
    const int64_t jj = j + t;
    if (jj < limit && !(kpm && !kpm[jj])) {
      bf16_row(at(k, kBF16, jj * ks), D, Dp, K16 + t * Dp);
      bf16_row(at(v, kBF16, jj * vs), D, Dp, V16 + t * Dp);
    } else {
      std::memset(K16 + t * Dp, 0, sizeof(uint16_t) * Dp);
      std::memset(V16 + t * Dp, 0, sizeof(uint16_t) * Dp);
    }
  }
}

// dst[p * ldd + t] = src[t * lds + p] for 16 rows t and n words p: a 32-bit transpose writing whole 64-byte
// rows of dst (one word at a time, dst rows 4 KB apart, every store would land in the same cache set).
inline void transpose_words16(const uint32_t* src, int64_t lds, int64_t n, uint32_t* dst, int64_t ldd) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(static_cast<int>(lds)));
  for (int64_t p = 0; p < n; ++p) _mm512_storeu_si512(dst + p * ldd, _mm512_i32gather_epi32(idx, src + p, 4));
}

// Rows a and b of n bf16 values (n a multiple of 16) as pair words: out[c] = (a[c], b[c]).
inline void pair_bf16_rows(const uint16_t* a, const uint16_t* b, int64_t n, uint32_t* out) {
  for (int64_t c = 0; c < n; c += 16) {
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + c)));
    const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + c)));
    _mm512_storeu_si512(out + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}

// Rows r and r + 1 of two fp32 rows (n values, n a multiple of 16) as bf16 pair words: out[c] = (a[c], b[c]).
__attribute__((target("avx512bf16,avx512bw,avx512f"))) inline void interleave_bf16_rows(
    const float* a, const float* b, int64_t n, uint32_t* out) {
  // vcvtne2ps2bf16 puts its second operand (row a) in the low half, the first (row b) in the high half;
  // the permute interleaves the halves.
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t c = 0; c < n; c += 16) {
    const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(b + c), _mm512_loadu_ps(a + c));
    _mm512_storeu_si512(out + c, _mm512_permutexvar_epi16(idx, packed));
  }
}
#endif

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
