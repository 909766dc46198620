// Fused attention for CUDA: forward (online softmax, log-sum-exp saved) and backward (a delta pass, then
// dK/dV per key block and dQ per query block, so no atomics), fp32 accumulation for every input dtype.
//
// SIMT kernels (no tensor cores): 4 warps per block. In score loops one lane owns one key (forward,
// dQ) or one query (dK/dV) of a 32-wide tile held in shared memory; in accumulation loops a lane owns
// head-dim columns d = lane + 32 t (t < DPL, so D <= 32 * DPL <= 256). Shapes and masks follow
// csrc/kernels.h: q (B, H, Nq, D), k/v (B, H, Nk, D) with (b, h, n) strides and unit stride along D;
// key j is visible to query i when kpm[b, j] != 0 (if given) and, if causal, j <= i + causal_offset.
// Padded keys are never read. A query that sees no key, or is padding (qpm), gets out = 0, lse = +inf and
// zero gradients (backward skips rows whose lse is +inf).
#pragma once

#include "common.cuh"

namespace minillm {
namespace cuda {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * kWarp;
constexpr int kTile = kWarp;  // keys (forward, dQ) or queries (dK/dV) per tile: one per lane

// Rows each warp keeps in registers: fewer for wide heads, to bound registers and shared memory.
template <int DPL>
struct RowsPerWarp {
  static constexpr int value = DPL <= 4 ? 4 : 2;
};

// Row stride for tiles that lane j reads along row j: odd, so the 32 lanes hit 32 different banks.
MINILLM_HD int odd_stride(int D) { return D | 1; }

MINILLM_HD size_t attention_fwd_smem(int D, int rows) {
  // K (32, odd D), V (32, D), Q (rows, D), per-warp probabilities (4, 32), key visibility (32)
  return sizeof(float) * (size_t(kTile) * odd_stride(D) + size_t(kTile) * D + size_t(rows) * D +
                          kAttnWarps * kTile + kTile);
}

MINILLM_HD size_t attention_dkdv_smem(int D, int keys) {
  // K, V (keys, D), Q, dO (32, odd D), lse, delta (32), p, ds per warp (4, 32) each, key visibility (keys)
  return sizeof(float) * (2 * size_t(keys) * D + 2 * size_t(kTile) * odd_stride(D) + 2 * kTile +
                          2 * kAttnWarps * kTile + keys);
}

MINILLM_HD size_t attention_dq_smem(int D, int rows) {
  // Q, dO (rows, D), K, V (32, odd D), lse, delta (rows), ds per warp (4, 32), key visibility (32)
  return sizeof(float) * (2 * size_t(rows) * D + 2 * size_t(kTile) * odd_stride(D) + 2 * size_t(rows) +
                          kAttnWarps * kTile + kTile);
}

template <typename T>
MINILLM_DEVICE float load(const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t n, int d) {
  return to_float(static_cast<const T*>(base)[b * stride[0] + h * stride[1] + n * stride[2] + d]);
}

MINILLM_DEVICE bool key_kept(const uint8_t* kpm, int64_t b, int64_t Nk, int64_t j) {
  return kpm == nullptr || kpm[b * Nk + j] != 0;
}

// Block-wide: keys k0 .. k0 + rows - 1 of (b, h) into shared memory, K rows ks and V rows vs floats apart;
// keys at or past kend, or padded, are stored as zeros (never read) and marked 0 in vis.
template <typename T, typename Args>
MINILLM_DEVICE void load_keys(const Args& a, int64_t b, int64_t h, int64_t k0, int64_t kend, int rows, float* Ks,
                              int ks, float* Vs, int vs, float* vis) {
  const int D = int(a.D);
  for (int e = int(threadIdx.x); e < rows * D; e += kAttnThreads) {
    const int jl = e / D, d = e % D;
    const int64_t j = k0 + jl;
    const bool on = j < kend && key_kept(a.kpm, b, a.Nk, j);
    Ks[jl * ks + d] = on ? load<T>(a.k, a.k_stride, b, h, j, d) : 0.0f;
    Vs[jl * vs + d] = on ? load<T>(a.v, a.v_stride, b, h, j, d) : 0.0f;
    if (d == 0) vis[jl] = on ? 1.0f : 0.0f;
  }
}

// ---- forward ----

template <typename T, int DPL>
__global__ void __launch_bounds__(kAttnThreads) attention_fwd_kernel(AttnFwdArgs a) {
  constexpr int R = RowsPerWarp<DPL>::value;
  constexpr int BR = kAttnWarps * R;  // query rows per block
  const int D = int(a.D), KS = odd_stride(D);
  const int64_t nqb = ceil_div(a.Nq, BR);
  const int64_t bh = blockIdx.x / nqb;
  // Later query blocks see more keys under a causal mask: they go first, the short ones fill in.
  const int64_t qb = nqb - 1 - int64_t(blockIdx.x) % nqb;
  const int64_t b = bh / a.H, h = bh % a.H, q0 = qb * BR;
  const int tid = int(threadIdx.x), lane = tid % kWarp, warp = tid / kWarp;
  const float scale = float(a.scale);

  MINILLM_SHARED_FLOATS(smem);
  float* Ks = smem;                  // (32, KS)
  float* Vs = Ks + kTile * KS;       // (32, D)
  float* Qs = Vs + kTile * D;        // (BR, D)
  float* Ps = Qs + BR * D;           // (warps, 32)
  float* vis = Ps + kAttnWarps * kTile;  // (32)

  for (int e = tid; e < BR * D; e += kAttnThreads) {
    const int64_t i = q0 + e / D;
    Qs[e] = i < a.Nq ? load<T>(a.q, a.q_stride, b, h, i, e % D) : 0.0f;
  }
  int64_t kend = a.Nk;
  if (a.causal) kend = min64(kend, min64(a.Nq - 1, q0 + BR - 1) + a.causal_offset + 1);

  float m[R], l[R], o[R][DPL];
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
    for (int t = 0; t < DPL; ++t) o[r][t] = 0.0f;
  }

