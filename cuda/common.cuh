// Shared pieces of the CUDA kernels: storage types, warp reductions, the launch macro.
//
// Every kernel body in cuda/*.cuh compiles two ways: with nvcc for the GPU, and with g++ against the
// SIMT emulator of tests/cuda/simt_emu.h (included before this file), which runs them on the CPU in
// the tests. So the kernels use only what the emulator models: __syncthreads, full-warp shuffles,
// __syncwarp, atomics and dynamic shared memory (see cuda/README.md).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"  // csrc/: AttnFwdArgs, AttnBwdArgs, TopkArgs, DType, Metric

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define MINILLM_DEVICE __device__ __forceinline__
#define MINILLM_HD __host__ __device__ __forceinline__
// One dynamic shared-memory buffer per kernel, viewed as floats.
#define MINILLM_SHARED_FLOATS(name)                       \
  extern __shared__ __align__(16) unsigned char minillm_smem_[]; \
  float* name = reinterpret_cast<float*>(minillm_smem_)
#define MINILLM_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
// Fragment arrays stay in registers only when every loop indexing them is unrolled.
#define MINILLM_UNROLL _Pragma("unroll")
// Lets a kernel use more than the default 48 KB of dynamic shared memory; a failure surfaces in the
// launcher's cudaGetLastError().
#define MINILLM_ALLOW_SMEM(kernel, bytes)                                                               \
  ((bytes) > 48 * 1024 ? (void)cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                                                    int(bytes))                                         \
                       : (void)0)
#else
#if !defined(MINILLM_EMULATED_LAUNCH)
#error "compile cuda/*.cuh with nvcc, or include tests/cuda/simt_emu.h first"
#endif
#define MINILLM_DEVICE inline
#define MINILLM_HD inline
#define MINILLM_SHARED_FLOATS(name) float* name = static_cast<float*>(::simt::dynamic_smem())
#define MINILLM_LAUNCH MINILLM_EMULATED_LAUNCH
#define MINILLM_UNROLL
#define MINILLM_ALLOW_SMEM(kernel, bytes) ((void)(bytes))
#endif

namespace minillm {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// 16-bit storage types as raw bits, so the kernel bodies need no CUDA headers under g++.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

MINILLM_DEVICE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

MINILLM_DEVICE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

MINILLM_DEVICE float to_float(float x) { return x; }
MINILLM_DEVICE float to_float(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
MINILLM_DEVICE float to_float(f16 x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return float(h);
#endif
}

template <typename T>
MINILLM_DEVICE T from_float(float x);
template <>
MINILLM_DEVICE float from_float<float>(float x) {
  return x;
}
template <>
MINILLM_DEVICE bf16 from_float<bf16>(float x) {
  // Round to nearest even, as torch does; NaN stays a quiet NaN.
  uint32_t u = float_to_bits(x);
  if (x != x) return bf16{uint16_t(0x7fc0)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}
template <>
MINILLM_DEVICE f16 from_float<f16>(float x) {
#if defined(__CUDA_ARCH__)
  return f16{__half_as_ushort(__float2half_rn(x))};
#else
  const _Float16 h = static_cast<_Float16>(x);
  f16 out;
  std::memcpy(&out.bits, &h, 2);
  return out;
#endif
}

// Max that propagates NaN, so a NaN score at a visible position reaches the output.
MINILLM_DEVICE float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// Butterfly reductions: every lane ends with the result.
MINILLM_DEVICE float warp_max(float v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v = nan_max(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

MINILLM_DEVICE float warp_sum(float v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

MINILLM_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
MINILLM_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
MINILLM_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit

// Launch failures that the launchers report before touching the GPU.
enum LaunchStatus : int { kLaunchOk = 0, kTooMuchSharedMemory = 10, kUnsupportedShape = 11 };

}  // namespace cuda
}  // namespace minillm
