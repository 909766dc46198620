// Attention forward for a few query rows (KV-cache decoding): K and V rows read in place.
#pragma once
#include "cpu/attention_mods.h"
#include "cpu/parallel.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// Few query rows (KV-cache decoding): scores straight from K's rows and the output straight from V's
// rows, with no transposed or converted copy of K and V (which would cost as much as the math).
constexpr int64_t kDecodeRows = 4;

template <typename T>
int attention_decode_impl(const AttnFwdArgs& a) {
  typedef vec_t<T> V;
  constexpr int W = Vec<T>::W;
  const int64_t B = a.B, H = a.H, Nq = a.Nq, Nk = a.Nk, D = a.D;
  const int64_t Dp = round_up(D, kPad);
  // fp32/fp64 rows whose length is whole vectors are read in place; others are converted row by row.
  const bool direct = (a.dtype == kF32 || a.dtype == kF64) && D == Dp;
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  const int64_t NkP = round_up(Nk, W);
  const Band band(a);
  const size_t arena_bytes = Arena::need<T>(NkP) + 3 * Arena::need<T>(Dp);
  int status = kOk;
#pragma omp parallel num_threads(nt)
  {
    Arena arena(arena_bytes);
    const bool ok = thread_arena_ok(arena, &status);
    T* s = ok ? arena.take<T>(NkP) : nullptr;    // (NkP): scores, then probabilities
    T* qv = ok ? arena.take<T>(Dp) : nullptr;    // (Dp): q * scale
    T* row = ok ? arena.take<T>(Dp) : nullptr;   // (Dp): a converted k or v row
    T* acc = ok ? arena.take<T>(Dp) : nullptr;   // (Dp)
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      if (!ok) continue;
      const int64_t b = bh / H, h = bh % H;
      const uint8_t* kpm = a.kpm ? a.kpm + b * Nk : nullptr;
      const ScoreMods<T> mods(a, b, h);
      const int64_t kbase = b * a.k_stride[0] + kv_head(a, h) * a.k_stride[1];
      const int64_t vbase = b * a.v_stride[0] + kv_head(a, h) * a.v_stride[1];
      auto krow = [&](int64_t j) -> const T* {
        const void* p = at(a.k, a.dtype, kbase + j * a.k_stride[2]);
        if (direct) return static_cast<const T*>(p);
        load_row<T>(p, a.dtype, D, Dp, T(1), row);
        return row;
      };
      auto vrow = [&](int64_t j) -> const T* {
        const void* p = at(a.v, a.dtype, vbase + j * a.v_stride[2]);
        if (direct) return static_cast<const T*>(p);
        load_row<T>(p, a.dtype, D, Dp, T(1), row);
        return row;
      };
      const uint8_t* qpm = a.qpm ? a.qpm + b * Nq : nullptr;
      for (int64_t i = 0; i < Nq; ++i) {
        if (qpm && !qpm[i]) {
          write_empty_row<T>(a, bh, i, acc, Dp);
          continue;
        }
        load_row<T>(at(a.q, a.dtype, b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2]), a.dtype, D, Dp,
                    static_cast<T>(a.scale), qv);
        // Keys [j_lo, n_vis) are in the band; a padded key's row is never read (its score is masked).
        const int64_t j_lo = band.first(i), n_vis = band.end(i, Nk);
        for (int64_t j = j_lo; j < n_vis; ++j) {
          if (kpm && !kpm[j]) {
            s[j] = 0;
            continue;
          }
          const T* k = krow(j);
          V d = V{};
          for (int64_t c = 0; c < Dp; c += W) d += vload(qv + c) * vload(k + c);
          s[j] = hsum<T>(d);
        }
        // The modifiers over whole vectors from j_lo's (aligned down; the extra scores are never used).
        const int64_t a0 = j_lo / W * W;
        if (mods.on && n_vis > j_lo) {
          for (int64_t j = a0; j < j_lo; ++j) s[j] = 0;
          for (int64_t j = n_vis; j < round_up(n_vis, W); ++j) s[j] = 0;
          mods.apply(s + a0, round_up(n_vis, W) - a0, T(1), i, a0, Nk, nullptr);
        }
        T m = mods.sink;  // a sink is a score with no value row
        for (int64_t j = j_lo; j < n_vis; ++j) {
          if (kpm && !kpm[j]) s[j] = -INFINITY;
          m = s[j] > m ? s[j] : m;
        }
        T* lse = static_cast<T*>(a.lse) + bh * Nq + i;
        void* orow = out_at(a, bh, i);
        for (int64_t c = 0; c < Dp; ++c) acc[c] = 0;
        const T shift = m == -INFINITY ? T(0) : m;
        T l = mods.sink == -INFINITY ? T(0) : std::exp(mods.sink - shift);
        for (int64_t j = j_lo; j < n_vis; ++j) {
          if (s[j] == -INFINITY) continue;  // masked: its value row is never read
          const T p = std::exp(s[j] - shift);
          l += p;
          const T* v = vrow(j);
          const V pv = vbcast(p);
          for (int64_t c = 0; c < Dp; c += W) vstore(acc + c, vload(acc + c) + pv * vload(v + c));
        }
        if (l == T(0)) {
          for (int64_t c = 0; c < Dp; ++c) acc[c] = 0;
          store_row<T>(acc, D, T(1), a.dtype, orow);
          *lse = INFINITY;
        } else {
          store_row<T>(acc, D, T(1) / l, a.dtype, orow);
          *lse = m + std::log(l);
        }
      }
    }
  }
  return status;
}

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
