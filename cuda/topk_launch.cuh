// Launch of the top-k kernels: the plan (the tensor-core scan of topk_mma.cuh for many queries over a 16-bit
// corpus it can copy by cp.async, else the SIMT scan of topk.cuh), then the scan and, when the corpus is split
// across blocks, the merge.
#pragma once

#include "topk_mma.cuh"

namespace minillm {
namespace cuda {

// The plan for these arguments; `sm`: the device's compute capability (10 major + minor), `simt_only` keeps
// the SIMT scan (tests, and timing one kernel against the other).
inline int topk_plan_for(const TopkArgs& a, size_t max_smem, int64_t target_blocks, int sm, TopkPlan* plan,
                         bool simt_only = false) {
  if (!simt_only && topk_mma_ok(a, sm) &&
      topk_make_plan_mma(a.Q, a.N, a.k, a.d, max_smem, target_blocks, plan) == kLaunchOk)
    return kLaunchOk;
  return topk_make_plan(a.Q, a.N, a.k, max_smem, target_blocks, plan);
}

// An upper bound of the scratch either plan needs, for callers that allocate before they know the arguments:
// the tensor-core plan's scratch does not depend on d, only whether it fits does (least at d = 8).
inline size_t topk_workspace_bound(int64_t Q, int64_t N, int64_t k, size_t max_smem, int64_t target_blocks) {
  TopkPlan simt, mma;
  size_t bytes = 0;
  if (topk_make_plan(Q, N, k, max_smem, target_blocks, &simt) == kLaunchOk) bytes = topk_workspace_bytes(simt, Q, k);
  if (topk_make_plan_mma(Q, N, k, 8, max_smem, target_blocks, &mma) == kLaunchOk) {
    const size_t m = topk_workspace_bytes(mma, Q, k);
    bytes = m > bytes ? m : bytes;
  }
  return bytes;
}

// Launches the scan (and the merge when the corpus is split). `workspace` holds
// topk_workspace_bytes(plan, Q, k) bytes of device memory (may be null when that is 0).
inline int topk_launch(const TopkArgs& a, const TopkPlan& p, void* workspace, cudaStream_t stream) {
  const int64_t grid = ceil_div(a.Q, p.qb) * p.parts;
  if (grid > kMaxGrid || a.Q > kMaxGrid) return kUnsupportedShape;
  float* part_keys = nullptr;
  int64_t* part_ids = nullptr;
  if (p.parts > 1) {
    part_ids = static_cast<int64_t*>(workspace);
    part_keys = reinterpret_cast<float*>(part_ids + a.Q * p.parts * a.k);
  }
#define MINILLM_SCAN(KERNEL)                                                                           \
  {                                                                                                    \
    auto kernel = KERNEL;                                                                              \
    MINILLM_ALLOW_SMEM(kernel, p.smem);                                                                \
    MINILLM_LAUNCH(kernel, dim3(unsigned(grid)), dim3(kTopkThreads), p.smem, stream, a, p, part_keys, part_ids); \
    break;                                                                                             \
  }
  switch (a.dtype) {
    case kF32:
      if (p.mma) return kUnsupportedShape;  // the tensor-core scan takes 16-bit corpora only
      MINILLM_SCAN(topk_scan_kernel<float>)
    case kBF16: MINILLM_SCAN(p.mma ? topk_mma_scan_kernel<bf16> : topk_scan_kernel<bf16>)
    case kF16: MINILLM_SCAN(p.mma ? topk_mma_scan_kernel<f16> : topk_scan_kernel<f16>)
    default: return kUnsupportedShape;
  }
#undef MINILLM_SCAN
  if (p.parts > 1) {
    auto merge = topk_merge_kernel;
    const float* pk = part_keys;
    const int64_t* pi = part_ids;
    MINILLM_ALLOW_SMEM(merge, p.merge_smem);
    MINILLM_LAUNCH(merge, dim3(unsigned(a.Q)), dim3(kTopkThreads), p.merge_smem, stream, a, p, pk, pi);
  }
  return kLaunchOk;
}

}  // namespace cuda
}  // namespace minillm
