// One decoding step through every layer of a Llama-family stack in a single call (csrc/kernels.h: DecodeArgs).
//
// Why: a decoded token of a 30-layer model ran ~15 eager torch/Python operations per layer around the kernels (norms,
// rotary embedding, cache writes, views, module calls), ~190 us a layer against ~300 us of int4 weight streaming: a
// third of the step. Here the glue is a few loops over B x C floats between the kernels' own entry points (the SIMD
// level's linear_small_m / linear_quant and attention_fwd), so a step costs its weight reads and little else. The
// reference is DecoderOnlyModel's module path, which this step must equal (tests/models/test_native_decode.py).
#include <cmath>
#include <cstring>

#include "bf16.h"
#include "kernels.h"

namespace minillm {
namespace {

// y (B, N) = x (B, K) W^T on the weight's own kernel (ldx = K).
int run_linear(const DecodeWeight& w, const float* x, int64_t B, float* y, int nthreads) {
  if (w.bits == 32) {
    LinearArgs a{};
    a.x = x, a.w = w.w, a.b = nullptr, a.y = y;
    a.M = B, a.K = w.K, a.N = w.N, a.ldx = w.K;
    a.dtype = kF32, a.nthreads = nthreads;
    return linear_small_m(a);
  }
  QLinearArgs a{};
  a.x = x, a.ldx = w.K, a.bias = nullptr, a.y = y, a.M = B, a.nthreads = nthreads;
  a.w = QuantWeight{w.w, w.scale, w.offset, w.N, w.K, w.bits, w.group};
  return linear_quant(a);
}

// out = x / sqrt(mean(x^2) + eps) * weight, per row of C (RMSNorm, fp32 as Llama's reference computes it).
void rmsnorm(const float* x, const float* weight, int64_t B, int64_t C, double eps, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* r = x + b * C;
    float ss = 0.f;
    for (int64_t c = 0; c < C; ++c) ss += r[c] * r[c];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(C) + static_cast<float>(eps));
    for (int64_t c = 0; c < C; ++c) out[b * C + c] = weight[c] * (r[c] * inv);
  }
}

// x * cos + rotate_half(x) * sin on one head's Dh values, in place (rotate_half(x) = (-x2, x1)).
void rope(float* v, const float* cs, const float* sn, int64_t Dh) {
  const int64_t half = Dh / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = v[i], x2 = v[i + half];
    v[i] = x1 * cs[i] - x2 * sn[i];
    v[i + half] = x2 * cs[i + half] + x1 * sn[i + half];
  }
}

}  // namespace

int decode_layers(const DecodeArgs& a) {
  const int64_t B = a.B, C = a.C, H = a.H, Hkv = a.Hkv, Dh = a.Dh, F = a.F, T = a.cache_len + 1;
  const int64_t QKV = (H + 2 * Hkv) * Dh;
  float* h = a.scratch;                // (B, C): a norm's output
  float* qkv = h + B * C;              // (B, QKV)
  float* att = qkv + B * QKV;          // (B, H Dh): attention's output, the projection's input
  float* lse = att + B * H * Dh;       // (B, H)
  float* gu = lse + B * H;             // (B, 2F): gate and up
  float* act = gu + 2 * B * F;         // (B, F)
  float* y = act + B * F;              // (B, C): a branch's output before the residual add
  const bool bf16 = a.cache_dtype == kBF16;
  uint16_t* q16 = reinterpret_cast<uint16_t*>(y + B * C);  // (B, H, Dh) bf16 q, then (B, H, Dh) bf16 out
  uint16_t* o16 = q16 + B * H * Dh;
  for (int64_t l = 0; l < a.L; ++l) {
    const DecodeLayer& ly = a.layers[l];
    rmsnorm(a.x, ly.norm1, B, C, a.eps, h);
    int st = run_linear(ly.qkv, h, B, qkv, a.linear_threads);
    if (st != kOk) return st;
    for (int64_t b = 0; b < B; ++b) {
      float* row = qkv + b * QKV;
      for (int64_t hd = 0; hd < H + Hkv; ++hd) rope(row + hd * Dh, a.cos + b * Dh, a.sin + b * Dh, Dh);  // q and k
      for (int64_t g = 0; g < Hkv; ++g) {  // the new token's key and value into the cache, row cache_len
        const int64_t at = ((b * Hkv + g) * a.capacity + a.cache_len) * Dh;
        const float* kr = row + (H + g) * Dh;
        const float* vr = row + (H + Hkv + g) * Dh;
        if (bf16) {
          uint16_t* kc = static_cast<uint16_t*>(ly.k_cache) + at;
          uint16_t* vc = static_cast<uint16_t*>(ly.v_cache) + at;
          for (int64_t d = 0; d < Dh; ++d) kc[d] = f32_to_bf16(kr[d]), vc[d] = f32_to_bf16(vr[d]);
        } else {
          std::memcpy(static_cast<float*>(ly.k_cache) + at, kr, Dh * sizeof(float));
          std::memcpy(static_cast<float*>(ly.v_cache) + at, vr, Dh * sizeof(float));
        }
      }
      if (bf16)  // the attention kernel takes one dtype for q, k and v
        for (int64_t e = 0; e < H * Dh; ++e) q16[b * H * Dh + e] = f32_to_bf16(row[e]);
    }
    AttnFwdArgs at{};
    at.q = bf16 ? static_cast<const void*>(q16) : qkv;
    at.k = ly.k_cache, at.v = ly.v_cache, at.lse = lse, at.kpm = a.kpm, at.qpm = nullptr;
    at.out = bf16 ? static_cast<void*>(o16) : att;
    at.B = B, at.H = H, at.Nq = 1, at.Nk = T, at.D = Dh, at.Hkv = Hkv;
    // q (B, H, 1, Dh): heads of a qkv row (fp32), or the packed bf16 copy
    at.q_stride[0] = bf16 ? H * Dh : QKV, at.q_stride[1] = Dh, at.q_stride[2] = bf16 ? H * Dh : QKV;
    at.k_stride[0] = at.v_stride[0] = Hkv * a.capacity * Dh;
    at.k_stride[1] = at.v_stride[1] = a.capacity * Dh;
    at.k_stride[2] = at.v_stride[2] = Dh;
    at.causal = false;  // one query at the newest position: every cached key is at or before it
    at.causal_offset = 0;
    at.scale = a.scale;
    at.mods.window_left = at.mods.window_right = -1;
    at.dtype = bf16 ? kBF16 : kF32, at.nthreads = a.attn_threads;
    if ((st = attention_fwd(at)) != kOk) return st;
    if (bf16)
      for (int64_t e = 0; e < B * H * Dh; ++e) att[e] = bf16_to_f32(o16[e]);
    if ((st = run_linear(ly.proj, att, B, y, a.linear_threads)) != kOk) return st;
    for (int64_t e = 0; e < B * C; ++e) a.x[e] += y[e];
    rmsnorm(a.x, ly.norm2, B, C, a.eps, h);
    if ((st = run_linear(ly.fc, h, B, gu, a.linear_threads)) != kOk) return st;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t f = 0; f < F; ++f) {
        const float g = gu[b * 2 * F + f], u = gu[b * 2 * F + F + f];
        act[b * F + f] = g / (1.f + std::exp(-g)) * u;  // silu(gate) * up
      }
    if ((st = run_linear(ly.down, act, B, y, a.linear_threads)) != kOk) return st;
    for (int64_t e = 0; e < B * C; ++e) a.x[e] += y[e];
  }
  return kOk;
}

}  // namespace minillm
