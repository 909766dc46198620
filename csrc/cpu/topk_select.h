// The result handler of exact top-k: scores offered to per-(query, part) heaps, in the two score layouts the
// scorers produce, and the merge of a query's parts into its sorted results.
#pragma once
#include "cpu/topk_heap.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// Running top-k of Q queries, each split into `parts` corpus parts (one heap of k per (query, part)).
struct TopkHeaps {
  Cand* heaps;     // (Q, parts, k)
  int64_t* sizes;  // (Q, parts)
  int64_t parts, k;
  Cand* heap(int64_t q, int64_t part) const { return heaps + (q * parts + part) * k; }
  int64_t* size(int64_t q, int64_t part) const { return sizes + q * parts + part; }
};

// Offers scores S (nrows, ldS) -- row j of the tile against query i at S[j * ldS + i] -- to the running
// top-k of each query, W queries per test of the bar. Heaps of consecutive queries are hstride apart.
inline void select_by_row(const float* S, int64_t ldS, int64_t nrows, int64_t t0, int64_t nq, const float* qq,
                          const float* invq, const float* cc, int metric, int64_t k, Cand* heap0, int64_t hstride,
                          int64_t* size0, int64_t sstride, float* bar, int32_t* open) {
  typedef vec_t<float> V;
  typedef int32_t VI __attribute__((vector_size(VB)));
  constexpr int W = Vec<float>::W;
  for (int64_t j = 0; j < nrows; ++j) {
    const float* srow = S + j * ldS;
    const float inv_c = metric == kCosine && cc[j] > 0 ? 1.0f / std::sqrt(cc[j]) : 0.0f;
    for (int64_t i0 = 0; i0 < nq; i0 += W) {
      V key = vload(srow + i0);
      if (metric == kCosine) {
        key = key * vload(invq + i0) * inv_c;
      } else if (metric == kL2) {
        V dist = vload(qq + i0) + cc[j] - 2.0f * key;
        dist = dist < V{} ? V{} : dist;                // rounding can push a zero distance below 0
        key = -dist;
      }
      VI pass;
      std::memcpy(&pass, open + i0, VB);
      pass |= key > vload(bar + i0);
      uint64_t any[VB / 8], bits = 0;
      std::memcpy(any, &pass, VB);
      for (int w = 0; w < VB / 8; ++w) bits |= any[w];
      if (!bits) continue;
      for (int l = 0; l < W && i0 + l < nq; ++l) {
        if (!pass[l]) continue;
        const int64_t i = i0 + l;
        Cand c;
        c.key = key[l];
        c.nan = c.key != c.key;
        c.idx = t0 + j;
        if (c.nan) c.key = -INFINITY;
        Cand* hp = heap0 + i * hstride;
        int64_t* n = size0 + i * sstride;
        heap_push(hp, n, k, c);
        if (*n == k) {
          open[i] = 0;
          bar[i] = hp[0].key;
        }
      }
    }
  }
}

// Offers scores S (nq, lds) -- query r against row j of the tile at S[r * lds + j] -- to the running top-k of
// queries [q0, q0 + nq), one query at a time. qq: the queries' squared norms; cc: the rows' (cosine, l2).
inline void select_by_query(const float* S, int64_t lds, int64_t nrows, int64_t t0, int64_t q0, int64_t nq,
                            const float* qq, const float* cc, int metric, int64_t part, const TopkHeaps& th) {
  const int64_t k = th.k;
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t q = q0 + r;
    Cand* hp = th.heap(q, part);
    int64_t* n = th.size(q, part);
    const float* s = S + r * lds;
    const float inv_q = qq[q] > 0 ? 1.0f / std::sqrt(qq[q]) : 0.0f;
    for (int64_t j = 0; j < nrows; ++j) {
      float key = s[j];
      if (metric == kCosine) {
        key *= inv_q * (cc[j] > 0 ? 1.0f / std::sqrt(cc[j]) : 0.0f);
      } else if (metric == kL2) {
        const float dist = qq[q] + cc[j] - 2.0f * s[j];
        key = dist < 0.0f ? -0.0f : -dist;  // rounding can push a zero distance below 0
      }
      // Within one part indices increase, so an equal key never displaces a kept one.
      if (*n == k && !(key > hp[0].key)) continue;
      Cand c;
      c.key = key;
      c.nan = key != key;
      c.idx = t0 + j;
      if (c.nan) c.key = -INFINITY;
      heap_push(hp, n, k, c);
    }
  }
}

// Merges the parts of query q into hf (room for k) and writes them out best first: scores (L2 distances
// again) and indices, NaN scores last.
inline void write_results(const TopkHeaps& th, int64_t q, int metric, Cand* hf, float* out_scores,
                          int64_t* out_idx) {
  const int64_t k = th.k;
  int64_t n = 0;
  for (int64_t part = 0; part < th.parts; ++part) {
    const Cand* hp = th.heap(q, part);
    for (int64_t i = 0; i < *th.size(q, part); ++i) heap_push(hf, &n, k, hp[i]);
  }
  for (int64_t pos = n - 1; pos >= 0; --pos) {  // pop the worst into the last free slot
    const Cand c = hf[0];
    hf[0] = hf[pos];
    sift_down(hf, pos, 0);
    out_idx[q * k + pos] = c.idx;
    out_scores[q * k + pos] = c.nan ? NAN : (metric == kL2 ? -c.key : c.key);
  }
}

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
