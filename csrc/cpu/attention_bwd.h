// Attention backward: one FlashAttention-2 block loop (attention_bwd_blocks) and the two kernels that fill it
// in, fp32/fp64 GEMM tiles (BwdF32) and bf16 pair-word products on vdpbf16ps or AMX (BwdBf16).
#pragma once
#include "cpu/amx.h"
#include "cpu/attention_bf16.h"
#include "cpu/attention_mods.h"
#include "cpu/parallel.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// Block sizes of one backward call: query rows per block (BQ), keys per block (bk), rows per register tile
// (TR) and the key granularity of a tile's products (CW).
struct BwdBlocks {
  int64_t BQ, bk, TR, CW;
};

// Delta_i = rowsum(dO_i * O_i) - dlse_i for rows of Dp values: d lse_i / d S_ij = P_ij, so an incoming lse
// gradient enters exactly like -Delta.
template <typename T>
inline T delta_row(const T* dO, const T* O, int64_t Dp, T dlse) {
  typedef vec_t<T> V;
  V s = V{};
  for (int64_t d = 0; d < Dp; d += Vec<T>::W) s += vload(dO + d) * vload(O + d);
  return hsum<T>(s) - dlse;
}

// The backward's work loop, the same for every kernel: one (b, key/value head) per work item, which owns dK and
// dV of its pair and dQ of its query heads (one, or H / Hkv with grouped-query attention, in turn), so no
// accumulation crosses threads. Per query head: key block by query block (only the query blocks whose band
// reaches the key block), row tile by row tile: P = exp(S - lse) and dS = P (dP - Delta) in T (float for 16-bit
// inputs), dQ += dS k per tile, then dV += P^T dO and dK += dS^T q per block. Score modifiers
// (attention_mods.h) recompute the forward's scores before the mask; dL/ds is written to dbias when asked and
// then taken through the soft-capping's tanh. Kernel (one per thread) supplies:
//   scratch_bytes(a, blocks, Dp, NkP)    its per-thread scratch
//   load_kv(b, hk, kpm)                  K and V of one (b, key/value head), zeroed dK and dV
//   load_q(b, h, bh, qpm, Dl)            q and dO of one (b, h), Delta per query, zeroed dQ
//   key_cols(j0, k_end)                  keys of block j0 that rows compute (the rest have P = dS = 0)
//   products(i0, r0, tr, cv, j0, P, dS)  S and dP rows [r0, r0 + tr) for keys [j0, j0 + cv)
//   row_scale                            multiplies S before the mask (1: q was scaled already)
//   row_done(r, dS)                      after row r of dS is final
//   dq(i0, r0, tr, cols, cv, j0, dS)     dQ rows += dS k
//   block_done(i0, rows, j0, kcols, tri, hi_off, P, dS)  dV += P^T dO, dK += dS^T q (tri: rows i with
//                                        i + hi_off < j see no key j; the product may skip them)
//   store_dq(bh), store_dkv(bkv)         the gradients to the outputs
template <typename T, typename Kernel>
int attention_bwd_blocks(const AttnBwdArgs& a, const BwdBlocks& bb) {
  typedef vec_t<T> V;
  constexpr int W = Vec<T>::W;
  const int64_t B = a.B, H = a.H, Nq = a.Nq, Nk = a.Nk, D = a.D, BQ = bb.BQ, bk = bb.bk;
  const int64_t Hkv = a.Hkv > 0 ? a.Hkv : H, G = H / Hkv;
  const int64_t Dp = round_up(D, kPad), NkP = round_up(Nk, bk), nkb = NkP / bk;
  const Band band(a);
  const int nt = a.nthreads > 0 ? a.nthreads : 1;
  const bool capped = a.mods.softcap > 0;
  const size_t arena_bytes = Kernel::scratch_bytes(a, bb, Dp, NkP) + Arena::need<T>(Nq) +
                             (capped ? 3 : 2) * Arena::need<T>(BQ * bk) + Arena::need<uint8_t>(nkb);
  int status = kOk;
  int done = 0;  // threads done with their share (finish_share)
#pragma omp parallel num_threads(nt)
  {
    Arena arena(arena_bytes);
    const bool ok = thread_arena_ok(arena, &status);
    Kernel kern(a, bb, Dp, NkP, ok ? &arena : nullptr);
    T* Dl = ok ? arena.take<T>(Nq) : nullptr;       // (Nq): rowsum(dO * O) - dlse
    T* P = ok ? arena.take<T>(BQ * bk) : nullptr;   // (BQ, bk)
    T* dS = ok ? arena.take<T>(BQ * bk) : nullptr;  // (BQ, bk): dP, then dS in place
    T* tc = ok && capped ? arena.take<T>(BQ * bk) : nullptr;  // (BQ, bk): tanh of the soft-capped scores
    uint8_t* kvis = ok ? arena.take<uint8_t>(nkb) : nullptr;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t item = 0; item < B * Hkv; ++item) {
      if (!ok) continue;
      const int64_t b = item / Hkv, hk = item % Hkv;
      const uint8_t* kpm = a.kpm ? a.kpm + b * Nk : nullptr;
      const uint8_t* qpm = a.qpm ? a.qpm + b * Nq : nullptr;
      kern.load_kv(b, hk, kpm);
      visible_blocks(kpm, Nk, bk, nkb, kvis);
      const int64_t k_end = keys_end(kpm, Nk);
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        const int64_t bh = b * H + h;
        const T* lse = static_cast<const T*>(a.lse) + bh * Nq;
        const ScoreMods<T> mods(a, b, h);
        T* dbias = static_cast<T*>(a.mods.dbias);
        kern.load_q(b, h, bh, qpm, Dl);
        for (int64_t j0 = 0; j0 < Nk; j0 += bk) {
          if (!kvis[j0 / bk]) continue;
          const int64_t kcols = kern.key_cols(j0, k_end);
          // Rows i + hi_off < j0 see no key of this block, nor do rows i + lo_off > j0 + kcols - 1.
          const int64_t i_first = band.hi ? imax(0, j0 - band.hi_off) / BQ * BQ : 0;
          const int64_t i_stop = band.lo ? imax(0, imin(Nq, j0 + kcols - band.lo_off)) : Nq;
          for (int64_t i0 = i_first; i0 < i_stop; i0 += BQ) {
            const int64_t rows = imin(BQ, Nq - i0);
            if (!any_query(qpm, i0, i0 + rows)) continue;
            const bool masked = block_needs_mask(j0, bk, Nk, band, i0, rows, kvis[j0 / bk]);
            const bool tri = band.hi && masked;
            // P and dS row tile by row tile; on a block crossing the band's upper edge a tile computes only the
            // keys its last row sees and zero-fills the rest, so the products below may skip them.
            for (int64_t r0 = 0; r0 < rows; r0 += bb.TR) {
              const int64_t tr = imin(bb.TR, rows - r0);
              const int64_t cols = tri ? imax(0, imin(kcols, band.end(i0 + r0 + tr - 1, Nk) - j0)) : kcols;
              const int64_t cv = round_up(cols, bb.CW);  // keys in [cols, cv) are masked: p = dS = 0
              if (cv > 0) kern.products(i0, r0, tr, cv, j0, P, dS);
              for (int64_t r = r0; r < r0 + tr; ++r) {
                T* p = P + r * bk;
                T* ds = dS + r * bk;
                T* t = capped ? tc + r * bk : nullptr;
                std::memset(p + cv, 0, sizeof(T) * (bk - cv));
                std::memset(ds + cv, 0, sizeof(T) * (bk - cv));
                if (qpm && !qpm[i0 + r]) {  // a padded query takes no part, whatever its q or dO hold
                  std::memset(p, 0, sizeof(T) * cv);
                  std::memset(ds, 0, sizeof(T) * cv);
                } else {
                  if (mods.on) {
                    mods.apply(p, cv, kern.row_scale, i0 + r, j0, Nk, t);
                  } else if (kern.row_scale != T(1)) {
                    const V sc = vbcast(kern.row_scale);
                    for (int64_t c = 0; c < cv; c += W) vstore(p + c, vload(p + c) * sc);
                  }
                  if (masked) mask_block<T>(p, j0, cv, Nk, band, i0 + r, kpm);
                  const V lv = vbcast(lse[i0 + r]), dv = vbcast(Dl[i0 + r]);
                  for (int64_t c = 0; c < cv; c += W) {
                    const V pv = vexp(vload(p + c) - lv);
                    vstore(p + c, pv);
                    vstore(ds + c, pv * (vload(ds + c) - dv));
                  }
                  if (dbias)  // dL/ds of this row's keys below Nk (the buffer starts zeroed)
                    std::memcpy(dbias + (bh * Nq + i0 + r) * Nk + j0, ds, sizeof(T) * imin(cv, Nk - j0));
                  if (capped)  // d cap tanh(x / cap) / dx = 1 - tanh^2; masked keys have ds = 0 already
                    for (int64_t c = 0; c < cv; c += W) {
                      const V tv = vload(t + c);
                      vstore(ds + c, vload(ds + c) * (T(1) - tv * tv));
                    }
                }
                kern.row_done(r, dS);
              }
              if (cols > 0) kern.dq(i0, r0, tr, cols, cv, j0, dS);
            }
            kern.block_done(i0, rows, j0, kcols, tri, band.hi_off, P, dS);
          }
        }
        kern.store_dq(bh);
      }
      kern.store_dkv(item);
    }
    finish_share(&done);
  }
  return status;
}

