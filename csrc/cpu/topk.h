// Exact top-k: the plan, the many-query GEMM scorer, selection into the heaps and the merge.
#pragma once
#include "cpu/topk_scan.h"
#include "cpu/topk_heap.h"
#include "cpu/gemm_ukernel.h"
#include "cpu/parallel.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// Queries per work item. A GEMM-scored item reads the whole corpus (or its part) once, so more queries per
// item read it fewer times: with 16 registers 128 (QT 192 KB, in L2) took Q = 256 on 1M x 384 from 1.90
// to 1.48 s and Q = 4096 on 200k x 384 from 5.9-6.3 to 5.0-5.3 s (2-core Zen 3, C++ harness). At AVX-512 on
// a Zen 4 (1 MB L2), 128 against the 64 of the Zen 5: medians 0.92 at Q = 256, 0.94 at Q = 4096 on 200k x
// 384; 256 was within 2% of 128.
constexpr int64_t kQb = 128;

// Queries from which top-k scores tiles as a GEMM rather than by dot products (kMQ queries per pass over a
// tile). 1M x 384, 2 threads, C++ harness on a Zen 4, GEMM against dot products: Q = 16 0.50 of the time
// at AVX-512 (0.43 at AVX2), bf16 Q = 12 0.63, Q = 8 0.89 (AVX2 0.75); at Q = 4 they are equal, at Q = 2 the
// GEMM is 1.45x slower. Where the scans request rows ahead (use_scan_prefetch(), Zen 5) dot products on rows
// read in place keep the lead further. 1M x 384, 2 threads, on the 2-core Zen 5: fp32 rows, separate
// processes in turn, ms: Q = 8 40-72 (median 45) against the GEMM's 52-83 (median 59); from Q = 9 (a third
// pass over each tile) 62-79 against 54-58. 16-bit and int8 rows (fused, timed in turn in one process, ms):
// Q = 9 fp16 32 / 55, bf16 33 / 56, int8 25 / 50; Q = 12 40 / 55, 42 / 56, 32 / 50; Q = 16 52 / 55,
// 54 / 56, 41 / 50. That holds for corpora streamed from memory; one that fits the caches is scored at the
// FMA rate, where a GEMM beats the passes (20k x 64 fp16, Q = 16: 0.6 against 0.3 ms), so the longer
// stretch needs a corpus beyond kStreamedBytes.
constexpr int64_t kGemmMinQ = 8;
constexpr int64_t kGemmMinQPrefetch = 9;         // fp32 rows read in place, or small 16-bit and int8 corpora
constexpr int64_t kGemmMinQPrefetchStored = 17;  // 16-bit and int8 corpora of kStreamedBytes or more
constexpr int64_t kStreamedBytes = int64_t(64) << 20;
static_assert(kGemmMinQ > kMQ, "a few-query scan (16-bit or int8 rows widened in registers) is never a GEMM");

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

