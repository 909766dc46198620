// Tensor-core attention forward (FlashAttention-2's loop): a block of 4 warps owns 64 query rows of one
// (b, h), 16 per warp; key/value tiles of 64 rows stream through shared memory by cp.async, the next tile's
// copy in flight while the current one is used. Per tile and warp: S = Q K^T on mma.m16n8k16 (Q's fragments
// stay in registers), scores and masks on the fragments (flash_mask.cuh), the online softmax in registers
// (flash_softmax.cuh), and O += P V with P's fragments reused as the A operand. fp32 accumulation throughout;
// P is rounded to T for the second product, as FlashAttention does.
//
// Semantics are those of csrc/kernels.h (AttnFwdArgs): q (B, H, Nq, D), k/v (B, Hkv, Nk, D) with (b, h, n)
// strides, grouped-query heads read in place, key and query padding, the band of causal/window, softcap,
// ALiBi, sinks; padded or out-of-range keys are never read (zero-filled copies), a row that sees no key gets
// out = 0 and lse = +inf (with a sink: out = 0, lse = the sink).
#pragma once

#include "flash_mask.cuh"
#include "flash_softmax.cuh"
#include "flash_traits.cuh"

namespace minillm {
namespace cuda {

template <typename Args>
MINILLM_DEVICE int64_t flash_kv_head(const Args& a, int64_t h) {
  return a.Hkv > 0 && a.Hkv != a.H ? h / (a.H / a.Hkv) : h;
}

// The block of BM query rows a forward or dQ block owns (blockIdx.x over (b, h, query block), the longest causal
// rows first, the short ones fill in): its masks, score modifiers, operand rows, and the key tiles its rows see,
// [j_first, j_end) in whole tiles of BN from a multiple of BN.
template <typename Args, int BM, int BN>
struct QueryBlock {
  int64_t bh, b, h, hk, q0;
  const uint8_t* kpm;
  const uint8_t* qpm;
  FlashBand band;
  FlashScore score;
  const uint16_t* q;  // row 0 of (b, h), and of (b, hk) for k, v
  const uint16_t* k;
  const uint16_t* v;
  int64_t j_first, j_end;
  int n_tiles;

  MINILLM_DEVICE static int64_t bh_of(const Args& a) { return blockIdx.x / ceil_div(a.Nq, BM); }
  MINILLM_DEVICE explicit QueryBlock(const Args& a)
      : bh(bh_of(a)),
        b(bh / a.H),
        h(bh % a.H),
        hk(flash_kv_head(a, h)),
        q0((ceil_div(a.Nq, BM) - 1 - int64_t(blockIdx.x) % ceil_div(a.Nq, BM)) * BM),
        kpm(a.kpm ? a.kpm + b * a.Nk : nullptr),
        qpm(a.qpm ? a.qpm + b * a.Nq : nullptr),
        band(a),
        score(a, b, h),
        q(static_cast<const uint16_t*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1]),
        k(static_cast<const uint16_t*>(a.k) + b * a.k_stride[0] + hk * a.k_stride[1]),
        v(static_cast<const uint16_t*>(a.v) + b * a.v_stride[0] + hk * a.v_stride[1]) {
    j_first = band.first(q0) / BN * BN;
    j_end = band.end(min64(a.Nq, q0 + BM) - 1, a.Nk);
    n_tiles = j_end > j_first ? int(ceil_div(j_end - j_first, BN)) : 0;
  }
};

template <typename T, int kD>
__global__ void __launch_bounds__(FlashTraits<kD>::kThreads) flash_fwd_kernel(AttnFwdArgs a) {
  using Tr = FlashTraits<kD>;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, kNB = BN / 8, kOB = kD / 8, kKS = kD / 16;
  const QueryBlock<AttnFwdArgs, BM, BN> blk(a);
  const int64_t bh = blk.bh, h = blk.h, q0 = blk.q0, j_first = blk.j_first, j_end = blk.j_end;
  const int n_tiles = blk.n_tiles;
  const uint8_t *kpm = blk.kpm, *qpm = blk.qpm;
  const int lane = int(threadIdx.x) % kWarp, warp = int(threadIdx.x) / kWarp, g = lane / 4, t = lane % 4;
  const int D = int(a.D);

  MINILLM_SHARED_FLOATS(smem_f);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem_f);  // (BM, kD)
  uint16_t* Ks = Qs + BM * kD;                          // (2, BN, kD)
  uint16_t* Vs = Ks + 2 * BN * kD;                      // (2, BN, kD)

  load_tile_async<kD, BM, Tr::kThreads>(Qs, blk.q, a.q_stride[2], q0, a.Nq, D, qpm);
  if (n_tiles > 0) {
    load_tile_async<kD, BN, Tr::kThreads>(Ks, blk.k, a.k_stride[2], j_first, j_end, D, kpm);
    load_tile_async<kD, BN, Tr::kThreads>(Vs, blk.v, a.v_stride[2], j_first, j_end, D, kpm);
  }
  cp_async_commit();

