// Attention and exact top-k kernels, compiled once per SIMD level.
//
// The including file defines MINILLM_ISA (the namespace, e.g. avx512) and MINILLM_VBYTES (the
// vector width in bytes) and is compiled with the matching -m flags. The code uses GCC/Clang vector
// extensions, so one source gives AVX-512, AVX2 or baseline (SSE2 / NEON) code. Every helper has
// internal linkage inside minillm::MINILLM_ISA and no STL template is instantiated on a type shared
// between levels: otherwise the linker could keep an AVX-512 copy of an inline function and call it
// from the baseline path on a CPU without AVX-512.
//
// Naming: B batch, H heads, Nq / Nk query / key length, D head dim, Dp = D padded to whole vectors.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
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
// Register tile of the GEMM micro-kernel: kMR rows x kNV vectors. 6x4 zmm accumulators fit the 32
// AVX-512 registers; with 16 registers (AVX2, SSE2, NEON) 6x2.
constexpr int kMR = 6;
constexpr int kNV = VB >= 64 ? 4 : 2;
// Attention tiles: query rows per block and keys per block (a multiple of every vector width).
constexpr int64_t kBq = 64;
constexpr int64_t kBkMax = 64;
// The fp32 forward's tiles. Query blocks are whole row tiles, so that no block ends on a narrower tile (64
// rows left a 4-row tile with 8 accumulators instead of 12: 4.6% of the AVX2 forward's perf samples). With
// 16 vector registers the blocks are larger (126 = 21 row tiles, 256 keys): each K and V block is reread
// less often and the online-softmax bookkeeping (row maxima, rescaling acc) runs per 256 keys. Small gains
// on a 2-core Zen 3 (AVX2), B4 H8 D64, calls alternating in one process (time ratio min / median, 2
// threads): 126 x 128 against 60 x 64 0.92 / 0.94 at N = 1024, 0.93 / 0.98 at N = 512, 1.0 / 1.03 at
// N = 2048; 126 x 256 against 126 x 128, medians 0.97-0.98 bidirectional at N = 1024 and 2048 (four
// runs), 0.95 causal at 1024, 0.94 / 0.99 causal at 2048, 0.96 at N = 256, 0.94-0.99 with 25% padded
// keys (126 x 64 and 252 x 64 were slower, 1.04-1.07; 126 x 512 no better, 0.95-1.07). AVX-512 on a
// 2-core Zen 4 (512-bit FMAs on two 256-bit halves): 60 x 256 against the 60 x 64 tuned on Zen 5, medians
// 0.88-0.93 bidirectional at N = 512-2048, 0.81-0.92 causal, 0.85-0.88 padded, 0.87 at B12 H4 D32 N = 128
// (60 x 128 0.93; 60 x 512, 30 x 256 and 126 x 256 within 2% of 60 x 256).
constexpr int64_t kBqFwd = VB >= 64 ? 60 : 126;
constexpr int64_t kBkFwd = 256;
static_assert(kBqFwd % kMR == 0, "forward query blocks are whole row tiles");

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
// fp32 attention forward on a Zen 4, in-process A/B: B12 H4 D32 medians 0.96-0.98 at N = 64-128, equal at
// N = 1024); there lanes below -87 are zeroed by the masked vscalefps.
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

// ---- dtype conversion (round to nearest even, NaN kept) ----
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (e == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int shift = -1;
      do {
        ++shift;
        man <<= 1;
      } while (!(man & 0x400u));
      bits = sign | (static_cast<uint32_t>(112 - shift) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (e == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((e + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (ax < 0x38800000u) {  // half subnormal: value = m * 2^-24, m rounded to nearest even
    float a;
    std::memcpy(&a, &ax, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u) - (112u << 23);
  return static_cast<uint16_t>(sign | (r >> 13));
}

inline const void* at(const void* base, int dtype, int64_t off) {
  return static_cast<const char*>(base) + off * elem_size(dtype);
}

// Bulk conversions to fp32 with the instructions this file's ISA has (GCC does not vectorise the
// generic forms of these), scalar code elsewhere and for the tails.
inline void f16_to_f32_n(const uint16_t* s, int64_t n, float mul, float* dst) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 m = _mm512_set1_ps(mul);
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))), m));
#elif defined(__F16C__)
  const __m256 m = _mm256_set1_ps(mul);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))), m));
#endif
  for (; i < n; ++i) dst[i] = f16_to_f32(s[i]) * mul;
}

inline void i8_to_f32(const int8_t* s, int64_t n, float mul, float* dst) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 m = _mm512_set1_ps(mul);
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)))), m));
#elif defined(__AVX2__)
  const __m256 m = _mm256_set1_ps(mul);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + i)))), m));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(s[i]) * mul;
}

// Reads n elements of `dtype` into dst and zero-fills dst up to n_pad, multiplying by mul.
template <typename T>
inline void load_row(const void* src, int dtype, int64_t n, int64_t n_pad, T mul, T* dst) {
  switch (dtype) {
    case kF32: {
      const float* s = static_cast<const float*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(s[i]) * mul;
      break;
    }
    case kF64: {
      const double* s = static_cast<const double*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(s[i]) * mul;
      break;
    }
    case kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(bf16_to_f32(s[i])) * mul;
      break;
    }
    case kI8: {
      const int8_t* s = static_cast<const int8_t*>(src);
      if constexpr (std::is_same<T, float>::value) {
        i8_to_f32(s, n, mul, dst);
      } else {
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(s[i]) * mul;
      }
      break;
    }
    default: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      if constexpr (std::is_same<T, float>::value) {
        f16_to_f32_n(s, n, mul, dst);
      } else {
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(f16_to_f32(s[i])) * mul;
      }
      break;
    }
  }
  for (int64_t i = n; i < n_pad; ++i) dst[i] = 0;
}

// Writes n values times mul to dst in `dtype`.
template <typename T>
inline void store_row(const T* src, int64_t n, T mul, int dtype, void* dst) {
  switch (dtype) {
    case kF32: {
      float* d = static_cast<float*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(src[i] * mul);
      break;
    }
    case kF64: {
      double* d = static_cast<double*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<double>(src[i] * mul);
      break;
    }
    case kBF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(static_cast<float>(src[i] * mul));
      break;
    }
    default: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(static_cast<float>(src[i] * mul));
      break;
    }
  }
}

// Per-thread scratch, 64-byte aligned, carved into sub-buffers in order.
class Arena {
 public:
  explicit Arena(size_t bytes) : base_(std::aligned_alloc(64, round_up(static_cast<int64_t>(bytes) + 64, 64))) {}
  ~Arena() { std::free(base_); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  bool ok() const { return base_ != nullptr; }
  template <typename T>
  T* take(int64_t n) {
    T* p = reinterpret_cast<T*>(static_cast<char*>(base_) + used_);
    used_ += round_up(n * static_cast<int64_t>(sizeof(T)), 64);
    return p;
  }
  // Bytes `take` consumes for n elements of T (to size an Arena before carving it).
  template <typename T>
  static size_t need(int64_t n) {
    return static_cast<size_t>(round_up(n * static_cast<int64_t>(sizeof(T)), 64));
  }

 private:
  void* base_;
  int64_t used_ = 0;
};

// With OMP_WAIT_POLICY=PASSIVE a thread that reaches a barrier first sleeps in the kernel, and waking it
// costs tens of microseconds on a VM (~80 us median on the 2-core Zen 5 for an empty region). An attention
// region's work loop ends without a barrier (nowait) and each thread, its share done, spins here until the
// whole team is done (at most ~100 us), so that they reach the region's closing barrier together. fp32
// forward, in-process A/B on the 2-core Zen 5, B12 H4 D32: N = 64 0.77 of the time, causal N = 128 0.87-0.88
// (nowait alone 0.85 / 0.89-0.92).
inline void finish_share(int* done) {
#if defined(_OPENMP)
  const int team = omp_get_num_threads();
  if (__atomic_add_fetch(done, 1, __ATOMIC_ACQ_REL) >= team) return;
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
  while (__atomic_load_n(done, __ATOMIC_ACQUIRE) < team && std::chrono::steady_clock::now() < until) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }
#else
  (void)done;
#endif
}

// Called by each thread of a parallel region on its own Arena: a failed allocation marks the whole call
// as out of memory (the Python side raises MemoryError) and the thread skips its work items.
inline bool thread_arena_ok(const Arena& arena, int* status) {
  if (arena.ok()) return true;
#pragma omp atomic write
  *status = kOutOfMemory;
  return false;
}

// ---- GEMM: C[M x N] (+)= A[M x K] * B[K x N], B and C row-major, N a multiple of the vector width ----
// A is row-major (element (i, p) at A[i * lda + p]) or, with ColA, column-major (at A[i + p * lda]),
// as in dW = dY^T X where the broadcast operand is a transposed view.
template <typename T, int MR, int NV, bool ColA = false>
inline void gemm_tile(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                      bool accumulate) {
  typedef vec_t<T> V;
  constexpr int W = Vec<T>::W;
  V c[MR][NV];
  MINILLM_UNROLL
  for (int i = 0; i < MR; ++i)
    MINILLM_UNROLL
    for (int v = 0; v < NV; ++v) c[i][v] = accumulate ? vload(C + i * ldc + v * W) : V{};
  for (int64_t p = 0; p < K; ++p) {
    V b[NV];
    MINILLM_UNROLL
    for (int v = 0; v < NV; ++v) b[v] = vload(B + p * ldb + v * W);
    MINILLM_UNROLL
    for (int i = 0; i < MR; ++i) {
      const V a = vbcast(ColA ? A[i + p * lda] : A[i * lda + p]);
      MINILLM_UNROLL
      for (int v = 0; v < NV; ++v) c[i][v] += a * b[v];
    }
  }
  MINILLM_UNROLL
  for (int i = 0; i < MR; ++i)
    MINILLM_UNROLL
    for (int v = 0; v < NV; ++v) vstore(C + i * ldc + v * W, c[i][v]);
}

// Rows per tile for a panel of NV vectors: narrow panels (head dims of 32 or 48, a few queries) take more
// rows so that ~24 accumulators stay in flight and broadcasts do not outnumber the FMAs they feed.
constexpr int panel_rows(int nv) { return VB >= 64 ? (nv >= 4 ? kMR : nv == 3 ? 8 : 12) : kMR; }

template <typename T, int NV, bool ColA = false>
inline void gemm_panel(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                       int64_t ldc, bool acc) {
  constexpr int MR = panel_rows(NV);
  // Row i of A starts at A + i * (ColA ? 1 : lda).
  const int64_t row = ColA ? 1 : lda;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) gemm_tile<T, MR, NV, ColA>(K, A + i * row, lda, B, ldb, C + i * ldc, ldc, acc);
  for (; MR > kMR && i + kMR <= M; i += kMR)
    gemm_tile<T, kMR, NV, ColA>(K, A + i * row, lda, B, ldb, C + i * ldc, ldc, acc);
  A += i * row;
  C += i * ldc;
  switch (M - i) {
    case 1: gemm_tile<T, 1, NV, ColA>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 2: gemm_tile<T, 2, NV, ColA>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 3: gemm_tile<T, 3, NV, ColA>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 4: gemm_tile<T, 4, NV, ColA>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 5: gemm_tile<T, 5, NV, ColA>(K, A, lda, B, ldb, C, ldc, acc); break;
    default: break;
  }
}

// The column panels of C (+)= A B: panel j (columns [j, j + kNV W), or the narrower tail) reads B from
// panel_b(j) with rows ldb apart.
template <typename T, bool ColA, typename PanelB>
inline void gemm_panels(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, PanelB panel_b, int64_t ldb,
                        T* C, int64_t ldc, bool acc) {
  constexpr int W = Vec<T>::W;
  int64_t j = 0;
  for (; j + kNV * W <= N; j += kNV * W) gemm_panel<T, kNV, ColA>(M, K, A, lda, panel_b(j), ldb, C + j, ldc, acc);
  switch ((N - j) / W) {
    case 1: gemm_panel<T, 1, ColA>(M, K, A, lda, panel_b(j), ldb, C + j, ldc, acc); break;
    case 2: gemm_panel<T, 2, ColA>(M, K, A, lda, panel_b(j), ldb, C + j, ldc, acc); break;
    case 3: gemm_panel<T, 3, ColA>(M, K, A, lda, panel_b(j), ldb, C + j, ldc, acc); break;
    default: break;
  }
}

template <typename T, bool ColA = false>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
          bool acc) {
  gemm_panels<T, ColA>(M, N, K, A, lda, [B](int64_t j) { return B + j; }, ldb, C, ldc, acc);
}

// Width of one GEMM panel (kNV vectors) and C (+)= A B for B packed panel by panel: columns [j, j + kPanel)
// of B are one contiguous (K, kPanel) block at Bp + (j / kPanel) * K * kPanel, so each k-step of the
// micro-kernel reads the next cache line instead of a line a whole row of B away (a 4 KB stride at
// N = 1024, a new page per k-step). In-process A/B on the 2-core Zen 3 (AVX2), B4 H8 D64, against K^T (and
// the backward's V^T) stored row-major with a padded leading dimension: forward medians 0.91-1.0 of the
// time at N = 512-2048, bidirectional, causal and padded, 0.99 at N = 64-128; backward 0.93-1.01
// bidirectional, 0.88-0.93 causal, 0.95 padded; the same output bits.
template <typename T>
constexpr int64_t kPanel = kNV * Vec<T>::W;
static_assert(kBkFwd % kPanel<float> == 0 && kBkFwd % kPanel<double> == 0 && kBkMax % kPanel<float> == 0 &&
                  kBkMax % kPanel<double> == 0,
              "key blocks start on a packed panel");

// Element (p, j) of a packed B with K rows is packed_at(Bp, K, j)[p * kPanel]; for a j that starts a panel,
// packed_at(Bp, K, j) is that panel's block.
template <typename T>
inline T* packed_at(T* Bp, int64_t K, int64_t j) {
  constexpr int64_t P = kPanel<T>;
  return Bp + (j / P) * K * P + j % P;
}

template <typename T>
void gemm_packed(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc,
                 bool acc) {
  gemm_panels<T, false>(M, N, K, A, lda, [Bp, K](int64_t j) { return packed_at(Bp, K, j); }, kPanel<T>, C, ldc,
                        acc);
}

