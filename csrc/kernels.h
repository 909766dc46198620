// Kernel entry points shared by every SIMD level.
//
// The Python layer owns all argument checking; these structs carry raw pointers, sizes and
// element strides only, so this code never touches a Python object or libtorch.
#pragma once
#include <cstdint>

namespace minillm {

// Storage dtype of tensors handed to a kernel. Accumulation is fp32 for F32/BF16/F16/I8 and fp64 for F64.
// I8 is only a top-k corpus format: int8 codes with one fp32 scale per row.
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3, kI8 = 4 };

enum Metric : int { kIP = 0, kCosine = 1, kL2 = 2 };

// Bytes of one stored element of a DType.
inline int64_t elem_size(int dtype) { return dtype == kF64 ? 8 : dtype == kF32 ? 4 : dtype == kI8 ? 1 : 2; }

// A kI8 corpus row is read in whole blocks of this many columns (codes zero-padded to a multiple of it).
constexpr int64_t kI8Pad = 64;

// Status codes returned by kernels (0 = ok).
enum Status : int { kOk = 0, kOutOfMemory = 1, kBadArgs = 2 };  // kBadArgs: a layout the kernel does not take (the bindings check first)

// Score modifiers of an attention call, flash-attention's (a zero-initialised struct, with both window sides
// -1, changes nothing). With off = causal_offset, key j is visible to query i only inside the window
// [i + off - window_left, i + off + window_right] (-1: unbounded on that side; causal caps the right side at 0),
// and the score is
//   s_ij = softcap * tanh(scale q_i.k_j / softcap) (softcap > 0; else scale q_i.k_j)
//          - alibi[b, h] * |i + off - j| + bias[b, h, i, j],
// with exp(sinks[h]) added to every softmax denominator (a learned logit with no value row; forward only,
// the backward reads it through lse).
struct AttnMods {
  int64_t window_left, window_right;
  double softcap;
  const void* alibi;  // (B, H) contiguous, accumulation type, or nullptr
  const void* bias;   // accumulation type with element strides bias_stride for (b, h, i, j), or nullptr
  int64_t bias_stride[4];
  const void* sinks;  // (H) accumulation type, or nullptr
  void* dbias;        // backward: (B, H, Nq, Nk) contiguous accumulation type, gets dL/ds_ij; or nullptr
};

// Attention forward. q: (B, H, Nq, D), k/v: (B, Hkv, Nk, D), each with element strides for (b, h, n)
// and unit stride along D. out: (B, H, Nq, D) of the input dtype, element strides o_stride for (b, h, n) and
// unit stride along D; o_stride[2] == 0 (as zero-initialised) means contiguous; lse: contiguous (B, H, Nq) in the
// accumulation type (float, or double for F64).
// Key j is visible to query i when kpm[b*Nk + j] != 0 (if kpm is set) and, if causal,
// j <= i + causal_offset. A query with qpm[b*Nq + i] == 0 (if qpm is set) is not computed: out = 0,
// lse = +inf, and zero gradients, like a query that sees no key.
struct AttnFwdArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  void* lse;
  const uint8_t* kpm;  // (B, Nk) contiguous or nullptr
  const uint8_t* qpm;  // (B, Nq) contiguous or nullptr
  int64_t B, H, Nq, Nk, D;
  // Key/value heads (grouped-query attention): query head h reads key/value head h / (H / Hkv); H % Hkv == 0.
  // 0 means H (one key/value head per query head). The CUDA kernels take Hkv = H only.
  int64_t Hkv;
  int64_t q_stride[3], k_stride[3], v_stride[3];
  int64_t o_stride[3];  // of out; {0, 0, 0}: contiguous
  bool causal;
  int64_t causal_offset;
  double scale;
  AttnMods mods;
  int dtype;
  int nthreads;
};