  for (int64_t k0 = 0; k0 < kend; k0 += kTile) {
    __syncthreads();  // every warp is done with the previous tile
    load_keys<T>(a, b, h, k0, kend, kTile, Ks, KS, Vs, D, vis);
    __syncthreads();
    bool any = false;
    for (int jl = 0; jl < kTile; ++jl) any = any || vis[jl] != 0.0f;
    if (!any) continue;  // a fully padded tile costs nothing more

    for (int r = 0; r < R; ++r) {
      const int rl = warp * R + r;
      const int64_t i = q0 + rl;
      if (i >= a.Nq) break;
      if (a.qpm && !a.qpm[b * a.Nq + i]) continue;  // a padded query: left as a row that sees no key
      const int64_t j = k0 + lane;
      float s = -INFINITY;
      if (vis[lane] != 0.0f && (!a.causal || j <= i + a.causal_offset)) {
        const float* qrow = Qs + rl * D;
        const float* krow = Ks + lane * KS;
        float acc = 0.0f;
        for (int d = 0; d < D; ++d) acc += qrow[d] * krow[d];
        s = acc * scale;
      }
      const float tile_max = warp_max(s);
      if (tile_max == -INFINITY) continue;  // the same on every lane: no visible key for this row
      const float m_new = nan_max(m[r], tile_max);
      const float alpha = expf(m[r] - m_new);
      const float p = expf(s - m_new);
      l[r] = l[r] * alpha + warp_sum(p);
      m[r] = m_new;
      Ps[warp * kTile + lane] = p;
      __syncwarp();
      for (int t = 0; t < DPL; ++t) o[r][t] *= alpha;
      for (int jj = 0; jj < kTile; ++jj) {
        const float pj = Ps[warp * kTile + jj];
        const float* vrow = Vs + jj * D;
        for (int t = 0; t < DPL; ++t) {
          const int d = lane + kWarp * t;
          if (d < D) o[r][t] += pj * vrow[d];
        }
      }
      __syncwarp();  // Ps is rewritten for the next row
    }
  }