// ---- attention ----

// Keys per block: 64, or fewer (whole vectors) for short sequences, which would otherwise pay for 64.
inline int64_t key_block(int64_t Nk, int64_t max_keys = kBkMax) { return imin(max_keys, round_up(imax(Nk, 1), kPad)); }

// dst[d * ldd + r] = src[r * lds + d] for 8 rows r and d < n (n a multiple of 8): 8 x 8 blocks.
template <typename T>
inline void transpose8_rows(const T* src, int64_t lds, int64_t n, T* dst, int64_t ldd) {
  for (int64_t d = 0; d < n; ++d)
    for (int64_t r = 0; r < 8; ++r) dst[d * ldd + r] = src[r * lds + d];
}
#if defined(__AVX2__)
// In registers: the element-by-element form stores to 8 different lines per element read, and was most of
// the fp32 forward's own (non-GEMM) time at N = 128 (perf: ~9% of the call).
inline void transpose8_rows(const float* src, int64_t lds, int64_t n, float* dst, int64_t ldd) {
  for (int64_t d = 0; d < n; d += 8) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds + d);
    for (int i = 0; i < 8; i += 2) {  // t[i], t[i+1]: rows i, i+1 interleaved by element pairs
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int h = 0; h < 8; h += 4) {  // r[h..h+3]: columns of four rows, per 128-bit half
      r[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
      r[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);
      r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
      r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {  // low halves give columns d + i, high halves d + 4 + i
      _mm256_storeu_ps(dst + (d + i) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
      _mm256_storeu_ps(dst + (d + 4 + i) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
  }
}
#endif

// Rows [0, n) of `rows` (row stride ld, Dp values each) into a packed K^T (packed_at), 8 rows at a time in
// register transposes; returns how many were packed (n rounded down to 8), the caller packs the rest. Groups of
// 8 need panels of a multiple of 8 columns: the scalar build's fp64 panel holds 4, and there this packs none.
template <typename T>
inline int64_t pack_rows8(const T* rows, int64_t ld, int64_t n, int64_t Dp, T* Bp) {
  if (kPanel<T> % 8 != 0) return 0;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) transpose8_rows(rows + j * ld, ld, Dp, packed_at(Bp, Dp, j), kPanel<T>);
  return j;
}

// Requests rows [0, n) (row_bytes each, stride_bytes apart) into the cache ahead of use. A work item's
// inputs are cold (another (b, h) ran last), and the p v product reads V in place inside its inner loop:
// asking for V's first blocks and the next query rows while K is being transposed hides that latency.
inline void prefetch_strided(const void* base, int64_t n, int64_t stride_bytes, int64_t row_bytes) {
  const char* p = static_cast<const char*>(base);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(p + r * stride_bytes + b, 0, 2);
}

// Few-query top-k scans read each corpus row once, in order: with use_scan_prefetch() the row `pf` rows
// ahead (about 6 KB) is requested as non-temporal, so that it neither waits on the hardware prefetcher nor
// displaces the queries and heaps from the caches. Rows past the corpus (`avail` rows from `base`) are not
// requested.
inline void prefetch_scan_row(const void* base, int64_t row, int64_t pf, int64_t avail, int64_t row_bytes) {
  if (pf == 0 || row + pf >= avail) return;
  const char* r = static_cast<const char*>(base) + (row + pf) * row_bytes;
  for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(r + b, 0, 0);
}

// Sets s[c] = -inf for every key of the block [j0, j0 + bk) that query row `i` may not see. Runs once per
// row of every masked block, so the padding mask is applied a vector at a time.
template <typename T>
inline void mask_block(T* s, int64_t j0, int64_t bk, int64_t Nk, bool causal, int64_t last_visible,
                       const uint8_t* kpm) {
  typedef vec_t<T> V;
  typedef decltype(V{} < V{}) VM;  // lane mask type (int32 or int64 lanes)
  constexpr int W = Vec<T>::W;
  typedef uint8_t M8 __attribute__((vector_size(W)));
  const T ninf = -INFINITY;
  const int64_t in_range = imax(0, imin(bk, Nk - j0));  // columns whose key exists
  int64_t c = 0;
  if (kpm) {
    const V vninf = vbcast(ninf);
    for (; c + W <= in_range; c += W) {
      M8 keep8;
      std::memcpy(&keep8, kpm + j0 + c, W);
      const VM keep = __builtin_convertvector(keep8, VM);
      vstore(s + c, keep != 0 ? vload(s + c) : vninf);
    }
    for (; c < in_range; ++c)
      if (!kpm[j0 + c]) s[c] = ninf;
  }
  for (c = in_range; c < bk; ++c) s[c] = ninf;
  if (causal)
    for (c = imax(0, last_visible + 1 - j0); c < in_range; ++c) s[c] = ninf;
}

// One past the last key kept by the padding mask (Nk without one): right-padded keys beyond it cost nothing.
inline int64_t keys_end(const uint8_t* kpm, int64_t Nk) {
  int64_t n = Nk;
  while (kpm && n > 0 && !kpm[n - 1]) --n;
  return n;
}

// Per key block: kNoKey (every key padded: the block is skipped), kSomeKeys, or kAllKeys (no padded key
// among those below Nk; all of them without a padding mask).
enum : uint8_t { kNoKey = 0, kSomeKeys = 1, kAllKeys = 2 };
inline void visible_blocks(const uint8_t* kpm, int64_t Nk, int64_t bk, int64_t nkb, uint8_t* out) {
  for (int64_t kb = 0; kb < nkb; ++kb) {
    int64_t kept = 0;
    const int64_t j1 = imin(Nk, (kb + 1) * bk);
    for (int64_t j = kb * bk; kpm && j < j1; ++j) kept += kpm[j] ? 1 : 0;
    out[kb] = !kpm || kept == j1 - kb * bk ? kAllKeys : kept ? kSomeKeys : kNoKey;
  }
}

// True when some key of block j0 is invisible to some row of [i0, i0 + rows): past Nk, padded (`vis`, the
// block's visible_blocks entry), or above the causal diagonal. Blocks with every key kept skip the mask
// pass (a right-padded batch masks one block per row, not all of them).
inline bool block_needs_mask(int64_t j0, int64_t bk, int64_t Nk, bool causal, int64_t i0, int64_t off,
                             uint8_t vis) {
  return j0 + bk > Nk || vis != kAllKeys || (causal && j0 + bk - 1 > i0 + off);
}

// Few query rows (KV-cache decoding): scores straight from K's rows and the output straight from V's
// rows, with no transposed or converted copy of K and V (which would cost as much as the math).
constexpr int64_t kDecodeRows = 4;

// Query padding (qpm, the (Nq) row of one batch entry): true when any of rows [i0, i1) is computed.
inline bool any_query(const uint8_t* qpm, int64_t i0, int64_t i1) {
  if (!qpm) return i0 < i1;
  for (int64_t i = i0; i < i1; ++i)
    if (qpm[i]) return true;
  return false;
}

// The output of a query that is padded or sees no key: zeros, and lse = +inf so that backward's P is 0.
template <typename T>
inline void write_empty_row(const AttnFwdArgs& a, int64_t row, T* scratch, int64_t Dp) {
  std::memset(scratch, 0, sizeof(T) * Dp);
  store_row<T>(scratch, a.D, T(1), a.dtype, const_cast<void*>(at(a.out, a.dtype, row * a.D)));
  static_cast<T*>(a.lse)[row] = INFINITY;
}

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
template <typename T>
inline void softmax_tile(T* S, int64_t lds, int64_t r0, int64_t tr, int64_t cv, T scale, T* m, T* l, T* acc,
                         int64_t Dp) {
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

template <typename T>
int attention_decode_impl(const AttnFwdArgs& a) {
  typedef vec_t<T> V;
  constexpr int W = Vec<T>::W;
  const int64_t B = a.B, H = a.H, Nq = a.Nq, Nk = a.Nk, D = a.D;
  const int64_t Dp = round_up(D, kPad);
  // fp32/fp64 rows whose length is whole vectors are read in place; others are converted row by row.
  const bool direct = (a.dtype == kF32 || a.dtype == kF64) && D == Dp;
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  const size_t arena_bytes = Arena::need<T>(Nk) + 3 * Arena::need<T>(Dp);
  int status = kOk;
#pragma omp parallel num_threads(nt)
  {
    Arena arena(arena_bytes);
    const bool ok = thread_arena_ok(arena, &status);
    T* s = ok ? arena.take<T>(Nk) : nullptr;     // (Nk): scores, then probabilities
    T* qv = ok ? arena.take<T>(Dp) : nullptr;    // (Dp): q * scale
    T* row = ok ? arena.take<T>(Dp) : nullptr;   // (Dp): a converted k or v row
    T* acc = ok ? arena.take<T>(Dp) : nullptr;   // (Dp)
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      if (!ok) continue;
      const int64_t b = bh / H, h = bh % H;
      const uint8_t* kpm = a.kpm ? a.kpm + b * Nk : nullptr;
      const int64_t kbase = b * a.k_stride[0] + h * a.k_stride[1];
      const int64_t vbase = b * a.v_stride[0] + h * a.v_stride[1];
      auto krow = [&](int64_t j) -> const T* {
        const void* p = at(a.k, a.dtype, kbase + j * a.k_stride[2]);
        if (direct) return static_cast<const T*>(p);
        load_row<T>(p, a.dtype, D, Dp, T(1), row);
        return row;
      };
      auto vrow = [&](int64_t j) -> const T* {
        const void* p = at(a.v, a.dtype, vbase + j * a.v_stride[2]);
        if (direct) return static_cast<const T*>(p);
        load_row<T>(p, a.dtype, D, Dp, T(1), row);
        return row;
      };
      const uint8_t* qpm = a.qpm ? a.qpm + b * Nq : nullptr;
      for (int64_t i = 0; i < Nq; ++i) {
        if (qpm && !qpm[i]) {
          write_empty_row<T>(a, bh * Nq + i, acc, Dp);
          continue;
        }
        load_row<T>(at(a.q, a.dtype, b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2]), a.dtype, D, Dp,
                    static_cast<T>(a.scale), qv);
        const int64_t n_vis = a.causal ? imax(0, imin(Nk, i + a.causal_offset + 1)) : Nk;
        T m = -INFINITY;
        for (int64_t j = 0; j < n_vis; ++j) {
          if (kpm && !kpm[j]) {
            s[j] = -INFINITY;
            continue;
          }
          const T* k = krow(j);
          V d = V{};
          for (int64_t c = 0; c < Dp; c += W) d += vload(qv + c) * vload(k + c);
          s[j] = hsum<T>(d);
          m = s[j] > m ? s[j] : m;
        }
        T* lse = static_cast<T*>(a.lse) + bh * Nq + i;
        void* orow = const_cast<void*>(at(a.out, a.dtype, (bh * Nq + i) * D));
        for (int64_t c = 0; c < Dp; ++c) acc[c] = 0;
        const T shift = m == -INFINITY ? T(0) : m;
        T l = 0;
        for (int64_t j = 0; j < n_vis; ++j) {
          if (s[j] == -INFINITY) continue;  // masked: its value row is never read
          const T p = std::exp(s[j] - shift);
          l += p;
          const T* v = vrow(j);
          const V pv = vbcast(p);
          for (int64_t c = 0; c < Dp; c += W) vstore(acc + c, vload(acc + c) + pv * vload(v + c));
        }
        if (l == T(0)) {
          for (int64_t c = 0; c < Dp; ++c) acc[c] = 0;
          store_row<T>(acc, D, T(1), a.dtype, orow);
          *lse = INFINITY;
        } else {
          store_row<T>(acc, D, T(1) / l, a.dtype, orow);
          *lse = m + std::log(l);
        }
      }
    }
  }
  return status;
}


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

// ---- AMX: the same products on tile registers (tdpbf16ps) ----
// A tile multiply takes a 16-row A tile (16 pairs per row, the broadcast side's words) and a 16-row B tile
// (16 pair rows of 16 words, exactly the packed vector side above) into a 16 x 16 fp32 C tile: 8192
// multiply-adds per instruction, so the layouts above feed it unchanged. The configuration is fixed for a
// thread's whole parallel region (AmxTiles): tiles 0-3 hold a 2 x 2 block of C, 4-5 two A tiles, 6-7 two B
// tiles, all 16 rows of 64 bytes. Edges that are not whole tiles (rows past a multiple of 16, pairs past a
// multiple of 16) go through bf16_gemm, so a tile never reads or writes past the caller's arrays.
constexpr int64_t kAmxRows = 32;  // rows per attention row tile with AMX: two A tiles

struct alignas(64) AmxConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

__attribute__((target("amx-tile"))) inline void amx_configure() {
  AmxConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  // GCC 12's _tile_loadconfig tells the compiler it reads only the first 8 bytes, so the stores above
  // would be dropped as dead; the barrier keeps them.
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}
__attribute__((target("amx-tile"))) inline void amx_release() { _tile_release(); }

// The tile configuration of one thread's parallel region (nothing when AMX is off).
struct AmxTiles {
  const bool on;
  explicit AmxTiles(bool use) : on(use) {
    if (on) amx_configure();
  }
  ~AmxTiles() {
    if (on) amx_release();
  }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
};

// C (16 MI, 16 NJ) (+)= A (16 MI, KP16 pairs) B (KP16 pairs, 16 NJ), KP16 a multiple of 16; strides in
// words (A, B) and floats (C) as in bf16_gemm.
template <int MI, int NJ>
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_block(int64_t KP16, const uint32_t* A, int64_t lda,
                                                                    const uint32_t* B, int64_t ldb, float* C,
                                                                    int64_t ldc, bool acc) {
  const long sa = 4 * lda, sb = 4 * ldb, sc = 4 * ldc;
  if (acc) {
    _tile_loadd(0, C, sc);
    if (NJ > 1) _tile_loadd(1, C + 16, sc);
    if (MI > 1) _tile_loadd(2, C + 16 * ldc, sc);
    if (MI > 1 && NJ > 1) _tile_loadd(3, C + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if (NJ > 1) _tile_zero(1);
    if (MI > 1) _tile_zero(2);
    if (MI > 1 && NJ > 1) _tile_zero(3);
  }
  for (int64_t p = 0; p < KP16; p += 16) {
    _tile_loadd(4, A + p, sa);
    if (MI > 1) _tile_loadd(5, A + 16 * lda + p, sa);
    _tile_loadd(6, B + p * ldb, sb);
    if (NJ > 1) _tile_loadd(7, B + p * ldb + 16, sb);
    _tile_dpbf16ps(0, 4, 6);
    if (NJ > 1) _tile_dpbf16ps(1, 4, 7);
    if (MI > 1) _tile_dpbf16ps(2, 5, 6);
    if (MI > 1 && NJ > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, sc);
  if (NJ > 1) _tile_stored(1, C + 16, sc);
  if (MI > 1) _tile_stored(2, C + 16 * ldc, sc);
  if (MI > 1 && NJ > 1) _tile_stored(3, C + 16 * ldc + 16, sc);
}

// C (16 MI, N) (+)= A (16 MI, 16 KC pairs) B for a shallow product (KC <= 2 chunks: the scores, with D <= 64,
// and the backward's products over 64 keys or query pairs): A's tiles stay in tiles 0-3 while B and C move
// 16 columns at a time (tiles 4-5 and 6-7). The 2 x 2 blocks of amx_block would reload A for every 32 columns
// and drain four C tiles after only KC multiplies each: 865 against 570-640 GFLOP/s per core on 32 x 256 x 64
// scores in a micro-benchmark here.
template <int MI, int KC>
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_rows_shallow(int64_t N, const uint32_t* A, int64_t lda,
                                                                           const uint32_t* B, int64_t ldb, float* C,
                                                                           int64_t ldc, bool acc) {
  const long sa = 4 * lda, sb = 4 * ldb, sc = 4 * ldc;
  _tile_loadd(0, A, sa);
  if (KC > 1) _tile_loadd(1, A + 16, sa);
  if (MI > 1) _tile_loadd(2, A + 16 * lda, sa);
  if (MI > 1 && KC > 1) _tile_loadd(3, A + 16 * lda + 16, sa);
  for (int64_t j = 0; j < N; j += 16) {
    _tile_loadd(4, B + j, sb);
    if (KC > 1) _tile_loadd(5, B + 16 * ldb + j, sb);
    if (acc) {
      _tile_loadd(6, C + j, sc);
      if (MI > 1) _tile_loadd(7, C + 16 * ldc + j, sc);
    } else {
      _tile_zero(6);
      if (MI > 1) _tile_zero(7);
    }
    _tile_dpbf16ps(6, 0, 4);
    if (MI > 1) _tile_dpbf16ps(7, 2, 4);
    if (KC > 1) _tile_dpbf16ps(6, 1, 5);
    if (MI > 1 && KC > 1) _tile_dpbf16ps(7, 3, 5);
    _tile_stored(6, C + j, sc);
    if (MI > 1) _tile_stored(7, C + 16 * ldc + j, sc);
  }
}

// bf16_gemm on tiles (the calling thread holds AmxTiles): C (M, N) (+)= A (M, KP pairs) B, N a multiple of 16.
inline void amx_gemm(int64_t M, int64_t N, int64_t KP, const uint32_t* A, int64_t lda, const uint32_t* B,
                     int64_t ldb, float* C, int64_t ldc, bool acc) {
  const int64_t M16 = M / 16 * 16, KP16 = KP / 16 * 16;
  if (M16 == 0 || KP16 == 0) return bf16_gemm(M, N, KP, A, lda, B, ldb, C, ldc, acc);
  for (int64_t i = 0; i < M16; i += 32) {
    const bool two_rows = M16 - i >= 32;
    const uint32_t* Ai = A + i * lda;
    float* Ci = C + i * ldc;
    if (KP16 <= 32) {
      if (KP16 == 32 && two_rows) amx_rows_shallow<2, 2>(N, Ai, lda, B, ldb, Ci, ldc, acc);
      else if (KP16 == 32) amx_rows_shallow<1, 2>(N, Ai, lda, B, ldb, Ci, ldc, acc);
      else if (two_rows) amx_rows_shallow<2, 1>(N, Ai, lda, B, ldb, Ci, ldc, acc);
      else amx_rows_shallow<1, 1>(N, Ai, lda, B, ldb, Ci, ldc, acc);
      continue;
    }
    for (int64_t j = 0; j < N; j += 32) {
      const bool two_cols = N - j >= 32;
      if (two_rows && two_cols) amx_block<2, 2>(KP16, Ai, lda, B + j, ldb, Ci + j, ldc, acc);
      else if (two_rows) amx_block<2, 1>(KP16, Ai, lda, B + j, ldb, Ci + j, ldc, acc);
      else if (two_cols) amx_block<1, 2>(KP16, Ai, lda, B + j, ldb, Ci + j, ldc, acc);
      else amx_block<1, 1>(KP16, Ai, lda, B + j, ldb, Ci + j, ldc, acc);
    }
  }
  if (KP16 < KP) bf16_gemm(M16, N, KP - KP16, A + KP16, lda, B + KP16 * ldb, ldb, C, ldc, true);
  if (M16 < M) bf16_gemm(M - M16, N, KP, A + M16 * lda, lda, B, ldb, C + M16 * ldc, ldc, acc);
}

inline void bf16_mm(bool amx, int64_t M, int64_t N, int64_t KP, const uint32_t* A, int64_t lda, const uint32_t* B,
                    int64_t ldb, float* C, int64_t ldc, bool acc) {
  if (amx)
    amx_gemm(M, N, KP, A, lda, B, ldb, C, ldc, acc);
  else
    bf16_gemm(M, N, KP, A, lda, B, ldb, C, ldc, acc);
}

// Row `src` of D bf16 values into dst (Dp values, zero-padded), so that pairs are whole aligned words.
inline void bf16_row(const void* src, int64_t D, int64_t Dp, uint16_t* dst) {
  std::memcpy(dst, src, sizeof(uint16_t) * D);
  std::memset(dst + D, 0, sizeof(uint16_t) * (Dp - D));
}

__attribute__((target("avx512bf16,avx512bw,avx512f"))) inline void f32_to_bf16_row(const float* src, int64_t n,
                                                                                   uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)  // vcvtneps2bf16: round to nearest even, NaN kept
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
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

int attention_fwd_bf16dot(const AttnFwdArgs& a) {
  constexpr int W = 16;
  const int64_t B = a.B, H = a.H, Nq = a.Nq, Nk = a.Nk, D = a.D;
  // With AMX a row tile is 32 rows and its columns whole 32-key chunks (16 pairs, one tile's depth in p v).
  const bool amx = use_amx();
  const int64_t TR = amx ? kAmxRows : kMR, CW = amx ? 32 : W;
  const int64_t bk = imin(kBkFwd, round_up(imax(Nk, 1), CW));  // 256 keys: 0.82-0.87 of 64's time on a Zen 4
  const int64_t Dp = round_up(D, kPad), DP = Dp / 2, NkP = round_up(imax(Nk, 1), bk), nkb = NkP / bk;
  const int64_t off = a.causal_offset;
  const float scale = static_cast<float>(a.scale);
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  // Rows read in place as 32-bit words: whole pairs (D == Dp), word strides, and gather offsets within int32.
  constexpr int64_t kMaxWordStride = int64_t(1) << 26;
  const bool q_in_place = D == Dp && a.q_stride[2] % 2 == 0;
  const bool rows_in_place = D == Dp && a.k_stride[2] % 2 == 0 && a.k_stride[2] / 2 < kMaxWordStride;
  const int64_t nqb = (Nq + kBq - 1) / kBq;
  const int64_t chunks = B * H >= 2 * nt ? 1 : imax(1, imin(nqb, (2 * nt + B * H - 1) / (B * H)));
  const int64_t qb_per_chunk = (nqb + chunks - 1) / chunks;
  const int64_t items = B * H * chunks;
  const size_t arena_bytes = Arena::need<uint32_t>(DP * NkP) + Arena::need<uint32_t>(NkP / 2 * Dp) +
                             Arena::need<uint16_t>(kBq * Dp) + 2 * Arena::need<uint16_t>(16 * Dp) +
                             Arena::need<float>(kBq * bk) + Arena::need<uint16_t>(kBq * bk) +
                             Arena::need<float>(kBq * Dp) + 2 * Arena::need<float>(kBq) + Arena::need<uint8_t>(nkb);
  int status = kOk;
  int done = 0;  // threads done with their share (finish_share)
#pragma omp parallel num_threads(nt)
  {
    Arena arena(arena_bytes);
    const bool ok = thread_arena_ok(arena, &status);
    AmxTiles tiles(amx && ok);
    uint32_t* Kp = ok ? arena.take<uint32_t>(DP * NkP) : nullptr;      // (Dp / 2, ldk) words: K^T pairs
    uint32_t* Vp = ok ? arena.take<uint32_t>(NkP / 2 * Dp) : nullptr;  // (keys / 2, Dp) words: V row pairs
    uint16_t* Qb = ok ? arena.take<uint16_t>(kBq * Dp) : nullptr;      // (kBq, Dp) bf16
    uint16_t* K16 = ok ? arena.take<uint16_t>(16 * Dp) : nullptr;      // (16, Dp): 16 padded k rows
    uint16_t* V16 = ok ? arena.take<uint16_t>(16 * Dp) : nullptr;      // (16, Dp): their v rows
    float* S = ok ? arena.take<float>(kBq * bk) : nullptr;             // (kBq, bk): scores, then p
    uint16_t* Pb = ok ? arena.take<uint16_t>(kBq * bk) : nullptr;      // (kBq, bk): p in bf16
    float* acc = ok ? arena.take<float>(kBq * Dp) : nullptr;
    float* m = ok ? arena.take<float>(kBq) : nullptr;
    float* l = ok ? arena.take<float>(kBq) : nullptr;
    uint8_t* kvis = ok ? arena.take<uint8_t>(nkb) : nullptr;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t it = 0; it < items; ++it) {
      if (!ok) continue;
      const int64_t bh = it / chunks, b = bh / H, h = bh % H;
      const int64_t q_begin = (it % chunks) * qb_per_chunk * kBq;
      const int64_t q_end = imin(Nq, q_begin + qb_per_chunk * kBq);
      if (q_begin >= q_end) continue;
      const uint8_t* qpm = a.qpm ? a.qpm + b * Nq : nullptr;
      if (!any_query(qpm, q_begin, q_end)) {
        for (int64_t i = q_begin; i < q_end; ++i) write_empty_row<float>(a, bh * Nq + i, acc, Dp);
        continue;
      }
      const uint8_t* kpm = a.kpm ? a.kpm + b * Nk : nullptr;
      // Keys any row here sees: up to the causal limit and the last unpadded key.
      const int64_t k_end = imin(a.causal ? imax(0, imin(Nk, q_end + off)) : Nk, keys_end(kpm, Nk));
      const int64_t ldk = imax(bk, round_up(k_end, bk));
      const int64_t kbase = b * a.k_stride[0] + h * a.k_stride[1];
      const int64_t vbase = b * a.v_stride[0] + h * a.v_stride[1];
      const int64_t qbase = b * a.q_stride[0] + h * a.q_stride[1];
      // Packs keys [0, ldk) 16 at a time; padded keys and keys past k_end are zeros (never read as data).
      // Rows that need no zero padding (D == Dp) are read in place when all 16 keys are visible.
      for (int64_t j = 0; j < ldk; j += 16) {
        bool whole = rows_in_place && j + 16 <= k_end;
        for (int64_t t = 0; whole && kpm && t < 16; ++t) whole = kpm[j + t];
        if (whole) {
          transpose_words16(static_cast<const uint32_t*>(at(a.k, kBF16, kbase + j * a.k_stride[2])), a.k_stride[2] / 2,
                            DP, Kp + j, ldk);
          auto vrow = [&](int64_t jj) { return static_cast<const uint16_t*>(at(a.v, kBF16, vbase + jj * a.v_stride[2])); };
          for (int64_t t = 0; t < 16; t += 2) pair_bf16_rows(vrow(j + t), vrow(j + t + 1), Dp, Vp + (j + t) / 2 * Dp);
          continue;
        }
        load_kv_rows16(at(a.k, kBF16, kbase), a.k_stride[2], at(a.v, kBF16, vbase), a.v_stride[2], j, k_end, kpm, D, Dp,
                       K16, V16);
        transpose_words16(reinterpret_cast<const uint32_t*>(K16), DP, DP, Kp + j, ldk);
        for (int64_t t = 0; t < 16; t += 2) pair_bf16_rows(V16 + t * Dp, V16 + (t + 1) * Dp, Dp, Vp + (j + t) / 2 * Dp);
      }
      visible_blocks(kpm, Nk, bk, nkb, kvis);

      for (int64_t i0 = q_begin; i0 < q_end; i0 += kBq) {
        const int64_t rows = imin(kBq, q_end - i0);
        if (!any_query(qpm, i0, i0 + rows)) {
          for (int64_t r = 0; r < rows; ++r) write_empty_row<float>(a, bh * Nq + i0 + r, acc, Dp);
          continue;
        }
        // q rows as the products' broadcast side: in place when they need no zero padding.
        const uint32_t* Qw = reinterpret_cast<const uint32_t*>(Qb);
        int64_t ldq = DP;
        if (q_in_place) {
          Qw = static_cast<const uint32_t*>(at(a.q, kBF16, qbase + i0 * a.q_stride[2]));
          ldq = a.q_stride[2] / 2;
        } else {
          for (int64_t r = 0; r < rows; ++r)
            bf16_row(at(a.q, kBF16, qbase + (i0 + r) * a.q_stride[2]), D, Dp, Qb + r * Dp);
        }
        for (int64_t r = 0; r < rows; ++r) {
          m[r] = -INFINITY;
          l[r] = 0;
        }
        std::memset(acc, 0, sizeof(float) * rows * Dp);
        const int64_t j_end = a.causal ? imax(0, imin(k_end, i0 + rows + off)) : k_end;
        for (int64_t j0 = 0; j0 < j_end; j0 += bk) {
          if (!kvis[j0 / bk]) continue;
          const bool masked = block_needs_mask(j0, bk, Nk, a.causal, i0, off, kvis[j0 / bk]);
          for (int64_t r0 = 0; r0 < rows; r0 += TR) {
            const int64_t tr = imin(TR, rows - r0);
            const int64_t cols =
                imin(k_end - j0, a.causal && masked ? imax(0, imin(bk, i0 + r0 + tr + off - j0)) : bk);
            if (cols <= 0) continue;
            // Keys in [cols, cv) are masked for every row of the tile (past the causal limit of its last
            // row, or past k_end), so their p is 0 and p v may run over all cv keys.
            const int64_t cv = round_up(cols, CW);
            bf16_mm(amx, tr, cv, DP, Qw + r0 * ldq, ldq, Kp + j0, ldk, S + r0 * bk, bk, false);
            // Scores are scaled after masking (-inf stays -inf) inside the softmax step.
            if (masked)
              for (int64_t r = r0; r < r0 + tr; ++r)
                mask_block<float>(S + r * bk, j0, cv, Nk, a.causal, i0 + r + off, kpm);
            for (int64_t s0 = r0; s0 < r0 + tr; s0 += kSoftRows)
              softmax_tile_bf16(S, bk, s0, imin(kSoftRows, r0 + tr - s0), cv, scale, m, l, acc, Dp, Pb, bk);
            bf16_mm(amx, tr, Dp, amx ? cv / 2 : (cols + 1) / 2, reinterpret_cast<const uint32_t*>(Pb + r0 * bk),
                    bk / 2, Vp + (j0 / 2) * Dp, Dp, acc + r0 * Dp, Dp, true);
          }
        }
        float* lse = static_cast<float*>(a.lse) + bh * Nq + i0;
        for (int64_t r = 0; r < rows; ++r) {
          void* orow = const_cast<void*>(at(a.out, a.dtype, (bh * Nq + i0 + r) * D));
          if (l[r] == 0.0f || (qpm && !qpm[i0 + r])) {
            std::memset(acc + r * Dp, 0, sizeof(float) * Dp);
            store_row<float>(acc + r * Dp, D, 1.0f, a.dtype, orow);
            lse[r] = INFINITY;
          } else {
            store_row<float>(acc + r * Dp, D, 1.0f / l[r], a.dtype, orow);
            lse[r] = m[r] + std::log(l[r]);
          }
        }
      }
    }
    finish_share(&done);
  }
  return status;
}
#endif

template <typename T>
int attention_fwd_impl(const AttnFwdArgs& a) {
  if (a.Nq <= kDecodeRows) return attention_decode_impl<T>(a);
#if defined(__AVX512BW__)
  if (std::is_same<T, float>::value && a.dtype == kBF16 && use_bf16_dot()) return attention_fwd_bf16dot(a);
#endif
  constexpr int W = Vec<T>::W;
  const int64_t B = a.B, H = a.H, Nq = a.Nq, Nk = a.Nk, D = a.D;
  const int64_t bk = key_block(Nk, kBkFwd);
  const int64_t Dp = round_up(D, kPad), NkP = round_up(imax(Nk, 1), bk), nkb = NkP / bk;
  const int64_t off = a.causal_offset;
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  // fp32/fp64 rows whose length is whole vectors need no conversion.
  const bool direct = (a.dtype == kF32 || a.dtype == kF64) && D == Dp;
  // Too few (b, h) pairs to feed every thread: split each pair's queries into chunks. Each work
  // item converts its K (transposed) and V once, so items are kept as large as the threads allow.
  const int64_t nqb = (Nq + kBqFwd - 1) / kBqFwd;
  const int64_t chunks = B * H >= 2 * nt ? 1 : imax(1, imin(nqb, (2 * nt + B * H - 1) / (B * H)));
  const int64_t qb_per_chunk = (nqb + chunks - 1) / chunks;
  const int64_t items = B * H * chunks;
  const size_t arena_bytes = Arena::need<T>(Dp * round_up(NkP, kPanel<T>)) + Arena::need<T>(NkP * Dp) + Arena::need<T>(kBqFwd * Dp) +
                             Arena::need<T>(kBqFwd * bk) + Arena::need<T>(kBqFwd * Dp) + 2 * Arena::need<T>(kBqFwd) +
                             Arena::need<uint8_t>(nkb);
  int status = kOk;
  int done = 0;  // threads done with their share (finish_share)
#pragma omp parallel num_threads(nt)
  {
    Arena arena(arena_bytes);
    const bool ok = thread_arena_ok(arena, &status);
    T* Kt = ok ? arena.take<T>(Dp * round_up(NkP, kPanel<T>)) : nullptr;  // K^T, packed (gemm_packed)
    T* Vp = ok ? arena.take<T>(NkP * Dp) : nullptr;  // (keys, Dp)
    T* Qs = ok ? arena.take<T>(kBqFwd * Dp) : nullptr;  // (kBqFwd, Dp): q * scale
    T* S = ok ? arena.take<T>(kBqFwd * bk) : nullptr;  // (kBqFwd, bk): scores, then probabilities
    T* acc = ok ? arena.take<T>(kBqFwd * Dp) : nullptr;
    T* m = ok ? arena.take<T>(kBqFwd) : nullptr;
    T* l = ok ? arena.take<T>(kBqFwd) : nullptr;
    uint8_t* kvis = ok ? arena.take<uint8_t>(nkb) : nullptr;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t it = 0; it < items; ++it) {
      if (!ok) continue;
      const int64_t bh = it / chunks, b = bh / H, h = bh % H;
      const int64_t q_begin = (it % chunks) * qb_per_chunk * kBqFwd;
      const int64_t q_end = imin(Nq, q_begin + qb_per_chunk * kBqFwd);
      if (q_begin >= q_end) continue;
      const uint8_t* qpm = a.qpm ? a.qpm + b * Nq : nullptr;
      if (!any_query(qpm, q_begin, q_end)) {  // every query here is padding: nothing to read
        for (int64_t i = q_begin; i < q_end; ++i) write_empty_row<T>(a, bh * Nq + i, acc, Dp);
        continue;
      }
      const uint8_t* kpm = a.kpm ? a.kpm + b * Nk : nullptr;
      // Keys any row here sees: up to the causal limit and the last unpadded key.
      const int64_t k_end = imin(a.causal ? imax(0, imin(Nk, q_end + off)) : Nk, keys_end(kpm, Nk));
      // Element (d, j) of K^T: kt(j)[d * P] (packed_at).
      constexpr int64_t P = kPanel<T>;
      auto kt = [&](int64_t j) { return packed_at(Kt, Dp, j); };
      const int64_t kbase = b * a.k_stride[0] + h * a.k_stride[1];
      const int64_t vbase = b * a.v_stride[0] + h * a.v_stride[1];
      const int64_t qbase = b * a.q_stride[0] + h * a.q_stride[1];

      // Rows already in the kernel's type and width are read in place: K while it is transposed, and V by
      // the p v product itself when no key below k_end is padded (keys from k_end on are never read: a
      // right-padded batch). A padded value must not be read (0 * NaN is NaN), so with padding holes V is
      // copied with those rows zeroed.
      bool holes = false;
      for (int64_t j = 0; kpm && j < k_end; ++j) holes |= !kpm[j];
      const bool v_direct = direct && !holes;
      const T* Vb = v_direct ? static_cast<const T*>(at(a.v, a.dtype, vbase)) : Vp;
      const int64_t ldv = v_direct ? a.v_stride[2] : Dp;
      const int64_t es = elem_size(a.dtype);
      if (v_direct) prefetch_strided(Vb, imin(k_end, 2 * bk), ldv * es, D * es);
      prefetch_strided(at(a.q, a.dtype, qbase + q_begin * a.q_stride[2]), imin(kBqFwd, q_end - q_begin),
                       a.q_stride[2] * es, D * es);
      // No padded key below k_end: groups of 8 keys straight from their rows.
      int64_t j = v_direct ? pack_rows8(static_cast<const T*>(at(a.k, a.dtype, kbase)), a.k_stride[2], k_end, Dp, Kt)
                           : 0;
      for (; j < k_end; ++j) {
        // Padded keys are never read: whatever they hold (NaN, inf) cannot reach the output.
        if (kpm && !kpm[j]) {
          for (int64_t d = 0; d < Dp; ++d) kt(j)[d * P] = 0;
          std::memset(Vp + j * Dp, 0, sizeof(T) * Dp);
          continue;
        }
        const T* kr = Qs;
        if (direct)
          kr = static_cast<const T*>(at(a.k, a.dtype, kbase + j * a.k_stride[2]));
        else
          load_row<T>(at(a.k, a.dtype, kbase + j * a.k_stride[2]), a.dtype, D, Dp, T(1), Qs);
        for (int64_t d = 0; d < Dp; ++d) kt(j)[d * P] = kr[d];
        if (!v_direct)
          load_row<T>(at(a.v, a.dtype, vbase + j * a.v_stride[2]), a.dtype, D, Dp, T(1), Vp + j * Dp);
      }
      for (int64_t j = k_end; j < round_up(k_end, P); ++j)  // the last panel's unused columns
        for (int64_t d = 0; d < Dp; ++d) kt(j)[d * P] = 0;
      visible_blocks(kpm, Nk, bk, nkb, kvis);

      for (int64_t i0 = q_begin; i0 < q_end; i0 += kBqFwd) {
        const int64_t rows = imin(kBqFwd, q_end - i0);
        if (!any_query(qpm, i0, i0 + rows)) {
          for (int64_t r = 0; r < rows; ++r) write_empty_row<T>(a, bh * Nq + i0 + r, acc, Dp);
          continue;
        }
        for (int64_t r = 0; r < rows; ++r)
          load_row<T>(at(a.q, a.dtype, qbase + (i0 + r) * a.q_stride[2]), a.dtype, D, Dp, static_cast<T>(a.scale),
                      Qs + r * Dp);
        if (i0 + rows < q_end)
          prefetch_strided(at(a.q, a.dtype, qbase + (i0 + rows) * a.q_stride[2]), imin(kBqFwd, q_end - i0 - rows),
                           a.q_stride[2] * es, D * es);
        for (int64_t r = 0; r < rows; ++r) {
          m[r] = -INFINITY;
          l[r] = 0;
        }
        std::memset(acc, 0, sizeof(T) * rows * Dp);
        const int64_t j_end = a.causal ? imax(0, imin(k_end, i0 + rows + off)) : k_end;
        for (int64_t j0 = 0; j0 < j_end; j0 += bk) {
          if (!kvis[j0 / bk]) continue;
          const bool masked = block_needs_mask(j0, bk, Nk, a.causal, i0, off, kvis[j0 / bk]);
          // Row tile by row tile: on a causal block crossing the diagonal a tile computes only the keys its
          // last row sees, which skips the triangle above the diagonal (most of the work when N <= bk).
          for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
            const int64_t tr = imin(kMR, rows - r0);
            const int64_t cols =
                imin(k_end - j0, a.causal && masked ? imax(0, imin(bk, i0 + r0 + tr + off - j0)) : bk);
            if (cols <= 0) continue;  // no row of the tile sees a key of this block
            const int64_t cv = round_up(cols, W);
            gemm_packed<T>(tr, cv, Dp, Qs + r0 * Dp, Dp, kt(j0), S + r0 * bk, bk, false);
            if (masked)
              for (int64_t r = r0; r < r0 + tr; ++r) mask_block<T>(S + r * bk, j0, cv, Nk, a.causal, i0 + r + off, kpm);
            softmax_tile<T>(S, bk, r0, tr, cv, T(1), m, l, acc, Dp);
            // Keys past k_end have p = 0 and no value row (V read in place ends at Nk).
            gemm<T>(tr, Dp, imin(cols, k_end - j0), S + r0 * bk, bk, Vb + j0 * ldv, ldv, acc + r0 * Dp, Dp, true);
          }
        }
        T* lse = static_cast<T*>(a.lse) + bh * Nq + i0;
        for (int64_t r = 0; r < rows; ++r) {
          void* orow = const_cast<void*>(at(a.out, a.dtype, (bh * Nq + i0 + r) * D));
          if (l[r] == T(0) || (qpm && !qpm[i0 + r])) {  // padded query, or no visible key: the row is 0
            std::memset(acc + r * Dp, 0, sizeof(T) * Dp);
            store_row<T>(acc + r * Dp, D, T(1), a.dtype, orow);
            lse[r] = INFINITY;
          } else {
            store_row<T>(acc + r * Dp, D, T(1) / l[r], a.dtype, orow);
            lse[r] = m[r] + std::log(l[r]);
          }
        }
      }
    }
    finish_share(&done);
  }
  return status;
}