// Attention backward. dout/out are strided like q; dlse (optional) and lse are contiguous
// (B, H, Nq) in the accumulation type. dq: (B, H, Nq, D), dk/dv: (B, Hkv, Nk, D), of the input dtype
// (grouped-query attention sums each key/value head's gradient over its query heads), with element strides
// dq_stride / dk_stride / dv_stride for (b, h, n) and unit stride along D; a stride triple with [2] == 0 (as
// zero-initialised) means contiguous. The three may be slices of one buffer (q/k/v packed in one projection).
struct AttnBwdArgs {
  const void* dout;
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* lse;
  const void* dlse;  // nullptr when the log-sum-exp output had no gradient
  const uint8_t* kpm;
  const uint8_t* qpm;
  void* dq;
  void* dk;
  void* dv;
  int64_t B, H, Nq, Nk, D;
  int64_t Hkv;  // as in AttnFwdArgs; 0 means H
  int64_t do_stride[3], q_stride[3], k_stride[3], v_stride[3], o_stride[3];
  int64_t dq_stride[3], dk_stride[3], dv_stride[3];  // of the outputs; {0, 0, 0}: contiguous
  bool causal;
  int64_t causal_offset;
  double scale;
  AttnMods mods;
  int dtype;
  int nthreads;
};

// Exact top-k. queries: contiguous fp32 (Q, d). corpus: (N, d) rows of the given dtype with
// row stride corpus_stride (elements), unit stride along d. Outputs contiguous (Q, k).
// kI8 corpus: row j is row_scale[j] * codes[j], with codes zero-padded to a multiple of 64 columns
// (corpus_stride >= that) and row_norm2[j] its squared norm (cosine, l2); scores are then approximate.
struct TopkArgs {
  const float* queries;
  const void* corpus;
  int64_t corpus_stride;
  int dtype;  // kF32, kBF16, kF16 or kI8
  const float* row_scale;  // kI8 only
  const float* row_norm2;  // kI8 only
  int64_t Q, N, d, k;
  int metric;
  float* out_scores;
  int64_t* out_idx;
  int nthreads;
};

// y (M, N) = x (M, K) W^T + b for few rows M (decoding): W (N, K) row-major as in nn.Linear, read once.
// x has row stride ldx and unit column stride; y and b are contiguous; b may be null. F32, F64 or BF16 (x, W, b
// and y all bf16; sums in fp32, y rounded once).
struct LinearArgs {
  const void* x;
  const void* w;
  const void* b;
  void* y;
  int64_t M, K, N, ldx;
  int dtype;
  int nthreads;
};

// A weight (N, K) stored as codes (csrc/cpu/linear_quant.h has the layouts): bits 16, bf16 (N, K) (linear_quant
// only: fp32 x and y); bits 8 with group 0, int8 codes (N, K) and a scale (N) per row; bits 8 with a group, uint8
// codes (N, K) with a scale and an offset (N, K / group) per group of `group` (a multiple of 32 dividing K)
// consecutive columns; bits 4, K / 2 bytes per row of 4-bit codes with a scale and an offset per group likewise.
struct QuantWeight {
  const void* codes;
  const float* scale;
  const float* offset;  // grouped codes only
  int64_t N, K;
  int bits;
  int64_t group;  // 0: one scale per row (bits 8 only)
};

// y (M, N) fp32 = x (M, K) fp32 W^T + bias for few rows M, W given by its codes and streamed once. x has row stride
// ldx and unit column stride; y and bias (N, may be null) are contiguous.
struct QLinearArgs {
  const void* x;
  int64_t ldx;
  QuantWeight w;
  const float* bias;
  void* y;
  int64_t M;
  int nthreads;
};

