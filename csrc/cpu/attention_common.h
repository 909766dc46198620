// Attention tiles, K^T packing, and the masks: what every attention kernel shares.
#pragma once
#include "cpu/convert.h"
#include "cpu/gemm_ukernel.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// Attention tiles: query rows per block and keys per block (a multiple of every vector width).
constexpr int64_t kBq = 64;
constexpr int64_t kBkMax = 64;
// The fp32 forward's tiles: query blocks are whole row tiles (no block ends on a narrower tile), and with 16
// vector registers larger blocks reread K and V less often. Measurements: docs/performance.md, "Attention tiles".
constexpr int64_t kBqFwd = VB >= 64 ? 60 : 126;
constexpr int64_t kBkFwd = 256;
static_assert(kBqFwd % kMR == 0, "forward query blocks are whole row tiles");
static_assert(kBkFwd % kPanel<float> == 0 && kBkFwd % kPanel<double> == 0 && kBkMax % kPanel<float> == 0 &&
                  kBkMax % kPanel<double> == 0,
              "key blocks start on a packed panel");

// ---- attention ----

// Element offset of row n of (b, h) = (bh / heads, bh % heads) in an output (B, heads, N, D) with element strides
// st for (b, h, n) and unit stride along D; st[2] == 0 means contiguous (csrc/kernels.h).
inline int64_t out_row(const int64_t* st, int64_t heads, int64_t N, int64_t D, int64_t bh, int64_t n) {
  if (st[2] == 0) return (bh * N + n) * D;
  return (bh / heads) * st[0] + (bh % heads) * st[1] + n * st[2];
}

// Row n of (b, h) = (bh / H, bh % H) of the forward's output.
inline void* out_at(const AttnFwdArgs& a, int64_t bh, int64_t n) {
  return const_cast<void*>(at(a.out, a.dtype, out_row(a.o_stride, a.H, a.Nq, a.D, bh, n)));
}

// The key/value heads of a backward call (0 in the arguments means H).
inline int64_t kv_heads(const AttnBwdArgs& a) { return a.Hkv > 0 ? a.Hkv : a.H; }

// Row n of (b, h) = (bh / heads, bh % heads) of a backward output (dq, dk or dv) of strides st.
inline void* out_at(const AttnBwdArgs& a, void* out, const int64_t* st, int64_t heads, int64_t N, int64_t bh,
                    int64_t n) {
  return const_cast<void*>(at(out, a.dtype, out_row(st, heads, N, a.D, bh, n)));
}

// The key/value head that query head h reads (grouped-query attention: Hkv heads serve H query heads).
inline int64_t kv_head(const AttnFwdArgs& a, int64_t h) { return a.Hkv > 0 && a.Hkv != a.H ? h / (a.H / a.Hkv) : h; }

// The band of keys each query row sees, from the causal flag and the window (csrc/kernels.h, AttnMods): row i
// sees keys [i + lo_off, i + hi_off], a side without a limit when its flag is off. Causal attention is the band
// with hi_off = causal_offset; every block loop skips the blocks outside it.
struct Band {
  bool lo, hi;
  int64_t lo_off, hi_off;
  template <typename Args>
  explicit Band(const Args& a) {
    int64_t right = a.mods.window_right;  // -1: unbounded
    if (a.causal) right = right < 0 ? 0 : imin(right, 0);
    hi = right >= 0;
    hi_off = a.causal_offset + right;
    lo = a.mods.window_left >= 0;
    lo_off = a.causal_offset - a.mods.window_left;
  }
  // Keys [first(i), last(i) + 1) of row i, within [0, Nk); empty when last < first.
  int64_t first(int64_t i) const { return lo ? imax(0, i + lo_off) : 0; }
  int64_t end(int64_t i, int64_t Nk) const { return hi ? imax(0, imin(Nk, i + hi_off + 1)) : Nk; }
};

// Keys per block: 64, or fewer (whole vectors) for short sequences, which would otherwise pay for 64.
inline int64_t key_block(int64_t Nk, int64_t max_keys = kBkMax) { return imin(max_keys, round_up(imax(Nk, 1), kPad)); }