#if defined(__AVX512BW__)
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

// FlashAttention-2 backward for bf16 inputs on vdpbf16ps (see attention_fwd_bf16dot for the layouts).
// Per (b, h): S = q k^T and dP = dO v^T take q / dO rows against packed K^T / V^T pairs; dQ += dS k takes
// dS rows (pairs along keys) against K row pairs; dV and dK are accumulated transposed, dV^T += dO^T P and
// dK^T += q^T dS, so that P and dS enter as row-pair words (two rows interleaved, vectorised) rather than
// transposed element by element. q and k are unscaled: dQ and dK take the scale once, at the end.
constexpr int64_t kOutKeys = 64;  // keys per transpose of dK^T / dV^T back to rows
static_assert(kOutKeys % 16 == 0, "key chunks start on whole 16-key steps of NkP");

int attention_bwd_bf16dot(const AttnBwdArgs& a) {
  constexpr int W = 16;
  typedef vec_t<float> V;
  const int64_t B = a.B, H = a.H, Nq = a.Nq, Nk = a.Nk, D = a.D;
  const bool amx = use_amx();  // row tiles of 32 rows and 32-key column chunks, as in the forward
  const int64_t TR = amx ? kAmxRows : kMR, CW = amx ? 32 : W;
  const int64_t bk = imin(kBkMax, round_up(imax(Nk, 1), CW));
  const int64_t Dp = round_up(D, kPad), DP = Dp / 2, NkP = round_up(Nk, bk), nkb = NkP / bk;
  const int64_t NqE = round_up(Nq, 32);  // whole 16-word rows of QT and dOT
  const int64_t off = a.causal_offset;
  const float scale = static_cast<float>(a.scale);
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  const size_t arena_bytes =
      2 * Arena::need<uint16_t>(NqE * Dp) + 2 * Arena::need<uint32_t>(Dp * NqE / 2) +  // Qb dOb, QT dOT
      3 * Arena::need<uint32_t>(16 * Dp) +                                              // K16 V16 W16
      3 * Arena::need<uint32_t>(DP * NkP) +                                              // Kp Vp Kv
      Arena::need<float>(Nq * Dp) + 2 * Arena::need<float>(Dp * NkP) + Arena::need<float>(Nq) +  // dQ dKT dVT Dl
      2 * Arena::need<float>(kBq * bk) + Arena::need<uint16_t>(kBq * bk) + 2 * Arena::need<uint32_t>(kBq / 2 * bk) +
      2 * Arena::need<float>(kOutKeys * Dp) + Arena::need<uint8_t>(nkb);
  int status = kOk;
  int done = 0;  // threads done with their share (finish_share)
#pragma omp parallel num_threads(nt)
  {
    Arena arena(arena_bytes);
    const bool ok = thread_arena_ok(arena, &status);
    AmxTiles tiles(amx && ok);
    uint16_t* Qb = ok ? arena.take<uint16_t>(NqE * Dp) : nullptr;     // (NqE, Dp) bf16 q rows
    uint16_t* dOb = ok ? arena.take<uint16_t>(NqE * Dp) : nullptr;    // (NqE, Dp) bf16 dO rows
    uint32_t* QT = ok ? arena.take<uint32_t>(Dp * NqE / 2) : nullptr;   // (Dp, NqE / 2): q^T row pairs
    uint32_t* dOT = ok ? arena.take<uint32_t>(Dp * NqE / 2) : nullptr;  // (Dp, NqE / 2): dO^T row pairs
    uint16_t* K16 = ok ? reinterpret_cast<uint16_t*>(arena.take<uint32_t>(16 * Dp)) : nullptr;  // (16, Dp) k rows
    uint16_t* V16 = ok ? reinterpret_cast<uint16_t*>(arena.take<uint32_t>(16 * Dp)) : nullptr;  // (16, Dp) v rows
    uint32_t* W16 = ok ? arena.take<uint32_t>(16 * Dp) : nullptr;  // (16, Dp): 16 row pairs as words
    uint32_t* Kp = ok ? arena.take<uint32_t>(DP * NkP) : nullptr;     // (Dp / 2, NkP): K^T pairs along D
    uint32_t* Vp = ok ? arena.take<uint32_t>(DP * NkP) : nullptr;     // (Dp / 2, NkP): V^T pairs along D
    uint32_t* Kv = ok ? arena.take<uint32_t>(DP * NkP) : nullptr;     // (NkP / 2, Dp): K row pairs
    float* dQ = ok ? arena.take<float>(Nq * Dp) : nullptr;            // (Nq, Dp)
    float* dKT = ok ? arena.take<float>(Dp * NkP) : nullptr;          // (Dp, NkP)
    float* dVT = ok ? arena.take<float>(Dp * NkP) : nullptr;          // (Dp, NkP)
    float* Dl = ok ? arena.take<float>(Nq) : nullptr;                 // (Nq): rowsum(dO * O) - dlse
    float* P = ok ? arena.take<float>(kBq * bk) : nullptr;            // (kBq, bk)
    float* dS = ok ? arena.take<float>(kBq * bk) : nullptr;           // (kBq, bk): dP, then dS
    uint16_t* dSb = ok ? arena.take<uint16_t>(kBq * bk) : nullptr;    // (kBq, bk) bf16
    uint32_t* PI = ok ? arena.take<uint32_t>(kBq / 2 * bk) : nullptr;   // (kBq / 2, bk): P row pairs
    uint32_t* dSI = ok ? arena.take<uint32_t>(kBq / 2 * bk) : nullptr;  // (kBq / 2, bk): dS row pairs
    float* f0 = ok ? arena.take<float>(kOutKeys * Dp) : nullptr;  // (kOutKeys, Dp): fp32 rows, dK rows at the end
    float* f1 = ok ? arena.take<float>(kOutKeys * Dp) : nullptr;  // the same for dO, then dV
    uint8_t* kvis = ok ? arena.take<uint8_t>(nkb) : nullptr;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t bh = 0; bh < B * H; ++bh) {
      if (!ok) continue;
      const int64_t b = bh / H, h = bh % H;
      const uint8_t* kpm = a.kpm ? a.kpm + b * Nk : nullptr;
      const uint8_t* qpm = a.qpm ? a.qpm + b * Nq : nullptr;
      const float* lse = static_cast<const float*>(a.lse) + bh * Nq;
      const float* dlse = a.dlse ? static_cast<const float*>(a.dlse) + bh * Nq : nullptr;
      // q and dO rows (padded queries and the pad row are zeros), Dl, and their transposed row pairs.
      for (int64_t i = 0; i < NqE; ++i) {
        uint16_t* qr = Qb + i * Dp;
        uint16_t* dr = dOb + i * Dp;
        if (i >= Nq || (qpm && !qpm[i])) {
          std::memset(qr, 0, sizeof(uint16_t) * Dp);
          std::memset(dr, 0, sizeof(uint16_t) * Dp);
          if (i < Nq) Dl[i] = 0;
          continue;
        }
        bf16_row(at(a.q, kBF16, b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2]), D, Dp, qr);
        bf16_row(at(a.dout, kBF16, b * a.do_stride[0] + h * a.do_stride[1] + i * a.do_stride[2]), D, Dp, dr);
        load_row<float>(at(a.dout, kBF16, b * a.do_stride[0] + h * a.do_stride[1] + i * a.do_stride[2]), kBF16, D, Dp,
                        1.0f, f0);
        load_row<float>(at(a.out, kBF16, b * a.o_stride[0] + h * a.o_stride[1] + i * a.o_stride[2]), kBF16, D, Dp,
                        1.0f, f1);
        V sv = V{};
        for (int64_t d = 0; d < Dp; d += W) sv += vload(f0 + d) * vload(f1 + d);
        Dl[i] = hsum<float>(sv) - (dlse ? dlse[i] : 0.0f);
      }
      // 16 row pairs at a time: pair words, then transposed (whole 64-byte rows of QT and dOT).
      for (int64_t ip = 0; ip < NqE / 2; ip += 16) {
        for (int64_t t = 0; t < 16; ++t)
          pair_bf16_rows(Qb + 2 * (ip + t) * Dp, Qb + (2 * (ip + t) + 1) * Dp, Dp, W16 + t * Dp);
        transpose_words16(W16, Dp, Dp, QT + ip, NqE / 2);
        for (int64_t t = 0; t < 16; ++t)
          pair_bf16_rows(dOb + 2 * (ip + t) * Dp, dOb + (2 * (ip + t) + 1) * Dp, Dp, W16 + t * Dp);
        transpose_words16(W16, Dp, Dp, dOT + ip, NqE / 2);
      }
      // K and V, 16 keys at a time: padded keys and keys past Nk are zeros (never read as data).
      for (int64_t j = 0; j < NkP; j += 16) {
        load_kv_rows16(at(a.k, kBF16, b * a.k_stride[0] + h * a.k_stride[1]), a.k_stride[2],
                       at(a.v, kBF16, b * a.v_stride[0] + h * a.v_stride[1]), a.v_stride[2], j, Nk, kpm, D, Dp, K16, V16);
        transpose_words16(reinterpret_cast<const uint32_t*>(K16), DP, DP, Kp + j, NkP);
        transpose_words16(reinterpret_cast<const uint32_t*>(V16), DP, DP, Vp + j, NkP);
        for (int64_t t = 0; t < 16; t += 2) pair_bf16_rows(K16 + t * Dp, K16 + (t + 1) * Dp, Dp, Kv + (j + t) / 2 * Dp);
      }
      std::memset(dQ, 0, sizeof(float) * Nq * Dp);
      std::memset(dKT, 0, sizeof(float) * Dp * NkP);
      std::memset(dVT, 0, sizeof(float) * Dp * NkP);
      visible_blocks(kpm, Nk, bk, nkb, kvis);
      const uint32_t* Qw = reinterpret_cast<const uint32_t*>(Qb);
      const uint32_t* dOw = reinterpret_cast<const uint32_t*>(dOb);

      for (int64_t j0 = 0; j0 < Nk; j0 += bk) {
        if (!kvis[j0 / bk]) continue;
        const int64_t i_first = a.causal ? imax(0, j0 - off) / kBq * kBq : 0;
        for (int64_t i0 = i_first; i0 < Nq; i0 += kBq) {
          const int64_t rows = imin(kBq, Nq - i0);
          if (!any_query(qpm, i0, i0 + rows)) continue;
          const bool masked = block_needs_mask(j0, bk, Nk, a.causal, i0, off, kvis[j0 / bk]);
          const bool tri = a.causal && masked;
          for (int64_t r0 = 0; r0 < rows; r0 += TR) {
            const int64_t tr = imin(TR, rows - r0);
            const int64_t cols = tri ? imax(0, imin(bk, i0 + r0 + tr + off - j0)) : bk;
            const int64_t cv = round_up(cols, CW);  // keys in [cols, cv) are masked: p = dS = 0
            if (cv > 0) {
              bf16_mm(amx, tr, cv, DP, Qw + (i0 + r0) * DP, DP, Kp + j0, NkP, P + r0 * bk, bk, false);
              bf16_mm(amx, tr, cv, DP, dOw + (i0 + r0) * DP, DP, Vp + j0, NkP, dS + r0 * bk, bk, false);
            }
            for (int64_t r = r0; r < r0 + tr; ++r) {
              float* p = P + r * bk;
              float* ds = dS + r * bk;
              std::memset(p + cv, 0, sizeof(float) * (bk - cv));
              std::memset(ds + cv, 0, sizeof(float) * (bk - cv));
              if (qpm && !qpm[i0 + r]) {
                std::memset(p, 0, sizeof(float) * cv);
                std::memset(ds, 0, sizeof(float) * cv);
              } else {
                const V sc = vbcast(scale);
                for (int64_t c = 0; c < cv; c += W) vstore(p + c, vload(p + c) * sc);
                if (masked) mask_block<float>(p, j0, cv, Nk, a.causal, i0 + r + off, kpm);
                const V lv = vbcast(lse[i0 + r]), dv = vbcast(Dl[i0 + r]);
                for (int64_t c = 0; c < cv; c += W) {
                  const V pv = vexp(vload(p + c) - lv);
                  vstore(p + c, pv);
                  vstore(ds + c, pv * (vload(ds + c) - dv));
                }
              }
              f32_to_bf16_row(ds, bk, dSb + r * bk);
            }
            if (cols > 0)  // dQ += dS k (unscaled)
              bf16_mm(amx, tr, Dp, amx ? cv / 2 : (cols + 1) / 2, reinterpret_cast<const uint32_t*>(dSb + r0 * bk),
                      bk / 2, Kv + (j0 / 2) * Dp, Dp, dQ + (i0 + r0) * Dp, Dp, true);
          }
          // Row pairs of P and dS; an odd last row pairs with zeros.
          const int64_t rp = (rows + 1) / 2;
          if (rows & 1) {
            std::memset(P + rows * bk, 0, sizeof(float) * bk);
            std::memset(dS + rows * bk, 0, sizeof(float) * bk);
          }
          for (int64_t ip = 0; ip < rp; ++ip) {
            interleave_bf16_rows(P + 2 * ip * bk, P + (2 * ip + 1) * bk, bk, PI + ip * bk);
            interleave_bf16_rows(dS + 2 * ip * bk, dS + (2 * ip + 1) * bk, bk, dSI + ip * bk);
          }
          bf16_mm(amx, Dp, bk, rp, dOT + i0 / 2, NqE / 2, PI, bk, dVT + j0, NkP, true);  // dV^T += dO^T P
          bf16_mm(amx, Dp, bk, rp, QT + i0 / 2, NqE / 2, dSI, bk, dKT + j0, NkP, true);  // dK^T += q^T dS
        }
      }
      for (int64_t i = 0; i < Nq; ++i)
        store_row<float>(dQ + i * Dp, D, scale, a.dtype, const_cast<void*>(at(a.dq, a.dtype, (bh * Nq + i) * D)));
      // dK^T and dV^T back to rows, kOutKeys keys at a time in 8 x 8 register transposes: read a column at a
      // time, each value was on another line NkP floats away (4 KB at N = 1024, one cache set), 8% of the call.
      for (int64_t j0 = 0; j0 < Nk; j0 += kOutKeys) {
        const int64_t nj = imin(kOutKeys, NkP - j0);  // a multiple of 8: NkP and j0 are multiples of 16
        for (int64_t d0 = 0; d0 < Dp; d0 += 8) {
          transpose8_rows(dKT + d0 * NkP + j0, NkP, nj, f0 + d0, Dp);
          transpose8_rows(dVT + d0 * NkP + j0, NkP, nj, f1 + d0, Dp);
        }
        for (int64_t j = j0; j < imin(Nk, j0 + kOutKeys); ++j) {
          store_row<float>(f0 + (j - j0) * Dp, D, scale, a.dtype, const_cast<void*>(at(a.dk, a.dtype, (bh * Nk + j) * D)));
          store_row<float>(f1 + (j - j0) * Dp, D, 1.0f, a.dtype, const_cast<void*>(at(a.dv, a.dtype, (bh * Nk + j) * D)));
        }
      }
    }
    finish_share(&done);
  }
  return status;
}
#endif

