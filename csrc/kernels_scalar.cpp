// Baseline level: the architecture's default flags (SSE2 on x86-64, NEON on aarch64) with 16-byte
// generic vectors; the only level compiled on non-x86 machines.
#define MINILLM_ISA scalar
#define MINILLM_VBYTES 16
// Each header ends with its op's entry point for this level (declared in kernels.h).
#include "cpu/attention_bwd.h"
#include "cpu/attention_fwd.h"
#include "cpu/gemm.h"
#include "cpu/layer_norm.h"
#include "cpu/linear_quant.h"
#include "cpu/topk.h"