int topk_impl(const TopkArgs& a) {
  const int64_t Q = a.Q, N = a.N, d = a.d, k = a.k;
  const int64_t dp = round_up(d, kPad);
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  // Below the GEMM's query count the kernels read rows in place: fp32 rows of whole vectors, and 16-bit and
  // int8 rows widened in registers as each value is used (fused), in passes of kMQ queries over each tile
  // (which then stays in L2). Otherwise (GEMM, or fp32 rows of part vectors) a tile is converted (int8:
  // and scaled) once into fp32 rows that every query reuses.
  const bool in_place = a.dtype != kF32 || d == dp;
  // Many queries: each tile is scored as a GEMM, tile rows x (dp x queries) with the queries transposed
  // once per work item, which runs near the FMA peak; per-pair dot products would spend a horizontal sum
  // on every (query, row). Scores of one row for all queries then sit side by side, so the running
  // top-k's bar is tested a vector of queries at a time.
  const bool streamed = N * a.corpus_stride * elem_size(a.dtype) >= kStreamedBytes;
  const int64_t gemm_min_q = !in_place || !use_scan_prefetch()   ? kGemmMinQ
                             : a.dtype != kF32 && streamed ? kGemmMinQPrefetchStored
                                                           : kGemmMinQPrefetch;
  const bool use_gemm = Q >= gemm_min_q;
  const bool fused = a.dtype != kF32 && !use_gemm;
  const bool direct = (a.dtype == kF32 && d == dp) || fused;
  // ~32 KB of corpus per tile keeps it in L1/L2 while every query of the item passes over it.
  // Rows scanned in place for a few queries (fused) need no converted copy: longer tiles, fewer passes.
  // As a GEMM (many queries) a tile is whole micro-kernel row tiles (a remainder tile of 2 rows runs at a
  // third of the FMA rate), ~24 K values: 60 rows of 384 dimensions.
  const int64_t tile = fused || (direct && Q <= kMQ) ? 256
                       : use_gemm ? imax(kMR, imin(510, (24576 / dp) / kMR * kMR))
                                  : imax(4, imin(512, 8192 / dp));
  const int64_t nqb = (Q + kQb - 1) / kQb;
  const int64_t ntiles = (N + tile - 1) / tile;
  // Few query blocks (small Q): also split the corpus, one running top-k per (query, part).
  const int64_t parts = nqb >= nt ? 1 : imax(1, imin(ntiles, (2 * nt + nqb - 1) / nqb));
  const int64_t tiles_per_part = (ntiles + parts - 1) / parts;

  // int8 codes for a few queries: integer dot products against int16 queries (codes padded to kI8Pad).
  const bool i8q = fused && a.dtype == kI8;
  const int64_t di = round_up(d, kI8Pad);
  // Rows ahead that the few-query scans of rows read in place request (prefetch_scan_row), about 6 KB.
  const int64_t row_bytes = a.corpus_stride * elem_size(a.dtype);
  // Rows read in place by dot products (any Q below the GEMM's) are one pass over the corpus in order; the
  // later query groups of a tile find its rows in the cache (dot_block requests only on the first).
  const bool scan = direct && !use_gemm;  // fused rows are direct, and never a GEMM
  const int64_t pf_rows = scan && use_scan_prefetch() ? imax(2, 6144 / imax(1, row_bytes)) : 0;
  Arena shared(Arena::need<float>(Q * dp) + Arena::need<float>(Q) + Arena::need<Cand>(Q * parts * k) +
               Arena::need<int64_t>(Q * parts) + (i8q ? Arena::need<int16_t>(Q * di) + Arena::need<float>(Q) : 0));
  if (!shared.ok()) return kOutOfMemory;
  float* Qp = shared.take<float>(Q * dp);  // (Q, dp) zero-padded queries
  float* qq = shared.take<float>(Q);       // squared norms
  Cand* heaps = shared.take<Cand>(Q * parts * k);
  int64_t* sizes = shared.take<int64_t>(Q * parts);
  int16_t* Qi = i8q ? shared.take<int16_t>(Q * di) : nullptr;  // (Q, di) int16 queries (or u8 ones: VNNI)
  float* qinv = i8q ? shared.take<float>(Q) : nullptr;         // their inverse scales
#if defined(__AVX512BW__)
  const bool vnni = i8q && use_vnni();
#else
  [[maybe_unused]] const bool vnni = false;
#endif
  for (int64_t i = 0; i < Q; ++i) {
    load_row<float>(a.queries + i * d, kF32, d, dp, 1.0f, Qp + i * dp);
    qq[i] = self_dot(Qp + i * dp, dp);
    if (fused && a.dtype == kBF16 && kBF16Pairs) split_pairs(Qp + i * dp, d);  // only dot_tile_cvt reads Qp
#if defined(__AVX512BW__)
    if (vnni) {
      qinv[i] = quantize_u8(a.queries + i * d, d, di, reinterpret_cast<uint8_t*>(Qi) + i * di);
      continue;
    }
#endif
    if (i8q) qinv[i] = quantize_i16(a.queries + i * d, d, di, Qi + i * di);
  }
  for (int64_t i = 0; i < Q * parts; ++i) sizes[i] = 0;

  const size_t arena_bytes = Arena::need<float>(direct ? 0 : tile * dp) + Arena::need<float>(kQb * tile) +
                             Arena::need<float>(tile) + (use_gemm ? Arena::need<float>(dp * kQb) : 0) +
                             3 * Arena::need<float>(kQb) + Arena::need<int32_t>(kQb);
  int status = kOk;
#pragma omp parallel num_threads(nt)
  {
    Arena arena(arena_bytes);
    const bool ok = thread_arena_ok(arena, &status);
    float* conv = ok ? arena.take<float>(direct ? 0 : tile * dp) : nullptr;  // (tile, dp)
    float* S = ok ? arena.take<float>(kQb * tile) : nullptr;                 // (kQb, tile) or (tile, qpad)
    float* cc = ok ? arena.take<float>(tile) : nullptr;                      // corpus squared norms
    float* QT = ok && use_gemm ? arena.take<float>(dp * kQb) : nullptr;      // (dp, qpad) queries transposed
    float* bar = ok ? arena.take<float>(kQb) : nullptr;    // per query: the key to beat once its heap is full
    float* invq = ok ? arena.take<float>(kQb) : nullptr;   // per query: 1 / |q| (cosine)
    float* qn2 = ok ? arena.take<float>(kQb) : nullptr;    // per query: |q|^2 (l2), 0 in padding lanes
    int32_t* open = ok ? arena.take<int32_t>(kQb) : nullptr;  // per query: -1 while its heap has room
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < nqb * parts; ++it) {
      if (!ok) continue;
      const int64_t qb = it / parts, part = it % parts;
      const int64_t q0 = qb * kQb, nq = imin(kQb, Q - q0);
      const int64_t c_begin = part * tiles_per_part * tile, c_end = imin(N, c_begin + tiles_per_part * tile);
      const int64_t qpad = round_up(nq, Vec<float>::W);
      if (use_gemm) {
        for (int64_t p = 0; p < dp; ++p)
          for (int64_t i = 0; i < qpad; ++i) QT[p * qpad + i] = i < nq ? Qp[(q0 + i) * dp + p] : 0.0f;
        for (int64_t i = 0; i < qpad; ++i) {
          // Padding lanes can never pass: their bar is +inf and they have no room.
          bar[i] = i < nq ? -INFINITY : INFINITY;
          open[i] = i < nq ? -1 : 0;
          invq[i] = i < nq && qq[q0 + i] > 0 ? 1.0f / std::sqrt(qq[q0 + i]) : 0.0f;
          qn2[i] = i < nq ? qq[q0 + i] : 0.0f;
        }
      }
      // A tile as fp32 rows, read in place (fp32 whole vectors) or converted (int8: and scaled), and the
      // rows' squared norms in cc.
      auto fp32_tile = [&](int64_t t0, int64_t nrows, int64_t* ldc) -> const float* {
        const float* C = conv;
        *ldc = dp;
        if (direct) {
          C = static_cast<const float*>(a.corpus) + t0 * a.corpus_stride;
          *ldc = a.corpus_stride;
        } else {
          for (int64_t j = 0; j < nrows; ++j)
            load_row<float>(at(a.corpus, a.dtype, (t0 + j) * a.corpus_stride), a.dtype, d, dp,
                            a.dtype == kI8 ? a.row_scale[t0 + j] : 1.0f, conv + j * dp);
        }
        if (a.metric != kIP && a.dtype == kI8)
          for (int64_t j = 0; j < nrows; ++j) cc[j] = a.row_norm2[t0 + j];
        else if (a.metric != kIP)
          for (int64_t j = 0; j < nrows; ++j) cc[j] = self_dot(C + j * *ldc, dp);
        return C;
      };
      for (int64_t t0 = c_begin; t0 < c_end; t0 += tile) {
        const int64_t nrows = imin(tile, c_end - t0);
        if (use_gemm) {
          int64_t ldc;
          const float* C = fp32_tile(t0, nrows, &ldc);
          // S: (nrows, qpad), two vectors of queries at a time: QT streams from L2 (384 x 64 floats do not fit
          // L1), and 12 x 2-vector tiles (32 registers) need half the loads from it per FMA that 6 x 4-vector
          // tiles do. Only the first pass over the queries reads the tile from memory, so the next tile is
          // requested a slice per micro-kernel call. On a 2-core Zen 3 the scan ran at 51-59% of the FMA rate
          // (Q = 4096) while the same GEMM on a tile in cache runs at the FMA peak (91 of 92 GFLOP/s on one
          // core); the requests took Q = 4096 on 200k x 384 from 6.4-6.8 to 5.7-5.8 s.
          const int64_t next_rows = imin(tile, c_end - t0 - nrows);
          const char* next = static_cast<const char*>(a.corpus) + (t0 + nrows) * a.corpus_stride * elem_size(a.dtype);
          const int64_t next_lines = next_rows * a.corpus_stride * elem_size(a.dtype) / 64;
          constexpr int MRq = panel_rows(2);
          constexpr int64_t NW = 2 * Vec<float>::W;
          const int64_t calls = imax(1, (nrows / MRq) * (qpad / NW));
          const int64_t per_call = (next_lines + calls - 1) / calls;
          int64_t line = 0;
          int64_t j = 0;
          for (; j + NW <= qpad; j += NW) {
            int64_t r = 0;
            for (; r + MRq <= nrows; r += MRq) {
              const int64_t e = imin(next_lines, line + per_call);
              prefetch_strided(next + line * 64, e - line, 64, 64);
              line = e;
              gemm_tile<float, MRq, 2>(dp, C + r * ldc, ldc, QT + j, qpad, S + r * qpad + j, qpad, false);
            }
            if (r < nrows)
              gemm_panel<float, 2>(nrows - r, dp, C + r * ldc, ldc, QT + j, qpad, S + r * qpad + j, qpad, false);
          }
          if (j < qpad) gemm<float>(nrows, qpad - j, dp, C, ldc, QT + j, qpad, S + j, qpad, false);
          select_by_row(S, qpad, nrows, t0, nq, qn2, invq, cc, a.metric, k, heaps + (q0 * parts + part) * k,
                        parts * k, sizes + q0 * parts + part, parts, bar, open);
          continue;
        }
        if (i8q) {
          const int8_t* codes = static_cast<const int8_t*>(a.corpus) + t0 * a.corpus_stride;
#if defined(__AVX512BW__)
          if (vnni)
            dot_block_i8_vnni(di, reinterpret_cast<const uint8_t*>(Qi) + q0 * di, di, nq, codes, a.corpus_stride,
                              nrows, S, tile, pf_rows, N - t0);
          else
#endif
            dot_block_i8q(di, Qi + q0 * di, di, nq, codes, a.corpus_stride, nrows, S, tile, pf_rows, N - t0);
          for (int64_t r = 0; r < nq; ++r)  // both quantization scales multiply the integer dot product
            for (int64_t j = 0; j < nrows; ++j) S[r * tile + j] *= a.row_scale[t0 + j] * qinv[q0 + r];
          if (a.metric != kIP)
            for (int64_t j = 0; j < nrows; ++j) cc[j] = a.row_norm2[t0 + j];
        } else if (fused) {  // 16-bit rows
          dot_block_stored(a.dtype, d, Qp + q0 * dp, dp, nq, at(a.corpus, a.dtype, t0 * a.corpus_stride),
                           a.corpus_stride, nrows, S, tile, pf_rows, N - t0);
          if (a.metric != kIP)
            for (int64_t j = 0; j < nrows; ++j) cc[j] = self_dot_stored(a.dtype, a.corpus, (t0 + j) * a.corpus_stride, d);
        } else {
          int64_t ldc;
          const float* C = fp32_tile(t0, nrows, &ldc);
          // pf_rows is 0 unless the rows are read in place (direct). With cosine and l2, fp32_tile's norms have
          // read the tile already, and requests for cached rows only cost time (l2: 1.11x).
          const int64_t pf = a.metric == kIP ? pf_rows : 0;
          dot_block(dp, Qp + q0 * dp, dp, nq, C, ldc, nrows, S, tile, pf, N - t0);
        }
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t q = q0 + r;
          Cand* hp = heaps + (q * parts + part) * k;
          int64_t* n = sizes + q * parts + part;
          const float* s = S + r * tile;
          const float inv_q = qq[q] > 0 ? 1.0f / std::sqrt(qq[q]) : 0.0f;
          for (int64_t j = 0; j < nrows; ++j) {
            float key = s[j];
            if (a.metric == kCosine) {
              key *= inv_q * (cc[j] > 0 ? 1.0f / std::sqrt(cc[j]) : 0.0f);
            } else if (a.metric == kL2) {
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
    }
    // Merge the parts of each query and write them out best first.
    Arena merge(Arena::need<Cand>(k));
    Cand* hf = merge.ok() ? merge.take<Cand>(k) : nullptr;
    if (!merge.ok()) {
#pragma omp atomic write
      status = kOutOfMemory;
    }
#pragma omp for schedule(static)
    for (int64_t q = 0; q < Q; ++q) {
      if (!hf) continue;
      int64_t n = 0;
      for (int64_t part = 0; part < parts; ++part) {
        const Cand* hp = heaps + (q * parts + part) * k;
        for (int64_t i = 0; i < sizes[q * parts + part]; ++i) heap_push(hf, &n, k, hp[i]);
      }
      for (int64_t pos = n - 1; pos >= 0; --pos) {  // pop the worst into the last free slot
        const Cand c = hf[0];
        hf[0] = hf[pos];
        sift_down(hf, pos, 0);
        a.out_idx[q * k + pos] = c.idx;
        a.out_scores[q * k + pos] = c.nan ? NAN : (a.metric == kL2 ? -c.key : c.key);
      }
    }
  }
  return status;
}

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