// FlashAttention-2 backward for one (b, h) per work item: the item owns dQ, dK and dV of its pair,
// so no accumulation crosses threads.
template <typename T>
int attention_bwd_impl(const AttnBwdArgs& a) {
#if defined(__AVX512BW__)
  if (std::is_same<T, float>::value && a.dtype == kBF16 && use_bf16_dot()) return attention_bwd_bf16dot(a);
#endif
  typedef vec_t<T> V;
  constexpr int W = Vec<T>::W;
  const int64_t B = a.B, H = a.H, Nq = a.Nq, Nk = a.Nk, D = a.D;
  const int64_t bk = key_block(Nk);
  const int64_t Dp = round_up(D, kPad), NkP = round_up(Nk, bk), nkb = NkP / bk;
  const int64_t off = a.causal_offset;
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  const int64_t NkT = round_up(NkP, kPanel<T>);  // K^T and V^T packed by panels (gemm_packed)
  const size_t arena_bytes = 3 * Arena::need<T>(Nq * Dp) + Arena::need<T>(Nq) + 2 * Arena::need<T>(Dp * NkT) +
                             3 * Arena::need<T>(NkP * Dp) + 2 * Arena::need<T>(kBq * bk) + Arena::need<uint8_t>(nkb);
  int status = kOk;
  int done = 0;  // threads done with their share (finish_share)
#pragma omp parallel num_threads(nt)
  {
    Arena arena(arena_bytes);
    const bool ok = thread_arena_ok(arena, &status);
    T* Qs = ok ? arena.take<T>(Nq * Dp) : nullptr;    // (Nq, Dp): q * scale
    T* dO = ok ? arena.take<T>(Nq * Dp) : nullptr;    // (Nq, Dp)
    T* dQ = ok ? arena.take<T>(Nq * Dp) : nullptr;    // (Nq, Dp): sum dS K, scaled at the end
    T* Dl = ok ? arena.take<T>(Nq) : nullptr;         // (Nq): rowsum(dO * O) - dlse
    T* Kt = ok ? arena.take<T>(Dp * NkT) : nullptr;   // K^T, packed (packed_at)
    T* Vt = ok ? arena.take<T>(Dp * NkT) : nullptr;   // V^T, packed the same way
    T* Kr = ok ? arena.take<T>(Dp * NkP) : nullptr;   // (NkP, Dp)
    T* dK = ok ? arena.take<T>(NkP * Dp) : nullptr;   // (NkP, Dp)
    T* dV = ok ? arena.take<T>(NkP * Dp) : nullptr;   // (NkP, Dp)
    T* P = ok ? arena.take<T>(kBq * bk) : nullptr;   // (kBq, bk)
    T* dS = ok ? arena.take<T>(kBq * bk) : nullptr;  // (kBq, bk): dP, then dS in place
    uint8_t* kvis = ok ? arena.take<uint8_t>(nkb) : nullptr;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t bh = 0; bh < B * H; ++bh) {
      if (!ok) continue;
      const int64_t b = bh / H, h = bh % H;
      const uint8_t* kpm = a.kpm ? a.kpm + b * Nk : nullptr;
      const uint8_t* qpm = a.qpm ? a.qpm + b * Nq : nullptr;
      const T* lse = static_cast<const T*>(a.lse) + bh * Nq;
      const T* dlse = a.dlse ? static_cast<const T*>(a.dlse) + bh * Nq : nullptr;
      for (int64_t i = 0; i < Nq; ++i) {
        if (qpm && !qpm[i]) {  // a padded query's q and dO are never read: zero rows keep the GEMMs clean
          std::memset(Qs + i * Dp, 0, sizeof(T) * Dp);
          std::memset(dO + i * Dp, 0, sizeof(T) * Dp);
          Dl[i] = 0;
          continue;
        }
        load_row<T>(at(a.q, a.dtype, b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2]), a.dtype, D, Dp,
                    static_cast<T>(a.scale), Qs + i * Dp);
        load_row<T>(at(a.dout, a.dtype, b * a.do_stride[0] + h * a.do_stride[1] + i * a.do_stride[2]), a.dtype, D,
                    Dp, T(1), dO + i * Dp);
        load_row<T>(at(a.out, a.dtype, b * a.o_stride[0] + h * a.o_stride[1] + i * a.o_stride[2]), a.dtype, D, Dp,
                    T(1), dQ + i * Dp);
        V s = V{};
        for (int64_t d = 0; d < Dp; d += W) s += vload(dO + i * Dp + d) * vload(dQ + i * Dp + d);
        // d lse_i / d S_ij = P_ij, so an incoming lse gradient enters exactly like -Delta.
        Dl[i] = hsum<T>(s) - (dlse ? dlse[i] : T(0));
      }
      std::memset(dQ, 0, sizeof(T) * Nq * Dp);
      // K rows into Kr and V rows into dV (free until it is zeroed below), then both packed transposed, 8 keys
      // at a time in registers: value by value it was a quarter of the kernel's own time at B12 H4 D32 N = 64.
      for (int64_t j = 0; j < NkP; ++j) {
        if (j < Nk && !(kpm && !kpm[j])) {  // padded keys are never read
          load_row<T>(at(a.k, a.dtype, b * a.k_stride[0] + h * a.k_stride[1] + j * a.k_stride[2]), a.dtype, D, Dp,
                      T(1), Kr + j * Dp);
          load_row<T>(at(a.v, a.dtype, b * a.v_stride[0] + h * a.v_stride[1] + j * a.v_stride[2]), a.dtype, D, Dp,
                      T(1), dV + j * Dp);
        } else {
          std::memset(Kr + j * Dp, 0, sizeof(T) * Dp);
          std::memset(dV + j * Dp, 0, sizeof(T) * Dp);
        }
      }
      int64_t jt = pack_rows8(Kr, Dp, NkP, Dp, Kt);
      pack_rows8(dV, Dp, NkP, Dp, Vt);
      for (; jt < NkP; ++jt)  // scalar builds: NkP may be a multiple of 4 only, and fp64 panels hold 4 keys
        for (int64_t d = 0; d < Dp; ++d) {
          packed_at(Kt, Dp, jt)[d * kPanel<T>] = Kr[jt * Dp + d];
          packed_at(Vt, Dp, jt)[d * kPanel<T>] = dV[jt * Dp + d];
        }
      std::memset(dK, 0, sizeof(T) * NkP * Dp);
      std::memset(dV, 0, sizeof(T) * NkP * Dp);
      visible_blocks(kpm, Nk, bk, nkb, kvis);
      // Right-padded keys (from k_end on) are never computed: a block that holds the last kept key stops there,
      // as the forward's does (their dK and dV rows stay 0). In-process A/B on a 2-core Zen 4, 25% of the keys
      // padded, B12 H4 D32: N = 64 0.80-0.85 of the time, N = 128 0.78-0.80 (either call order), same bits;
      // B4 H8 D64 N = 128 0.82, N = 512 equal (its padding fills whole blocks, skipped already).
      const int64_t k_end = keys_end(kpm, Nk);

      for (int64_t j0 = 0; j0 < Nk; j0 += bk) {
        if (!kvis[j0 / bk]) continue;
        const int64_t kcols = imin(bk, k_end - j0);  // >= 1: a visible block holds a kept key
        // Causal: rows i < j0 - off see no key of this block.
        const int64_t i_first = a.causal ? imax(0, j0 - off) / kBq * kBq : 0;
        for (int64_t i0 = i_first; i0 < Nq; i0 += kBq) {
          const int64_t rows = imin(kBq, Nq - i0);
          if (!any_query(qpm, i0, i0 + rows)) continue;
          const bool masked = block_needs_mask(j0, bk, Nk, a.causal, i0, off, kvis[j0 / bk]);
          const bool tri = a.causal && masked;
          // P and dS row tile by row tile; on a causal block crossing the diagonal a tile computes only
          // the keys its last row sees and zero-fills the rest, so the products below may skip them.
          for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
            const int64_t tr = imin(kMR, rows - r0);
            const int64_t cols = tri ? imax(0, imin(kcols, i0 + r0 + tr + off - j0)) : kcols;
            const int64_t cv = round_up(cols, W);
            if (cv > 0) {
              gemm_packed<T>(tr, cv, Dp, Qs + (i0 + r0) * Dp, Dp, packed_at(Kt, Dp, j0), P + r0 * bk, bk, false);
              gemm_packed<T>(tr, cv, Dp, dO + (i0 + r0) * Dp, Dp, packed_at(Vt, Dp, j0), dS + r0 * bk, bk, false);
            }
            for (int64_t r = r0; r < r0 + tr; ++r) {
              T* p = P + r * bk;
              T* ds = dS + r * bk;
              std::memset(p + cv, 0, sizeof(T) * (bk - cv));
              std::memset(ds + cv, 0, sizeof(T) * (bk - cv));
              if (qpm && !qpm[i0 + r]) {  // a padded query takes no part, whatever its q or dO hold
                std::memset(p, 0, sizeof(T) * cv);
                std::memset(ds, 0, sizeof(T) * cv);
                continue;
              }
              if (masked) mask_block<T>(p, j0, cv, Nk, a.causal, i0 + r + off, kpm);
              const V lv = vbcast(lse[i0 + r]), dv = vbcast(Dl[i0 + r]);
              for (int64_t c = 0; c < cv; c += W) {
                const V pv = vexp(vload(p + c) - lv);
                vstore(p + c, pv);
                vstore(ds + c, pv * (vload(ds + c) - dv));
              }
            }
            if (cols > 0)  // dQ += dS K (the unscaled sum; scaled once at the end)
              gemm<T>(tr, Dp, cols, dS + r0 * bk, bk, Kr + j0 * Dp, Dp, dQ + (i0 + r0) * Dp, Dp, true);
          }
          // dV += P^T dO and dK += dS^T (scale q), key tile by key tile; P^T and dS^T are read in place
          // (column-major), and on the diagonal a key tile starts at the first row that sees its first key.
          for (int64_t c0 = 0; c0 < kcols; c0 += kMR) {
            const int64_t tk = imin(kMR, kcols - c0);
            const int64_t r_start = tri ? imin(rows, imax(0, j0 + c0 - off - i0)) : 0;
            if (r_start == rows) continue;
            const int64_t kr = rows - r_start;
            gemm<T, true>(tk, Dp, kr, P + r_start * bk + c0, bk, dO + (i0 + r_start) * Dp, Dp,
                          dV + (j0 + c0) * Dp, Dp, true);
            gemm<T, true>(tk, Dp, kr, dS + r_start * bk + c0, bk, Qs + (i0 + r_start) * Dp, Dp,
                          dK + (j0 + c0) * Dp, Dp, true);
          }
        }
      }
      const T scale = static_cast<T>(a.scale);
      for (int64_t i = 0; i < Nq; ++i)
        store_row<T>(dQ + i * Dp, D, scale, a.dtype, const_cast<void*>(at(a.dq, a.dtype, (bh * Nq + i) * D)));
      for (int64_t j = 0; j < Nk; ++j) {
        store_row<T>(dK + j * Dp, D, T(1), a.dtype, const_cast<void*>(at(a.dk, a.dtype, (bh * Nk + j) * D)));
        store_row<T>(dV + j * Dp, D, T(1), a.dtype, const_cast<void*>(at(a.dv, a.dtype, (bh * Nk + j) * D)));
      }
    }
    finish_share(&done);
  }
  return status;
}

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

