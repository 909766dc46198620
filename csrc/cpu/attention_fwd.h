// Attention forward: one FlashAttention-2 block loop (attention_fwd_blocks) and the two kernels that fill it
// in, fp32/fp64 GEMM tiles (FwdF32) and bf16 pair-word products on vdpbf16ps or AMX (FwdBf16).
#pragma once
#include "cpu/attention_bf16.h"
#include "cpu/amx.h"
#include "cpu/attention_decode.h"
#include "cpu/attention_mods.h"
#include "cpu/softmax.h"
#include "cpu/prefetch.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// Keys per block of the forward: kBkFwd, or 64 under a narrow sliding window, where a 256-key block would mostly
// hold keys outside every row's window (masked, yet computed). Measured at a window of 256 (docs/performance.md,
// "Attention variants"); the bound of 1024 keys is not tuned.
inline int64_t fwd_key_block(const AttnFwdArgs& a, int64_t granule) {
  const bool narrow = a.mods.window_left >= 0 && a.mods.window_left < 4 * kBkFwd;
  return imin(narrow ? kBkMax : kBkFwd, round_up(imax(a.Nk, 1), granule));
}

// Block sizes of one forward call: query rows per block (BQ), keys per block (bk), rows per register tile
// (TR) and the key granularity of a tile's products (CW: a tile computes its keys rounded up to it).
struct FwdBlocks {
  int64_t BQ, bk, TR, CW;
};

