// Exact top-k search for CUDA: tiled scoring with a running top-k per query in shared memory, and a
// second pass that merges the per-part results when the corpus is split across blocks.
//
// Scan kernel: a block takes up to QB queries and one part of the corpus. Per tile of 128 corpus rows
// (one per thread), the block stages 32 columns at a time in shared memory and every thread scores its
// row against the QB queries. A row that beats its query's current k-th best is appended to that
// query's candidate buffer (slot taken with a shared-memory atomicAdd); when a buffer could overflow on
// the next tile, the block bitonic-sorts it and keeps the best k, whose last entry becomes the new bar.
// Buffers hold k + 128 entries rounded up to a power of two, so any k fits that the buffer of one query
// fits in shared memory (k <= 1024 within the default 48 KB).
//
// Order: larger key first, ties to the lower index, NaN after every number (csrc/kernels.h, as the CPU
// kernel). Keys are the score for ip and cosine and minus the squared distance for l2.
#pragma once

#include "common.cuh"

namespace minillm {
namespace cuda {

constexpr int kTopkThreads = 128;
constexpr int kRowTile = kTopkThreads;  // corpus rows per tile: one per thread
constexpr int kColChunk = 32;           // corpus columns staged in shared memory at once
constexpr int kMaxQB = 8;               // queries per block
constexpr int64_t kNoIndex = INT64_MAX; // an empty slot: ranks after every real entry
constexpr size_t kDefaultSmem = 48 * 1024;

struct TopkPlan {
  int cap;                 // candidate slots per query (power of two >= k + kRowTile)
  int qb;                  // queries per block
  int64_t parts;           // corpus parts, one block each per query block
  int64_t rows_per_part;   // multiple of kRowTile
  size_t smem;             // dynamic shared memory per block (scan kernel)
  size_t merge_smem;       // dynamic shared memory per block (merge kernel)
  bool mma = false;        // the tensor-core scan of topk_mma.cuh
};

MINILLM_HD size_t topk_smem(int cap, int qb) {
  // ids (qb, cap) and bars' ids (qb) as int64 first (alignment), then keys (qb, cap), staged rows
  // (128, 33), staged query columns (qb, 32), query norms, counts, bars' keys (qb each)
  return sizeof(int64_t) * (size_t(qb) * cap + qb) +
         sizeof(float) * (size_t(qb) * cap + size_t(kRowTile) * (kColChunk + 1) + size_t(qb) * kColChunk + 3 * size_t(qb));
}

MINILLM_HD size_t topk_merge_smem(int cap) { return sizeof(int64_t) * (size_t(cap) + 1) + sizeof(float) * (size_t(cap) + 2); }

// The corpus split of a plan: with too few query blocks (of qb queries) to keep target_blocks busy, the corpus is
// cut into parts of whole tiles (of `rows` rows), at least 4 tiles each.
inline void split_corpus(int64_t Q, int64_t N, int qb, int rows, int64_t target_blocks, TopkPlan* plan) {
  const int64_t nqb = ceil_div(Q, qb), ntiles = ceil_div(N, rows);
  int64_t parts = max64(1, min64(ceil_div(target_blocks, nqb), ntiles / 4));
  const int64_t tiles_per_part = ceil_div(ntiles, parts);
  plan->parts = ceil_div(ntiles, tiles_per_part);
  plan->rows_per_part = tiles_per_part * rows;
}

// Returns kLaunchOk and fills `plan`, or kTooMuchSharedMemory when one query's buffer does not fit.
// `target_blocks` is how many blocks keep the device busy (a few per multiprocessor).
inline int topk_make_plan(int64_t Q, int64_t N, int64_t k, size_t max_smem, int64_t target_blocks, TopkPlan* plan) {
  int64_t cap = 1;
  while (cap < k + kRowTile) cap *= 2;
  if (cap > (int64_t(1) << 24) || topk_smem(int(cap), 1) > max_smem) return kTooMuchSharedMemory;
  int qb = 1;
  // More queries per block reuse each staged corpus tile; stay within the default 48 KB.
  while (qb < kMaxQB && qb < Q && topk_smem(int(cap), qb + 1) <= (max_smem < kDefaultSmem ? max_smem : kDefaultSmem)) ++qb;
  plan->cap = int(cap);
  plan->qb = qb;
  split_corpus(Q, N, qb, kRowTile, target_blocks, plan);
  plan->smem = topk_smem(int(cap), qb);
  plan->merge_smem = topk_merge_smem(int(cap));
  return kLaunchOk;
}

// Bytes of device scratch the launch needs (per-part results), 0 when the corpus is not split.
MINILLM_HD size_t topk_workspace_bytes(const TopkPlan& p, int64_t Q, int64_t k) {
  return p.parts > 1 ? size_t(Q * p.parts * k) * (sizeof(int64_t) + sizeof(float)) : 0;
}

MINILLM_DEVICE bool better(float ka, int64_t ia, float kb, int64_t ib) {
  const bool na = ka != ka, nb = kb != kb;
  if (na != nb) return nb;
  if (!na && ka != kb) return ka > kb;
  return ia < ib;
}

// One query's candidate buffer in shared memory.
struct Cands {
  float* keys;     // (cap)
  int64_t* ids;    // (cap)
  float* count;    // entries in use, as a float-sized int slot
  float* bar_key;  // the k-th best so far (NaN with bar_id = kNoIndex: accept anything)
  int64_t* bar_id;
};

MINILLM_DEVICE int* count_of(const Cands& c) { return reinterpret_cast<int*>(c.count); }

MINILLM_DEVICE void offer(const Cands& c, float key, int64_t id) {
  if (!better(key, id, *c.bar_key, *c.bar_id)) return;
  const int slot = atomicAdd(count_of(c), 1);
  c.keys[slot] = key;
  c.ids[slot] = id;
}

// Block-wide: sorts the buffer best first (empty slots last) and keeps the best k. Called by every
// thread of the block between barriers.
MINILLM_DEVICE void sort_keep(const Cands& c, int cap, int64_t k) {
  const int tid = int(threadIdx.x);
  const int n = *count_of(c);
  for (int s = n + tid; s < cap; s += kTopkThreads) {
    c.keys[s] = NAN;
    c.ids[s] = kNoIndex;
  }
  __syncthreads();
  for (int size = 2; size <= cap; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int t = tid; t < cap / 2; t += kTopkThreads) {
        const int i = 2 * t - (t & (stride - 1)), j = i + stride;  // the pair differs in bit `stride`
        const bool best_first = (i & size) == 0;
        const bool swap = best_first ? better(c.keys[j], c.ids[j], c.keys[i], c.ids[i])
                                     : better(c.keys[i], c.ids[i], c.keys[j], c.ids[j]);
        if (swap) {
          const float kt = c.keys[i];
          c.keys[i] = c.keys[j];
          c.keys[j] = kt;
          const int64_t it = c.ids[i];
          c.ids[i] = c.ids[j];
          c.ids[j] = it;
        }
      }
      __syncthreads();
    }
  }
  if (tid == 0) {
    const int kept = n < k ? n : int(k);
    *count_of(c) = kept;
    if (kept == k) {
      *c.bar_key = c.keys[k - 1];
      *c.bar_id = c.ids[k - 1];
    }
  }
  __syncthreads();
}

