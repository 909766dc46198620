// Element conversions (bf16, fp16, int8 to and from fp32) and whole-row loads and stores.
#pragma once
#include <type_traits>
#include "bf16.h"
#include "cpu/vec.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// ---- dtype conversion (round to nearest even, NaN kept); bf16_to_f32 and f32_to_bf16 are csrc/bf16.h's ----
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

#if defined(__AVX512BW__)
// n fp32 values to bf16 by vcvtneps2bf16 (round to nearest even, NaN kept, as f32_to_bf16), for CPUs with
// AVX512-BF16 (callers check use_bf16_dot()).
__attribute__((target("avx512bf16,avx512bw,avx512f"))) inline void f32_to_bf16_row(const float* src, int64_t n,
                                                                                   uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}
#endif

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