// fp32 / fp64: q (scaled) and dO against K^T and V^T packed by GEMM panels; dQ, dK and dV accumulated as rows.
template <typename T>
struct BwdF32 {
  const AttnBwdArgs& a;
  const int64_t D, Dp, NkP, bk;
  const T row_scale = T(1);  // q is scaled as it is loaded
  T* Qs;  // (Nq, Dp): q * scale
  T* dO;  // (Nq, Dp)
  T* dQ;  // (Nq, Dp): sum dS K, scaled at the end
  T* Kt;  // K^T, packed (packed_at)
  T* Vt;  // V^T, packed the same way
  T* Kr;  // (NkP, Dp)
  T* dK;  // (NkP, Dp)
  T* dV;  // (NkP, Dp)

  static BwdBlocks blocks(const AttnBwdArgs& a) { return {kBq, key_block(a.Nk), kMR, Vec<T>::W}; }
  static size_t scratch_bytes(const AttnBwdArgs& a, const BwdBlocks&, int64_t Dp, int64_t NkP) {
    const int64_t NkT = round_up(NkP, kPanel<T>);  // K^T and V^T packed by panels (gemm_packed)
    return 3 * Arena::need<T>(a.Nq * Dp) + 2 * Arena::need<T>(Dp * NkT) + 3 * Arena::need<T>(NkP * Dp);
  }
  BwdF32(const AttnBwdArgs& args, const BwdBlocks& bb, int64_t Dp_, int64_t NkP_, Arena* arena)
      : a(args), D(args.D), Dp(Dp_), NkP(NkP_), bk(bb.bk) {
    const int64_t NkT = round_up(NkP, kPanel<T>), Nq = a.Nq;
    Qs = arena ? arena->take<T>(Nq * Dp) : nullptr;
    dO = arena ? arena->take<T>(Nq * Dp) : nullptr;
    dQ = arena ? arena->take<T>(Nq * Dp) : nullptr;
    Kt = arena ? arena->take<T>(Dp * NkT) : nullptr;
    Vt = arena ? arena->take<T>(Dp * NkT) : nullptr;
    Kr = arena ? arena->take<T>(Dp * NkP) : nullptr;
    dK = arena ? arena->take<T>(NkP * Dp) : nullptr;
    dV = arena ? arena->take<T>(NkP * Dp) : nullptr;
  }