// The forward's work loop, the same for every kernel. Work items are (b, h, chunk of query blocks): with too
// few (b, h) pairs to feed every thread each pair's queries are split, and each item packs its K and V once,
// so items stay as large as the threads allow. Within an item, query block by key block, row tile by row
// tile, with the online softmax's running maxima m, sums l and output rows acc in T (float for 16-bit).
// Kernel (constructed once per thread on its Arena) supplies what differs:
//   scratch_bytes(a, blocks, Dp, NkP)       its per-thread scratch
//   pack_keys(b, h, kpm, k_end, q0, q1)     K and V of one (b, h) (keys from k_end on are never read)
//   load_queries(i0, rows, q_end)           the block's q rows
//   scores(r0, tr, cv, j0, S)               S rows [r0, r0 + tr) = q k^T for keys [j0, j0 + cv)
//   score_scale                             what S still has to be multiplied by (1: q was scaled already)
//   update(S, r0, tr, cv, cols, j0, m, l, acc, scale)  the softmax step on S * scale and acc += p v
// Score modifiers (attention_mods.h) run between scores and the mask; the update then scales by 1.
template <typename T, typename Kernel>
int attention_fwd_blocks(const AttnFwdArgs& a, const FwdBlocks& fb) {
  const int64_t B = a.B, H = a.H, Nq = a.Nq, Nk = a.Nk, D = a.D, BQ = fb.BQ, bk = fb.bk;
  const int64_t Dp = round_up(D, kPad), NkP = round_up(imax(Nk, 1), bk), nkb = NkP / bk;
  const Band band(a);
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  const int64_t nqb = (Nq + BQ - 1) / BQ;
  const int64_t chunks = B * H >= 2 * nt ? 1 : imax(1, imin(nqb, (2 * nt + B * H - 1) / (B * H)));
  const int64_t qb_per_chunk = (nqb + chunks - 1) / chunks;
  const int64_t items = B * H * chunks;
  const size_t arena_bytes = Kernel::scratch_bytes(a, fb, Dp, NkP) + Arena::need<T>(BQ * bk) +
                             Arena::need<T>(BQ * Dp) + 2 * Arena::need<T>(BQ) + Arena::need<uint8_t>(nkb);
  int status = kOk;
  int done = 0;  // threads done with their share (finish_share)
#pragma omp parallel num_threads(nt)
  {
    Arena arena(arena_bytes);
    const bool ok = thread_arena_ok(arena, &status);
    Kernel kern(a, fb, Dp, NkP, ok ? &arena : nullptr);
    T* S = ok ? arena.take<T>(BQ * bk) : nullptr;  // (BQ, bk): scores, then probabilities
    T* acc = ok ? arena.take<T>(BQ * Dp) : nullptr;  // (BQ, Dp)
    T* m = ok ? arena.take<T>(BQ) : nullptr;
    T* l = ok ? arena.take<T>(BQ) : nullptr;
    uint8_t* kvis = ok ? arena.take<uint8_t>(nkb) : nullptr;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t it = 0; it < items; ++it) {
      if (!ok) continue;
      const int64_t bh = it / chunks, b = bh / H, h = bh % H;
      const int64_t q_begin = (it % chunks) * qb_per_chunk * BQ;
      const int64_t q_end = imin(Nq, q_begin + qb_per_chunk * BQ);
      if (q_begin >= q_end) continue;
      const uint8_t* qpm = a.qpm ? a.qpm + b * Nq : nullptr;
      if (!any_query(qpm, q_begin, q_end)) {  // every query here is padding: nothing to read
        for (int64_t i = q_begin; i < q_end; ++i) write_empty_row<T>(a, bh, i, acc, Dp);
        continue;
      }
      const uint8_t* kpm = a.kpm ? a.kpm + b * Nk : nullptr;
      const ScoreMods<T> mods(a, b, h);
      // Keys any row here sees: up to the band's limit and the last unpadded key.
      const int64_t k_end = imin(band.end(q_end - 1, Nk), keys_end(kpm, Nk));
      kern.pack_keys(b, h, kpm, k_end, q_begin, q_end);
      visible_blocks(kpm, Nk, bk, nkb, kvis);

      for (int64_t i0 = q_begin; i0 < q_end; i0 += BQ) {
        const int64_t rows = imin(BQ, q_end - i0);
        if (!any_query(qpm, i0, i0 + rows)) {
          for (int64_t r = 0; r < rows; ++r) write_empty_row<T>(a, bh, i0 + r, acc, Dp);
          continue;
        }
        kern.load_queries(i0, rows, q_end);
        // A sink is a first visible score with no value row: m starts at it and l at exp(0).
        for (int64_t r = 0; r < rows; ++r) {
          m[r] = mods.sink;
          l[r] = mods.sink == -INFINITY ? T(0) : T(1);
        }
        std::memset(acc, 0, sizeof(T) * rows * Dp);
        const int64_t j_end = imin(k_end, band.end(i0 + rows - 1, Nk));
        for (int64_t j0 = band.first(i0) / bk * bk; j0 < j_end; j0 += bk) {
          if (!kvis[j0 / bk]) continue;
          const bool masked = block_needs_mask(j0, bk, Nk, band, i0, rows, kvis[j0 / bk]);
          // Row tile by row tile: on a causal block crossing the diagonal a tile computes only the keys its
          // last row sees, which skips the triangle above the diagonal (most of the work when N <= bk).
          for (int64_t r0 = 0; r0 < rows; r0 += fb.TR) {
            const int64_t tr = imin(fb.TR, rows - r0);
            const int64_t cols = imin(imin(bk, k_end - j0), band.hi && masked ? band.end(i0 + r0 + tr - 1, Nk) - j0 : bk);
            // no row of the tile sees a key of this block (left of the window of its first row: none does)
            if (cols <= 0 || band.first(i0 + r0) >= j0 + cols) continue;
            // Keys in [cols, cv) are masked for every row of the tile (past the causal limit of its last row,
            // or past k_end), so their p is 0 and p v may run over all cv keys.
            const int64_t cv = round_up(cols, fb.CW);
            kern.scores(r0, tr, cv, j0, S);
            if (mods.on)
              for (int64_t r = r0; r < r0 + tr; ++r) mods.apply(S + r * bk, cv, kern.score_scale, i0 + r, j0, Nk, nullptr);
            if (masked)  // before any scaling, so that -inf stays -inf
              for (int64_t r = r0; r < r0 + tr; ++r) mask_block<T>(S + r * bk, j0, cv, Nk, band, i0 + r, kpm);
            kern.update(S, r0, tr, cv, cols, j0, m, l, acc, mods.on ? T(1) : kern.score_scale);
          }
        }
        T* lse = static_cast<T*>(a.lse) + bh * Nq + i0;
        for (int64_t r = 0; r < rows; ++r) {
          void* orow = out_at(a, bh, i0 + r);
          if (l[r] == T(0) || (qpm && !qpm[i0 + r])) {  // padded query, or no visible key: the row is 0
            std::memset(acc + r * Dp, 0, sizeof(T) * Dp);
            store_row<T>(acc + r * Dp, D, T(1), a.dtype, orow);
            lse[r] = INFINITY;
          } else {
            store_row<T>(acc + r * Dp, D, T(1) / l[r], a.dtype, orow);
            lse[r] = m[r] + std::log(l[r]);
          }
        }
      }
    }
    finish_share(&done);
  }
  return status;
}

