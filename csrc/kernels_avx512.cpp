// AVX-512 level (F, BW, VL, DQ + FMA); compiled with the matching -m flags (see CMakeLists.txt), run only
// when the CPU and OS support them.
#define MINILLM_ISA avx512
#define MINILLM_VBYTES 64
// Each header ends with its op's entry point for this level (declared in kernels.h).
#include "cpu/attention_bwd.h"
#include "cpu/attention_fwd.h"
#include "cpu/gemm.h"
#include "cpu/layer_norm.h"
#include "cpu/linear_quant.h"
#include "cpu/topk.h"