// One decoding step through a Llama-family stack (pre-norm RMSNorm, rotary q/k, grouped-query attention over a KV
// cache, SwiGLU MLP, no biases), every layer in one call: x (B, C) fp32, the new token of each sequence, is updated in
// place. csrc/decode.cpp runs the layers with the kernels above (linear_small_m, linear_quant, attention_fwd); the
// Python twin is DecoderOnlyModel's module path (minillm/models/decoder.py).
struct DecodeWeight {
  int bits;          // 32: fp32 (N, K) row-major in w; 16: bf16 (N, K); 8 or 4: codes as QuantWeight
  const void* w;     // fp32 weight or codes
  const float* scale;
  const float* offset;
  int64_t N, K, group;
};
struct DecodeLayer {
  const float* norm1;  // (C)
  DecodeWeight qkv;    // ((H + 2 Hkv) Dh, C): q heads, then k heads, then v heads
  DecodeWeight proj;   // (C, H Dh)
  const float* norm2;  // (C)
  DecodeWeight fc;     // (2 F, C): gate rows, then up rows
  DecodeWeight down;   // (C, F)
  void* k_cache;       // (B, Hkv, capacity, Dh) contiguous, fp32 or bf16 (cache_dtype): the step writes row cache_len
  void* v_cache;
};
struct DecodeArgs {
  float* x;                  // (B, C)
  const float* cos;          // (B, Dh): each sequence's rotary tables at its new position
  const float* sin;
  const uint8_t* kpm;        // (B, cache_len + 1) key padding or nullptr
  const DecodeLayer* layers;
  float* scratch;            // decode_scratch_floats(...) floats
  int64_t L, B, C, H, Hkv, Dh, F, cache_len, capacity;
  double eps, scale;
  int cache_dtype;           // kF32, or kBF16 (a bf16 model: q is rounded to bf16 for the attention call, as the
                             // cache's keys are; every other activation stays fp32)
  int linear_threads, attn_threads;
};
inline int64_t decode_scratch_floats(int64_t B, int64_t C, int64_t H, int64_t Hkv, int64_t Dh, int64_t F) {
  return B * (C + (H + 2 * Hkv) * Dh + 2 * H * Dh + H + 3 * F + C);  // + B H Dh: bf16 q and out (2 x 2 bytes)
}
int decode_layers(const DecodeArgs& a);

// C (M, N) = A (M, K) B (K, N) + bias, for linear layers with many rows and their gradients. A is
// row-major with row stride lda (a_colmajor: column-major, column stride lda), B likewise with ldb;
// C is contiguous; bias (N) may be null. F32 or F64. K >= 1.
struct GemmArgs {
  const void* a;
  int64_t lda;
  bool a_colmajor;
  const void* b;
  int64_t ldb;
  bool b_colmajor;
  const void* bias;
  void* c;
  int64_t M, N, K;
  int dtype;
  int nthreads;
};

// LayerNorm over the last dimension (csrc/cpu/layer_norm.h). x: M rows of C values, unit stride along C and row
// stride ldx; y: contiguous (M, C); mean, rstd: (M) of the element type, saved for the backward; weight (C) and
// bias (C, or nullptr) contiguous. F32 or F64.
struct LayerNormFwdArgs {
  const void* x;
  int64_t ldx;
  const void* weight;
  const void* bias;
  void* y;
  void* mean;
  void* rstd;
  int64_t M, C;
  double eps;
  int dtype;
  // y's dtype: dtype, or kBF16 with kF32 (y rounded to bf16 as it is stored: autocast's cast of the result, fused)
  int y_dtype;
  int nthreads;
};
// Its backward: dy with row stride lddy (unit stride along C), x as in the forward, mean/rstd from it; dx: contiguous
// (M, C), dweight / dbias: (C); each output may be nullptr (not wanted).
struct LayerNormBwdArgs {
  const void* dy;
  int64_t lddy;
  const void* x;
  int64_t ldx;
  const void* weight;
  const void* mean;
  const void* rstd;
  void* dx;
  void* dweight;
  void* dbias;
  int64_t M, C;
  int dtype;
  int dy_dtype;  // dy's dtype: dtype, or kBF16 with kF32 (the gradient of a bf16 y, widened exactly as read)
  int nthreads;
};

#define MINILLM_DECLARE_ISA(ns)                   \
  namespace ns {                                  \
  int attention_fwd(const AttnFwdArgs& a);        \
  int attention_bwd(const AttnBwdArgs& a);        \
  int topk(const TopkArgs& a);                    \
  int linear_small_m(const LinearArgs& a);        \
  int linear_quant(const QLinearArgs& a);         \
  int dequantize(const QuantWeight& q, float* out, int nthreads); \
  int gemm(const GemmArgs& g);                    \
  int gemm_pair(const GemmArgs& g1, const GemmArgs& g2, int nthreads); \
  int layer_norm_fwd(const LayerNormFwdArgs& a); \
  int layer_norm_bwd(const LayerNormBwdArgs& a); \
  }