MINILLM_DEVICE float score_of(float key, int metric) {
  if (key != key) return NAN;
  return metric == kL2 ? -key : key;
}

// Writes the best k of a sorted buffer: final results or one part's candidates.
MINILLM_DEVICE void write_out(const Cands& c, int64_t k, int metric, bool final, float* scores, int64_t* idx) {
  for (int64_t r = threadIdx.x; r < k; r += kTopkThreads) {
    scores[r] = final ? score_of(c.keys[r], metric) : c.keys[r];
    idx[r] = c.ids[r];
  }
}

// Block-wide: query q's final sort, then its k best to the output (one part) or to the part's slots.
MINILLM_DEVICE void finish_query(const TopkArgs& a, const TopkPlan& p, const Cands& c, int64_t q, int64_t part,
                                 float* part_keys, int64_t* part_ids) {
  sort_keep(c, p.cap, a.k);
  if (p.parts == 1)
    write_out(c, a.k, a.metric, true, a.out_scores + q * a.k, a.out_idx + q * a.k);
  else
    write_out(c, a.k, a.metric, false, part_keys + (q * p.parts + part) * a.k, part_ids + (q * p.parts + part) * a.k);
}

// Block-wide: the squared norms of queries q0 .. q0 + nq - 1 (fp32, one warp a query; 0 for slots past nq) and
// QB empty candidate buffers (count 0, a bar that accepts anything).
MINILLM_DEVICE void init_queries(const TopkArgs& a, int64_t q0, int nq, int QB, float* qnorm2, float* counts,
                                 float* bar_keys, int64_t* bar_ids) {
  const int tid = int(threadIdx.x), lane = tid % kWarp, warp = tid / kWarp;
  for (int qq = warp; qq < QB; qq += kTopkThreads / kWarp) {
    float acc = 0.0f;
    for (int64_t c = lane; c < a.d && qq < nq; c += kWarp) {
      const float x = a.queries[(q0 + qq) * a.d + c];
      acc += x * x;
    }
    acc = warp_sum(acc);
    if (lane == 0) qnorm2[qq] = acc;
  }
  if (tid < QB) {
    *reinterpret_cast<int*>(counts + tid) = 0;
    bar_keys[tid] = NAN;
    bar_ids[tid] = kNoIndex;
  }
}

