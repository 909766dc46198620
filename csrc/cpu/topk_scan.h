// Top-k scorers for few queries: dot products on fp32, fp16, bf16 and int8 rows read in place.
#pragma once
#include "cpu/dot.h"
#include "cpu/convert.h"
#include "cpu/prefetch.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

constexpr int kMQ = VB >= 64 ? 4 : 2;  // queries per dot micro-kernel

// The few-query micro-kernels read one corpus row at a time: rows read side by side are interleaved
// streams, which the memory system serves worse than one. Measurements: docs/performance.md, "Top-k scans".
// pf, avail: prefetch_scan_row's (pf = 0: none). Only a tile's first pass over the corpus requests rows: later
// query groups find them in the cache, where requests only cost time (fp32 l2, whose norms read the tile first,
// was 1.11x slower with them).
template <int MQ>
inline void dot_rows(int64_t K, const float* Qp, int64_t ldq, int64_t nrows, const float* C, int64_t ldc, float* S,
                     int64_t lds, int64_t pf, int64_t avail) {
  for (int64_t j = 0; j < nrows; ++j) {
    prefetch_scan_row(C, j, pf, avail, 4 * ldc);
    dot_tile<float, MQ, 1>(K, Qp, ldq, C + j * ldc, ldc, S + j, lds);
  }
}

inline void dot_block(int64_t K, const float* Qp, int64_t ldq, int64_t nq, const float* C, int64_t ldc,
                      int64_t nrows, float* S, int64_t lds, int64_t pf, int64_t avail) {
  int64_t i = 0;
  for (; i + kMQ <= nq; i += kMQ, pf = 0)
    dot_rows<kMQ>(K, Qp + i * ldq, ldq, nrows, C, ldc, S + i * lds, lds, pf, avail);
  // The last nq % kMQ queries in one pass over the tile, not one pass each.
  Qp += i * ldq;
  S += i * lds;
  switch (nq - i) {
    case 1: dot_rows<1>(K, Qp, ldq, nrows, C, ldc, S, lds, pf, avail); break;
    case 2: dot_rows<2>(K, Qp, ldq, nrows, C, ldc, S, lds, pf, avail); break;  // kMQ = 4 only
    case 3: dot_rows<3>(K, Qp, ldq, nrows, C, ldc, S, lds, pf, avail); break;
    default: break;
  }
}

// Corpus rows stored as bf16 or fp16, widened to fp32 in registers W values at a time, so a few
// queries score them without a converted copy of the tile.
template <int DT>
inline vec_t<float> vload_cvt(const void* base, int64_t off) {
  vec_t<float> v;
  if constexpr (DT == kF16) {
    const uint16_t* p = static_cast<const uint16_t*>(base) + off;
#if defined(__AVX512F__)
    if constexpr (VB == 64) {
      const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      std::memcpy(&v, &f, VB);
      return v;
    }
#endif
#if defined(__F16C__)
    if constexpr (VB == 32) {
      const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      std::memcpy(&v, &f, VB);
      return v;
    }
#endif
    for (int i = 0; i < Vec<float>::W; ++i) v[i] = f16_to_f32(p[i]);
  } else {  // bf16: the upper half of an fp32
    typedef uint16_t VH __attribute__((vector_size(VB / 2)));
    typedef uint32_t VU __attribute__((vector_size(VB)));
    VH h;
    std::memcpy(&h, static_cast<const uint16_t*>(base) + off, VB / 2);
    const VU u = __builtin_convertvector(h, VU) << 16;
    std::memcpy(&v, &u, VB);
  }
  return v;
}

inline float load_cvt(int dt, const void* base, int64_t off) {
  const uint16_t h = static_cast<const uint16_t*>(base)[off];
  return dt == kF16 ? f16_to_f32(h) : bf16_to_f32(h);
}

// bf16 rows two values per 32-bit lane: the lane shifted left by 16 is the even value as an fp32 and the
// lane with its low half cleared the odd one, so a block of 2W values widens with a shift and an AND. The
// generic widening (zero-extend each value to 32 bits, then shift) spends a cross-lane shuffle per W values.
// (docs/performance.md, "Top-k scans"). The queries a pair-widened row meets are deinterleaved to match
// (split_pairs).
constexpr bool kBF16Pairs = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;
constexpr int64_t kPairBlock = 2 * Vec<float>::W;

