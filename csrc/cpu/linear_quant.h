// Few-row linear layers (decoding) on compressed weights: bf16, int8 and 4-bit codes.
//
// A decoding step reads every weight once per token, so its time is the bytes of the weights; these kernels
// stream the stored form (2, 1 or ~0.6 bytes per weight instead of 4) and widen it to fp32 in registers,
// never in memory. Layout and the reference formulas (minillm/ops/quant.py holds the torch twins):
//   bf16: W (N, K) bf16, x and y bf16; products summed in fp32, y rounded once.
//   int8: codes (N, K) int8, scale (N): W[n][k] = scale[n] * codes[n][k] (per output channel).
//   int8 in groups: codes (N, K) uint8, scale and offset (N, K / group): W[n][k] = scale[n][g] * q + offset[n][g],
//         q in 0..255, g = k / group (256 levels from the group's minimum to its maximum: a 4-bit grid such as
//         llama.cpp's Q4_1 is on it, or a step of it within 1/17 of its own).
//   int4: groups of `group` (32 or 64) consecutive k in a row, with scale and offset (N, K / group):
//         W[n][k] = scale[n][g] * q + offset[n][g], q in 0..15, g = k / group. A row is K / 2 bytes in blocks
//         of 32 elements (16 bytes); byte i of a block holds element i in its low nibble and element i + 16 in
//         its high nibble, so one 16-byte load widens to two vectors of 16 consecutive elements (AVX-512).
#pragma once
#include "cpu/convert.h"
#include <vector>

#include "cpu/linear.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

typedef vec_t<float> VF;
constexpr int kQW = Vec<float>::W;
constexpr int64_t kQBlock = 32;             // elements per decoded block (a 4-bit block is 16 bytes)
constexpr int kQSub = kQBlock / kQW;        // float vectors per block
typedef int32_t VI __attribute__((vector_size(VB)));

// Widening kQW stored elements to a float (or int32) vector. GCC's generic __builtin_convertvector from a byte
// vector came out as scalar extracts and inserts (~100 instructions per 16 bytes); the x86 levels use the widening
// loads (vpmovsxbd, vpmovzxbd, vpmovzxwd) instead.
inline VF widen_i8(const int8_t* p) {
#if defined(__AVX512F__) && MINILLM_VBYTES == 64
  return (VF)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__) && MINILLM_VBYTES == 32
  return (VF)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  VF v;
  for (int i = 0; i < kQW; ++i) v[i] = p[i];
  return v;
#endif
}
inline VI widen_u8(const uint8_t* p) {
#if defined(__AVX512F__) && MINILLM_VBYTES == 64
  return (VI)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__) && MINILLM_VBYTES == 32
  return (VI)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  VI v;
  for (int i = 0; i < kQW; ++i) v[i] = p[i];
  return v;
#endif
}
inline VF widen_bf16(const uint16_t* p) {
  // bf16 is the top half of an fp32: widen and shift, exact
#if defined(__AVX512F__) && MINILLM_VBYTES == 64
  return (VF)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif defined(__AVX2__) && MINILLM_VBYTES == 32
  return (VF)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  VF v;
  for (int i = 0; i < kQW; ++i) v[i] = bf16_to_f32(p[i]);
  return v;
#endif
}

// Weight readers: block(j, p, w) widens columns p .. p + 31 of weight row j (p a multiple of 32) to fp32 vectors;
// elem(j, k) is one weight, for the columns past the last whole block. post(j, dot) finishes a row's dot product
// (int8 applies its per-row scale there, once, rather than once per element).
struct BF16Rows {
  const uint16_t* w;
  int64_t K;
  void block(int64_t j, int64_t p, VF* out) const {
    MINILLM_UNROLL
    for (int s = 0; s < kQSub; ++s) out[s] = widen_bf16(w + j * K + p + s * kQW);
  }
  float elem(int64_t j, int64_t k) const { return bf16_to_f32(w[j * K + k]); }
  float post(int64_t, float dot) const { return dot; }
};

struct Int8Rows {
  const int8_t* codes;
  const float* scale;
  int64_t K;
  void block(int64_t j, int64_t p, VF* out) const {
    MINILLM_UNROLL
    for (int s = 0; s < kQSub; ++s) out[s] = widen_i8(codes + j * K + p + s * kQW);
  }
  float elem(int64_t j, int64_t k) const { return codes[j * K + k]; }
  float post(int64_t j, float dot) const { return scale[j] * dot; }
};

// Codes in groups of `group` columns, each with a scale and an offset: W = scale * q + offset.
struct GroupedRows {
  const uint8_t* codes;
  const float* scale;
  const float* offset;
  int64_t K, group;
  // The scale and offset of the group holding columns p .. p + 31 of row j, broadcast.
  void scale_offset(int64_t j, int64_t p, VF& s, VF& o) const {
    const int64_t g = j * (K / group) + p / group;
    s = vbcast(scale[g]), o = vbcast(offset[g]);
  }
  float elem(int64_t, int64_t) const { return 0.f; }  // never called: K is a multiple of the group
  float post(int64_t, float dot) const { return dot; }
};