template <typename T>
__global__ void __launch_bounds__(kTopkThreads)
    topk_scan_kernel(TopkArgs a, TopkPlan p, float* part_keys, int64_t* part_ids) {
  const int tid = int(threadIdx.x);
  const int cap = p.cap, QB = p.qb;
  const int64_t part = int64_t(blockIdx.x) % p.parts, q0 = int64_t(blockIdx.x) / p.parts * QB;
  const int nq = int(min64(QB, a.Q - q0));
  const int64_t r_begin = part * p.rows_per_part, r_end = min64(a.N, r_begin + p.rows_per_part);

  MINILLM_SHARED_FLOATS(smem);
  int64_t* ids = reinterpret_cast<int64_t*>(smem);   // (QB, cap)
  int64_t* bar_ids = ids + size_t(QB) * cap;         // (QB)
  float* keys = reinterpret_cast<float*>(bar_ids + QB);  // (QB, cap)
  float* Cs = keys + size_t(QB) * cap;               // (128, 33) staged corpus columns
  float* Qs = Cs + kRowTile * (kColChunk + 1);       // (QB, 32) staged query columns
  float* qnorm2 = Qs + QB * kColChunk;               // (QB)
  float* counts = qnorm2 + QB;                        // (QB), used as ints
  float* bar_keys = counts + QB;                      // (QB)
  auto cands = [&](int qq) {
    return Cands{keys + size_t(qq) * cap, ids + size_t(qq) * cap, counts + qq, bar_keys + qq, bar_ids + qq};
  };

  init_queries(a, q0, nq, QB, qnorm2, counts, bar_keys, bar_ids);

  const T* corpus = static_cast<const T*>(a.corpus);
  for (int64_t t0 = r_begin; t0 < r_end; t0 += kRowTile) {
    const int64_t row = t0 + tid;
    float acc[kMaxQB];
    for (int qq = 0; qq < kMaxQB; ++qq) acc[qq] = 0.0f;
    float cc = 0.0f;  // the row's squared norm
    for (int64_t c0 = 0; c0 < a.d; c0 += kColChunk) {
      __syncthreads();  // the staged columns of the previous chunk are consumed
      // Consecutive threads read consecutive columns of one row: coalesced loads.
      for (int e = tid; e < kRowTile * kColChunk; e += kTopkThreads) {
        const int rl = e / kColChunk, cl = e % kColChunk;
        const int64_t r = t0 + rl, c = c0 + cl;
        Cs[rl * (kColChunk + 1) + cl] = (r < r_end && c < a.d) ? to_float(corpus[r * a.corpus_stride + c]) : 0.0f;
      }
      for (int e = tid; e < QB * kColChunk; e += kTopkThreads) {
        const int qq = e / kColChunk;
        const int64_t c = c0 + e % kColChunk;
        Qs[e] = (qq < nq && c < a.d) ? a.queries[(q0 + qq) * a.d + c] : 0.0f;
      }
      __syncthreads();
      const float* crow = Cs + tid * (kColChunk + 1);
      for (int cl = 0; cl < kColChunk; ++cl) {
        const float x = crow[cl];
        cc += x * x;
        for (int qq = 0; qq < kMaxQB; ++qq)
          if (qq < QB) acc[qq] += Qs[qq * kColChunk + cl] * x;
      }
    }
    if (row < r_end) {
      for (int qq = 0; qq < nq; ++qq) {
        float key = acc[qq];
        if (a.metric == kCosine) {
          const float qn = qnorm2[qq];
          key *= (qn > 0.0f ? 1.0f / sqrtf(qn) : 0.0f) * (cc > 0.0f ? 1.0f / sqrtf(cc) : 0.0f);
        } else if (a.metric == kL2) {
          const float dist = qnorm2[qq] + cc - 2.0f * acc[qq];
          key = dist < 0.0f ? -0.0f : -dist;  // rounding can push a zero distance below 0
        }
        offer(cands(qq), key, row);
      }
    }
    __syncthreads();
    for (int qq = 0; qq < nq; ++qq)
      if (*reinterpret_cast<const int*>(counts + qq) > cap - kRowTile) sort_keep(cands(qq), cap, a.k);
  }

  for (int qq = 0; qq < nq; ++qq) finish_query(a, p, cands(qq), q0 + qq, part, part_keys, part_ids);
}

