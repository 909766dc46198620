// bf16 <-> fp32 for single values (round to nearest even, NaN kept quiet), shared by the per-SIMD-level kernels
// (csrc/cpu/convert.h) and csrc/decode.cpp. Internal linkage: each translation unit keeps its own copy, so the
// linker never hands code compiled for one SIMD level to another (see csrc/cpu/vec.h).
#pragma once
#include <cstdint>
#include <cstring>

namespace minillm {
namespace {

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
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

}  // namespace
}  // namespace minillm