  T* out = static_cast<T*>(a.out);
  float* lse = static_cast<float*>(a.lse);
  for (int r = 0; r < R; ++r) {
    const int64_t i = q0 + warp * R + r;
    if (i >= a.Nq) break;
    const int64_t row = (b * a.H + h) * a.Nq + i;  // out is contiguous (B, H, Nq, D)
    const bool seen = m[r] != -INFINITY;
    const float inv_l = seen ? 1.0f / l[r] : 0.0f;
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + kWarp * t;
      if (d < D) out[row * D + d] = from_float<T>(seen ? o[r][t] * inv_l : 0.0f);
    }
    if (lane == 0) lse[row] = seen ? m[r] + logf(l[r]) : INFINITY;
  }
}

// ---- backward ----

// delta_i = sum_d dO[i, d] O[i, d] - dlse_i, one warp per query row; rows = B * H * Nq.
template <typename T>
__global__ void __launch_bounds__(kAttnThreads) attention_bwd_delta_kernel(AttnBwdArgs a, float* delta) {
  const int lane = int(threadIdx.x) % kWarp;
  const int64_t row = int64_t(blockIdx.x) * kAttnWarps + int(threadIdx.x) / kWarp;
  if (row >= a.B * a.H * a.Nq) return;  // whole warps leave together; no block barrier follows
  const int64_t i = row % a.Nq, bh = row / a.Nq, b = bh / a.H, h = bh % a.H;
  float acc = 0.0f;
  for (int d = lane; d < int(a.D); d += kWarp)
    acc += load<T>(a.dout, a.do_stride, b, h, i, d) * load<T>(a.out, a.o_stride, b, h, i, d);
  acc = warp_sum(acc);
  if (lane == 0) delta[row] = acc - (a.dlse ? static_cast<const float*>(a.dlse)[row] : 0.0f);
}

