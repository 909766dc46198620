// Host launchers of the attention kernels (attention.cuh): device, shared-memory limit, stream, errors.
#include "attention.cuh"
#include "cuda_api.h"
#include "launch_util.cuh"

namespace minillm {
namespace cuda_api {

using detail::DeviceScope;
using detail::fail;
using detail::finish;
using detail::limits;

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
  if (!limits(device, &max_smem, &sms, error)) return 1;
  const int status = cuda::attention_fwd_launch(a, reinterpret_cast<cudaStream_t>(stream), max_smem);
  return finish(status, "minillm attention forward (CUDA)", error);
}

int attention_bwd(const AttnBwdArgs& a, float* delta, int device, uintptr_t stream, std::string* error) {
  DeviceScope scope(device);
  if (fail(scope.status(), "cudaSetDevice", error)) return 1;
  size_t max_smem;
  int sms;
  if (!limits(device, &max_smem, &sms, error)) return 1;
  const int status = cuda::attention_bwd_launch(a, delta, reinterpret_cast<cudaStream_t>(stream), max_smem);
  return finish(status, "minillm attention backward (CUDA)", error);
}

}  // namespace cuda_api
}  // namespace minillm