inline void bf16_pairs(const void* base, int64_t off, vec_t<float>* lo, vec_t<float>* hi) {
  typedef uint32_t VU __attribute__((vector_size(VB)));
  VU u;
  std::memcpy(&u, static_cast<const uint16_t*>(base) + off, VB);
  const VU even = u << 16, odd = u & 0xffff0000u;
  std::memcpy(lo, &even, VB);
  std::memcpy(hi, &odd, VB);
}

// Reorders each whole block of kPairBlock values of q (its first K) to [even values, odd values], the order
// bf16_pairs widens a row in; the rest of q stays in place.
inline void split_pairs(float* q, int64_t K) {
  constexpr int W = Vec<float>::W;
  for (int64_t b = 0; b + kPairBlock <= K; b += kPairBlock) {
    float t[kPairBlock];
    for (int i = 0; i < W; ++i) {
      t[i] = q[b + 2 * i];
      t[W + i] = q[b + 2 * i + 1];
    }
    std::memcpy(q + b, t, sizeof(t));
  }
}

// Accumulator chains per (query, row) pair. With one row at a time and a single query, one chain waits on
// every FMA's latency: four took a 1M x 384 fp16 or bf16 scan at Q = 1 from 46-48 to 39-42 ms (2-core Zen
// 3, C++ harness; the fp32 scan is bandwidth-bound and gained nothing). The count is fixed, so every row
// is summed in the same order whatever the tile or query count (ties stay ties).
constexpr int kCvtChains = 4;

// S[i * lds] = <Qp[i], row> over the first K values of one 16-bit row (Qp zero-padded past K).
template <int DT, int MQ>
inline void dot_tile_cvt(int64_t K, const float* Qp, int64_t ldq, const void* C, float* S, int64_t lds) {
  typedef vec_t<float> V;
  constexpr int W = Vec<float>::W;
  constexpr int U = kCvtChains;
  V acc[U][MQ];
  MINILLM_UNROLL
  for (int u = 0; u < U; ++u)
    MINILLM_UNROLL
    for (int i = 0; i < MQ; ++i) acc[u][i] = V{};
  int64_t p = 0;
  if constexpr (DT == kBF16 && kBF16Pairs) {
    static_assert(U == 4, "two pair blocks (low and high halves) per step are the four chains");
    for (; p + 2 * kPairBlock <= K; p += 2 * kPairBlock)
      MINILLM_UNROLL
      for (int u = 0; u < 2; ++u) {
        V lo, hi;
        bf16_pairs(C, p + u * kPairBlock, &lo, &hi);
        MINILLM_UNROLL
        for (int i = 0; i < MQ; ++i) {
          acc[2 * u][i] += vload(Qp + i * ldq + p + u * kPairBlock) * lo;
          acc[2 * u + 1][i] += vload(Qp + i * ldq + p + u * kPairBlock + W) * hi;
        }
      }
    for (; p + kPairBlock <= K; p += kPairBlock) {
      V lo, hi;
      bf16_pairs(C, p, &lo, &hi);
      MINILLM_UNROLL
      for (int i = 0; i < MQ; ++i) {
        acc[0][i] += vload(Qp + i * ldq + p) * lo;
        acc[1][i] += vload(Qp + i * ldq + p + W) * hi;
      }
    }
  }
  for (; p + U * W <= K; p += U * W)
    MINILLM_UNROLL
    for (int u = 0; u < U; ++u) {
      const V c = vload_cvt<DT>(C, p + u * W);
      MINILLM_UNROLL
      for (int i = 0; i < MQ; ++i) acc[u][i] += vload(Qp + i * ldq + p + u * W) * c;
    }
  for (; p + W <= K; p += W) {
    const V c = vload_cvt<DT>(C, p);
    MINILLM_UNROLL
    for (int i = 0; i < MQ; ++i) acc[0][i] += vload(Qp + i * ldq + p) * c;
  }
  MINILLM_UNROLL
  for (int i = 0; i < MQ; ++i) {
    MINILLM_UNROLL
    for (int u = 1; u < U; ++u) acc[0][i] += acc[u][i];
    float s = hsum<float>(acc[0][i]);
    for (int64_t t = p; t < K; ++t) s += Qp[i * ldq + t] * load_cvt(DT, C, t);
    S[i * lds] = s;
  }
}

