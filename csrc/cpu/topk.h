// Exact top-k: the plan (TopkPlan), the scorers of a corpus tile (GEMM for many queries, dot-product scans
// for few: topk_scan.h) and the driver; candidates go to topk_select.h's result handler.
#pragma once
#include "cpu/gemm_ukernel.h"
#include "cpu/parallel.h"
#include "cpu/topk_scan.h"
#include "cpu/topk_select.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// Queries per work item: a GEMM-scored item reads the whole corpus (or its part) once, so more queries per
// item read it fewer times; 128 keeps the transposed queries in L2. Measurements: docs/performance.md, "Top-k plan".
constexpr int64_t kQb = 128;

// Queries from which top-k scores tiles as a GEMM rather than by dot products (kMQ queries per pass over a
// tile): a few queries are cheaper as passes over rows read in place, more of them as a GEMM; where the scans
// request rows ahead (use_scan_prefetch()) the passes keep the lead further for corpora streamed from memory.
// Measurements: docs/performance.md, "Top-k plan".
constexpr int64_t kGemmMinQ = 8;
constexpr int64_t kGemmMinQPrefetch = 9;         // fp32 rows read in place, or small 16-bit and int8 corpora
constexpr int64_t kGemmMinQPrefetchStored = 17;  // 16-bit and int8 corpora of kStreamedBytes or more
constexpr int64_t kStreamedBytes = int64_t(64) << 20;
static_assert(kGemmMinQ > kMQ, "a few-query scan (16-bit or int8 rows widened in registers) is never a GEMM");

// How one call scans: which scorer, the tile and work split, and the prefetch distance.
struct TopkPlan {
  int64_t dp;            // d padded to whole vectors
  bool use_gemm;         // tiles scored as a GEMM against all of an item's queries (score_gemm_tile)
  bool fused;            // 16-bit or int8 rows widened in registers by the scans (no converted copy)
  bool direct;           // rows read in place (fp32 of whole vectors, or fused)
  bool i8q;              // int8 rows against integer queries (dot_block_i8q / dot_block_i8_vnni)
  bool vnni;             // ... with vpdpbusd on u8 queries
  int64_t tile;          // corpus rows per tile
  int64_t nqb;           // query blocks of kQb
  int64_t parts;         // corpus parts per query block (one running top-k per (query, part))
  int64_t tiles_per_part;
  int64_t di;            // int8 row length (padded to kI8Pad)
  int64_t pf_rows;       // rows the in-place scans request ahead (prefetch_scan_row), 0 for none

  static TopkPlan make(const TopkArgs& a, int nt) {
    TopkPlan p;
    const int64_t Q = a.Q, N = a.N, d = a.d;
    p.dp = round_up(d, kPad);
    // Below the GEMM's query count the kernels read rows in place: fp32 rows of whole vectors, and 16-bit and
    // int8 rows widened in registers as each value is used (fused), in passes of kMQ queries over each tile
    // (which then stays in L2). Otherwise (GEMM, or fp32 rows of part vectors) a tile is converted (int8:
    // and scaled) once into fp32 rows that every query reuses.
    const bool in_place = a.dtype != kF32 || d == p.dp;
    // Many queries: each tile is scored as a GEMM, tile rows x (dp x queries) with the queries transposed
    // once per work item, which runs near the FMA peak; per-pair dot products would spend a horizontal sum
    // on every (query, row). Scores of one row for all queries then sit side by side, so the running
    // top-k's bar is tested a vector of queries at a time.
    const bool streamed = N * a.corpus_stride * elem_size(a.dtype) >= kStreamedBytes;
    const int64_t gemm_min_q = !in_place || !use_scan_prefetch()   ? kGemmMinQ
                               : a.dtype != kF32 && streamed ? kGemmMinQPrefetchStored
                                                             : kGemmMinQPrefetch;
    p.use_gemm = Q >= gemm_min_q;
    p.fused = a.dtype != kF32 && !p.use_gemm;
    p.direct = (a.dtype == kF32 && d == p.dp) || p.fused;
    // ~32 KB of corpus per tile keeps it in L1/L2 while every query of the item passes over it.
    // Rows scanned in place for a few queries (fused) need no converted copy: longer tiles, fewer passes.
    // As a GEMM (many queries) a tile is whole micro-kernel row tiles (a remainder tile of 2 rows runs at a
    // third of the FMA rate), ~24 K values: 60 rows of 384 dimensions.
    p.tile = p.fused || (p.direct && Q <= kMQ) ? 256
             : p.use_gemm ? imax(kMR, imin(510, (24576 / p.dp) / kMR * kMR))
                          : imax(4, imin(512, 8192 / p.dp));
    p.nqb = (Q + kQb - 1) / kQb;
    const int64_t ntiles = (N + p.tile - 1) / p.tile;
    // Few query blocks (small Q): also split the corpus, one running top-k per (query, part).
    p.parts = p.nqb >= nt ? 1 : imax(1, imin(ntiles, (2 * nt + p.nqb - 1) / p.nqb));
    p.tiles_per_part = (ntiles + p.parts - 1) / p.parts;
    // int8 codes for a few queries: integer dot products against int16 queries (codes padded to kI8Pad).
    p.i8q = p.fused && a.dtype == kI8;
    p.di = round_up(d, kI8Pad);
#if defined(__AVX512BW__)
    p.vnni = p.i8q && use_vnni();
#else
    p.vnni = false;
#endif
    // Rows read in place by dot products (any Q below the GEMM's) are one pass over the corpus in order; the
    // later query groups of a tile find its rows in the cache (dot_block requests only on the first). About
    // 6 KB ahead.
    const int64_t row_bytes = a.corpus_stride * elem_size(a.dtype);
    const bool scan = p.direct && !p.use_gemm;  // fused rows are direct, and never a GEMM
    p.pf_rows = scan && use_scan_prefetch() ? imax(2, 6144 / imax(1, row_bytes)) : 0;
    return p;
  }
};

