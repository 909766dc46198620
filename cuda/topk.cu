// Host launchers of the top-k kernels (topk.cuh): plan, workspace size, device, stream, errors.
#include "cuda_api.h"
#include "launch_util.cuh"
#include "topk_launch.cuh"

namespace minillm {
namespace cuda_api {

using detail::DeviceScope;
using detail::fail;
using detail::finish;
using detail::limits;

namespace {
bool device_limits(int device, size_t* max_smem, int64_t* target_blocks, int* sm, std::string* error) {
  int sms, major = 0, minor = 0;
  if (!limits(device, max_smem, &sms, error)) return false;
  if (fail(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "device query", error)) return false;
  if (fail(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "device query", error)) return false;
  *sm = 10 * major + minor;
  *target_blocks = 4 * int64_t(sms);  // a few blocks per multiprocessor keep the device busy with few queries
  return true;
}

std::string no_room(int64_t k) {
  return "minillm top-k (CUDA): k = " + std::to_string(k) + " needs more shared memory than this GPU offers";
}
}  // namespace

int64_t topk_workspace_bytes(int64_t Q, int64_t N, int64_t k, int device, std::string* error) {
  DeviceScope scope(device);
  if (fail(scope.status(), "cudaSetDevice", error)) return -1;
  size_t max_smem;
  int64_t target;
  int sm;
  if (!device_limits(device, &max_smem, &target, &sm, error)) return -1;
  cuda::TopkPlan plan;
  if (cuda::topk_make_plan(Q, N, k, max_smem, target, &plan) != cuda::kLaunchOk) {
    *error = no_room(k);
    return -1;
  }
  return int64_t(cuda::topk_workspace_bound(Q, N, k, max_smem, target));
}

int topk(const TopkArgs& a, void* workspace, int64_t workspace_bytes, int device, uintptr_t stream,
         std::string* error) {
  DeviceScope scope(device);
  if (fail(scope.status(), "cudaSetDevice", error)) return 1;
  size_t max_smem;
  int64_t target;
  int sm;
  if (!device_limits(device, &max_smem, &target, &sm, error)) return 1;
  cuda::TopkPlan plan;
  if (cuda::topk_plan_for(a, max_smem, target, sm, &plan) != cuda::kLaunchOk) {
    *error = no_room(a.k);
    return 1;
  }
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