// dK, dV for a block of keys; each warp owns KPW keys and loops over all queries that can see them.
template <typename T, int DPL>
__global__ void __launch_bounds__(kAttnThreads) attention_bwd_dkdv_kernel(AttnBwdArgs a, const float* delta) {
  constexpr int KPW = RowsPerWarp<DPL>::value;
  constexpr int BK = kAttnWarps * KPW;  // keys per block
  const int D = int(a.D), QS = odd_stride(D);
  const int64_t nkb = ceil_div(a.Nk, BK);
  const int64_t bh = blockIdx.x / nkb, kb = int64_t(blockIdx.x) % nkb;
  const int64_t b = bh / a.H, h = bh % a.H, k0 = kb * BK;
  const int tid = int(threadIdx.x), lane = tid % kWarp, warp = tid / kWarp;
  const float scale = float(a.scale);
  const float* lse = static_cast<const float*>(a.lse);

  MINILLM_SHARED_FLOATS(smem);
  float* Ks = smem;                   // (BK, D)
  float* Vs = Ks + BK * D;            // (BK, D)
  float* Qs = Vs + BK * D;            // (32, QS)
  float* dOs = Qs + kTile * QS;       // (32, QS)
  float* lse_s = dOs + kTile * QS;    // (32)
  float* delta_s = lse_s + kTile;     // (32)
  float* Pw = delta_s + kTile;        // (warps, 32)
  float* DSw = Pw + kAttnWarps * kTile;  // (warps, 32)
  float* kvis = DSw + kAttnWarps * kTile;  // (BK)

  load_keys<T>(a, b, h, k0, a.Nk, BK, Ks, D, Vs, D, kvis);

  float dk[KPW][DPL], dv[KPW][DPL];
  for (int kk = 0; kk < KPW; ++kk)
    for (int t = 0; t < DPL; ++t) dk[kk][t] = dv[kk][t] = 0.0f;

  // Under a causal mask only queries i >= j - causal_offset see key j.
  const int64_t i_begin = a.causal ? max64(0, k0 - a.causal_offset) : 0;
  for (int64_t i0 = i_begin; i0 < a.Nq; i0 += kTile) {
    __syncthreads();  // the previous query tile is consumed (and K, V are written, the first time)
    for (int e = tid; e < kTile * D; e += kAttnThreads) {
      const int il = e / D, d = e % D;
      const int64_t i = i0 + il;
      // A padded query's q and dO are never read (its p is 0, and 0 * NaN would still be NaN).
      const bool on = i < a.Nq && (a.qpm == nullptr || a.qpm[b * a.Nq + i] != 0);
      Qs[il * QS + d] = on ? load<T>(a.q, a.q_stride, b, h, i, d) : 0.0f;
      dOs[il * QS + d] = on ? load<T>(a.dout, a.do_stride, b, h, i, d) : 0.0f;
    }
    if (tid < kTile) {
      const int64_t i = i0 + tid, row = (b * a.H + h) * a.Nq + i;
      lse_s[tid] = i < a.Nq ? lse[row] : INFINITY;
      delta_s[tid] = i < a.Nq ? delta[row] : 0.0f;
    }
    __syncthreads();

    for (int kk = 0; kk < KPW; ++kk) {
      const int jl = warp * KPW + kk;
      if (kvis[jl] == 0.0f) continue;  // padded or past Nk: the same for the whole warp
      const int64_t j = k0 + jl, i = i0 + lane;
      const float L = lse_s[lane];
      float p = 0.0f, ds = 0.0f;
      if (L != INFINITY && (!a.causal || j <= i + a.causal_offset)) {
        const float* qrow = Qs + lane * QS;
        const float* dorow = dOs + lane * QS;
        const float* krow = Ks + jl * D;
        const float* vrow = Vs + jl * D;
        float s = 0.0f, dp = 0.0f;
        for (int d = 0; d < D; ++d) {
          s += qrow[d] * krow[d];
          dp += dorow[d] * vrow[d];
        }
        p = expf(s * scale - L);
        ds = p * (dp - delta_s[lane]);
      }
      Pw[warp * kTile + lane] = p;
      DSw[warp * kTile + lane] = ds;
      __syncwarp();
      for (int il = 0; il < kTile; ++il) {
        const float pi = Pw[warp * kTile + il], dsi = DSw[warp * kTile + il];
        const float* dorow = dOs + il * QS;
        const float* qrow = Qs + il * QS;
        for (int t = 0; t < DPL; ++t) {
          const int d = lane + kWarp * t;
          if (d < D) {
            dv[kk][t] += pi * dorow[d];
            dk[kk][t] += dsi * qrow[d];
          }
        }
      }
      __syncwarp();  // Pw, DSw are rewritten for the next key
    }
  }

  T* dK = static_cast<T*>(a.dk);
  T* dV = static_cast<T*>(a.dv);
  for (int kk = 0; kk < KPW; ++kk) {
    const int64_t j = k0 + warp * KPW + kk;
    if (j >= a.Nk) break;
    const int64_t row = (b * a.H + h) * a.Nk + j;  // dk, dv are contiguous (B, H, Nk, D)
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + kWarp * t;
      if (d < D) {
        dK[row * D + d] = from_float<T>(dk[kk][t] * scale);
        dV[row * D + d] = from_float<T>(dv[kk][t]);
      }
    }
  }
}