// S (nrows, qpad) = C (nrows rows, ldc apart) QT (dp, qpad), two vectors of queries at a time: QT streams
// from L2 (384 x 64 floats do not fit L1), and 12 x 2-vector tiles (32 registers) need half the loads from it
// per FMA that 6 x 4-vector tiles do. Only the first pass over the queries reads the tile from memory, so the
// next tile (next_lines cache lines at `next`) is requested a slice per micro-kernel call. On a 2-core Zen 3
// the scan ran at 51-59% of the FMA rate (Q = 4096) while the same GEMM on a tile in cache runs at the FMA
// peak (91 of 92 GFLOP/s on one core); the requests took Q = 4096 on 200k x 384 from 6.4-6.8 to 5.7-5.8 s.
inline void score_gemm_tile(int64_t dp, const float* C, int64_t ldc, int64_t nrows, const float* QT, int64_t qpad,
                            float* S, const char* next, int64_t next_lines) {
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
    if (r < nrows) gemm_panel<float, 2>(nrows - r, dp, C + r * ldc, ldc, QT + j, qpad, S + r * qpad + j, qpad, false);
  }
  if (j < qpad) gemm<float>(nrows, qpad - j, dp, C, ldc, QT + j, qpad, S + j, qpad, false);
}

int topk_impl(const TopkArgs& a) {
  const int64_t Q = a.Q, N = a.N, d = a.d, k = a.k;
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  const TopkPlan pl = TopkPlan::make(a, nt);
  const int64_t dp = pl.dp, tile = pl.tile, parts = pl.parts, di = pl.di;
  const bool use_gemm = pl.use_gemm, direct = pl.direct, i8q = pl.i8q;
  Arena shared(Arena::need<float>(Q * dp) + Arena::need<float>(Q) + Arena::need<Cand>(Q * parts * k) +
               Arena::need<int64_t>(Q * parts) + (i8q ? Arena::need<int16_t>(Q * di) + Arena::need<float>(Q) : 0));
  if (!shared.ok()) return kOutOfMemory;
  float* Qp = shared.take<float>(Q * dp);  // (Q, dp) zero-padded queries
  float* qq = shared.take<float>(Q);       // squared norms
  TopkHeaps th;
  th.heaps = shared.take<Cand>(Q * parts * k);
  th.sizes = shared.take<int64_t>(Q * parts);
  th.parts = parts;
  th.k = k;
  int16_t* Qi = i8q ? shared.take<int16_t>(Q * di) : nullptr;  // (Q, di) int16 queries (or u8 ones: VNNI)
  float* qinv = i8q ? shared.take<float>(Q) : nullptr;         // their inverse scales
  for (int64_t i = 0; i < Q; ++i) {
    load_row<float>(a.queries + i * d, kF32, d, dp, 1.0f, Qp + i * dp);
    qq[i] = self_dot(Qp + i * dp, dp);
    if (pl.fused && a.dtype == kBF16 && kBF16Pairs) split_pairs(Qp + i * dp, d);  // only dot_tile_cvt reads Qp
#if defined(__AVX512BW__)
    if (pl.vnni) {
      qinv[i] = quantize_u8(a.queries + i * d, d, di, reinterpret_cast<uint8_t*>(Qi) + i * di);
      continue;
    }
#endif
    if (i8q) qinv[i] = quantize_i16(a.queries + i * d, d, di, Qi + i * di);
  }
  for (int64_t i = 0; i < Q * parts; ++i) th.sizes[i] = 0;

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
    for (int64_t it = 0; it < pl.nqb * parts; ++it) {
      if (!ok) continue;
      const int64_t qb = it / parts, part = it % parts;
      const int64_t q0 = qb * kQb, nq = imin(kQb, Q - q0);
      const int64_t c_begin = part * pl.tiles_per_part * tile, c_end = imin(N, c_begin + pl.tiles_per_part * tile);
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
          const int64_t next_rows = imin(tile, c_end - t0 - nrows);
          const char* next = static_cast<const char*>(a.corpus) + (t0 + nrows) * a.corpus_stride * elem_size(a.dtype);
          score_gemm_tile(dp, C, ldc, nrows, QT, qpad, S, next, next_rows * a.corpus_stride * elem_size(a.dtype) / 64);
          select_by_row(S, qpad, nrows, t0, nq, qn2, invq, cc, a.metric, k, th.heap(q0, part), parts * k,
                        th.size(q0, part), parts, bar, open);
          continue;
        }
        if (i8q) {
          const int8_t* codes = static_cast<const int8_t*>(a.corpus) + t0 * a.corpus_stride;
#if defined(__AVX512BW__)
          if (pl.vnni)
            dot_block_i8_vnni(di, reinterpret_cast<const uint8_t*>(Qi) + q0 * di, di, nq, codes, a.corpus_stride,
                              nrows, S, tile, pl.pf_rows, N - t0);
          else
#endif
            dot_block_i8q(di, Qi + q0 * di, di, nq, codes, a.corpus_stride, nrows, S, tile, pl.pf_rows, N - t0);
          for (int64_t r = 0; r < nq; ++r)  // both quantization scales multiply the integer dot product
            for (int64_t j = 0; j < nrows; ++j) S[r * tile + j] *= a.row_scale[t0 + j] * qinv[q0 + r];
          if (a.metric != kIP)
            for (int64_t j = 0; j < nrows; ++j) cc[j] = a.row_norm2[t0 + j];
        } else if (pl.fused) {  // 16-bit rows
          dot_block_stored(a.dtype, d, Qp + q0 * dp, dp, nq, at(a.corpus, a.dtype, t0 * a.corpus_stride),
                           a.corpus_stride, nrows, S, tile, pl.pf_rows, N - t0);
          if (a.metric != kIP)
            for (int64_t j = 0; j < nrows; ++j) cc[j] = self_dot_stored(a.dtype, a.corpus, (t0 + j) * a.corpus_stride, d);
        } else {
          int64_t ldc;
          const float* C = fp32_tile(t0, nrows, &ldc);
          // pf_rows is 0 unless the rows are read in place (direct). With cosine and l2, fp32_tile's norms have
          // read the tile already, and requests for cached rows only cost time (l2: 1.11x).
          const int64_t pf = a.metric == kIP ? pl.pf_rows : 0;
          dot_block(dp, Qp + q0 * dp, dp, nq, C, ldc, nrows, S, tile, pf, N - t0);
        }
        select_by_query(S, tile, nrows, t0, q0, nq, qq, cc, a.metric, part, th);
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
    for (int64_t q = 0; q < Q; ++q)
      if (hf) write_results(th, q, a.metric, hf, a.out_scores, a.out_idx);
  }
  return status;
}

}  // namespace

// The entry point of this SIMD level (csrc/kernels.h).
int topk(const TopkArgs& a) { return topk_impl(a); }

}  // namespace MINILLM_ISA
}  // namespace minillm