  MINILLM_ALWAYS_INLINE void load_q(int64_t b, int64_t h, int64_t bh, const uint8_t* qpm, T* Dl) {
    const int64_t Nq = a.Nq;
    const T* dlse = a.dlse ? static_cast<const T*>(a.dlse) + bh * Nq : nullptr;
    for (int64_t i = 0; i < Nq; ++i) {
      if (qpm && !qpm[i]) {  // a padded query's q and dO are never read: zero rows keep the GEMMs clean
        std::memset(Qs + i * Dp, 0, sizeof(T) * Dp);
        std::memset(dO + i * Dp, 0, sizeof(T) * Dp);
        Dl[i] = 0;
        continue;
      }
      load_row<T>(at(a.q, a.dtype, b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2]), a.dtype, D, Dp,
                  static_cast<T>(a.scale), Qs + i * Dp);
      load_row<T>(at(a.dout, a.dtype, b * a.do_stride[0] + h * a.do_stride[1] + i * a.do_stride[2]), a.dtype, D,
                  Dp, T(1), dO + i * Dp);
      load_row<T>(at(a.out, a.dtype, b * a.o_stride[0] + h * a.o_stride[1] + i * a.o_stride[2]), a.dtype, D, Dp,
                  T(1), dQ + i * Dp);
      Dl[i] = delta_row<T>(dO + i * Dp, dQ + i * Dp, Dp, dlse ? dlse[i] : T(0));
    }
    std::memset(dQ, 0, sizeof(T) * Nq * Dp);
  }

  MINILLM_ALWAYS_INLINE void load_kv(int64_t b, int64_t hk, const uint8_t* kpm) {
    const int64_t Nk = a.Nk;
    // K rows into Kr and V rows into dV (free until it is zeroed below), then both packed transposed, 8 keys
    // at a time in registers: value by value it was a quarter of the kernel's own time at B12 H4 D32 N = 64.
    for (int64_t j = 0; j < NkP; ++j) {
      if (j < Nk && !(kpm && !kpm[j])) {  // padded keys are never read
        load_row<T>(at(a.k, a.dtype, b * a.k_stride[0] + hk * a.k_stride[1] + j * a.k_stride[2]), a.dtype, D, Dp,
                    T(1), Kr + j * Dp);
        load_row<T>(at(a.v, a.dtype, b * a.v_stride[0] + hk * a.v_stride[1] + j * a.v_stride[2]), a.dtype, D, Dp,
                    T(1), dV + j * Dp);
      } else {
        std::memset(Kr + j * Dp, 0, sizeof(T) * Dp);
        std::memset(dV + j * Dp, 0, sizeof(T) * Dp);
      }
    }
    int64_t jt = pack_rows8(Kr, Dp, NkP, Dp, Kt);
    pack_rows8(dV, Dp, NkP, Dp, Vt);
    for (; jt < NkP; ++jt)  // scalar builds: NkP may be a multiple of 4 only, and fp64 panels hold 4 keys
      for (int64_t d = 0; d < Dp; ++d) {
        packed_at(Kt, Dp, jt)[d * kPanel<T>] = Kr[jt * Dp + d];
        packed_at(Vt, Dp, jt)[d * kPanel<T>] = dV[jt * Dp + d];
      }
    std::memset(dK, 0, sizeof(T) * NkP * Dp);
    std::memset(dV, 0, sizeof(T) * NkP * Dp);
  }

  // Right-padded keys (from k_end on) are never computed: a block that holds the last kept key stops there, as
  // the forward's does (their dK and dV rows stay 0); >= 1, since a visible block holds a kept key.
  int64_t key_cols(int64_t j0, int64_t k_end) const { return imin(bk, k_end - j0); }

  void products(int64_t i0, int64_t r0, int64_t tr, int64_t cv, int64_t j0, T* P, T* dS) const {
    gemm_packed<T>(tr, cv, Dp, Qs + (i0 + r0) * Dp, Dp, packed_at(Kt, Dp, j0), P + r0 * bk, bk, false);
    gemm_packed<T>(tr, cv, Dp, dO + (i0 + r0) * Dp, Dp, packed_at(Vt, Dp, j0), dS + r0 * bk, bk, false);
  }

  void row_done(int64_t, T*) const {}

  // dQ += dS K (the unscaled sum; scaled once at the end)
  void dq(int64_t i0, int64_t r0, int64_t tr, int64_t cols, int64_t, int64_t j0, const T* dS) const {
    gemm<T>(tr, Dp, cols, dS + r0 * bk, bk, Kr + j0 * Dp, Dp, dQ + (i0 + r0) * Dp, Dp, true);
  }

  // dV += P^T dO and dK += dS^T (scale q), key tile by key tile; P^T and dS^T are read in place (column-major),
  // and on the diagonal a key tile starts at the first row that sees its first key.
  void block_done(int64_t i0, int64_t rows, int64_t j0, int64_t kcols, bool tri, int64_t off, const T* P,
                  const T* dS) const {
    for (int64_t c0 = 0; c0 < kcols; c0 += kMR) {
      const int64_t tk = imin(kMR, kcols - c0);
      const int64_t r_start = tri ? imin(rows, imax(0, j0 + c0 - off - i0)) : 0;
      if (r_start == rows) continue;
      const int64_t kr = rows - r_start;
      gemm<T, true>(tk, Dp, kr, P + r_start * bk + c0, bk, dO + (i0 + r_start) * Dp, Dp, dV + (j0 + c0) * Dp, Dp,
                    true);
      gemm<T, true>(tk, Dp, kr, dS + r_start * bk + c0, bk, Qs + (i0 + r_start) * Dp, Dp, dK + (j0 + c0) * Dp, Dp,
                    true);
    }
  }

  void store_dq(int64_t bh) const {
    const T scale = static_cast<T>(a.scale);
    const int64_t Nq = a.Nq;
    for (int64_t i = 0; i < Nq; ++i)
      store_row<T>(dQ + i * Dp, D, scale, a.dtype, out_at(a, a.dq, a.dq_stride, a.H, Nq, bh, i));
  }

  void store_dkv(int64_t bkv) const {
    const int64_t Nk = a.Nk;
    for (int64_t j = 0; j < Nk; ++j) {
      store_row<T>(dK + j * Dp, D, T(1), a.dtype, out_at(a, a.dk, a.dk_stride, kv_heads(a), Nk, bkv, j));
      store_row<T>(dV + j * Dp, D, T(1), a.dtype, out_at(a, a.dv, a.dv_stride, kv_heads(a), Nk, bkv, j));
    }
  }
};

