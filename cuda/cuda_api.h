// Host entry points of the CUDA kernels, for csrc/bindings.cpp (plain C++: no CUDA headers).
//
// Pointers are device pointers of the given device; `stream` is the caller's cudaStream_t as an
// integer (torch.cuda.current_stream().cuda_stream). Each call sets the device for its duration,
// launches asynchronously on the stream, and returns 0 or fills `error` with a message.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "kernels.h"

namespace minillm {
namespace cuda_api {

// Devices the CUDA runtime sees; 0 without a GPU or driver (never an error).
int device_count();

int attention_fwd(const AttnFwdArgs& a, int device, uintptr_t stream, std::string* error);

// `delta`: device scratch of B * H * Nq floats.
int attention_bwd(const AttnBwdArgs& a, float* delta, int device, uintptr_t stream, std::string* error);

// Device scratch bytes topk() needs for these sizes, or -1 (with `error`) when k does not fit.
int64_t topk_workspace_bytes(int64_t Q, int64_t N, int64_t k, int device, std::string* error);

// `workspace`: `workspace_bytes` of device scratch, at least topk_workspace_bytes() (checked).
int topk(const TopkArgs& a, void* workspace, int64_t workspace_bytes, int device, uintptr_t stream, std::string* error);

}  // namespace cuda_api
}  // namespace minillm
