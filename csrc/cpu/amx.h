// The bf16 products on AMX tiles (tdpbf16ps), and bf16_mm choosing AMX or vdpbf16ps.
#pragma once
#include "cpu/bf16_gemm.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

#if defined(__AVX512BW__)
// ---- AMX: the same products on tile registers (tdpbf16ps) ----
// A tile multiply takes a 16-row A tile (16 pairs per row, the broadcast side's words) and a 16-row B tile
// (16 pair rows of 16 words, exactly the packed vector side above) into a 16 x 16 fp32 C tile: 8192
// multiply-adds per instruction, so the layouts above feed it unchanged. The configuration is fixed for a
// thread's whole parallel region (AmxTiles): tiles 0-3 hold a 2 x 2 block of C, 4-5 two A tiles, 6-7 two B
// tiles, all 16 rows of 64 bytes. Edges that are not whole tiles (rows past a multiple of 16, pairs past a
// multiple of 16) go through bf16_gemm, so a tile never reads or writes past the caller's arrays.
constexpr int64_t kAmxRows = 32;  // rows per attention row tile with AMX: two A tiles

struct alignas(64) AmxConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

__attribute__((target("amx-tile"))) inline void amx_configure() {
  AmxConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  // GCC 12's _tile_loadconfig tells the compiler it reads only the first 8 bytes, so the stores above
  // would be dropped as dead; the barrier keeps them.
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}
__attribute__((target("amx-tile"))) inline void amx_release() { _tile_release(); }

// The tile configuration of one thread's parallel region (nothing when AMX is off).
struct AmxTiles {
  const bool on;
  explicit AmxTiles(bool use) : on(use) {
    if (on) amx_configure();
  }
  ~AmxTiles() {
    if (on) amx_release();
  }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
};