#if defined(__AVX512BW__)
// bf16 on vdpbf16ps (see FwdBf16 for the layouts). S = q k^T and dP = dO v^T take q / dO rows against packed
// K^T / V^T pairs; dQ += dS k takes dS rows (pairs along keys) against K row pairs; dV and dK are accumulated
// transposed, dV^T += dO^T P and dK^T += q^T dS, so that P and dS enter as row-pair words (two rows
// interleaved, vectorised) rather than transposed element by element. q and k are unscaled: S is scaled per
// row, and dQ and dK take the scale once, at the end.
constexpr int64_t kOutKeys = 64;  // keys per transpose of dK^T / dV^T back to rows
static_assert(kOutKeys % 16 == 0, "key chunks start on whole 16-key steps of NkP");

struct BwdBf16 {
  const AttnBwdArgs& a;
  const int64_t D, Dp, DP, NkP, NqE, bk;
  const bool amx;
  const float row_scale;
  AmxTiles tiles;
  uint16_t* Qb;   // (NqE, Dp) bf16 q rows
  uint16_t* dOb;  // (NqE, Dp) bf16 dO rows
  uint32_t* QT;   // (Dp, NqE / 2): q^T row pairs
  uint32_t* dOT;  // (Dp, NqE / 2): dO^T row pairs
  uint16_t* K16;  // (16, Dp) k rows
  uint16_t* V16;  // (16, Dp) v rows
  uint32_t* W16;  // (16, Dp): 16 row pairs as words
  uint32_t* Kp;   // (Dp / 2, NkP): K^T pairs along D
  uint32_t* Vp;   // (Dp / 2, NkP): V^T pairs along D
  uint32_t* Kv;   // (NkP / 2, Dp): K row pairs
  float* dQ;      // (Nq, Dp)
  float* dKT;     // (Dp, NkP)
  float* dVT;     // (Dp, NkP)
  uint16_t* dSb;  // (BQ, bk) bf16
  uint32_t* PI;   // (BQ / 2, bk): P row pairs
  uint32_t* dSI;  // (BQ / 2, bk): dS row pairs
  float* f0;      // (kOutKeys, Dp): fp32 rows, dK rows at the end
  float* f1;      // the same for dO, then dV

