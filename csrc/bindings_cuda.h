// The CUDA bindings, for csrc/bindings.cpp (inside its anonymous namespace, after the CPU bindings whose
// argument structs, field lists and argument builders they share): the same keywords on device pointers, plus
// the device index, the caller's stream and the launchers' scratch. Empty without MINILLM_WITH_CUDA.
#pragma once
#ifdef MINILLM_WITH_CUDA

// Runs a CUDA launcher without the GIL; its message becomes a RuntimeError.
template <typename F>
void run_cuda(F&& launch) {
  std::string error;
  int status;
  {
    py::gil_scoped_release nogil;
    status = launch(&error);
  }
  if (status != 0) throw std::runtime_error(error);
}

// minillm/ops/attention.py passes kv_heads and mods on every call; the outputs are contiguous (no *_strides).
std::array<Field<AttnFwdIn>, 19> cuda_attention_fwd_fields = {{MINILLM_ATTN_FWD_FIELDS(AttnFwdIn),
                                                                MINILLM_FIELD(AttnFwdIn, device),
                                                                MINILLM_FIELD(AttnFwdIn, stream),
                                                                MINILLM_OPTIONAL(AttnFwdIn, kv_heads),
                                                                MINILLM_OPTIONAL(AttnFwdIn, mods)}};

// No CUDA kernel takes an additive bias; grouped-query heads and the other modifiers run on the tensor-core
// kernels, and the launchers refuse (with a message) what neither kernel takes.
void require_no_bias(const minillm::AttnMods& m) {
  require(!m.bias && !m.dbias, "the CUDA attention kernels take no mods.bias or mods.dbias");
}

void cuda_attention_fwd(const AttnFwdIn& in) {
  const AttnFwdArgs a = fwd_args(in);
  require_no_bias(a.mods);
  run_cuda([&](std::string* e) { return minillm::cuda_api::attention_fwd(a, in.device, in.stream, e); });
}

std::array<Field<AttnBwdIn>, 27> cuda_attention_bwd_fields = {{MINILLM_ATTN_BWD_FIELDS(AttnBwdIn),
                                                                MINILLM_FIELD(AttnBwdIn, delta),
                                                                MINILLM_FIELD(AttnBwdIn, device),
                                                                MINILLM_FIELD(AttnBwdIn, stream),
                                                                MINILLM_OPTIONAL(AttnBwdIn, kv_heads),
                                                                MINILLM_OPTIONAL(AttnBwdIn, mods)}};

void cuda_attention_bwd(const AttnBwdIn& in) {
  const AttnBwdArgs a = bwd_args(in);
  require_no_bias(a.mods);
  float* scratch = checked<float*>(in.delta, "delta", 4, {dense({in.sizes[0], in.sizes[1], in.sizes[2]})});
  run_cuda([&](std::string* e) { return minillm::cuda_api::attention_bwd(a, scratch, in.device, in.stream, e); });
}

std::array<Field<TopkIn>, 14> cuda_topk_fields = {{MINILLM_TOPK_FIELDS(TopkIn), MINILLM_FIELD(TopkIn, workspace),
                                                   MINILLM_FIELD(TopkIn, device), MINILLM_FIELD(TopkIn, stream)}};

void cuda_topk(const TopkIn& in) {
  const TopkArgs a = topk_args(in);
  const Buf& w = in.workspace;
  require(w.bytes >= 0 && (w.ptr != 0 || w.bytes == 0), "workspace: bad buffer");
  // The launcher compares the workspace's bytes with what its plan needs (cuda_topk_workspace).
  run_cuda([&](std::string* e) {
    return minillm::cuda_api::topk(a, reinterpret_cast<void*>(w.ptr), w.bytes, in.device, in.stream, e);
  });
}
#endif  // MINILLM_WITH_CUDA
