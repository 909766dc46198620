// Host-side helpers of the .cu launchers: device scope, error text, device limits.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "common.cuh"

namespace minillm {
namespace cuda_api {
namespace detail {

// Sets `device` for the scope of one call and restores the caller's device afterwards.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    cudaGetDevice(&previous_);
    status_ = cudaSetDevice(device);
  }
  ~DeviceScope() {
    cudaSetDevice(previous_);
    cudaGetLastError();  // a failure here (no device at all) must not leak into the next call
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = 0;
  cudaError_t status_;
};

inline bool fail(cudaError_t e, const char* what, std::string* error) {
  if (e == cudaSuccess) return false;
  *error = std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  cudaGetLastError();  // clear a non-sticky error so later calls start clean
  return true;
}

inline bool limits(int device, size_t* max_smem, int* sms, std::string* error) {
  int optin = 0, count = 0;
  if (fail(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "device query", error))
    return false;
  if (fail(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "device query", error)) return false;
  *max_smem = size_t(optin);
  *sms = count;
  return true;
}

inline int finish(int status, const char* what, std::string* error) {
  if (status == cuda::kTooMuchSharedMemory) {
    *error = std::string(what) + ": needs more shared memory per block than this GPU offers";
    return status;
  }
  if (status == cuda::kUnsupportedShape) {
    *error = std::string(what) + ": shape or dtype outside what the CUDA kernel supports";
    return status;
  }
  if (fail(cudaGetLastError(), what, error)) return 1;
  return 0;
}

}  // namespace detail
}  // namespace cuda_api
}  // namespace minillm
