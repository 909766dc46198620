// AVX2 + FMA level; compiled with -mavx2 -mfma -mf16c (see CMakeLists.txt), run only when the CPU has them.
#define MINILLM_ISA avx2
#define MINILLM_VBYTES 32
// Each header ends with its op's entry point for this level (declared in kernels.h).
#include "cpu/attention_bwd.h"
#include "cpu/attention_fwd.h"
#include "cpu/gemm.h"
#include "cpu/layer_norm.h"
#include "cpu/linear_quant.h"
#include "cpu/topk.h"