  // Row tiles of 32 rows and 32-key column chunks with AMX, as in the forward.
  static BwdBlocks blocks(const AttnBwdArgs& a) {
    const bool amx = use_amx();
    const int64_t CW = amx ? 32 : 16;
    return {kBq, imin(kBkMax, round_up(imax(a.Nk, 1), CW)), amx ? kAmxRows : kMR, CW};
  }
  static int64_t rows_e(int64_t Nq) { return round_up(Nq, 32); }  // whole 16-word rows of QT and dOT
  static size_t scratch_bytes(const AttnBwdArgs& a, const BwdBlocks& bb, int64_t Dp, int64_t NkP) {
    const int64_t NqE = rows_e(a.Nq), BQ = bb.BQ, bk = bb.bk;
    return 2 * Arena::need<uint16_t>(NqE * Dp) + 2 * Arena::need<uint32_t>(Dp * NqE / 2) +  // Qb dOb, QT dOT
           3 * Arena::need<uint32_t>(16 * Dp) +                                              // K16 V16 W16
           3 * Arena::need<uint32_t>(Dp / 2 * NkP) +                                         // Kp Vp Kv
           Arena::need<float>(a.Nq * Dp) + 2 * Arena::need<float>(Dp * NkP) +              // dQ dKT dVT
           Arena::need<uint16_t>(BQ * bk) + 2 * Arena::need<uint32_t>(BQ / 2 * bk) + 2 * Arena::need<float>(kOutKeys * Dp);
  }
  BwdBf16(const AttnBwdArgs& args, const BwdBlocks& bb, int64_t Dp_, int64_t NkP_, Arena* arena)
      : a(args), D(args.D), Dp(Dp_), DP(Dp_ / 2), NkP(NkP_), NqE(rows_e(args.Nq)), bk(bb.bk),
        amx(bb.TR == kAmxRows), row_scale(static_cast<float>(args.scale)), tiles(amx && arena) {
    Qb = arena ? arena->take<uint16_t>(NqE * Dp) : nullptr;
    dOb = arena ? arena->take<uint16_t>(NqE * Dp) : nullptr;
    QT = arena ? arena->take<uint32_t>(Dp * NqE / 2) : nullptr;
    dOT = arena ? arena->take<uint32_t>(Dp * NqE / 2) : nullptr;
    K16 = arena ? reinterpret_cast<uint16_t*>(arena->take<uint32_t>(16 * Dp)) : nullptr;
    V16 = arena ? reinterpret_cast<uint16_t*>(arena->take<uint32_t>(16 * Dp)) : nullptr;
    W16 = arena ? arena->take<uint32_t>(16 * Dp) : nullptr;
    Kp = arena ? arena->take<uint32_t>(DP * NkP) : nullptr;
    Vp = arena ? arena->take<uint32_t>(DP * NkP) : nullptr;
    Kv = arena ? arena->take<uint32_t>(DP * NkP) : nullptr;
    dQ = arena ? arena->take<float>(a.Nq * Dp) : nullptr;
    dKT = arena ? arena->take<float>(Dp * NkP) : nullptr;
    dVT = arena ? arena->take<float>(Dp * NkP) : nullptr;
    dSb = arena ? arena->take<uint16_t>(bb.BQ * bk) : nullptr;
    PI = arena ? arena->take<uint32_t>(bb.BQ / 2 * bk) : nullptr;
    dSI = arena ? arena->take<uint32_t>(bb.BQ / 2 * bk) : nullptr;
    f0 = arena ? arena->take<float>(kOutKeys * Dp) : nullptr;
    f1 = arena ? arena->take<float>(kOutKeys * Dp) : nullptr;
  }