// dQ for a block of queries; each warp owns R query rows and loops over the keys they can see.
template <typename T, int DPL>
__global__ void __launch_bounds__(kAttnThreads) attention_bwd_dq_kernel(AttnBwdArgs a, const float* delta) {
  constexpr int R = RowsPerWarp<DPL>::value;
  constexpr int BR = kAttnWarps * R;
  const int D = int(a.D), KS = odd_stride(D);
  const int64_t nqb = ceil_div(a.Nq, BR);
  const int64_t bh = blockIdx.x / nqb;
  const int64_t qb = nqb - 1 - int64_t(blockIdx.x) % nqb;  // longest causal rows first, as in forward
  const int64_t b = bh / a.H, h = bh % a.H, q0 = qb * BR;
  const int tid = int(threadIdx.x), lane = tid % kWarp, warp = tid / kWarp;
  const float scale = float(a.scale);
  const float* lse = static_cast<const float*>(a.lse);

  MINILLM_SHARED_FLOATS(smem);
  float* Qs = smem;                   // (BR, D)
  float* dOs = Qs + BR * D;           // (BR, D)
  float* Ks = dOs + BR * D;           // (32, KS)
  float* Vs = Ks + kTile * KS;        // (32, KS)
  float* lse_s = Vs + kTile * KS;     // (BR)
  float* delta_s = lse_s + BR;        // (BR)
  float* DSw = delta_s + BR;          // (warps, 32)
  float* kvis = DSw + kAttnWarps * kTile;  // (32)

  for (int e = tid; e < BR * D; e += kAttnThreads) {
    const int64_t i = q0 + e / D;
    Qs[e] = i < a.Nq ? load<T>(a.q, a.q_stride, b, h, i, e % D) : 0.0f;
    dOs[e] = i < a.Nq ? load<T>(a.dout, a.do_stride, b, h, i, e % D) : 0.0f;
  }
  if (tid < BR) {
    const int64_t i = q0 + tid, row = (b * a.H + h) * a.Nq + i;
    lse_s[tid] = i < a.Nq ? lse[row] : INFINITY;
    delta_s[tid] = i < a.Nq ? delta[row] : 0.0f;
  }
  int64_t kend = a.Nk;
  if (a.causal) kend = min64(kend, min64(a.Nq - 1, q0 + BR - 1) + a.causal_offset + 1);

  float dq[R][DPL];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < DPL; ++t) dq[r][t] = 0.0f;

  for (int64_t k0 = 0; k0 < kend; k0 += kTile) {
    __syncthreads();
    load_keys<T>(a, b, h, k0, kend, kTile, Ks, KS, Vs, KS, kvis);
    __syncthreads();
    bool any = false;
    for (int jl = 0; jl < kTile; ++jl) any = any || kvis[jl] != 0.0f;
    if (!any) continue;

    for (int r = 0; r < R; ++r) {
      const int rl = warp * R + r;
      const int64_t i = q0 + rl;
      if (i >= a.Nq) break;
      const float L = lse_s[rl];
      if (L == INFINITY) continue;  // this row sees no key: zero gradient
      const int64_t j = k0 + lane;
      float ds = 0.0f;
      if (kvis[lane] != 0.0f && (!a.causal || j <= i + a.causal_offset)) {
        const float* qrow = Qs + rl * D;
        const float* dorow = dOs + rl * D;
        const float* krow = Ks + lane * KS;
        const float* vrow = Vs + lane * KS;
        float s = 0.0f, dp = 0.0f;
        for (int d = 0; d < D; ++d) {
          s += qrow[d] * krow[d];
          dp += dorow[d] * vrow[d];
        }
        const float p = expf(s * scale - L);
        ds = p * (dp - delta_s[rl]);
      }
      DSw[warp * kTile + lane] = ds;
      __syncwarp();
      for (int jj = 0; jj < kTile; ++jj) {
        const float dsj = DSw[warp * kTile + jj];
        const float* krow = Ks + jj * KS;
        for (int t = 0; t < DPL; ++t) {
          const int d = lane + kWarp * t;
          if (d < D) dq[r][t] += dsj * krow[d];
        }
      }
      __syncwarp();
    }
  }

  T* dQ = static_cast<T*>(a.dq);
  for (int r = 0; r < R; ++r) {
    const int64_t i = q0 + warp * R + r;
    if (i >= a.Nq) break;
    const int64_t row = (b * a.H + h) * a.Nq + i;  // dq is contiguous (B, H, Nq, D)
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + kWarp * t;
      if (d < D) dQ[row * D + d] = from_float<T>(dq[r][t] * scale);
    }
  }
}

// ---- launchers (host code shared by the .cu wrappers and the emulator tests) ----

template <typename T, int DPL>
int attention_fwd_launch_t(const AttnFwdArgs& a, cudaStream_t stream, size_t max_smem) {
  constexpr int BR = kAttnWarps * RowsPerWarp<DPL>::value;
  const size_t smem = attention_fwd_smem(int(a.D), BR);
  const int64_t grid = a.B * a.H * ceil_div(a.Nq, BR);
  if (smem > max_smem) return kTooMuchSharedMemory;
  if (grid > kMaxGrid) return kUnsupportedShape;
  auto kernel = attention_fwd_kernel<T, DPL>;
  MINILLM_ALLOW_SMEM(kernel, smem);
  MINILLM_LAUNCH(kernel, dim3(unsigned(grid)), dim3(kAttnThreads), smem, stream, a);
  return kLaunchOk;
}