// ---- exact top-k ----

// A candidate of the running top-k. Keys are "larger is better" for every metric (L2 stores the
// negated distance); NaN scores carry key -inf and the nan flag, so they rank last.
struct Cand {
  float key;
  int32_t nan;
  int64_t idx;
};
inline bool worse(const Cand& x, const Cand& y) { return x.key < y.key || (x.key == y.key && x.idx > y.idx); }

// Min-heap on `worse`: the root is the worst candidate kept.
inline void sift_down(Cand* h, int64_t n, int64_t i) {
  for (;;) {
    int64_t w = i;
    const int64_t l = 2 * i + 1, r = l + 1;
    if (l < n && worse(h[l], h[w])) w = l;
    if (r < n && worse(h[r], h[w])) w = r;
    if (w == i) return;
    const Cand t = h[i];
    h[i] = h[w];
    h[w] = t;
    i = w;
  }
}
inline void heap_push(Cand* h, int64_t* n, int64_t k, const Cand& c) {
  if (*n < k) {
    int64_t i = (*n)++;
    h[i] = c;
    while (i > 0 && worse(h[i], h[(i - 1) / 2])) {
      const Cand t = h[i];
      h[i] = h[(i - 1) / 2];
      h[(i - 1) / 2] = t;
      i = (i - 1) / 2;
    }
  } else if (worse(h[0], c)) {
    h[0] = c;
    sift_down(h, *n, 0);
  }
}

