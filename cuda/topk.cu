// Host launchers of the top-k kernels (topk.cuh): plan, workspace size, device, stream, errors.
#include "cuda_api.h"
#include "launch_util.cuh"
#include "topk.cuh"

namespace minillm {
namespace cuda_api {

using detail::DeviceScope;
using detail::fail;
using detail::finish;
using detail::limits;

namespace {
bool plan_for(int64_t Q, int64_t N, int64_t k, int device, cuda::TopkPlan* plan, std::string* error) {
  size_t max_smem;
  int sms;
  if (!limits(device, &max_smem, &sms, error)) return false;
  // A few blocks per multiprocessor keep the device busy when there are few queries.
  if (cuda::topk_make_plan(Q, N, k, max_smem, 4 * int64_t(sms), plan) != cuda::kLaunchOk) {
    *error = "minillm top-k (CUDA): k = " + std::to_string(k) + " needs more shared memory than this GPU offers";
    return false;
  }
  return true;
}
}  // namespace

int64_t topk_workspace_bytes(int64_t Q, int64_t N, int64_t k, int device, std::string* error) {
  DeviceScope scope(device);
  if (fail(scope.status(), "cudaSetDevice", error)) return -1;
  cuda::TopkPlan plan;
  if (!plan_for(Q, N, k, device, &plan, error)) return -1;
  return int64_t(cuda::topk_workspace_bytes(plan, Q, k));
}

int topk(const TopkArgs& a, void* workspace, int64_t workspace_bytes, int device, uintptr_t stream,
         std::string* error) {
  DeviceScope scope(device);
  if (fail(scope.status(), "cudaSetDevice", error)) return 1;
  cuda::TopkPlan plan;
  if (!plan_for(a.Q, a.N, a.k, device, &plan, error)) return 1;
  const int64_t need = int64_t(cuda::topk_workspace_bytes(plan, a.Q, a.k));
  if (workspace_bytes < need || (need > 0 && workspace == nullptr)) {
    *error = "minillm top-k (CUDA): the workspace holds " + std::to_string(workspace_bytes) + " bytes, the plan needs " +
             std::to_string(need);
    return 1;
  }
  const int status = cuda::topk_launch(a, plan, workspace, reinterpret_cast<cudaStream_t>(stream));
  return finish(status, "minillm top-k (CUDA)", error);
}

}  // namespace cuda_api
}  // namespace minillm