template <typename T, int DPL>
int attention_bwd_launch_t(const AttnBwdArgs& a, float* delta, cudaStream_t stream, size_t max_smem) {
  constexpr int RW = RowsPerWarp<DPL>::value;
  constexpr int BR = kAttnWarps * RW;
  const size_t smem_kv = attention_dkdv_smem(int(a.D), BR), smem_q = attention_dq_smem(int(a.D), BR);
  const int64_t grid_kv = a.B * a.H * ceil_div(a.Nk, BR), grid_q = a.B * a.H * ceil_div(a.Nq, BR);
  const int64_t grid_delta = ceil_div(a.B * a.H * a.Nq, kAttnWarps);
  if (smem_kv > max_smem || smem_q > max_smem) return kTooMuchSharedMemory;
  if (grid_kv > kMaxGrid || grid_q > kMaxGrid || grid_delta > kMaxGrid) return kUnsupportedShape;
  auto delta_kernel = attention_bwd_delta_kernel<T>;
  auto kv_kernel = attention_bwd_dkdv_kernel<T, DPL>;
  auto q_kernel = attention_bwd_dq_kernel<T, DPL>;
  MINILLM_ALLOW_SMEM(kv_kernel, smem_kv);
  MINILLM_ALLOW_SMEM(q_kernel, smem_q);
  const float* delta_c = delta;
  MINILLM_LAUNCH(delta_kernel, dim3(unsigned(grid_delta)), dim3(kAttnThreads), 0, stream, a, delta);
  MINILLM_LAUNCH(kv_kernel, dim3(unsigned(grid_kv)), dim3(kAttnThreads), smem_kv, stream, a, delta_c);
  MINILLM_LAUNCH(q_kernel, dim3(unsigned(grid_q)), dim3(kAttnThreads), smem_q, stream, a, delta_c);
  return kLaunchOk;
}

// What the SIMT kernels compute: one key/value head per query head and no score modifier.
template <typename Args>
MINILLM_HD bool simt_supports(const Args& a) {
  const AttnMods& m = a.mods;
  return (a.Hkv == 0 || a.Hkv == a.H) && m.window_left < 0 && m.window_right < 0 && m.softcap == 0 && !m.alibi &&
         !m.bias && !m.sinks && !m.dbias;
}

// Head dims up to 256, by columns per lane: 2 (D <= 64), 4 (D <= 128) or 8 (D <= 256).
inline int attention_fwd_launch_simt(const AttnFwdArgs& a, cudaStream_t stream, size_t max_smem) {
  const int64_t D = a.D;
  if (D < 1 || D > 256 || !simt_supports(a)) return kUnsupportedShape;
#define MINILLM_FWD_CASE(T)                                                         \
  if (D <= 64) return attention_fwd_launch_t<T, 2>(a, stream, max_smem);           \
  if (D <= 128) return attention_fwd_launch_t<T, 4>(a, stream, max_smem);          \
  return attention_fwd_launch_t<T, 8>(a, stream, max_smem);
  switch (a.dtype) {
    case kF32: { MINILLM_FWD_CASE(float) }
    case kBF16: { MINILLM_FWD_CASE(bf16) }
    case kF16: { MINILLM_FWD_CASE(f16) }
  }
#undef MINILLM_FWD_CASE
  return kUnsupportedShape;
}

// `delta` is scratch for B * H * Nq floats on the device.
inline int attention_bwd_launch_simt(const AttnBwdArgs& a, float* delta, cudaStream_t stream, size_t max_smem) {
  const int64_t D = a.D;
  if (D < 1 || D > 256 || !simt_supports(a)) return kUnsupportedShape;
#define MINILLM_BWD_CASE(T)                                                            \
  if (D <= 64) return attention_bwd_launch_t<T, 2>(a, delta, stream, max_smem);       \
  if (D <= 128) return attention_bwd_launch_t<T, 4>(a, delta, stream, max_smem);      \
  return attention_bwd_launch_t<T, 8>(a, delta, stream, max_smem);
  switch (a.dtype) {
    case kF32: { MINILLM_BWD_CASE(float) }
    case kBF16: { MINILLM_BWD_CASE(bf16) }
    case kF16: { MINILLM_BWD_CASE(f16) }
  }
#undef MINILLM_BWD_CASE
  return kUnsupportedShape;
}

}  // namespace cuda
}  // namespace minillm