struct Int8GroupRows : GroupedRows {
  void block(int64_t j, int64_t p, VF* out) const {
    VF s, o;
    scale_offset(j, p, s, o);
    MINILLM_UNROLL
    for (int c = 0; c < kQSub; ++c)
      out[c] = __builtin_convertvector(widen_u8(codes + j * K + p + c * kQW), VF) * s + o;
  }
};

struct Int4Rows : GroupedRows {
  void block(int64_t j, int64_t p, VF* out) const {
    VF s, o;
    scale_offset(j, p, s, o);
    const uint8_t* b = codes + j * (K / 2) + p / 2;  // the block's 16 bytes
    constexpr int kHalf = kQSub / 2;                 // vectors per 16 elements
    MINILLM_UNROLL
    for (int c = 0; c < kHalf; ++c) {
      const VI q = widen_u8(b + c * kQW);
      out[c] = __builtin_convertvector(q & 15, VF) * s + o;                 // elements c*W ..
      out[kHalf + c] = __builtin_convertvector(q >> 4, VF) * s + o;         // elements 16 + c*W ..
    }
  }
};

// Y[i][j] (ldy) = post(j, <X_i, W_j>) + bias[j] for MR rows of X and NR weight rows j0 .. j0 + NR - 1.
// A one-row tile gives each of a block's vectors its own accumulator (summed at the end), so that its FMAs do not form
// one dependent chain per block (a standalone run measured no difference either way; the chains cost nothing).
template <typename Rows, int MR, int NR>
MINILLM_ALWAYS_INLINE void qdot_tile(int64_t K, const float* X, int64_t ldx, const Rows& r, int64_t j0, const float* bias,
                      float* Y, int64_t ldy) {
  constexpr int kAcc = MR == 1 ? kQSub : 1;  // few tiles: independent chains; more rows already have MR * NR
  VF acc[MR][NR][kAcc];
  MINILLM_UNROLL
  for (int i = 0; i < MR; ++i)
    MINILLM_UNROLL
    for (int j = 0; j < NR; ++j)
      MINILLM_UNROLL
      for (int s = 0; s < kAcc; ++s) acc[i][j][s] = VF{};
  const int64_t whole = K / kQBlock * kQBlock;
  for (int64_t p = 0; p < whole; p += kQBlock) {
    VF w[NR][kQSub];
    MINILLM_UNROLL
    for (int j = 0; j < NR; ++j) r.block(j0 + j, p, w[j]);
    MINILLM_UNROLL
    for (int i = 0; i < MR; ++i)
      MINILLM_UNROLL
      for (int s = 0; s < kQSub; ++s) {
        const VF xv = vload(X + i * ldx + p + s * kQW);
        MINILLM_UNROLL
        for (int j = 0; j < NR; ++j) acc[i][j][s % kAcc] += xv * w[j][s];
      }
  }
  MINILLM_UNROLL
  for (int i = 0; i < MR; ++i)
    MINILLM_UNROLL
    for (int j = 0; j < NR; ++j) {
      VF a = acc[i][j][0];
      MINILLM_UNROLL
      for (int s = 1; s < kAcc; ++s) a += acc[i][j][s];
      float d = hsum<float>(a);
      for (int64_t k = whole; k < K; ++k) d += X[i * ldx + k] * r.elem(j0 + j, k);
      Y[i * ldy + j] = r.post(j0 + j, d) + (bias ? bias[j0 + j] : 0.f);
    }
}

template <typename Rows, int NR>
MINILLM_ALWAYS_INLINE void qdot_rows(int64_t M, int64_t K, const float* X, int64_t ldx, const Rows& r, int64_t j0,
                      const float* bias, float* Y, int64_t ldy) {
  int64_t i = 0;
  for (; i + kLinMR <= M; i += kLinMR) qdot_tile<Rows, kLinMR, NR>(K, X + i * ldx, ldx, r, j0, bias, Y + i * ldy, ldy);
  switch (M - i) {
#define MINILLM_QCASE(m) \
  case m: qdot_tile<Rows, m, NR>(K, X + i * ldx, ldx, r, j0, bias, Y + i * ldy, ldy); break;
    MINILLM_QCASE(1) MINILLM_QCASE(2) MINILLM_QCASE(3) MINILLM_QCASE(4)
    MINILLM_QCASE(5) MINILLM_QCASE(6) MINILLM_QCASE(7)
#undef MINILLM_QCASE
    default: break;
  }
}

// The weight rows streamed once (stream_row_tiles); `stream` is the stored rows (codes or bf16), `row_bytes` the
// stored bytes of one row (scales are not prefetched).
template <typename Rows>
void qlinear_run(int64_t M, int64_t K, int64_t N, const float* X, int64_t ldx, const Rows& r, const float* bias,
                 float* Y, int64_t row_bytes, const void* stream, int nthreads) {
  stream_row_tiles<kLinNR>(N, row_bytes, stream, nthreads, [&](int64_t j0, auto nr) {
    qdot_rows<Rows, decltype(nr)::value>(M, K, X, ldx, r, j0, bias, Y + j0, N);
  });
}