// fp32 / fp64: q (scaled) against K^T packed by GEMM panels, then p v straight from V's rows where it can.
template <typename T>
struct FwdF32 {
  const AttnFwdArgs& a;
  const int64_t D, Dp, bk;
  // fp32/fp64 rows whose length is whole vectors need no conversion.
  const bool direct;
  T* Kt;  // K^T, packed (gemm_packed); element (d, j) at packed_at(Kt, Dp, j)[d * kPanel<T>]
  T* Vp;  // (keys, Dp): converted V rows
  T* Qs;  // (BQ, Dp): q * scale
  // The current item's.
  int64_t qbase = 0, k_end = 0, ldv = 0;
  const T* Vb = nullptr;
  static constexpr T score_scale = T(1);  // q is scaled as it is loaded

  static FwdBlocks blocks(const AttnFwdArgs& a) { return {kBqFwd, fwd_key_block(a, kPad), kMR, Vec<T>::W}; }
  static size_t scratch_bytes(const AttnFwdArgs&, const FwdBlocks& fb, int64_t Dp, int64_t NkP) {
    return Arena::need<T>(Dp * round_up(NkP, kPanel<T>)) + Arena::need<T>(NkP * Dp) + Arena::need<T>(fb.BQ * Dp);
  }
  FwdF32(const AttnFwdArgs& args, const FwdBlocks& fb, int64_t Dp_, int64_t NkP, Arena* arena)
      : a(args), D(args.D), Dp(Dp_), bk(fb.bk), direct((a.dtype == kF32 || a.dtype == kF64) && D == Dp) {
    Kt = arena ? arena->take<T>(Dp * round_up(NkP, kPanel<T>)) : nullptr;
    Vp = arena ? arena->take<T>(NkP * Dp) : nullptr;
    Qs = arena ? arena->take<T>(fb.BQ * Dp) : nullptr;
  }