// pf, avail: prefetch_scan_row's (pf = 0: none; see dot_rows).
template <int DT, int MQ>
inline void dot_rows_cvt(int64_t K, const float* Qp, int64_t ldq, int64_t nrows, const void* C, int64_t ldc, float* S,
                         int64_t lds, int64_t pf, int64_t avail) {
  for (int64_t j = 0; j < nrows; ++j) {
    prefetch_scan_row(C, j, pf, avail, 2 * ldc);
    dot_tile_cvt<DT, MQ>(K, Qp, ldq, static_cast<const uint16_t*>(C) + j * ldc, S + j, lds);
  }
}

template <int DT>
inline void dot_block_cvt(int64_t K, const float* Qp, int64_t ldq, int64_t nq, const void* C, int64_t ldc,
                          int64_t nrows, float* S, int64_t lds, int64_t pf, int64_t avail) {
  int64_t i = 0;
  for (; i + kMQ <= nq; i += kMQ, pf = 0)
    dot_rows_cvt<DT, kMQ>(K, Qp + i * ldq, ldq, nrows, C, ldc, S + i * lds, lds, pf, avail);
  // As in dot_block: the last nq % kMQ queries in one pass.
  Qp += i * ldq;
  S += i * lds;
  switch (nq - i) {
    case 1: dot_rows_cvt<DT, 1>(K, Qp, ldq, nrows, C, ldc, S, lds, pf, avail); break;
    case 2: dot_rows_cvt<DT, 2>(K, Qp, ldq, nrows, C, ldc, S, lds, pf, avail); break;  // kMQ = 4 only
    case 3: dot_rows_cvt<DT, 3>(K, Qp, ldq, nrows, C, ldc, S, lds, pf, avail); break;
    default: break;
  }
}

template <int DT>
inline float self_dot_cvt(const void* C, int64_t off, int64_t K) {
  typedef vec_t<float> V;
  constexpr int W = Vec<float>::W;
  V acc = V{};
  int64_t p = 0;
  for (; p + W <= K; p += W) {
    const V x = vload_cvt<DT>(C, off + p);
    acc += x * x;
  }
  float s = hsum<float>(acc);
  for (; p < K; ++p) {
    const float x = load_cvt(DT, C, off + p);
    s += x * x;
  }
  return s;
}

// Squared norm of a 16-bit row.
inline float self_dot_stored(int dt, const void* C, int64_t off, int64_t K) {
  return dt == kF16 ? self_dot_cvt<kF16>(C, off, K) : self_dot_cvt<kBF16>(C, off, K);
}

// int8 codes against queries quantized to int16: pairs of int16 products summed into int32 lanes
// (vpmaddwd), two instructions per 32 codes instead of widening every code to fp32. K is a multiple of
// 64 (codes and queries are zero-padded to it); the caller rescales S by both quantization scales.

// <q, c> for one int16 query and one row of int8 codes.
inline float dot_i8q(int64_t K, const int16_t* q, const int8_t* c) {
#if defined(__AVX512BW__)
  __m512i acc = _mm512_setzero_si512();
  for (int64_t p = 0; p < K; p += 32) {
    const __m512i cw = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + p)));
    acc = _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_loadu_si512(q + p), cw));
  }
  return static_cast<float>(_mm512_reduce_add_epi32(acc));
#elif defined(__AVX2__)
  __m256i acc = _mm256_setzero_si256();
  for (int64_t p = 0; p < K; p += 16) {
    const __m256i cw = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + p)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + p)), cw));
  }
  int32_t lanes[8];
  std::memcpy(lanes, &acc, 32);
  int32_t t = 0;
  for (int l = 0; l < 8; ++l) t += lanes[l];
  return static_cast<float>(t);
#else
  int32_t t = 0;
  for (int64_t p = 0; p < K; ++p) t += int32_t(q[p]) * int32_t(c[p]);
  return static_cast<float>(t);
#endif
}

inline void dot_block_i8q(int64_t K, const int16_t* Qi, int64_t ldq, int64_t nq, const int8_t* C, int64_t ldc,
                          int64_t nrows, float* S, int64_t lds, int64_t pf, int64_t avail) {
  for (int64_t i = 0; i < nq; ++i, pf = 0)  // the first pass requests rows (see dot_rows)
    for (int64_t j = 0; j < nrows; ++j) {
      prefetch_scan_row(C, j, pf, avail, ldc);
      S[i * lds + j] = dot_i8q(K, Qi + i * ldq, C + j * ldc);
    }
}