// dst[d * ldd + r] = src[r * lds + d] for 8 rows r and d < n (n a multiple of 8): 8 x 8 blocks.
template <typename T>
inline void transpose8_rows(const T* src, int64_t lds, int64_t n, T* dst, int64_t ldd) {
  for (int64_t d = 0; d < n; ++d)
    for (int64_t r = 0; r < 8; ++r) dst[d * ldd + r] = src[r * lds + d];
}
#if defined(__AVX2__)
// In registers: the element-by-element form stores to 8 different lines per element read, and was most of
// the fp32 forward's own (non-GEMM) time at N = 128 (perf: ~9% of the call).
inline void transpose8_rows(const float* src, int64_t lds, int64_t n, float* dst, int64_t ldd) {
  for (int64_t d = 0; d < n; d += 8) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds + d);
    for (int i = 0; i < 8; i += 2) {  // t[i], t[i+1]: rows i, i+1 interleaved by element pairs
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int h = 0; h < 8; h += 4) {  // r[h..h+3]: columns of four rows, per 128-bit half
      r[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
      r[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);
      r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
      r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {  // low halves give columns d + i, high halves d + 4 + i
      _mm256_storeu_ps(dst + (d + i) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
      _mm256_storeu_ps(dst + (d + 4 + i) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
  }
}
#endif

// Rows [0, n) of `rows` (row stride ld, Dp values each) into a packed K^T (packed_at), 8 rows at a time in
// register transposes; returns how many were packed (n rounded down to 8), the caller packs the rest. Groups of
// 8 need panels of a multiple of 8 columns: the scalar build's fp64 panel holds 4, and there this packs none.
template <typename T>
inline int64_t pack_rows8(const T* rows, int64_t ld, int64_t n, int64_t Dp, T* Bp) {
  if (kPanel<T> % 8 != 0) return 0;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) transpose8_rows(rows + j * ld, ld, Dp, packed_at(Bp, Dp, j), kPanel<T>);
  return j;
}
// Sets s[c] = -inf for every key of the block [j0, j0 + bk) that query row `i` may not see. Runs once per
// row of every masked block, so the padding mask is applied a vector at a time.
template <typename T>
inline void mask_block(T* s, int64_t j0, int64_t bk, int64_t Nk, const Band& band, int64_t i, const uint8_t* kpm) {
  typedef vec_t<T> V;
  typedef decltype(V{} < V{}) VM;  // lane mask type (int32 or int64 lanes)
  constexpr int W = Vec<T>::W;
  typedef uint8_t M8 __attribute__((vector_size(W)));
  const T ninf = -INFINITY;
  const int64_t in_range = imax(0, imin(bk, Nk - j0));  // columns whose key exists
  int64_t c = 0;
  if (kpm) {
    const V vninf = vbcast(ninf);
    for (; c + W <= in_range; c += W) {
      M8 keep8;
      std::memcpy(&keep8, kpm + j0 + c, W);
      const VM keep = __builtin_convertvector(keep8, VM);
      vstore(s + c, keep != 0 ? vload(s + c) : vninf);
    }
    for (; c < in_range; ++c)
      if (!kpm[j0 + c]) s[c] = ninf;
  }
  for (c = in_range; c < bk; ++c) s[c] = ninf;
  if (band.hi)
    for (c = imax(0, i + band.hi_off + 1 - j0); c < in_range; ++c) s[c] = ninf;
  if (band.lo)
    for (c = 0; c < imin(in_range, i + band.lo_off - j0); ++c) s[c] = ninf;
}

// One past the last key kept by the padding mask (Nk without one): right-padded keys beyond it cost nothing.
inline int64_t keys_end(const uint8_t* kpm, int64_t Nk) {
  int64_t n = Nk;
  while (kpm && n > 0 && !kpm[n - 1]) --n;
  return n;
}

// Per key block: kNoKey (every key padded: the block is skipped), kSomeKeys, or kAllKeys (no padded key
// among those below Nk; all of them without a padding mask).
enum : uint8_t { kNoKey = 0, kSomeKeys = 1, kAllKeys = 2 };
inline void visible_blocks(const uint8_t* kpm, int64_t Nk, int64_t bk, int64_t nkb, uint8_t* out) {
  for (int64_t kb = 0; kb < nkb; ++kb) {
    int64_t kept = 0;
    const int64_t j1 = imin(Nk, (kb + 1) * bk);
    for (int64_t j = kb * bk; kpm && j < j1; ++j) kept += kpm[j] ? 1 : 0;
    out[kb] = !kpm || kept == j1 - kb * bk ? kAllKeys : kept ? kSomeKeys : kNoKey;
  }
}

// True when some key of block j0 is invisible to some row of [i0, i0 + rows): past Nk, padded (`vis`, the
// block's visible_blocks entry), or outside the band. Blocks with every key kept skip the mask pass (a
// right-padded batch masks one block per row, not all of them).
inline bool block_needs_mask(int64_t j0, int64_t bk, int64_t Nk, const Band& band, int64_t i0, int64_t rows,
                             uint8_t vis) {
  return j0 + bk > Nk || vis != kAllKeys || (band.hi && j0 + bk - 1 > i0 + band.hi_off) ||
         (band.lo && j0 < i0 + rows - 1 + band.lo_off);
}

// Query padding (qpm, the (Nq) row of one batch entry): true when any of rows [i0, i1) is computed.
inline bool any_query(const uint8_t* qpm, int64_t i0, int64_t i1) {
  if (!qpm) return i0 < i1;
  for (int64_t i = i0; i < i1; ++i)
    if (qpm[i]) return true;
  return false;
}

// The output of a query that is padded or sees no key: zeros, and lse = +inf so that backward's P is 0.
template <typename T>
inline void write_empty_row(const AttnFwdArgs& a, int64_t bh, int64_t i, T* scratch, int64_t Dp) {
  std::memset(scratch, 0, sizeof(T) * Dp);
  store_row<T>(scratch, a.D, T(1), a.dtype, out_at(a, bh, i));
  static_cast<T*>(a.lse)[bh * a.Nq + i] = INFINITY;
}

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