// C (16 MI, 16 NJ) (+)= A (16 MI, KP16 pairs) B (KP16 pairs, 16 NJ), KP16 a multiple of 16; strides in
// words (A, B) and floats (C) as in bf16_gemm.
template <int MI, int NJ>
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_block(int64_t KP16, const uint32_t* A, int64_t lda,
                                                                    const uint32_t* B, int64_t ldb, float* C,
                                                                    int64_t ldc, bool acc) {
  const long sa = 4 * lda, sb = 4 * ldb, sc = 4 * ldc;
  if (acc) {
    _tile_loadd(0, C, sc);
    if (NJ > 1) _tile_loadd(1, C + 16, sc);
    if (MI > 1) _tile_loadd(2, C + 16 * ldc, sc);
    if (MI > 1 && NJ > 1) _tile_loadd(3, C + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if (NJ > 1) _tile_zero(1);
    if (MI > 1) _tile_zero(2);
    if (MI > 1 && NJ > 1) _tile_zero(3);
  }
  for (int64_t p = 0; p < KP16; p += 16) {
    _tile_loadd(4, A + p, sa);
    if (MI > 1) _tile_loadd(5, A + 16 * lda + p, sa);
    _tile_loadd(6, B + p * ldb, sb);
    if (NJ > 1) _tile_loadd(7, B + p * ldb + 16, sb);
    _tile_dpbf16ps(0, 4, 6);
    if (NJ > 1) _tile_dpbf16ps(1, 4, 7);
    if (MI > 1) _tile_dpbf16ps(2, 5, 6);
    if (MI > 1 && NJ > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, sc);
  if (NJ > 1) _tile_stored(1, C + 16, sc);
  if (MI > 1) _tile_stored(2, C + 16 * ldc, sc);
  if (MI > 1 && NJ > 1) _tile_stored(3, C + 16 * ldc + 16, sc);
}

// C (16 MI, N) (+)= A (16 MI, 16 KC pairs) B for a shallow product (KC <= 2 chunks: the scores, with D <= 64,
// and the backward's products over 64 keys or query pairs): A's tiles stay in tiles 0-3 while B and C move
// 16 columns at a time (tiles 4-5 and 6-7). The 2 x 2 blocks of amx_block would reload A for every 32 columns
// and drain four C tiles after only KC multiplies each: 865 against 570-640 GFLOP/s per core on 32 x 256 x 64
// scores in a micro-benchmark here.
template <int MI, int KC>
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_rows_shallow(int64_t N, const uint32_t* A, int64_t lda,
                                                                           const uint32_t* B, int64_t ldb, float* C,
                                                                           int64_t ldc, bool acc) {
  const long sa = 4 * lda, sb = 4 * ldb, sc = 4 * ldc;
  _tile_loadd(0, A, sa);
  if (KC > 1) _tile_loadd(1, A + 16, sa);
  if (MI > 1) _tile_loadd(2, A + 16 * lda, sa);
  if (MI > 1 && KC > 1) _tile_loadd(3, A + 16 * lda + 16, sa);
  for (int64_t j = 0; j < N; j += 16) {
    _tile_loadd(4, B + j, sb);
    if (KC > 1) _tile_loadd(5, B + 16 * ldb + j, sb);
    if (acc) {
      _tile_loadd(6, C + j, sc);
      if (MI > 1) _tile_loadd(7, C + 16 * ldc + j, sc);
    } else {
      _tile_zero(6);
      if (MI > 1) _tile_zero(7);
    }
    _tile_dpbf16ps(6, 0, 4);
    if (MI > 1) _tile_dpbf16ps(7, 2, 4);
    if (KC > 1) _tile_dpbf16ps(6, 1, 5);
    if (MI > 1 && KC > 1) _tile_dpbf16ps(7, 3, 5);
    _tile_stored(6, C + j, sc);
    if (MI > 1) _tile_stored(7, C + 16 * ldc + j, sc);
  }
}

// bf16_gemm on tiles (the calling thread holds AmxTiles): C (M, N) (+)= A (M, KP pairs) B, N a multiple of 16.
inline void amx_gemm(int64_t M, int64_t N, int64_t KP, const uint32_t* A, int64_t lda, const uint32_t* B,
                     int64_t ldb, float* C, int64_t ldc, bool acc) {
  const int64_t M16 = M / 16 * 16, KP16 = KP / 16 * 16;
  if (M16 == 0 || KP16 == 0) return bf16_gemm(M, N, KP, A, lda, B, ldb, C, ldc, acc);
  for (int64_t i = 0; i < M16; i += 32) {
    const bool two_rows = M16 - i >= 32;
    const uint32_t* Ai = A + i * lda;
    float* Ci = C + i * ldc;
    if (KP16 <= 32) {
      if (KP16 == 32 && two_rows) amx_rows_shallow<2, 2>(N, Ai, lda, B, ldb, Ci, ldc, acc);
      else if (KP16 == 32) amx_rows_shallow<1, 2>(N, Ai, lda, B, ldb, Ci, ldc, acc);
      else if (two_rows) amx_rows_shallow<2, 1>(N, Ai, lda, B, ldb, Ci, ldc, acc);
      else amx_rows_shallow<1, 1>(N, Ai, lda, B, ldb, Ci, ldc, acc);
      continue;
    }
    for (int64_t j = 0; j < N; j += 32) {
      const bool two_cols = N - j >= 32;
      if (two_rows && two_cols) amx_block<2, 2>(KP16, Ai, lda, B + j, ldb, Ci + j, ldc, acc);
      else if (two_rows) amx_block<2, 1>(KP16, Ai, lda, B + j, ldb, Ci + j, ldc, acc);
      else if (two_cols) amx_block<1, 2>(KP16, Ai, lda, B + j, ldb, Ci + j, ldc, acc);
      else amx_block<1, 1>(KP16, Ai, lda, B + j, ldb, Ci + j, ldc, acc);
    }
  }
  if (KP16 < KP) bf16_gemm(M16, N, KP - KP16, A + KP16, lda, B + KP16 * ldb, ldb, C, ldc, true);
  if (M16 < M) bf16_gemm(M - M16, N, KP, A + M16 * lda, lda, B, ldb, C + M16 * ldc, ldc, acc);
}

inline void bf16_mm(bool amx, int64_t M, int64_t N, int64_t KP, const uint32_t* A, int64_t lda, const uint32_t* B,
                    int64_t ldb, float* C, int64_t ldc, bool acc) {
  if (amx)
    amx_gemm(M, N, KP, A, lda, B, ldb, C, ldc, acc);
  else
    bf16_gemm(M, N, KP, A, lda, B, ldb, C, ldc, acc);
}
#endif

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