#if defined(__AVX512BW__)
// With AVX512-VNNI (checked at run time): vpdpbusd multiplies 4 unsigned bytes by 4 signed bytes and
// adds them into an int32 lane, 64 products per instruction. The query goes in as u8 = q8 + 128
// (q8 in [-127, 127]); a second vpdpbusd against ones sums the codes, and 128 * sum(codes) is taken back.
__attribute__((target("avx512vnni,avx512bw,avx512f"))) inline void dot_block_i8_vnni(
    int64_t K, const uint8_t* Qu, int64_t ldq, int64_t nq, const int8_t* C, int64_t ldc, int64_t nrows, float* S,
    int64_t lds, int64_t pf, int64_t avail) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t i = 0; i < nq; ++i, pf = 0) {  // the first pass requests rows (see dot_rows)
    const uint8_t* q = Qu + i * ldq;
    for (int64_t j = 0; j < nrows; ++j) {
      prefetch_scan_row(C, j, pf, avail, ldc);
      const int8_t* c = C + j * ldc;
      __m512i acc = _mm512_setzero_si512(), sum = _mm512_setzero_si512();
      for (int64_t p = 0; p < K; p += 64) {
        const __m512i cv = _mm512_loadu_si512(c + p);
        acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(q + p), cv);
        sum = _mm512_dpbusd_epi32(sum, ones, cv);
      }
      S[i * lds + j] = static_cast<float>(_mm512_reduce_add_epi32(acc) - 128 * _mm512_reduce_add_epi32(sum));
    }
  }
}

// use_vnni() is false with MINILLM_NO_VNNI=1: the vpmaddwd path (tests cover both on a VNNI machine).

// Queries as u8 = round(q * scale) + 128 with |q| * scale <= 127. Returns 1 / scale (0 for a zero query).
inline float quantize_u8(const float* q, int64_t d, int64_t K, uint8_t* out) {
  float amax = 0.0f;
  for (int64_t i = 0; i < d; ++i) amax = std::fabs(q[i]) > amax ? std::fabs(q[i]) : amax;
  const float scale = amax > 0.0f ? 127.0f / amax : 0.0f;
  for (int64_t i = 0; i < K; ++i) out[i] = static_cast<uint8_t>(128 + (i < d ? std::lrint(q[i] * scale) : 0));
  return scale > 0.0f ? 1.0f / scale : 0.0f;
}
#endif

// Queries as int16 with one scale each: |q_i| * scale <= a bound that keeps a K-long int32 sum of
// int16 x int8 products from overflowing. Returns 1 / scale (0 for a zero query).
inline float quantize_i16(const float* q, int64_t d, int64_t K, int16_t* out) {
  float amax = 0.0f;
  for (int64_t i = 0; i < d; ++i) amax = std::fabs(q[i]) > amax ? std::fabs(q[i]) : amax;
  const double bound = std::fmin(32767.0, 2147483647.0 / (127.0 * static_cast<double>(K)) - 1.0);
  const float scale = amax > 0.0f ? static_cast<float>(bound / amax) : 0.0f;
  for (int64_t i = 0; i < K; ++i) out[i] = i < d ? static_cast<int16_t>(std::lrint(q[i] * scale)) : 0;
  return scale > 0.0f ? 1.0f / scale : 0.0f;
}

// Scores of a tile of a 16-bit corpus for a few queries, widened in registers.
inline void dot_block_stored(int dt, int64_t K, const float* Qp, int64_t ldq, int64_t nq, const void* C, int64_t ldc,
                             int64_t nrows, float* S, int64_t lds, int64_t pf, int64_t avail) {
  if (dt == kF16)
    dot_block_cvt<kF16>(K, Qp, ldq, nq, C, ldc, nrows, S, lds, pf, avail);
  else
    dot_block_cvt<kBF16>(K, Qp, ldq, nq, C, ldc, nrows, S, lds, pf, avail);
}

inline float self_dot(const float* x, int64_t K) {
  typedef vec_t<float> V;
  V s = V{};
  for (int64_t p = 0; p < K; p += Vec<float>::W) {
    const V v = vload(x + p);
    s += v * v;
  }
  return hsum<float>(s);
}

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
