// Top-k for many queries on tensor cores: the scoring tile as mma.m16n8k16, the running top-k of topk.cuh.
//
// A block owns 16 queries (one mma tile's rows) and one part of the corpus, in tiles of 128 rows (32 per warp,
// four 8-row n-blocks). Corpus rows stream through shared memory by cp.async, 64 columns a stage, two stages
// deep, and every warp multiplies the block's queries by its 32 rows. The corpus is bf16 or f16 and exact as
// stored; an fp32 query is split into q_hi + q_lo, both of the corpus's type (q_lo = q - q_hi rounded), and
// scored by two products summed in fp32, so a score misses the fp32 one only by q's third 8-bit (bf16) or 11-bit
// (f16) part: ~2^-17 (bf16) of |q| |c|. Norms (cosine, l2) are summed in fp32 from the exact 16-bit rows and the
// fp32 queries. Candidates then go through the same shared-memory buffers, sort and merge as the SIMT scan
// (topk.cuh): ties to the lower index, NaN rows last.
#pragma once

#include "flash_traits.cuh"
#include "topk.cuh"

namespace minillm {
namespace cuda {

constexpr int kMmaQB = 16;      // queries per block
constexpr int kMmaRows = 128;   // corpus rows per tile
constexpr int kMmaCols = 64;    // corpus columns per cp.async stage

MINILLM_HD int64_t topk_mma_dim(int64_t d) { return ceil_div(d, kMmaCols) * kMmaCols; }

MINILLM_HD size_t topk_mma_smem(int cap, int64_t d) {
  // ids (16, cap), bars' ids (16) as int64; keys (16, cap); q_hi, q_lo (16, dP) and the corpus stages
  // (2, 128, 64) as 16-bit; row norms (128), query norms, counts, bars' keys (16 each) as floats
  return sizeof(int64_t) * (size_t(kMmaQB) * cap + kMmaQB) + sizeof(float) * size_t(kMmaQB) * cap +
         sizeof(uint16_t) * (2 * size_t(kMmaQB) * size_t(topk_mma_dim(d)) + 2 * size_t(kMmaRows) * kMmaCols) +
         sizeof(float) * (kMmaRows + 3 * kMmaQB);
}

// The plan of the tensor-core scan (cap, parts as topk_make_plan chooses them, 16 queries a block), or
// kTooMuchSharedMemory when its buffers and tiles do not fit.
inline int topk_make_plan_mma(int64_t Q, int64_t N, int64_t k, int64_t d, size_t max_smem, int64_t target_blocks,
                              TopkPlan* plan) {
  int64_t cap = 1;
  while (cap < k + kMmaRows) cap *= 2;
  if (cap > (int64_t(1) << 24) || topk_mma_smem(int(cap), d) > max_smem) return kTooMuchSharedMemory;
  plan->cap = int(cap);
  plan->qb = kMmaQB;
  split_corpus(Q, N, kMmaQB, kMmaRows, target_blocks, plan);
  plan->smem = topk_mma_smem(int(cap), d);
  plan->merge_smem = topk_merge_smem(int(cap));
  plan->mma = true;
  return kLaunchOk;
}

// Whether the tensor-core scan takes these arguments: a 16-bit corpus whose rows cp.async can copy (16-byte
// aligned, d a multiple of 8), at least one full tile of queries, sm_80 or newer.
inline bool topk_mma_ok(const TopkArgs& a, int sm) {
  return sm >= 80 && (a.dtype == kBF16 || a.dtype == kF16) && a.Q >= kMmaQB && a.d % 8 == 0 &&
         a.corpus_stride % 8 == 0 && (reinterpret_cast<uintptr_t>(a.corpus) & 15u) == 0;
}

template <typename T>
__global__ void __launch_bounds__(kTopkThreads)
    topk_mma_scan_kernel(TopkArgs a, TopkPlan p, float* part_keys, int64_t* part_ids) {
  static_assert(kTopkThreads == 4 * kWarp && kMmaRows == 4 * 32, "4 warps of 32 corpus rows");
  const int tid = int(threadIdx.x), lane = tid % kWarp, warp = tid / kWarp, g = lane / 4, t = lane % 4;
  const int cap = p.cap;
  const int64_t part = int64_t(blockIdx.x) % p.parts, q0 = int64_t(blockIdx.x) / p.parts * kMmaQB;
  const int nq = int(min64(kMmaQB, a.Q - q0));
  const int64_t r_begin = part * p.rows_per_part, r_end = min64(a.N, r_begin + p.rows_per_part);
  const int dP = int(topk_mma_dim(a.d)), nchunks = dP / kMmaCols;

  MINILLM_SHARED_FLOATS(smem);
  int64_t* ids = reinterpret_cast<int64_t*>(smem);           // (16, cap)
  int64_t* bar_ids = ids + size_t(kMmaQB) * cap;             // (16)
  float* keys = reinterpret_cast<float*>(bar_ids + kMmaQB);  // (16, cap)
  uint16_t* Qhi = reinterpret_cast<uint16_t*>(keys + size_t(kMmaQB) * cap);  // (16, dP), swizzled rows
  uint16_t* Qlo = Qhi + kMmaQB * dP;                         // (16, dP)
  uint16_t* Cs = Qlo + kMmaQB * dP;                          // (2, 128, 64), swizzled rows
  float* rnorm = reinterpret_cast<float*>(Cs + 2 * kMmaRows * kMmaCols);  // (128)
  float* qnorm2 = rnorm + kMmaRows;                          // (16)
  float* counts = qnorm2 + kMmaQB;                           // (16), used as ints
  float* bar_keys = counts + kMmaQB;                         // (16)
  auto cands = [&](int qq) {
    return Cands{keys + size_t(qq) * cap, ids + size_t(qq) * cap, counts + qq, bar_keys + qq, bar_ids + qq};
  };
  // Element (row, col) of a swizzled 16-bit row of dP elements (chunks of 8 permuted by row % 8, as flash_traits).
  auto qat = [&](int row, int col) { return row * dP + (((col >> 3) ^ (row & 7)) << 3) + (col & 7); };

  const T* corpus = static_cast<const T*>(a.corpus);
  const int n_tiles = r_end > r_begin ? int(ceil_div(r_end - r_begin, kMmaRows)) : 0;
  const int steps = n_tiles * nchunks;
  auto load_step = [&](int s, int st) {  // stage st <- rows of tile s / nchunks, columns of chunk s % nchunks
    const int64_t t0 = r_begin + int64_t(s / nchunks) * kMmaRows, c0 = int64_t(s % nchunks) * kMmaCols;
    uint16_t* dst = Cs + st * kMmaRows * kMmaCols;
    for (int e = tid; e < kMmaRows * (kMmaCols / 8); e += kTopkThreads) {
      const int r = e / (kMmaCols / 8), c = e % (kMmaCols / 8);
      const int64_t row = t0 + r, col = c0 + 8 * c;
      const bool valid = row < r_end && col < a.d;
      cp_async_16(dst + swizzle<kMmaCols>(r, c), valid ? corpus + row * a.corpus_stride + col : corpus, valid);
    }
  };
  if (steps > 0) load_step(0, 0);
  cp_async_commit();

  // Queries: q_hi + q_lo in T (zero past d and past the last query), squared norms in fp32.
  for (int e = tid; e < kMmaQB * dP; e += kTopkThreads) {
    const int qq = e / dP, c = e % dP;
    const float x = (qq < nq && c < a.d) ? a.queries[(q0 + qq) * a.d + c] : 0.0f;
    const T hi = from_float<T>(x);
    Qhi[qat(qq, c)] = hi.bits;
    Qlo[qat(qq, c)] = from_float<T>(x - to_float(hi)).bits;
  }
  init_queries(a, q0, nq, kMmaQB, qnorm2, counts, bar_keys, bar_ids);
  __syncthreads();  // counts and bars set before any offer (and before the final sort of an empty part)

  float acc[4][4];
  float rn = 0.0f;  // the squared norm of this lane's corpus row of the tile (row warp * 32 + lane)
  for (int s = 0; s < steps; ++s) {
    const int st = s & 1, chunk = s % nchunks;
    if (s + 1 < steps) load_step(s + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // this stage (and, the first time, the queries) written by every thread
    if (chunk == 0) {
      MINILLM_UNROLL
      for (int nb = 0; nb < 4; ++nb)
        MINILLM_UNROLL
        for (int e = 0; e < 4; ++e) acc[nb][e] = 0.0f;
      rn = 0.0f;
    }
    const uint16_t* Cc = Cs + st * kMmaRows * kMmaCols;
    for (int c = 0; c < kMmaCols; ++c) {
      const float x = to_float(T{Cc[swizzle<kMmaCols>(warp * 32 + lane, c / 8) + c % 8]});
      rn += x * x;
    }
    MINILLM_UNROLL
    for (int ks = 0; ks < kMmaCols / 16; ++ks) {
      const int col = chunk * kMmaCols + 16 * ks + 8 * (lane / 16);
      uint32_t ah[4], al[4];
      ldmatrix<4, false>(ah, Qhi + qat(lane % 16, col));
      ldmatrix<4, false>(al, Qlo + qat(lane % 16, col));
      MINILLM_UNROLL
      for (int nb = 0; nb < 4; nb += 2) {
        uint32_t bf[4];
        load_b_frag_nmajor<kMmaCols>(bf, Cc, warp * 32 + nb * 8, ks);
        mma_m16n8k16<T>(acc[nb], ah, bf, acc[nb]);
        mma_m16n8k16<T>(acc[nb], al, bf, acc[nb]);
        mma_m16n8k16<T>(acc[nb + 1], ah, bf + 2, acc[nb + 1]);
        mma_m16n8k16<T>(acc[nb + 1], al, bf + 2, acc[nb + 1]);
      }
    }
    if (chunk == nchunks - 1) {  // the tile's scores are complete: offer them
      const int64_t t0 = r_begin + int64_t(s / nchunks) * kMmaRows;
      rnorm[warp * 32 + lane] = rn;
      __syncwarp();
      MINILLM_UNROLL
      for (int nb = 0; nb < 4; ++nb)
        MINILLM_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int qq = g + 8 * (e >> 1), rl = warp * 32 + nb * 8 + 2 * t + (e & 1);
          const int64_t row = t0 + rl;
          if (qq >= nq || row >= r_end) continue;
          float key = acc[nb][e];
          const float cc = rnorm[rl];
          if (a.metric == kCosine) {
            const float qn = qnorm2[qq];
            key *= (qn > 0.0f ? 1.0f / sqrtf(qn) : 0.0f) * (cc > 0.0f ? 1.0f / sqrtf(cc) : 0.0f);
          } else if (a.metric == kL2) {
            const float dist = qnorm2[qq] + cc - 2.0f * acc[nb][e];
            key = dist < 0.0f ? -0.0f : -dist;
          }
          offer(cands(qq), key, row);
        }
      __syncthreads();
      for (int qq = 0; qq < nq; ++qq)
        if (*reinterpret_cast<const int*>(counts + qq) > cap - kMmaRows) sort_keep(cands(qq), cap, a.k);
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }
  cp_async_wait<0>();

  for (int qq = 0; qq < nq; ++qq) finish_query(a, p, cands(qq), q0 + qq, part, part_keys, part_ids);
}

}  // namespace cuda
}  // namespace minillm