  const float sink = a.mods.sinks ? static_cast<const float*>(a.mods.sinks)[h] : -INFINITY;
  float m[2] = {sink, sink}, l[2], o[kOB][4];
  l[0] = l[1] = sink == -INFINITY ? 0.0f : 1.0f;  // a sink is a first score with no value row
  MINILLM_UNROLL
  for (int ob = 0; ob < kOB; ++ob)
    MINILLM_UNROLL
    for (int e = 0; e < 4; ++e) o[ob][e] = 0.0f;
  uint32_t qf[kKS][4];
  const int64_t row_i[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};

  for (int n = 0; n < n_tiles; ++n) {
    const int stage = n & 1;
    const int64_t j0 = j_first + int64_t(n) * BN;
    if (n + 1 < n_tiles) {  // the next tile's copy overlaps this tile's products
      uint16_t* Kn = Ks + (stage ^ 1) * BN * kD;
      uint16_t* Vn = Vs + (stage ^ 1) * BN * kD;
      load_tile_async<kD, BN, Tr::kThreads>(Kn, blk.k, a.k_stride[2], j0 + BN, j_end, D, kpm);
      load_tile_async<kD, BN, Tr::kThreads>(Vn, blk.v, a.v_stride[2], j0 + BN, j_end, D, kpm);
    }
    cp_async_commit();
    cp_async_wait<1>();  // every group but the newest has landed: Q and this tile
    __syncthreads();
    if (n == 0) {
      MINILLM_UNROLL
      for (int ks = 0; ks < kKS; ++ks) load_a_frag<kD>(qf[ks], Qs, warp * 16, ks);
    }
    const uint16_t* Kc = Ks + stage * BN * kD;
    const uint16_t* Vc = Vs + stage * BN * kD;

    // S = Q K^T: (16, BN) per warp as kNB fragments of 8 keys
    float s[kNB][4];
    MINILLM_UNROLL
    for (int nb = 0; nb < kNB; ++nb)
      MINILLM_UNROLL
      for (int e = 0; e < 4; ++e) s[nb][e] = 0.0f;
    MINILLM_UNROLL
    for (int ks = 0; ks < kKS; ++ks)
      MINILLM_UNROLL
      for (int nb = 0; nb < kNB; nb += 2) {
        uint32_t kf[4];
        load_b_frag_nmajor<kD>(kf, Kc, nb * 8, ks);
        mma_m16n8k16<T>(s[nb], qf[ks], kf, s[nb]);
        mma_m16n8k16<T>(s[nb + 1], qf[ks], kf + 2, s[nb + 1]);
      }
    MINILLM_UNROLL
    for (int nb = 0; nb < kNB; ++nb)
      MINILLM_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int64_t i = row_i[e >> 1], j = j0 + nb * 8 + 2 * t + (e & 1);
        const bool visible = i < a.Nq && j < j_end && (kpm == nullptr || kpm[j] != 0) &&
                             (qpm == nullptr || qpm[i] != 0) && blk.band.sees(i, j);
        float unused;
        s[nb][e] = visible ? blk.score.apply(s[nb][e], i, j, &unused) : -INFINITY;
      }
    online_softmax_tile<kNB, kOB>(s, m, l, o);

    // O += P V: P's fragments as A, V's rows (k-major) by ldmatrix .trans
    MINILLM_UNROLL
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4];
      c_to_a_frag<T>(pa, s[2 * kk], s[2 * kk + 1]);
      MINILLM_UNROLL
      for (int ob = 0; ob < kOB; ob += 2) {
        uint32_t vf[4];
        load_b_frag_kmajor<kD>(vf, Vc, kk * 16, ob);
        mma_m16n8k16<T>(o[ob], pa, vf, o[ob]);
        mma_m16n8k16<T>(o[ob + 1], pa, vf + 2, o[ob + 1]);
      }
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }
  cp_async_wait<0>();  // with no key tile, Q's copy is still to be released

  T* out = static_cast<T*>(a.out);
  float* lse = static_cast<float*>(a.lse);
  MINILLM_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int64_t i = row_i[r];
    if (i >= a.Nq) continue;
    const int64_t row = bh * a.Nq + i;  // out is contiguous (B, H, Nq, D)
    const bool empty = l[r] == 0.0f || (qpm != nullptr && qpm[i] == 0);
    const float inv_l = empty ? 0.0f : 1.0f / l[r];
    MINILLM_UNROLL
    for (int ob = 0; ob < kOB; ++ob)
      MINILLM_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int d = ob * 8 + 2 * t + e;
        if (d < D) out[row * D + d] = from_float<T>(empty ? 0.0f : o[ob][2 * r + e] * inv_l);
      }
    if (t == 0) lse[row] = empty ? INFINITY : m[r] + logf(l[r]);
  }
}

}  // namespace cuda
}  // namespace minillm