int linear_bf16(const LinearArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N;
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  // x (M, K) and bias to fp32 once: a few KB against the weights' megabytes
  std::vector<float> x(static_cast<size_t>(M * K)), bias(a.b ? static_cast<size_t>(N) : 0);
  const uint16_t* xs = static_cast<const uint16_t*>(a.x);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) x[i * K + k] = bf16_to_f32(xs[i * a.ldx + k]);
  for (int64_t j = 0; j < static_cast<int64_t>(bias.size()); ++j) bias[j] = bf16_to_f32(static_cast<const uint16_t*>(a.b)[j]);
  std::vector<float> y(static_cast<size_t>(M * N));
  const BF16Rows r{static_cast<const uint16_t*>(a.w), K};
  qlinear_run(M, K, N, x.data(), K, r, a.b ? bias.data() : nullptr, y.data(), 2 * K, a.w, nt);
  uint16_t* ys = static_cast<uint16_t*>(a.y);
  for (int64_t e = 0; e < M * N; ++e) ys[e] = f32_to_bf16(y[e]);
  return kOk;
}

}  // namespace

// The entry points of this SIMD level (csrc/kernels.h).
int linear_small_m(const LinearArgs& a) {
  if (a.dtype == kBF16) return linear_bf16(a);
  return a.dtype == kF64 ? linear_impl<double>(a) : linear_impl<float>(a);
}

int linear_quant(const QLinearArgs& a) {
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  const float* X = static_cast<const float*>(a.x);
  float* Y = static_cast<float*>(a.y);
  const QuantWeight& q = a.w;
  if (q.bits == 8 && q.group == 0) {
    const Int8Rows r{static_cast<const int8_t*>(q.codes), q.scale, q.K};
    qlinear_run(a.M, q.K, q.N, X, a.ldx, r, a.bias, Y, q.K, q.codes, nt);
  } else if (q.bits == 8) {
    if (q.K % q.group != 0 || q.group % kQBlock != 0) return kBadArgs;
    const Int8GroupRows r{{static_cast<const uint8_t*>(q.codes), q.scale, q.offset, q.K, q.group}};
    qlinear_run(a.M, q.K, q.N, X, a.ldx, r, a.bias, Y, q.K, q.codes, nt);
  } else if (q.bits == 16) {  // bf16 weights, fp32 x and y (the native decoding step of a bf16 model)
    const BF16Rows r{static_cast<const uint16_t*>(q.codes), q.K};
    qlinear_run(a.M, q.K, q.N, X, a.ldx, r, a.bias, Y, 2 * q.K, q.codes, nt);
  } else {
    if (q.bits != 4 || q.K % q.group != 0 || q.group % kQBlock != 0) return kBadArgs;
    const Int4Rows r{{static_cast<const uint8_t*>(q.codes), q.scale, q.offset, q.K, q.group}};
    qlinear_run(a.M, q.K, q.N, X, a.ldx, r, a.bias, Y, q.K / 2, q.codes, nt);
  }
  return kOk;
}

// W (N, K) fp32 from its codes, for layers with many rows (the GEMM then multiplies it): the readers' own
// widening, so both paths see the same weights.
int dequantize(const QuantWeight& q, float* out, int nthreads) {
  const int64_t N = q.N, K = q.K;
  const bool grouped = q.bits == 4 || q.group != 0;
  if (grouped && (q.group <= 0 || K % q.group != 0 || q.group % kQBlock != 0)) return kBadArgs;
  const Int8Rows r8{static_cast<const int8_t*>(q.codes), q.scale, K};
  const Int8GroupRows r8g{{static_cast<const uint8_t*>(q.codes), q.scale, q.offset, K, q.group}};
  const Int4Rows r4{{static_cast<const uint8_t*>(q.codes), q.scale, q.offset, K, q.group}};
  const int64_t whole = K / kQBlock * kQBlock;
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
  for (int64_t j = 0; j < N; ++j) {
    float* row = out + j * K;
    for (int64_t p = 0; p < whole; p += kQBlock) {
      VF w[kQSub];
      if (!grouped) {
        r8.block(j, p, w);  // codes; the row's scale applies here (the streaming kernel applies it to the dot)
        MINILLM_UNROLL
        for (int s = 0; s < kQSub; ++s) w[s] *= vbcast(q.scale[j]);
      } else if (q.bits == 8) {
        r8g.block(j, p, w);
      } else {
        r4.block(j, p, w);
      }
      MINILLM_UNROLL
      for (int s = 0; s < kQSub; ++s) vstore(row + p + s * kQW, w[s]);
    }
    for (int64_t k = whole; k < K; ++k) row[k] = q.scale[j] * r8.elem(j, k);  // per-row int8 only (grouped: K % 32 == 0)
  }
  return kOk;
}

}  // namespace MINILLM_ISA
}  // namespace minillm