constexpr int kMQ = VB >= 64 ? 4 : 2;  // queries per dot micro-kernel
// Queries per work item. A GEMM-scored item reads the whole corpus (or its part) once, so more queries per
// item read it fewer times: with 16 registers 128 (QT 192 KB, in L2) took Q = 256 on 1M x 384 from 1.90
// to 1.48 s and Q = 4096 on 200k x 384 from 5.9-6.3 to 5.0-5.3 s (2-core Zen 3, C++ harness). At AVX-512 on
// a Zen 4 (1 MB L2), 128 against the 64 of the Zen 5: medians 0.92 at Q = 256, 0.94 at Q = 4096 on 200k x
// 384; 256 was within 2% of 128.
constexpr int64_t kQb = 128;

// The few-query micro-kernels read one corpus row at a time: rows read side by side are interleaved
// streams, which the memory system serves worse than one. 1M x 384, Q = 1, C++ harness, 2 threads: on a
// Zen 3 (AVX2) four rows held an fp32 scan at ~13 GB/s, 60-65% of a plain sum's bandwidth, one row 18-19
// GB/s; on a Zen 4 (AVX-512, plain sum 30-31 GB/s) one row against four: fp32 0.70 of the time (26.6 GB/s),
// fp16 0.60, bf16 0.43, int8 (VNNI) 0.59-0.62, and four queries at once (fp32, fp16) 0.66-0.73. The rows
// come in through the hardware prefetcher alone: requesting rows 8 KB ahead (prefetchnta), which had
// raised a four-row scan on a Zen 5 from ~45 to ~65-70 GB/s, slowed the one-row scan on the Zen 4 (time
// without / with it: fp32 0.69-0.91, fp16 0.81, bf16 0.84, int8 0.92, four queries 0.76; AVX2 code 0.72-0.88).
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
// In-process A/B on a 2-core Zen 4, 1M x 384: Q = 2 0.78-0.81 of the time, Q = 4 0.86-0.96, Q = 1 0.92-0.96
// (noise level there: the unchanged fp16 scan read 0.93 in the same harness). The queries a pair-widened
// row meets are deinterleaved to match (split_pairs).
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

