// The kernel entry points of one SIMD level (declared in kernels.h): each picks the dtype's instantiation.
#pragma once
#include "cpu/attention_fwd.h"
#include "cpu/attention_bwd.h"
#include "cpu/topk.h"
#include "cpu/linear.h"
#include "cpu/gemm.h"

namespace minillm {
namespace MINILLM_ISA {

int linear_small_m(const LinearArgs& a) { return a.dtype == kF64 ? linear_impl<double>(a) : linear_impl<float>(a); }
int gemm(const GemmArgs& g) { return g.dtype == kF64 ? gemm_impl<double>(g) : gemm_impl<float>(g); }

int attention_fwd(const AttnFwdArgs& a) {
  return a.dtype == kF64 ? attention_fwd_impl<double>(a) : attention_fwd_impl<float>(a);
}
int attention_bwd(const AttnBwdArgs& a) {
  return a.dtype == kF64 ? attention_bwd_impl<double>(a) : attention_bwd_impl<float>(a);
}
int topk(const TopkArgs& a) { return topk_impl(a); }

}  // namespace MINILLM_ISA
}  // namespace minillm