  MINILLM_ALWAYS_INLINE void pack_keys(int64_t b, int64_t h, const uint8_t* kpm, int64_t k_end_, int64_t q_begin,
                                       int64_t q_end) {
    k_end = k_end_;
    constexpr int64_t P = kPanel<T>;
    auto kt = [&](int64_t j) { return packed_at(Kt, Dp, j); };
    const int64_t kbase = b * a.k_stride[0] + kv_head(a, h) * a.k_stride[1];
    const int64_t vbase = b * a.v_stride[0] + kv_head(a, h) * a.v_stride[1];
    qbase = b * a.q_stride[0] + h * a.q_stride[1];
    // Rows already in the kernel's type and width are read in place: K while it is transposed, and V by the
    // p v product itself when no key below k_end is padded (keys from k_end on are never read: a right-padded
    // batch). A padded value must not be read (0 * NaN is NaN), so with padding holes V is copied with those
    // rows zeroed.
    bool holes = false;
    for (int64_t j = 0; kpm && j < k_end; ++j) holes |= !kpm[j];
    const bool v_direct = direct && !holes;
    Vb = v_direct ? static_cast<const T*>(at(a.v, a.dtype, vbase)) : Vp;
    ldv = v_direct ? a.v_stride[2] : Dp;
    const int64_t es = elem_size(a.dtype);
    if (v_direct) prefetch_strided(Vb, imin(k_end, 2 * bk), ldv * es, D * es);
    prefetch_strided(at(a.q, a.dtype, qbase + q_begin * a.q_stride[2]), imin(kBqFwd, q_end - q_begin),
                     a.q_stride[2] * es, D * es);
    // No padded key below k_end: groups of 8 keys straight from their rows.
    int64_t j = v_direct ? pack_rows8(static_cast<const T*>(at(a.k, a.dtype, kbase)), a.k_stride[2], k_end, Dp, Kt)
                         : 0;
    for (; j < k_end; ++j) {
      // Padded keys are never read: whatever they hold (NaN, inf) cannot reach the output.
      if (kpm && !kpm[j]) {
        for (int64_t d = 0; d < Dp; ++d) kt(j)[d * P] = 0;
        std::memset(Vp + j * Dp, 0, sizeof(T) * Dp);
        continue;
      }
      const T* kr = Qs;
      if (direct)
        kr = static_cast<const T*>(at(a.k, a.dtype, kbase + j * a.k_stride[2]));
      else
        load_row<T>(at(a.k, a.dtype, kbase + j * a.k_stride[2]), a.dtype, D, Dp, T(1), Qs);
      for (int64_t d = 0; d < Dp; ++d) kt(j)[d * P] = kr[d];
      if (!v_direct) load_row<T>(at(a.v, a.dtype, vbase + j * a.v_stride[2]), a.dtype, D, Dp, T(1), Vp + j * Dp);
    }
    for (int64_t j = k_end; j < round_up(k_end, P); ++j)  // the last panel's unused columns
      for (int64_t d = 0; d < Dp; ++d) kt(j)[d * P] = 0;
  }

  void load_queries(int64_t i0, int64_t rows, int64_t q_end) {
    for (int64_t r = 0; r < rows; ++r)
      load_row<T>(at(a.q, a.dtype, qbase + (i0 + r) * a.q_stride[2]), a.dtype, D, Dp, static_cast<T>(a.scale),
                  Qs + r * Dp);
    const int64_t es = elem_size(a.dtype);
    if (i0 + rows < q_end)
      prefetch_strided(at(a.q, a.dtype, qbase + (i0 + rows) * a.q_stride[2]), imin(kBqFwd, q_end - i0 - rows),
                       a.q_stride[2] * es, D * es);
  }

  void scores(int64_t r0, int64_t tr, int64_t cv, int64_t j0, T* S) const {
    gemm_packed<T>(tr, cv, Dp, Qs + r0 * Dp, Dp, packed_at(Kt, Dp, j0), S + r0 * bk, bk, false);
  }

  void update(T* S, int64_t r0, int64_t tr, int64_t cv, int64_t cols, int64_t j0, T* m, T* l, T* acc, T) const {
    softmax_tile<T>(S, bk, r0, tr, cv, T(1), m, l, acc, Dp);
    // Keys past k_end have p = 0 and no value row (V read in place ends at Nk).
    gemm<T>(tr, Dp, imin(cols, k_end - j0), S + r0 * bk, bk, Vb + j0 * ldv, ldv, acc + r0 * Dp, Dp, true);
  }
};