// Queries from which top-k scores tiles as a GEMM rather than by dot products (kMQ queries per pass over a
// tile). 1M x 384, 2 threads, C++ harness on a Zen 4, GEMM against dot products: Q = 16 0.50 of the time
// at AVX-512 (0.43 at AVX2), bf16 Q = 12 0.63, Q = 8 0.89 (AVX2 0.75); at Q = 4 they are equal, at Q = 2 the
// GEMM is 1.45x slower. Where the scans request rows ahead (use_scan_prefetch(), Zen 5) dot products on rows
// read in place keep the lead further. 1M x 384, 2 threads, on the 2-core Zen 5: fp32 rows, separate
// processes in turn, ms: Q = 8 40-72 (median 45) against the GEMM's 52-83 (median 59); from Q = 9 (a third
// pass over each tile) 62-79 against 54-58. 16-bit and int8 rows (fused, timed in turn in one process, ms):
// Q = 9 fp16 32 / 55, bf16 33 / 56, int8 25 / 50; Q = 12 40 / 55, 42 / 56, 32 / 50; Q = 16 52 / 55,
// 54 / 56, 41 / 50. That holds for corpora streamed from memory; one that fits the caches is scored at the
// FMA rate, where a GEMM beats the passes (20k x 64 fp16, Q = 16: 0.6 against 0.3 ms), so the longer
// stretch needs a corpus beyond kStreamedBytes.
constexpr int64_t kGemmMinQ = 8;
constexpr int64_t kGemmMinQPrefetch = 9;         // fp32 rows read in place, or small 16-bit and int8 corpora
constexpr int64_t kGemmMinQPrefetchStored = 17;  // 16-bit and int8 corpora of kStreamedBytes or more
constexpr int64_t kStreamedBytes = int64_t(64) << 20;
static_assert(kGemmMinQ > kMQ, "a few-query scan (16-bit or int8 rows widened in registers) is never a GEMM");

// Offers scores S (nrows, ldS) -- row j of the tile against query i at S[j * ldS + i] -- to the running
// top-k of each query, W queries per test of the bar. Heaps of consecutive queries are hstride apart.
inline void select_by_row(const float* S, int64_t ldS, int64_t nrows, int64_t t0, int64_t nq, const float* qq,
                          const float* invq, const float* cc, int metric, int64_t k, Cand* heap0, int64_t hstride,
                          int64_t* size0, int64_t sstride, float* bar, int32_t* open) {
  typedef vec_t<float> V;
  typedef int32_t VI __attribute__((vector_size(VB)));
  constexpr int W = Vec<float>::W;
  for (int64_t j = 0; j < nrows; ++j) {
    const float* srow = S + j * ldS;
    const float inv_c = metric == kCosine && cc[j] > 0 ? 1.0f / std::sqrt(cc[j]) : 0.0f;
    for (int64_t i0 = 0; i0 < nq; i0 += W) {
      V key = vload(srow + i0);
      if (metric == kCosine) {
        key = key * vload(invq + i0) * inv_c;
      } else if (metric == kL2) {
        V dist = vload(qq + i0) + cc[j] - 2.0f * key;
        dist = dist < V{} ? V{} : dist;                // rounding can push a zero distance below 0
        key = -dist;
      }
      VI pass;
      std::memcpy(&pass, open + i0, VB);
      pass |= key > vload(bar + i0);
      uint64_t any[VB / 8], bits = 0;
      std::memcpy(any, &pass, VB);
      for (int w = 0; w < VB / 8; ++w) bits |= any[w];
      if (!bits) continue;
      for (int l = 0; l < W && i0 + l < nq; ++l) {
        if (!pass[l]) continue;
        const int64_t i = i0 + l;
        Cand c;
        c.key = key[l];
        c.nan = c.key != c.key;
        c.idx = t0 + j;
        if (c.nan) c.key = -INFINITY;
        Cand* hp = heap0 + i * hstride;
        int64_t* n = size0 + i * sstride;
        heap_push(hp, n, k, c);
        if (*n == k) {
          open[i] = 0;
          bar[i] = hp[0].key;
        }
      }
    }
  }
}

int topk_impl(const TopkArgs& a) {
  const int64_t Q = a.Q, N = a.N, d = a.d, k = a.k;
  const int64_t dp = round_up(d, kPad);
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  // Below the GEMM's query count the kernels read rows in place: fp32 rows of whole vectors, and 16-bit and
  // int8 rows widened in registers as each value is used (fused), in passes of kMQ queries over each tile
  // (which then stays in L2). Otherwise (GEMM, or fp32 rows of part vectors) a tile is converted (int8:
  // and scaled) once into fp32 rows that every query reuses.
  const bool in_place = a.dtype != kF32 || d == dp;
  // Many queries: each tile is scored as a GEMM, tile rows x (dp x queries) with the queries transposed
  // once per work item, which runs near the FMA peak; per-pair dot products would spend a horizontal sum
  // on every (query, row). Scores of one row for all queries then sit side by side, so the running
  // top-k's bar is tested a vector of queries at a time.
  const bool streamed = N * a.corpus_stride * elem_size(a.dtype) >= kStreamedBytes;
  const int64_t gemm_min_q = !in_place || !use_scan_prefetch()   ? kGemmMinQ
                             : a.dtype != kF32 && streamed ? kGemmMinQPrefetchStored
                                                           : kGemmMinQPrefetch;
  const bool use_gemm = Q >= gemm_min_q;
  const bool fused = a.dtype != kF32 && !use_gemm;
  const bool direct = (a.dtype == kF32 && d == dp) || fused;
  // ~32 KB of corpus per tile keeps it in L1/L2 while every query of the item passes over it.
  // Rows scanned in place for a few queries (fused) need no converted copy: longer tiles, fewer passes.
  // As a GEMM (many queries) a tile is whole micro-kernel row tiles (a remainder tile of 2 rows runs at a
  // third of the FMA rate), ~24 K values: 60 rows of 384 dimensions.
  const int64_t tile = fused || (direct && Q <= kMQ) ? 256
                       : use_gemm ? imax(kMR, imin(510, (24576 / dp) / kMR * kMR))
                                  : imax(4, imin(512, 8192 / dp));
  const int64_t nqb = (Q + kQb - 1) / kQb;
  const int64_t ntiles = (N + tile - 1) / tile;
  // Few query blocks (small Q): also split the corpus, one running top-k per (query, part).
  const int64_t parts = nqb >= nt ? 1 : imax(1, imin(ntiles, (2 * nt + nqb - 1) / nqb));
  const int64_t tiles_per_part = (ntiles + parts - 1) / parts;

  // int8 codes for a few queries: integer dot products against int16 queries (codes padded to kI8Pad).
  const bool i8q = fused && a.dtype == kI8;
  const int64_t di = round_up(d, kI8Pad);
  // Rows ahead that the few-query scans of rows read in place request (prefetch_scan_row), about 6 KB.
  const int64_t row_bytes = a.corpus_stride * elem_size(a.dtype);
  // Rows read in place by dot products (any Q below the GEMM's) are one pass over the corpus in order; the
  // later query groups of a tile find its rows in the cache (dot_block requests only on the first).
  const bool scan = direct && !use_gemm;  // fused rows are direct, and never a GEMM
  const int64_t pf_rows = scan && use_scan_prefetch() ? imax(2, 6144 / imax(1, row_bytes)) : 0;
  Arena shared(Arena::need<float>(Q * dp) + Arena::need<float>(Q) + Arena::need<Cand>(Q * parts * k) +
               Arena::need<int64_t>(Q * parts) + (i8q ? Arena::need<int16_t>(Q * di) + Arena::need<float>(Q) : 0));
  if (!shared.ok()) return kOutOfMemory;
  float* Qp = shared.take<float>(Q * dp);  // (Q, dp) zero-padded queries
  float* qq = shared.take<float>(Q);       // squared norms
  Cand* heaps = shared.take<Cand>(Q * parts * k);
  int64_t* sizes = shared.take<int64_t>(Q * parts);
  int16_t* Qi = i8q ? shared.take<int16_t>(Q * di) : nullptr;  // (Q, di) int16 queries (or u8 ones: VNNI)
  float* qinv = i8q ? shared.take<float>(Q) : nullptr;         // their inverse scales
#if defined(__AVX512BW__)
  const bool vnni = i8q && use_vnni();
#else
  [[maybe_unused]] const bool vnni = false;
#endif
  for (int64_t i = 0; i < Q; ++i) {
    load_row<float>(a.queries + i * d, kF32, d, dp, 1.0f, Qp + i * dp);
    qq[i] = self_dot(Qp + i * dp, dp);
    if (fused && a.dtype == kBF16 && kBF16Pairs) split_pairs(Qp + i * dp, d);  // only dot_tile_cvt reads Qp
#if defined(__AVX512BW__)
    if (vnni) {
      qinv[i] = quantize_u8(a.queries + i * d, d, di, reinterpret_cast<uint8_t*>(Qi) + i * di);
      continue;
    }
#endif
    if (i8q) qinv[i] = quantize_i16(a.queries + i * d, d, di, Qi + i * di);
  }
  for (int64_t i = 0; i < Q * parts; ++i) sizes[i] = 0;

  const size_t arena_bytes = Arena::need<float>(direct ? 0 : tile * dp) + Arena::need<float>(kQb * tile) +
                             Arena::need<float>(tile) + (use_gemm ? Arena::need<float>(dp * kQb) : 0) +
                             3 * Arena::need<float>(kQb) + Arena::need<int32_t>(kQb);
  int status = kOk;
#pragma omp parallel num_threads(nt)
  {
    Arena arena(arena_bytes);
    const bool ok = thread_arena_ok(arena, &status);
    float* conv = ok ? arena.take<float>(direct ? 0 : tile * dp) : nullptr;  // (tile, dp)
    float* S = ok ? arena.take<float>(kQb * tile) : nullptr;                 // (kQb, tile) or (tile, qpad)
    float* cc = ok ? arena.take<float>(tile) : nullptr;                      // corpus squared norms
    float* QT = ok && use_gemm ? arena.take<float>(dp * kQb) : nullptr;      // (dp, qpad) queries transposed
    float* bar = ok ? arena.take<float>(kQb) : nullptr;    // per query: the key to beat once its heap is full
    float* invq = ok ? arena.take<float>(kQb) : nullptr;   // per query: 1 / |q| (cosine)
    float* qn2 = ok ? arena.take<float>(kQb) : nullptr;    // per query: |q|^2 (l2), 0 in padding lanes
    int32_t* open = ok ? arena.take<int32_t>(kQb) : nullptr;  // per query: -1 while its heap has room
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < nqb * parts; ++it) {
      if (!ok) continue;
      const int64_t qb = it / parts, part = it % parts;
      const int64_t q0 = qb * kQb, nq = imin(kQb, Q - q0);
      const int64_t c_begin = part * tiles_per_part * tile, c_end = imin(N, c_begin + tiles_per_part * tile);
      const int64_t qpad = round_up(nq, Vec<float>::W);
      if (use_gemm) {
        for (int64_t p = 0; p < dp; ++p)
          for (int64_t i = 0; i < qpad; ++i) QT[p * qpad + i] = i < nq ? Qp[(q0 + i) * dp + p] : 0.0f;
        for (int64_t i = 0; i < qpad; ++i) {
          // Padding lanes can never pass: their bar is +inf and they have no room.
          bar[i] = i < nq ? -INFINITY : INFINITY;
          open[i] = i < nq ? -1 : 0;
          invq[i] = i < nq && qq[q0 + i] > 0 ? 1.0f / std::sqrt(qq[q0 + i]) : 0.0f;
          qn2[i] = i < nq ? qq[q0 + i] : 0.0f;
        }
      }
      // A tile as fp32 rows, read in place (fp32 whole vectors) or converted (int8: and scaled), and the
      // rows' squared norms in cc.
      auto fp32_tile = [&](int64_t t0, int64_t nrows, int64_t* ldc) -> const float* {
        const float* C = conv;
        *ldc = dp;
        if (direct) {
          C = static_cast<const float*>(a.corpus) + t0 * a.corpus_stride;
          *ldc = a.corpus_stride;
        } else {
          for (int64_t j = 0; j < nrows; ++j)
            load_row<float>(at(a.corpus, a.dtype, (t0 + j) * a.corpus_stride), a.dtype, d, dp,
                            a.dtype == kI8 ? a.row_scale[t0 + j] : 1.0f, conv + j * dp);
        }
        if (a.metric != kIP && a.dtype == kI8)
          for (int64_t j = 0; j < nrows; ++j) cc[j] = a.row_norm2[t0 + j];
        else if (a.metric != kIP)
          for (int64_t j = 0; j < nrows; ++j) cc[j] = self_dot(C + j * *ldc, dp);
        return C;
      };
      for (int64_t t0 = c_begin; t0 < c_end; t0 += tile) {
        const int64_t nrows = imin(tile, c_end - t0);
        if (use_gemm) {
          int64_t ldc;
          const float* C = fp32_tile(t0, nrows, &ldc);
          // S: (nrows, qpad), two vectors of queries at a time: QT streams from L2 (384 x 64 floats do not fit
          // L1), and 12 x 2-vector tiles (32 registers) need half the loads from it per FMA that 6 x 4-vector
          // tiles do. Only the first pass over the queries reads the tile from memory, so the next tile is
          // requested a slice per micro-kernel call. On a 2-core Zen 3 the scan ran at 51-59% of the FMA rate
          // (Q = 4096) while the same GEMM on a tile in cache runs at the FMA peak (91 of 92 GFLOP/s on one
          // core); the requests took Q = 4096 on 200k x 384 from 6.4-6.8 to 5.7-5.8 s.
          const int64_t next_rows = imin(tile, c_end - t0 - nrows);
          const char* next = static_cast<const char*>(a.corpus) + (t0 + nrows) * a.corpus_stride * elem_size(a.dtype);
          const int64_t next_lines = next_rows * a.corpus_stride * elem_size(a.dtype) / 64;
          constexpr int MRq = panel_rows(2);
          constexpr int64_t NW = 2 * Vec<float>::W;
          const int64_t calls = imax(1, (nrows / MRq) * (qpad / NW));
          const int64_t per_call = (next_lines + calls - 1) / calls;
          int64_t line = 0;
          int64_t j = 0;
          for (; j + NW <= qpad; j += NW) {
            int64_t r = 0;
            for (; r + MRq <= nrows; r += MRq) {
              const int64_t e = imin(next_lines, line + per_call);
              prefetch_strided(next + line * 64, e - line, 64, 64);
              line = e;
              gemm_tile<float, MRq, 2>(dp, C + r * ldc, ldc, QT + j, qpad, S + r * qpad + j, qpad, false);
            }
            if (r < nrows)
              gemm_panel<float, 2>(nrows - r, dp, C + r * ldc, ldc, QT + j, qpad, S + r * qpad + j, qpad, false);
          }
          if (j < qpad) gemm<float>(nrows, qpad - j, dp, C, ldc, QT + j, qpad, S + j, qpad, false);
          select_by_row(S, qpad, nrows, t0, nq, qn2, invq, cc, a.metric, k, heaps + (q0 * parts + part) * k,
                        parts * k, sizes + q0 * parts + part, parts, bar, open);
          continue;
        }
        if (i8q) {
          const int8_t* codes = static_cast<const int8_t*>(a.corpus) + t0 * a.corpus_stride;
#if defined(__AVX512BW__)
          if (vnni)
            dot_block_i8_vnni(di, reinterpret_cast<const uint8_t*>(Qi) + q0 * di, di, nq, codes, a.corpus_stride,
                              nrows, S, tile, pf_rows, N - t0);
          else
#endif
            dot_block_i8q(di, Qi + q0 * di, di, nq, codes, a.corpus_stride, nrows, S, tile, pf_rows, N - t0);
          for (int64_t r = 0; r < nq; ++r)  // both quantization scales multiply the integer dot product
            for (int64_t j = 0; j < nrows; ++j) S[r * tile + j] *= a.row_scale[t0 + j] * qinv[q0 + r];
          if (a.metric != kIP)
            for (int64_t j = 0; j < nrows; ++j) cc[j] = a.row_norm2[t0 + j];
        } else if (fused) {  // 16-bit rows
          dot_block_stored(a.dtype, d, Qp + q0 * dp, dp, nq, at(a.corpus, a.dtype, t0 * a.corpus_stride),
                           a.corpus_stride, nrows, S, tile, pf_rows, N - t0);
          if (a.metric != kIP)
            for (int64_t j = 0; j < nrows; ++j) cc[j] = self_dot_stored(a.dtype, a.corpus, (t0 + j) * a.corpus_stride, d);
        } else {
          int64_t ldc;
          const float* C = fp32_tile(t0, nrows, &ldc);
          // pf_rows is 0 unless the rows are read in place (direct). With cosine and l2, fp32_tile's norms have
          // read the tile already, and requests for cached rows only cost time (l2: 1.11x).
          const int64_t pf = a.metric == kIP ? pf_rows : 0;
          dot_block(dp, Qp + q0 * dp, dp, nq, C, ldc, nrows, S, tile, pf, N - t0);
        }
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t q = q0 + r;
          Cand* hp = heaps + (q * parts + part) * k;
          int64_t* n = sizes + q * parts + part;
          const float* s = S + r * tile;
          const float inv_q = qq[q] > 0 ? 1.0f / std::sqrt(qq[q]) : 0.0f;
          for (int64_t j = 0; j < nrows; ++j) {
            float key = s[j];
            if (a.metric == kCosine) {
              key *= inv_q * (cc[j] > 0 ? 1.0f / std::sqrt(cc[j]) : 0.0f);
            } else if (a.metric == kL2) {
              const float dist = qq[q] + cc[j] - 2.0f * s[j];
              key = dist < 0.0f ? -0.0f : -dist;  // rounding can push a zero distance below 0
            }
            // Within one part indices increase, so an equal key never displaces a kept one.
            if (*n == k && !(key > hp[0].key)) continue;
            Cand c;
            c.key = key;
            c.nan = key != key;
            c.idx = t0 + j;
            if (c.nan) c.key = -INFINITY;
            heap_push(hp, n, k, c);
          }
        }
      }
    }
    // Merge the parts of each query and write them out best first.
    Arena merge(Arena::need<Cand>(k));
    Cand* hf = merge.ok() ? merge.take<Cand>(k) : nullptr;
    if (!merge.ok()) {
#pragma omp atomic write
      status = kOutOfMemory;
    }