  MINILLM_ALWAYS_INLINE void load_q(int64_t b, int64_t h, int64_t bh, const uint8_t* qpm, float* Dl) {
    const int64_t Nq = a.Nq;
    const float* dlse = a.dlse ? static_cast<const float*>(a.dlse) + bh * Nq : nullptr;
    // q and dO rows (padded queries and the pad row are zeros), Dl, and their transposed row pairs.
    for (int64_t i = 0; i < NqE; ++i) {
      uint16_t* qr = Qb + i * Dp;
      uint16_t* dr = dOb + i * Dp;
      if (i >= Nq || (qpm && !qpm[i])) {
        std::memset(qr, 0, sizeof(uint16_t) * Dp);
        std::memset(dr, 0, sizeof(uint16_t) * Dp);
        if (i < Nq) Dl[i] = 0;
        continue;
      }
      const void* dorow = at(a.dout, kBF16, b * a.do_stride[0] + h * a.do_stride[1] + i * a.do_stride[2]);
      bf16_row(at(a.q, kBF16, b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2]), D, Dp, qr);
      bf16_row(dorow, D, Dp, dr);
      load_row<float>(dorow, kBF16, D, Dp, 1.0f, f0);
      load_row<float>(at(a.out, kBF16, b * a.o_stride[0] + h * a.o_stride[1] + i * a.o_stride[2]), kBF16, D, Dp,
                      1.0f, f1);
      Dl[i] = delta_row<float>(f0, f1, Dp, dlse ? dlse[i] : 0.0f);
    }
    // 16 row pairs at a time: pair words, then transposed (whole 64-byte rows of QT and dOT).
    for (int64_t ip = 0; ip < NqE / 2; ip += 16) {
      for (int64_t t = 0; t < 16; ++t)
        pair_bf16_rows(Qb + 2 * (ip + t) * Dp, Qb + (2 * (ip + t) + 1) * Dp, Dp, W16 + t * Dp);
      transpose_words16(W16, Dp, Dp, QT + ip, NqE / 2);
      for (int64_t t = 0; t < 16; ++t)
        pair_bf16_rows(dOb + 2 * (ip + t) * Dp, dOb + (2 * (ip + t) + 1) * Dp, Dp, W16 + t * Dp);
      transpose_words16(W16, Dp, Dp, dOT + ip, NqE / 2);
    }
    std::memset(dQ, 0, sizeof(float) * Nq * Dp);
  }

  MINILLM_ALWAYS_INLINE void load_kv(int64_t b, int64_t hk, const uint8_t* kpm) {
    const int64_t Nk = a.Nk;
    // K and V, 16 keys at a time: padded keys and keys past Nk are zeros (never read as data).
    for (int64_t j = 0; j < NkP; j += 16) {
      load_kv_rows16(at(a.k, kBF16, b * a.k_stride[0] + hk * a.k_stride[1]), a.k_stride[2],
                     at(a.v, kBF16, b * a.v_stride[0] + hk * a.v_stride[1]), a.v_stride[2], j, Nk, kpm, D, Dp, K16, V16);
      transpose_words16(reinterpret_cast<const uint32_t*>(K16), DP, DP, Kp + j, NkP);
      transpose_words16(reinterpret_cast<const uint32_t*>(V16), DP, DP, Vp + j, NkP);
      for (int64_t t = 0; t < 16; t += 2) pair_bf16_rows(K16 + t * Dp, K16 + (t + 1) * Dp, Dp, Kv + (j + t) / 2 * Dp);
    }
    std::memset(dKT, 0, sizeof(float) * Dp * NkP);
    std::memset(dVT, 0, sizeof(float) * Dp * NkP);
  }

  // Whole blocks: keys past Nk and padded keys are zero rows, masked.
  int64_t key_cols(int64_t, int64_t) const { return bk; }

  void products(int64_t i0, int64_t r0, int64_t tr, int64_t cv, int64_t j0, float* P, float* dS) const {
    const uint32_t* Qw = reinterpret_cast<const uint32_t*>(Qb);
    const uint32_t* dOw = reinterpret_cast<const uint32_t*>(dOb);
    bf16_mm(amx, tr, cv, DP, Qw + (i0 + r0) * DP, DP, Kp + j0, NkP, P + r0 * bk, bk, false);
    bf16_mm(amx, tr, cv, DP, dOw + (i0 + r0) * DP, DP, Vp + j0, NkP, dS + r0 * bk, bk, false);
  }

  void row_done(int64_t r, const float* dS) const { f32_to_bf16_row(dS + r * bk, bk, dSb + r * bk); }

  // dQ += dS k (unscaled)
  void dq(int64_t i0, int64_t r0, int64_t tr, int64_t cols, int64_t cv, int64_t j0, const float*) const {
    bf16_mm(amx, tr, Dp, amx ? cv / 2 : (cols + 1) / 2, reinterpret_cast<const uint32_t*>(dSb + r0 * bk), bk / 2,
            Kv + (j0 / 2) * Dp, Dp, dQ + (i0 + r0) * Dp, Dp, true);
  }

  void block_done(int64_t i0, int64_t rows, int64_t j0, int64_t, bool, int64_t, float* P, float* dS) const {
    // Row pairs of P and dS; an odd last row pairs with zeros.
    const int64_t rp = (rows + 1) / 2;
    if (rows & 1) {
      std::memset(P + rows * bk, 0, sizeof(float) * bk);
      std::memset(dS + rows * bk, 0, sizeof(float) * bk);
    }
    for (int64_t ip = 0; ip < rp; ++ip) {
      interleave_bf16_rows(P + 2 * ip * bk, P + (2 * ip + 1) * bk, bk, PI + ip * bk);
      interleave_bf16_rows(dS + 2 * ip * bk, dS + (2 * ip + 1) * bk, bk, dSI + ip * bk);
    }
    bf16_mm(amx, Dp, bk, rp, dOT + i0 / 2, NqE / 2, PI, bk, dVT + j0, NkP, true);  // dV^T += dO^T P
    bf16_mm(amx, Dp, bk, rp, QT + i0 / 2, NqE / 2, dSI, bk, dKT + j0, NkP, true);  // dK^T += q^T dS
  }

  void store_dq(int64_t bh) const {
    const int64_t Nq = a.Nq;
    for (int64_t i = 0; i < Nq; ++i)
      store_row<float>(dQ + i * Dp, D, row_scale, a.dtype, out_at(a, a.dq, a.dq_stride, a.H, Nq, bh, i));
  }

  void store_dkv(int64_t bkv) const {
    const int64_t Nk = a.Nk;
    // dK^T and dV^T back to rows, kOutKeys keys at a time in 8 x 8 register transposes: read a column at a
    // time, each value was on another line NkP floats away (4 KB at N = 1024, one cache set), 8% of the call.
    for (int64_t j0 = 0; j0 < Nk; j0 += kOutKeys) {
      const int64_t nj = imin(kOutKeys, NkP - j0);  // a multiple of 8: NkP and j0 are multiples of 16
      for (int64_t d0 = 0; d0 < Dp; d0 += 8) {
        transpose8_rows(dKT + d0 * NkP + j0, NkP, nj, f0 + d0, Dp);
        transpose8_rows(dVT + d0 * NkP + j0, NkP, nj, f1 + d0, Dp);
      }
      const int64_t Hkv = kv_heads(a);
      for (int64_t j = j0; j < imin(Nk, j0 + kOutKeys); ++j) {
        store_row<float>(f0 + (j - j0) * Dp, D, row_scale, a.dtype, out_at(a, a.dk, a.dk_stride, Hkv, Nk, bkv, j));
        store_row<float>(f1 + (j - j0) * Dp, D, 1.0f, a.dtype, out_at(a, a.dv, a.dv_stride, Hkv, Nk, bkv, j));
      }
    }
  }
};
#endif

template <typename T>
int attention_bwd_impl(const AttnBwdArgs& a) {
#if defined(__AVX512BW__)
  if (std::is_same<T, float>::value && a.dtype == kBF16 && use_bf16_dot())
    return attention_bwd_blocks<float, BwdBf16>(a, BwdBf16::blocks(a));
#endif
  return attention_bwd_blocks<T, BwdF32<T>>(a, BwdF32<T>::blocks(a));
}

}  // namespace

// The entry point of this SIMD level (csrc/kernels.h).
int attention_bwd(const AttnBwdArgs& a) {
  return a.dtype == kF64 ? attention_bwd_impl<double>(a) : attention_bwd_impl<float>(a);
}

}  // namespace MINILLM_ISA
}  // namespace minillm