#if defined(__AVX512BW__)
// bf16 on vdpbf16ps (or AMX tiles): q rows as pair words against K^T packed as (D / 2, keys) words, and p (rounded
// to bf16, as torch's bf16 flash kernel does) against V as (keys / 2, D) words; see attention_bf16.h.
struct FwdBf16 {
  const AttnFwdArgs& a;
  const int64_t D, Dp, DP, bk;
  const float scale, score_scale;  // score_scale = scale: q k^T is computed unscaled
  const bool amx;
  // Rows read in place as 32-bit words: whole pairs (D == Dp), word strides, and gather offsets within int32.
  const bool q_in_place, rows_in_place;
  AmxTiles tiles;
  uint32_t* Kp;   // (Dp / 2, ldk) words: K^T pairs
  uint32_t* Vp;   // (keys / 2, Dp) words: V row pairs
  uint16_t* Qb;   // (BQ, Dp) bf16
  uint16_t* K16;  // (16, Dp): 16 padded k rows
  uint16_t* V16;  // (16, Dp): their v rows
  uint16_t* Pb;   // (BQ, bk): p in bf16
  // The current item's and query block's.
  int64_t qbase = 0, ldk = 0, ldq = 0;
  const uint32_t* Qw = nullptr;

  static constexpr int64_t kMaxWordStride = int64_t(1) << 26;
  // With AMX a row tile is 32 rows and its columns whole 32-key chunks (16 pairs, one tile's depth in p v).
  static FwdBlocks blocks(const AttnFwdArgs& a) {
    const bool amx = use_amx();
    const int64_t CW = amx ? 32 : 16;
    return {kBq, fwd_key_block(a, CW), amx ? kAmxRows : kMR, CW};  // 256 keys: 0.82-0.87 of 64's time on a Zen 4
  }
  static size_t scratch_bytes(const AttnFwdArgs& a, const FwdBlocks& fb, int64_t Dp, int64_t NkP) {
    return Arena::need<uint32_t>(Dp / 2 * NkP) + Arena::need<uint32_t>(NkP / 2 * Dp) +
           Arena::need<uint16_t>(fb.BQ * Dp) + 2 * Arena::need<uint16_t>(16 * Dp) + Arena::need<uint16_t>(fb.BQ * fb.bk);
  }
  FwdBf16(const AttnFwdArgs& args, const FwdBlocks& fb, int64_t Dp_, int64_t NkP, Arena* arena)
      : a(args), D(args.D), Dp(Dp_), DP(Dp_ / 2), bk(fb.bk), scale(static_cast<float>(args.scale)),
        score_scale(scale), amx(fb.TR == kAmxRows), q_in_place(D == Dp && a.q_stride[2] % 2 == 0),
        rows_in_place(D == Dp && a.k_stride[2] % 2 == 0 && a.k_stride[2] / 2 < kMaxWordStride),
        tiles(amx && arena) {
    Kp = arena ? arena->take<uint32_t>(DP * NkP) : nullptr;
    Vp = arena ? arena->take<uint32_t>(NkP / 2 * Dp) : nullptr;
    Qb = arena ? arena->take<uint16_t>(fb.BQ * Dp) : nullptr;
    K16 = arena ? arena->take<uint16_t>(16 * Dp) : nullptr;
    V16 = arena ? arena->take<uint16_t>(16 * Dp) : nullptr;
    Pb = arena ? arena->take<uint16_t>(fb.BQ * bk) : nullptr;
  }

