// Host launchers of the attention kernels (attention.cuh): device, shared-memory limit, stream, errors.
#include "cuda_api.h"
#include "flash_launch.cuh"
#include "launch_util.cuh"

namespace minillm {
namespace cuda_api {

using detail::DeviceScope;
using detail::fail;
using detail::finish;
using detail::limits;

namespace {
int compute_capability(int device, int* sm, std::string* error) {
  int major = 0, minor = 0;
  if (fail(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "device query", error)) return 0;
  if (fail(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "device query", error)) return 0;
  *sm = 10 * major + minor;
  return 1;
}

constexpr const char* kNoKernel =
    "no CUDA attention kernel takes these arguments: grouped-query heads and score modifiers run on the "
    "tensor-core kernels only (bf16/fp16, head dim a multiple of 8 up to 128, 16-byte aligned rows, sm_80 or "
    "newer), and no CUDA kernel takes an additive bias";
}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

int attention_fwd(const AttnFwdArgs& a, int device, uintptr_t stream, std::string* error) {
  DeviceScope scope(device);
  if (fail(scope.status(), "cudaSetDevice", error)) return 1;
  size_t max_smem;
  int sms;
  int sm;
  if (!limits(device, &max_smem, &sms, error) || !compute_capability(device, &sm, error)) return 1;
  const int status = cuda::attention_fwd_launch(a, reinterpret_cast<cudaStream_t>(stream), max_smem, sm);
  if (status == cuda::kUnsupportedShape) {
    *error = kNoKernel;
    return status;
  }
  return finish(status, "minillm attention forward (CUDA)", error);
}

int attention_bwd(const AttnBwdArgs& a, float* delta, int device, uintptr_t stream, std::string* error) {
  DeviceScope scope(device);
  if (fail(scope.status(), "cudaSetDevice", error)) return 1;
  size_t max_smem;
  int sms;
  int sm;
  if (!limits(device, &max_smem, &sms, error) || !compute_capability(device, &sm, error)) return 1;
  const int status = cuda::attention_bwd_launch(a, delta, reinterpret_cast<cudaStream_t>(stream), max_smem, sm);
  if (status == cuda::kUnsupportedShape) {
    *error = kNoKernel;
    return status;
  }
  return finish(status, "minillm attention backward (CUDA)", error);
}

}  // namespace cuda_api
}  // namespace minillm