// One block per query: merges its parts' k candidates each.
__global__ void __launch_bounds__(kTopkThreads)
    topk_merge_kernel(TopkArgs a, TopkPlan p, const float* part_keys, const int64_t* part_ids) {
  const int tid = int(threadIdx.x);
  const int64_t q = blockIdx.x;
  MINILLM_SHARED_FLOATS(smem);
  int64_t* ids = reinterpret_cast<int64_t*>(smem);  // (cap)
  int64_t* bar_id = ids + p.cap;
  float* keys = reinterpret_cast<float*>(bar_id + 1);  // (cap)
  float* count = keys + p.cap;
  float* bar_key = count + 1;
  const Cands c{keys, ids, count, bar_key, bar_id};
  if (tid == 0) {
    *count_of(c) = 0;
    *bar_key = NAN;
    *bar_id = kNoIndex;
  }
  __syncthreads();
  const int64_t total = p.parts * a.k;
  const float* pk = part_keys + q * total;
  const int64_t* pi = part_ids + q * total;
  for (int64_t e0 = 0; e0 < total; e0 += kTopkThreads) {
    const int64_t e = e0 + tid;
    if (e < total && pi[e] != kNoIndex) offer(c, pk[e], pi[e]);
    __syncthreads();
    const bool full = *count_of(c) > p.cap - kTopkThreads;
    __syncthreads();  // every thread has read the count before the next round of offers moves it
    if (full) sort_keep(c, p.cap, a.k);
  }
  sort_keep(c, p.cap, a.k);
  write_out(c, a.k, a.metric, true, a.out_scores + q * a.k, a.out_idx + q * a.k);
}

}  // namespace cuda
}  // namespace minillm