  // Packs keys [0, ldk) 16 at a time; padded keys and keys past k_end are zeros (never read as data). Rows that
  // need no zero padding (D == Dp) are read in place when all 16 keys are visible.
  MINILLM_ALWAYS_INLINE void pack_keys(int64_t b, int64_t h, const uint8_t* kpm, int64_t k_end, int64_t, int64_t) {
    ldk = imax(bk, round_up(k_end, bk));
    const int64_t kbase = b * a.k_stride[0] + kv_head(a, h) * a.k_stride[1];
    const int64_t vbase = b * a.v_stride[0] + kv_head(a, h) * a.v_stride[1];
    qbase = b * a.q_stride[0] + h * a.q_stride[1];
    for (int64_t j = 0; j < ldk; j += 16) {
      bool whole = rows_in_place && j + 16 <= k_end;
      for (int64_t t = 0; whole && kpm && t < 16; ++t) whole = kpm[j + t];
      if (whole) {
        transpose_words16(static_cast<const uint32_t*>(at(a.k, kBF16, kbase + j * a.k_stride[2])), a.k_stride[2] / 2,
                          DP, Kp + j, ldk);
        auto vrow = [&](int64_t jj) { return static_cast<const uint16_t*>(at(a.v, kBF16, vbase + jj * a.v_stride[2])); };
        for (int64_t t = 0; t < 16; t += 2) pair_bf16_rows(vrow(j + t), vrow(j + t + 1), Dp, Vp + (j + t) / 2 * Dp);
        continue;
      }
      load_kv_rows16(at(a.k, kBF16, kbase), a.k_stride[2], at(a.v, kBF16, vbase), a.v_stride[2], j, k_end, kpm, D, Dp,
                     K16, V16);
      transpose_words16(reinterpret_cast<const uint32_t*>(K16), DP, DP, Kp + j, ldk);
      for (int64_t t = 0; t < 16; t += 2) pair_bf16_rows(V16 + t * Dp, V16 + (t + 1) * Dp, Dp, Vp + (j + t) / 2 * Dp);
    }
  }

  // q rows as the products' broadcast side: in place when they need no zero padding.
  void load_queries(int64_t i0, int64_t rows, int64_t) {
    Qw = reinterpret_cast<const uint32_t*>(Qb);
    ldq = DP;
    if (q_in_place) {
      Qw = static_cast<const uint32_t*>(at(a.q, kBF16, qbase + i0 * a.q_stride[2]));
      ldq = a.q_stride[2] / 2;
    } else {
      for (int64_t r = 0; r < rows; ++r) bf16_row(at(a.q, kBF16, qbase + (i0 + r) * a.q_stride[2]), D, Dp, Qb + r * Dp);
    }
  }

  // Unscaled: the scale enters the softmax's exponent.
  void scores(int64_t r0, int64_t tr, int64_t cv, int64_t j0, float* S) const {
    bf16_mm(amx, tr, cv, DP, Qw + r0 * ldq, ldq, Kp + j0, ldk, S + r0 * bk, bk, false);
  }

  void update(float* S, int64_t r0, int64_t tr, int64_t cv, int64_t cols, int64_t j0, float* m, float* l,
              float* acc, float sc) const {
    for (int64_t s0 = r0; s0 < r0 + tr; s0 += kSoftRows)
      softmax_tile_bf16(S, bk, s0, imin(kSoftRows, r0 + tr - s0), cv, sc, m, l, acc, Dp, Pb, bk);
    bf16_mm(amx, tr, Dp, amx ? cv / 2 : (cols + 1) / 2, reinterpret_cast<const uint32_t*>(Pb + r0 * bk), bk / 2,
            Vp + (j0 / 2) * Dp, Dp, acc + r0 * Dp, Dp, true);
  }
};
#endif

template <typename T>
int attention_fwd_impl(const AttnFwdArgs& a) {
  if (a.Nq <= kDecodeRows) return attention_decode_impl<T>(a);
#if defined(__AVX512BW__)
  if (std::is_same<T, float>::value && a.dtype == kBF16 && use_bf16_dot())
    return attention_fwd_blocks<float, FwdBf16>(a, FwdBf16::blocks(a));
#endif
  return attention_fwd_blocks<T, FwdF32<T>>(a, FwdF32<T>::blocks(a));
}

}  // namespace

// The entry point of this SIMD level (csrc/kernels.h).
int attention_fwd(const AttnFwdArgs& a) {
  return a.dtype == kF64 ? attention_fwd_impl<double>(a) : attention_fwd_impl<float>(a);
}

}  // namespace MINILLM_ISA
}  // namespace minillm
