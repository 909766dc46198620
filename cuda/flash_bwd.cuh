// Tensor-core attention backward (FlashAttention-2's products, dQ in its own pass instead of atomics, so the
// result does not depend on the order blocks finish). With P = exp(z - lse), dP = dO V^T,
// dS = P * (dP - delta) * dz/ds (delta_i = dO_i . O_i - dlse_i, from attention_bwd_delta_kernel):
//   dK/dV kernel: a block owns 64 keys of one (b, key/value head), 16 per warp, and loops over the query heads
//     that read it (grouped-query attention: dK and dV sum over them in registers, no copies) and their query
//     tiles of 32 rows streamed by cp.async: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q.
//   dQ kernel: a block owns 64 query rows, 16 per warp, and loops over key tiles of 64: S = Q K^T,
//     dP = dO V^T, dQ += dS K.
// The transposed products keep every operand in registers or ldmatrix reach: S^T's and dP^T's fragments
// are the A operands of dV and dK directly. Rows whose lse is +inf (padded, or seeing no key) get zero
// gradients, as do padded keys.
#pragma once

#include "flash_fwd.cuh"

namespace minillm {
namespace cuda {

// Warp-wide, the backward's two score-shaped products for the warp's 16 rows: s = A1 B1^T and dp = A2 B2^T, each
// (16, 8 kNB), with A1/A2 rows a_row0 .. a_row0 + 15 of their tiles and B1/B2's rows n-major. The dQ kernel runs
// it as S = Q K^T, dP = dO V^T; the dK/dV kernel as S^T = K Q^T, dP^T = V dO^T.
template <typename T, int kD, int kNB>
MINILLM_DEVICE void two_products(float (*s)[4], float (*dp)[4], const uint16_t* A1, const uint16_t* A2, int a_row0,
                                 const uint16_t* B1, const uint16_t* B2) {
  MINILLM_UNROLL
  for (int nb = 0; nb < kNB; ++nb)
    MINILLM_UNROLL
    for (int e = 0; e < 4; ++e) s[nb][e] = dp[nb][e] = 0.0f;
  MINILLM_UNROLL
  for (int ks = 0; ks < kD / 16; ++ks) {
    uint32_t a1[4], a2[4];
    load_a_frag<kD>(a1, A1, a_row0, ks);
    load_a_frag<kD>(a2, A2, a_row0, ks);
    MINILLM_UNROLL
    for (int nb = 0; nb < kNB; nb += 2) {
      uint32_t b1[4], b2[4];
      load_b_frag_nmajor<kD>(b1, B1, nb * 8, ks);
      load_b_frag_nmajor<kD>(b2, B2, nb * 8, ks);
      mma_m16n8k16<T>(s[nb], a1, b1, s[nb]);
      mma_m16n8k16<T>(s[nb + 1], a1, b1 + 2, s[nb + 1]);
      mma_m16n8k16<T>(dp[nb], a2, b2, dp[nb]);
      mma_m16n8k16<T>(dp[nb + 1], a2, b2 + 2, dp[nb + 1]);
    }
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(FlashTraits<kD>::kThreads) flash_bwd_dkdv_kernel(AttnBwdArgs a, const float* delta) {
  using Tr = FlashTraits<kD>;
  constexpr int BN = Tr::kBlockN, BM = Tr::kBwdTileM, kNB = BM / 8, kOB = kD / 8;
  const int64_t Hkv = a.Hkv > 0 ? a.Hkv : a.H, group = a.H / Hkv;
  const int64_t nkb = ceil_div(a.Nk, BN);
  const int64_t bhk = blockIdx.x / nkb, k0 = (int64_t(blockIdx.x) % nkb) * BN;
  const int64_t b = bhk / Hkv, hk = bhk % Hkv;
  const int lane = int(threadIdx.x) % kWarp, warp = int(threadIdx.x) / kWarp, g = lane / 4, t = lane % 4;
  const int D = int(a.D);

  MINILLM_SHARED_FLOATS(smem_f);
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem_f);  // (BN, kD)
  uint16_t* Vs = Ks + BN * kD;                         // (BN, kD)
  uint16_t* Qs = Vs + BN * kD;                         // (2, BM, kD)
  uint16_t* dOs = Qs + 2 * BM * kD;                    // (2, BM, kD)
  float* Ls = reinterpret_cast<float*>(dOs + 2 * BM * kD);  // (2, BM) lse
  float* Ds = Ls + 2 * BM;                                  // (2, BM) delta

  const uint8_t* kpm = a.kpm ? a.kpm + b * a.Nk : nullptr;
  const uint8_t* qpm = a.qpm ? a.qpm + b * a.Nq : nullptr;
  const FlashBand band(a);
  const float* lse = static_cast<const float*>(a.lse);
  const auto* kbase = static_cast<const uint16_t*>(a.k) + b * a.k_stride[0] + hk * a.k_stride[1];
  const auto* vbase = static_cast<const uint16_t*>(a.v) + b * a.v_stride[0] + hk * a.v_stride[1];
  load_tile_async<kD, BN, Tr::kThreads>(Ks, kbase, a.k_stride[2], k0, a.Nk, D, kpm);
  load_tile_async<kD, BN, Tr::kThreads>(Vs, vbase, a.v_stride[2], k0, a.Nk, D, kpm);

  // Queries that see any key of the block, in whole tiles; the same for each query head of the group.
  const int64_t i_first = band.qfirst(k0) / BM * BM, i_end = band.qend(min64(a.Nk, k0 + BN) - 1, a.Nq);
  const int q_tiles = i_end > i_first ? int(ceil_div(i_end - i_first, BM)) : 0;
  const int steps = int(group) * q_tiles;

  // Stage `st` of step `n`: the query tile's Q, dO (cp.async) and lse, delta (plain loads, ordered by the
  // barrier after the wait like the copies).
  auto load_step = [&](int n, int st) {
    const int64_t h = hk * group + n / q_tiles, i0 = i_first + int64_t(n % q_tiles) * BM;
    const auto* qbase = static_cast<const uint16_t*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1];
    const auto* dobase = static_cast<const uint16_t*>(a.dout) + b * a.do_stride[0] + h * a.do_stride[1];
    load_tile_async<kD, BM, Tr::kThreads>(Qs + st * BM * kD, qbase, a.q_stride[2], i0, a.Nq, D, qpm);
    load_tile_async<kD, BM, Tr::kThreads>(dOs + st * BM * kD, dobase, a.do_stride[2], i0, a.Nq, D, qpm);
    for (int r = int(threadIdx.x); r < BM; r += Tr::kThreads) {
      const int64_t i = i0 + r, row = (b * a.H + h) * a.Nq + i;
      Ls[st * BM + r] = i < a.Nq ? lse[row] : INFINITY;
      Ds[st * BM + r] = i < a.Nq ? delta[row] : 0.0f;
    }
  };
  if (steps > 0) load_step(0, 0);
  cp_async_commit();

  float dk[kOB][4], dv[kOB][4];
  MINILLM_UNROLL
  for (int ob = 0; ob < kOB; ++ob)
    MINILLM_UNROLL
    for (int e = 0; e < 4; ++e) dk[ob][e] = dv[ob][e] = 0.0f;
  const int64_t key_j[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};  // this lane's rows of S^T

  for (int n = 0; n < steps; ++n) {
    const int st = n & 1;
    if (n + 1 < steps) load_step(n + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int64_t h = hk * group + n / q_tiles, i0 = i_first + int64_t(n % q_tiles) * BM;
    const FlashScore score(a, b, h);
    const uint16_t* Qc = Qs + st * BM * kD;
    const uint16_t* dOc = dOs + st * BM * kD;
    const float* Lc = Ls + st * BM;
    const float* Dc = Ds + st * BM;

    // S^T = K Q^T and dP^T = V dO^T: (16 keys, BM queries) per warp
    float s[kNB][4], dp[kNB][4];
    two_products<T, kD, kNB>(s, dp, Ks, Vs, warp * 16, Qc, dOc);
    // P^T into s, dS^T into dp
    MINILLM_UNROLL
    for (int nb = 0; nb < kNB; ++nb)
      MINILLM_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int il = nb * 8 + 2 * t + (e & 1);
        const int64_t i = i0 + il, j = key_j[e >> 1];
        const float L = Lc[il];
        float p = 0.0f, ds = 0.0f;
        if (L != INFINITY && j < a.Nk && (kpm == nullptr || kpm[j] != 0) && band.sees(i, j)) {
          float dz_ds;
          const float z = score.apply(s[nb][e], i, j, &dz_ds);
          p = expf(z - L);
          ds = p * (dp[nb][e] - Dc[il]) * dz_ds;
        }
        s[nb][e] = p;
        dp[nb][e] = ds;
      }
    // dV += P^T dO, dK += dS^T Q: k runs over the tile's queries, dO and Q rows k-major
    MINILLM_UNROLL
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t pa[4], da[4];
      c_to_a_frag<T>(pa, s[2 * kk], s[2 * kk + 1]);
      c_to_a_frag<T>(da, dp[2 * kk], dp[2 * kk + 1]);
      MINILLM_UNROLL
      for (int ob = 0; ob < kOB; ob += 2) {
        uint32_t df[4], qf[4];
        load_b_frag_kmajor<kD>(df, dOc, kk * 16, ob);
        load_b_frag_kmajor<kD>(qf, Qc, kk * 16, ob);
        mma_m16n8k16<T>(dv[ob], pa, df, dv[ob]);
        mma_m16n8k16<T>(dv[ob + 1], pa, df + 2, dv[ob + 1]);
        mma_m16n8k16<T>(dk[ob], da, qf, dk[ob]);
        mma_m16n8k16<T>(dk[ob + 1], da, qf + 2, dk[ob + 1]);
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration
  }
  cp_async_wait<0>();

  T* dK = static_cast<T*>(a.dk);
  T* dV = static_cast<T*>(a.dv);
  const float scale = float(a.scale);
  MINILLM_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int64_t j = key_j[r];
    if (j >= a.Nk) continue;
    const int64_t row = (b * Hkv + hk) * a.Nk + j;  // dk, dv are contiguous (B, Hkv, Nk, D)
    MINILLM_UNROLL
    for (int ob = 0; ob < kOB; ++ob)
      MINILLM_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int d = ob * 8 + 2 * t + e;
        if (d < D) {
          dK[row * D + d] = from_float<T>(dk[ob][2 * r + e] * scale);
          dV[row * D + d] = from_float<T>(dv[ob][2 * r + e]);
        }
      }
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(FlashTraits<kD>::kThreads) flash_bwd_dq_kernel(AttnBwdArgs a, const float* delta) {
  using Tr = FlashTraits<kD>;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, kNB = BN / 8, kOB = kD / 8;
  const QueryBlock<AttnBwdArgs, BM, BN> blk(a);
  const int64_t bh = blk.bh, h = blk.h, q0 = blk.q0, j_first = blk.j_first, j_end = blk.j_end;
  const int n_tiles = blk.n_tiles;
  const uint8_t* kpm = blk.kpm;
  const int lane = int(threadIdx.x) % kWarp, warp = int(threadIdx.x) / kWarp, g = lane / 4, t = lane % 4;
  const int D = int(a.D);

  MINILLM_SHARED_FLOATS(smem_f);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem_f);  // (BM, kD)
  uint16_t* dOs = Qs + BM * kD;                        // (BM, kD)
  uint16_t* Ks = dOs + BM * kD;                        // (2, BN, kD)
  uint16_t* Vs = Ks + 2 * BN * kD;                     // (2, BN, kD)
  const auto* dobase = static_cast<const uint16_t*>(a.dout) + blk.b * a.do_stride[0] + h * a.do_stride[1];

  load_tile_async<kD, BM, Tr::kThreads>(Qs, blk.q, a.q_stride[2], q0, a.Nq, D, blk.qpm);
  load_tile_async<kD, BM, Tr::kThreads>(dOs, dobase, a.do_stride[2], q0, a.Nq, D, blk.qpm);
  if (n_tiles > 0) {
    load_tile_async<kD, BN, Tr::kThreads>(Ks, blk.k, a.k_stride[2], j_first, j_end, D, kpm);
    load_tile_async<kD, BN, Tr::kThreads>(Vs, blk.v, a.v_stride[2], j_first, j_end, D, kpm);
  }
  cp_async_commit();

  const float* lse = static_cast<const float*>(a.lse);
  const int64_t row_i[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  float L[2], Dl[2];
  MINILLM_UNROLL
  for (int r = 0; r < 2; ++r) {
    const bool in = row_i[r] < a.Nq;
    L[r] = in ? lse[bh * a.Nq + row_i[r]] : INFINITY;
    Dl[r] = in ? delta[bh * a.Nq + row_i[r]] : 0.0f;
  }
  float dq[kOB][4];
  MINILLM_UNROLL
  for (int ob = 0; ob < kOB; ++ob)
    MINILLM_UNROLL
    for (int e = 0; e < 4; ++e) dq[ob][e] = 0.0f;

  for (int n = 0; n < n_tiles; ++n) {
    const int stage = n & 1;
    const int64_t j0 = j_first + int64_t(n) * BN;
    if (n + 1 < n_tiles) {
      load_tile_async<kD, BN, Tr::kThreads>(Ks + (stage ^ 1) * BN * kD, blk.k, a.k_stride[2], j0 + BN, j_end, D, kpm);
      load_tile_async<kD, BN, Tr::kThreads>(Vs + (stage ^ 1) * BN * kD, blk.v, a.v_stride[2], j0 + BN, j_end, D, kpm);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint16_t* Kc = Ks + stage * BN * kD;
    const uint16_t* Vc = Vs + stage * BN * kD;

    // S = Q K^T, dP = dO V^T: (16, BN) per warp
    float s[kNB][4], dp[kNB][4];
    two_products<T, kD, kNB>(s, dp, Qs, dOs, warp * 16, Kc, Vc);
    MINILLM_UNROLL
    for (int nb = 0; nb < kNB; ++nb)
      MINILLM_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int64_t i = row_i[r], j = j0 + nb * 8 + 2 * t + (e & 1);
        float ds = 0.0f;
        if (L[r] != INFINITY && j < j_end && (kpm == nullptr || kpm[j] != 0) && blk.band.sees(i, j)) {
          float dz_ds;
          const float z = blk.score.apply(s[nb][e], i, j, &dz_ds);
          ds = expf(z - L[r]) * (dp[nb][e] - Dl[r]) * dz_ds;
        }
        dp[nb][e] = ds;
      }
    // dQ += dS K: K's rows k-major
    MINILLM_UNROLL
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t da[4];
      c_to_a_frag<T>(da, dp[2 * kk], dp[2 * kk + 1]);
      MINILLM_UNROLL
      for (int ob = 0; ob < kOB; ob += 2) {
        uint32_t kf[4];
        load_b_frag_kmajor<kD>(kf, Kc, kk * 16, ob);
        mma_m16n8k16<T>(dq[ob], da, kf, dq[ob]);
        mma_m16n8k16<T>(dq[ob + 1], da, kf + 2, dq[ob + 1]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  T* dQ = static_cast<T*>(a.dq);
  const float scale = float(a.scale);
  MINILLM_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int64_t i = row_i[r];
    if (i >= a.Nq) continue;
    const int64_t row = bh * a.Nq + i;  // dq is contiguous (B, H, Nq, D)
    MINILLM_UNROLL
    for (int ob = 0; ob < kOB; ++ob)
      MINILLM_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int d = ob * 8 + 2 * t + e;
        if (d < D) dQ[row * D + d] = from_float<T>(dq[ob][2 * r + e] * scale);
      }
  }
}

}  // namespace cuda
}  // namespace minillm