MINILLM_DECLARE_ISA(scalar)
#if defined(MINILLM_HAVE_X86_ISAS)
MINILLM_DECLARE_ISA(avx2)
MINILLM_DECLARE_ISA(avx512)
#endif
#undef MINILLM_DECLARE_ISA

// Runtime SIMD dispatch (simd.cpp).
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
const char* isa_name(int isa);
bool isa_supported(int isa);  // compiled in and supported by this CPU and OS
int best_isa();
int current_isa();
void set_isa(int isa);  // caller checks isa_supported first
// Dot-product instructions the AVX-512 kernels use when the CPU has them (checked once):
// vdpbf16ps for bf16 attention (MINILLM_NO_BF16DOT=1 turns it off) and vpdpbusd for the int8
// top-k scan (MINILLM_NO_VNNI=1).
bool use_bf16_dot();
bool use_vnni();
// AMX tiles (tdpbf16ps) for the bf16 attention products, on CPUs with AMX-BF16 where the OS grants the
// tile state (MINILLM_NO_AMX=1 keeps vdpbf16ps); implies use_bf16_dot().
bool use_amx();
// Software prefetch ahead of the few-query top-k scans (fp32 rows read in place, fp16, bf16, int8): on for
// CPUs where it measured faster (AMD family 1Ah and later), MINILLM_SCAN_PREFETCH=0|1 decides otherwise.
bool use_scan_prefetch();

// The ops at the SIMD level chosen at run time (best_isa(), or set_isa()): each runs <level>::op, defined at the
// end of csrc/cpu/<op>.h and compiled once per level by kernels_<level>.cpp. Status codes as above.
#if defined(MINILLM_HAVE_X86_ISAS)
#define MINILLM_AT_LEVEL(op, ...)                                                    \
  (current_isa() == kAvx512 ? avx512::op(__VA_ARGS__)                                \
                            : current_isa() == kAvx2 ? avx2::op(__VA_ARGS__) : scalar::op(__VA_ARGS__))
#else
#define MINILLM_AT_LEVEL(op, ...) scalar::op(__VA_ARGS__)
#endif
inline int attention_fwd(const AttnFwdArgs& a) { return MINILLM_AT_LEVEL(attention_fwd, a); }
inline int attention_bwd(const AttnBwdArgs& a) { return MINILLM_AT_LEVEL(attention_bwd, a); }
inline int topk(const TopkArgs& a) { return MINILLM_AT_LEVEL(topk, a); }
inline int linear_small_m(const LinearArgs& a) { return MINILLM_AT_LEVEL(linear_small_m, a); }
inline int linear_quant(const QLinearArgs& a) { return MINILLM_AT_LEVEL(linear_quant, a); }
// W (N, K) fp32 from its codes (row-major into out), as linear_quant widens it.
inline int dequantize(const QuantWeight& q, float* out, int nthreads) { return MINILLM_AT_LEVEL(dequantize, q, out, nthreads); }
inline int gemm(const GemmArgs& g) { return MINILLM_AT_LEVEL(gemm, g); }
// Two independent products, one per thread (a linear layer's dx and dW).
inline int gemm_pair(const GemmArgs& g1, const GemmArgs& g2, int nthreads) {
  return MINILLM_AT_LEVEL(gemm_pair, g1, g2, nthreads);
}
inline int layer_norm_fwd(const LayerNormFwdArgs& a) { return MINILLM_AT_LEVEL(layer_norm_fwd, a); }
inline int layer_norm_bwd(const LayerNormBwdArgs& a) { return MINILLM_AT_LEVEL(layer_norm_bwd, a); }
#undef MINILLM_AT_LEVEL

}  // namespace minillm