#pragma omp for schedule(static)
    for (int64_t q = 0; q < Q; ++q) {
      if (!hf) continue;
      int64_t n = 0;
      for (int64_t part = 0; part < parts; ++part) {
        const Cand* hp = heaps + (q * parts + part) * k;
        for (int64_t i = 0; i < sizes[q * parts + part]; ++i) heap_push(hf, &n, k, hp[i]);
      }
      for (int64_t pos = n - 1; pos >= 0; --pos) {  // pop the worst into the last free slot
        const Cand c = hf[0];
        hf[0] = hf[pos];
        sift_down(hf, pos, 0);
        a.out_idx[q * k + pos] = c.idx;
        a.out_scores[q * k + pos] = c.nan ? NAN : (a.metric == kL2 ? -c.key : c.key);
      }
    }
  }
  return status;
}

// ---- linear with few rows (decoding) ----

// Rows of x per micro-kernel and weight rows per micro-kernel: 8 x 2 accumulators on AVX-512,
// 4 x 2 with 16 vector registers.
constexpr int kLinMR = VB >= 64 ? 8 : 4;
constexpr int kLinNR = 2;

template <typename T, int NR>
inline void skinny_rows(int64_t M, int64_t K, const T* X, int64_t ldx, const T* Wm, int64_t ldw, T* Y, int64_t ldy) {
  int64_t i = 0;
  for (; i + kLinMR <= M; i += kLinMR) dot_tile<T, kLinMR, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy);
  switch (M - i) {
    case 1: dot_tile<T, 1, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy); break;
    case 2: dot_tile<T, 2, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy); break;
    case 3: dot_tile<T, 3, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy); break;
    case 4: dot_tile<T, 4, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy); break;
    case 5: dot_tile<T, 5, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy); break;
    case 6: dot_tile<T, 6, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy); break;
    case 7: dot_tile<T, 7, NR>(K, X + i * ldx, ldx, Wm, ldw, Y + i * ldy, ldy); break;
    default: break;
  }
}

// Each thread owns a contiguous slice of W's rows and streams it from memory once, whatever M is;
// a packed GEMM would first copy all of W, doubling the memory traffic that bounds decoding.
template <typename T>
int linear_impl(const LinearArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N;
  const T* X = static_cast<const T*>(a.x);
  const T* Wm = static_cast<const T*>(a.w);
  const T* bias = static_cast<const T*>(a.b);
  T* Y = static_cast<T*>(a.y);
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  const int64_t pairs = N / kLinNR;
  // Weight rows are requested 8 KB ahead of use: the stream is the whole cost of a decoding step, and
  // the hardware prefetcher alone left much of the memory bandwidth unused (on a Zen 5).
  constexpr int64_t kPrefetchBytes = 8192;
  const int64_t pair_bytes = kLinNR * K * static_cast<int64_t>(sizeof(T));
  const int64_t ahead = kPrefetchBytes / pair_bytes + 1;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t jp = 0; jp < pairs; ++jp) {
    if (jp + ahead < pairs) {
      const char* next = reinterpret_cast<const char*>(Wm + (jp + ahead) * kLinNR * K);
      for (int64_t b = 0; b < pair_bytes; b += 64) __builtin_prefetch(next + b);
    }
    skinny_rows<T, kLinNR>(M, K, X, a.ldx, Wm + jp * kLinNR * K, K, Y + jp * kLinNR, N);
  }
  for (int64_t j = pairs * kLinNR; j < N; ++j) skinny_rows<T, 1>(M, K, X, a.ldx, Wm + j * K, K, Y + j, N);
  if (bias)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) Y[i * N + j] += bias[j];
  return kOk;
}


// ---- GEMM for linear layers: C (M, N) = A (M, K) B (K, N) [+ bias], any layout of A and B ----

// K per packed block: a block of one B panel (128 x 64 floats, 32 KB) stays in L1 while every
// 6-row strip of the item's rows streams past it.
constexpr int64_t kGemmKC = 128;
// Rows per work item: its A block (96 x 128) stays in L2 across the item's panels.
constexpr int64_t kGemmMC = 96;
// Packed B up to this many elements (1 MB of floats) is packed before the parallel region.
constexpr int64_t kPackFirstElems = 1 << 18;

// Packs rows [k0, k0 + kc) of B's panel jp (columns [jp * NR, jp * NR + NR)) into dst (kc, NR),
// zero-padding columns past N.
template <typename T>
inline void pack_b_block(const GemmArgs& g, int64_t jp, int64_t k0, int64_t kc, T* dst) {
  constexpr int64_t NR = kNV * Vec<T>::W;
  const T* Bm = static_cast<const T*>(g.b);
  const int64_t j0 = jp * NR, cols = imin(NR, g.N - j0);
  if (!g.b_colmajor) {
    for (int64_t p = 0; p < kc; ++p) {
      std::memcpy(dst + p * NR, Bm + (k0 + p) * g.ldb + j0, sizeof(T) * cols);
      for (int64_t c = cols; c < NR; ++c) dst[p * NR + c] = T(0);
    }
    return;
  }
  // Column-major B (W^T for nn.Linear's (N, K) weight): a transpose, in 16 x 16 blocks that stay in L1.
  for (int64_t c0 = 0; c0 < NR; c0 += 16)
    for (int64_t p0 = 0; p0 < kc; p0 += 16) {
      const int64_t pe = imin(kc, p0 + 16);
      for (int64_t c = c0; c < imin(NR, c0 + 16); ++c) {
        if (c < cols) {
          const T* src = Bm + (j0 + c) * g.ldb + k0;
          for (int64_t p = p0; p < pe; ++p) dst[p * NR + c] = src[p];
        } else {
          for (int64_t p = p0; p < pe; ++p) dst[p * NR + c] = T(0);
        }
      }
    }
}

template <typename T>
int gemm_impl(const GemmArgs& g) {
  constexpr int64_t NR = kNV * Vec<T>::W;
  const int64_t M = g.M, N = g.N, K = g.K;
  const T* A = static_cast<const T*>(g.a);
  const T* bias = static_cast<const T*>(g.bias);
  T* C = static_cast<T*>(g.c);
  const int nt = g.nthreads > 0 ? g.nthreads : 1;
  const int64_t np = (N + NR - 1) / NR, nkb = (K + kGemmKC - 1) / kGemmKC;
  // All of B, packed once: panel jp's rows p at Bp[(jp * K + p) * NR], NR columns each.
  T* Bp = static_cast<T*>(std::aligned_alloc(64, static_cast<size_t>(round_up(np * K * NR * static_cast<int64_t>(sizeof(T)), 64))));
  if (!Bp) return kOutOfMemory;
  // Work items: row blocks x panel groups, at least ~4 per thread so that dynamic scheduling balances.
  const int64_t mb = (M + kGemmMC - 1) / kGemmMC;
  const int64_t want_groups = imin(np, imax(1, (4 * nt + mb - 1) / mb));
  const int64_t pg = (np + want_groups - 1) / want_groups, groups = (np + pg - 1) / pg;
  const int64_t items = mb * groups;
  auto pack_b_item = [&](int64_t t) {
    const int64_t jp = t / nkb, k0 = (t % nkb) * kGemmKC;
    pack_b_block<T>(g, jp, k0, imin(kGemmKC, K - k0), Bp + (jp * K + k0) * NR);
  };
  const bool pack_first = nt == 1 || np * K * NR <= kPackFirstElems;
  if (pack_first)
    for (int64_t t = 0; t < np * nkb; ++t) pack_b_item(t);
  int status = kOk;
#pragma omp parallel num_threads(nt)
  {
    Arena arena(Arena::need<T>(kGemmMC * NR));
    const bool ok = thread_arena_ok(arena, &status);
    T* edge = ok ? arena.take<T>(kGemmMC * NR) : nullptr;  // (MC, NR): tile of the last, partial panel
    // A small B is packed by the calling thread before the region: a parallel packing loop would end in a
    // barrier that waits for the woken thread (~50-90 us under OMP_WAIT_POLICY=PASSIVE here), while the
    // dynamically scheduled products below start at once and take the other thread whenever it arrives.
#pragma omp for schedule(static)
    for (int64_t t = 0; t < (pack_first ? 0 : np * nkb); ++t) pack_b_item(t);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      if (!ok) continue;
      const int64_t i0 = (it / groups) * kGemmMC, rows = imin(kGemmMC, M - i0);
      const int64_t jp_end = imin(np, (it % groups + 1) * pg);
      for (int64_t jp = (it % groups) * pg; jp < jp_end; ++jp) {
        const int64_t j0 = jp * NR, cols = imin(NR, N - j0);
        T* Ct = cols == NR ? C + i0 * N + j0 : edge;
        const int64_t ldt = cols == NR ? N : NR;
        for (int64_t k0 = 0; k0 < K; k0 += kGemmKC) {
          const int64_t kc = imin(kGemmKC, K - k0);
          const T* Bb = Bp + (jp * K + k0) * NR;
          if (g.a_colmajor)
            gemm_panel<T, kNV, true>(rows, kc, A + i0 + k0 * g.lda, g.lda, Bb, NR, Ct, ldt, k0 > 0);
          else
            gemm_panel<T, kNV, false>(rows, kc, A + i0 * g.lda + k0, g.lda, Bb, NR, Ct, ldt, k0 > 0);
        }
        if (cols == NR && !bias) continue;
        for (int64_t r = 0; r < rows; ++r) {
          T* dst = C + (i0 + r) * N + j0;
          const T* src = Ct + r * ldt;
          for (int64_t c = 0; c < cols; ++c) dst[c] = src[c] + (bias ? bias[j0 + c] : T(0));
        }
      }
    }
  }
  std::free(Bp);
  return status;
}

}  // namespace

int linear_small_m(const LinearArgs& a) { return a.dtype == kF64 ? linear_impl<double>(a) : linear_impl<float>(a); }
int gemm(const GemmArgs& g) { return g.dtype == kF64 ? gemm_impl<double>(g) : gemm_impl<float>(g); }

int attention_fwd(const AttnFwdArgs& a) {
  return a.dtype == kF64 ? attention_fwd_impl<double>(a) : attention_fwd_impl<float>(a);
}
int attention_bwd(const AttnBwdArgs& a) {
  return a.dtype == kF64 ? attention_bwd_impl<double>(a) : attention_bwd_impl<float>(a);
}
int topk(const TopkArgs& a) { return topk_impl(a); }

}  // namespace MINILLM_ISA
}  // namespace minillm
