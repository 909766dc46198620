// Launch templates of the tensor-core attention kernels, and the rule that picks them: 16-bit inputs on sm_80
// or newer, D a multiple of 8 up to 128, rows that cp.async can copy (16-byte aligned pointers and row
// strides), no additive bias, and the shared memory the tile sizes need.
#pragma once

#include "attention.cuh"
#include "flash_bwd.cuh"

namespace minillm {
namespace cuda {

MINILLM_HD bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Rows of a (b, h, n) strided operand start on 16 bytes for every index: base aligned, strides multiples of 8.
MINILLM_HD bool rows_aligned16(const void* p, const int64_t* stride) {
  return aligned16(p) && stride[0] % 8 == 0 && stride[1] % 8 == 0 && stride[2] % 8 == 0;
}

MINILLM_HD int flash_head_dim(int64_t D) { return D <= 64 ? 64 : 128; }

template <typename Args>
MINILLM_HD bool flash_common_ok(const Args& a, int sm) {
  return sm >= 80 && (a.dtype == kBF16 || a.dtype == kF16) && a.D >= 8 && a.D <= 128 && a.D % 8 == 0 &&
         a.mods.bias == nullptr && a.mods.dbias == nullptr;
}

inline bool flash_fwd_ok(const AttnFwdArgs& a, int sm, size_t max_smem) {
  const size_t smem = flash_head_dim(a.D) == 64 ? FlashTraits<64>::kSmemFwd : FlashTraits<128>::kSmemFwd;
  return flash_common_ok(a, sm) && smem <= max_smem && rows_aligned16(a.q, a.q_stride) &&
         rows_aligned16(a.k, a.k_stride) && rows_aligned16(a.v, a.v_stride);
}

inline bool flash_bwd_ok(const AttnBwdArgs& a, int sm, size_t max_smem) {
  const bool d64 = flash_head_dim(a.D) == 64;
  const size_t smem = d64 ? (FlashTraits<64>::kSmemBwdDq > FlashTraits<64>::kSmemBwdDkdv ? FlashTraits<64>::kSmemBwdDq
                                                                                         : FlashTraits<64>::kSmemBwdDkdv)
                          : (FlashTraits<128>::kSmemBwdDq > FlashTraits<128>::kSmemBwdDkdv ? FlashTraits<128>::kSmemBwdDq
                                                                                           : FlashTraits<128>::kSmemBwdDkdv);
  return flash_common_ok(a, sm) && smem <= max_smem && rows_aligned16(a.q, a.q_stride) &&
         rows_aligned16(a.k, a.k_stride) && rows_aligned16(a.v, a.v_stride) && rows_aligned16(a.dout, a.do_stride);
}

template <typename T, int kD>
int flash_fwd_launch_t(const AttnFwdArgs& a, cudaStream_t stream) {
  using Tr = FlashTraits<kD>;
  const int64_t grid = a.B * a.H * ceil_div(a.Nq, Tr::kBlockM);
  if (grid > kMaxGrid) return kUnsupportedShape;
  auto kernel = flash_fwd_kernel<T, kD>;
  MINILLM_ALLOW_SMEM(kernel, Tr::kSmemFwd);
  MINILLM_LAUNCH(kernel, dim3(unsigned(grid)), dim3(Tr::kThreads), Tr::kSmemFwd, stream, a);
  return kLaunchOk;
}

template <typename T, int kD>
int flash_bwd_launch_t(const AttnBwdArgs& a, float* delta, cudaStream_t stream) {
  using Tr = FlashTraits<kD>;
  const int64_t Hkv = a.Hkv > 0 ? a.Hkv : a.H;
  const int64_t grid_kv = a.B * Hkv * ceil_div(a.Nk, Tr::kBlockN), grid_q = a.B * a.H * ceil_div(a.Nq, Tr::kBlockM);
  const int64_t grid_delta = ceil_div(a.B * a.H * a.Nq, kAttnWarps);
  if (grid_kv > kMaxGrid || grid_q > kMaxGrid || grid_delta > kMaxGrid) return kUnsupportedShape;
  auto delta_kernel = attention_bwd_delta_kernel<T>;
  auto kv_kernel = flash_bwd_dkdv_kernel<T, kD>;
  auto q_kernel = flash_bwd_dq_kernel<T, kD>;
  MINILLM_ALLOW_SMEM(kv_kernel, Tr::kSmemBwdDkdv);
  MINILLM_ALLOW_SMEM(q_kernel, Tr::kSmemBwdDq);
  const float* delta_c = delta;
  MINILLM_LAUNCH(delta_kernel, dim3(unsigned(grid_delta)), dim3(kAttnThreads), 0, stream, a, delta);
  MINILLM_LAUNCH(kv_kernel, dim3(unsigned(grid_kv)), dim3(Tr::kThreads), Tr::kSmemBwdDkdv, stream, a, delta_c);
  MINILLM_LAUNCH(q_kernel, dim3(unsigned(grid_q)), dim3(Tr::kThreads), Tr::kSmemBwdDq, stream, a, delta_c);
  return kLaunchOk;
}

inline int flash_fwd_launch(const AttnFwdArgs& a, cudaStream_t stream) {
  const bool d64 = flash_head_dim(a.D) == 64;
  if (a.dtype == kBF16) return d64 ? flash_fwd_launch_t<bf16, 64>(a, stream) : flash_fwd_launch_t<bf16, 128>(a, stream);
  return d64 ? flash_fwd_launch_t<f16, 64>(a, stream) : flash_fwd_launch_t<f16, 128>(a, stream);
}

inline int flash_bwd_launch(const AttnBwdArgs& a, float* delta, cudaStream_t stream) {
  const bool d64 = flash_head_dim(a.D) == 64;
  if (a.dtype == kBF16)
    return d64 ? flash_bwd_launch_t<bf16, 64>(a, delta, stream) : flash_bwd_launch_t<bf16, 128>(a, delta, stream);
  return d64 ? flash_bwd_launch_t<f16, 64>(a, delta, stream) : flash_bwd_launch_t<f16, 128>(a, delta, stream);
}

// The attention launchers the .cu wrappers and the emulator call: the tensor-core kernels where flash_*_ok
// holds (unless `simt_only`), else the SIMT kernels of attention.cuh (plain attention only). `sm`: the
// device's compute capability as 10 * major + minor.
inline int attention_fwd_launch(const AttnFwdArgs& a, cudaStream_t stream, size_t max_smem, int sm,
                                bool simt_only = false) {
  if (!simt_only && flash_fwd_ok(a, sm, max_smem)) return flash_fwd_launch(a, stream);
  return attention_fwd_launch_simt(a, stream, max_smem);
}

inline int attention_bwd_launch(const AttnBwdArgs& a, float* delta, cudaStream_t stream, size_t max_smem, int sm,
                                bool simt_only = false) {
  if (!simt_only && flash_bwd_ok(a, sm, max_smem)) return flash_bwd_launch(a, delta, stream);
  return attention_bwd_launch_simt(a, delta, stream, max_smem);
}

}  // namespace cuda
}  // namespace minillm
