// Tile shapes and shared-memory layout of the tensor-core attention kernels (flash_fwd.cuh, flash_bwd.cuh).
//
// FlashAttention-2's structure: a block of 4 warps owns 64 query rows (forward, dQ) or 64 keys (dK/dV), 16 per
// warp, the height of one mma tile; K/V (or Q/dO) tiles stream through shared memory by cp.async, two stages
// deep. Operands are 16-bit (bf16 or f16), head dims padded to kD = 64 or 128 columns with zeros (D must be a
// multiple of 8: one 16-byte cp.async chunk is 8 elements). Tiles are stored row by row, kD elements a row,
// with each row's 16-byte chunks permuted by chunk ^ (row % 8): ldmatrix reads 8 rows at one chunk
// position, which without the permutation would all sit in the same 4 of the 32 banks when a row is 128 or
// 256 bytes.
#pragma once

#include "mma.cuh"

namespace minillm {
namespace cuda {

template <int kD_>
struct FlashTraits {
  static constexpr int kD = kD_;            // padded head dim: 64 or 128
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarp;
  static constexpr int kBlockM = 64;        // query rows per block (forward, dQ), 16 per warp
  static constexpr int kBlockN = 64;        // keys per tile (forward, dQ) and per block (dK/dV)
  static constexpr int kBwdTileM = 32;      // query rows per tile of the dK/dV kernel
  static constexpr int kChunks = kD / 8;    // 16-byte chunks per row
  static_assert(kD == 64 || kD == 128, "the swizzle needs at least 8 chunks a row");

  // forward: Q (64 rows), K and V (64 rows, 2 stages each)
  static constexpr size_t kSmemFwd = sizeof(uint16_t) * size_t(kD) * (kBlockM + 4 * kBlockN);
  // dQ: Q, dO (64 rows), K and V (64 rows, 2 stages each)
  static constexpr size_t kSmemBwdDq = sizeof(uint16_t) * size_t(kD) * (2 * kBlockM + 4 * kBlockN);
  // dK/dV: K, V (64 rows), Q and dO (32 rows, 2 stages each), then lse and delta (32 floats, 2 stages each)
  static constexpr size_t kSmemBwdDkdv =
      sizeof(uint16_t) * size_t(kD) * (2 * kBlockN + 4 * kBwdTileM) + sizeof(float) * 4 * kBwdTileM;
};

// Element offset of column chunk `chunk` (8 elements) of row `row` in a swizzled tile kD elements wide.
template <int kD>
MINILLM_DEVICE int swizzle(int row, int chunk) {
  return row * kD + ((chunk ^ (row & 7)) << 3);
}

// Block-wide: rows n0 .. n0 + kRows - 1 of a (rows, D) matrix at `base` (element row stride `ld`) into the
// swizzled tile `s` by cp.async. Rows at or past `n_end`, rows whose padding flag `pm[n]` is 0, and columns
// past D are written as zeros, never read.
template <int kD, int kRows, int kThreads>
MINILLM_DEVICE void load_tile_async(uint16_t* s, const uint16_t* base, int64_t ld, int64_t n0, int64_t n_end, int D,
                                    const uint8_t* pm) {
  constexpr int kChunks = kD / 8;
  for (int e = int(threadIdx.x); e < kRows * kChunks; e += kThreads) {
    const int r = e / kChunks, c = e % kChunks;
    const int64_t n = n0 + r;
    const bool valid = n < n_end && c * 8 < D && (pm == nullptr || pm[n] != 0);
    cp_async_16(s + swizzle<kD>(r, c), valid ? base + n * ld + c * 8 : base, valid);
  }
}

// Warp-wide: the A fragments of the 16 rows r0 .. r0 + 15 of a swizzled tile, for k-step ks (columns 16 ks ..
// 16 ks + 15): ldmatrix.x4 over (rows 0-7, 8-15) x (column halves 0-7, 8-15), in a[0..3]'s order.
template <int kD>
MINILLM_DEVICE void load_a_frag(uint32_t* a, const uint16_t* s, int r0, int ks) {
  const int lane = int(threadIdx.x) % kWarp;
  ldmatrix<4, false>(a, s + swizzle<kD>(r0 + lane % 16, 2 * ks + lane / 16));
}

// Warp-wide: B fragments of two adjacent 8-column n-blocks for k-step ks, from a tile stored n-major (row = n,
// as K's rows for q k^T): b[0..1] for rows n0 .. n0 + 7, b[2..3] for rows n0 + 8 .. n0 + 15.
template <int kD>
MINILLM_DEVICE void load_b_frag_nmajor(uint32_t* b, const uint16_t* s, int n0, int ks) {
  const int lane = int(threadIdx.x) % kWarp;
  ldmatrix<4, false>(b, s + swizzle<kD>(n0 + (lane / 16) * 8 + lane % 8, 2 * ks + (lane / 8) % 2));
}

// Warp-wide: B fragments of the two 8-column n-blocks chunk, chunk + 1 (columns 8 chunk ..) for the k-step of
// rows k0 .. k0 + 15, from a tile stored k-major (row = k, as V's rows for p v): ldmatrix .trans.
template <int kD>
MINILLM_DEVICE void load_b_frag_kmajor(uint32_t* b, const uint16_t* s, int k0, int chunk) {
  const int lane = int(threadIdx.x) % kWarp;
  ldmatrix<4, true>(b, s + swizzle<kD>(k0 + lane % 16, chunk + lane / 16));
}

// The A fragment of the product that follows: two adjacent 16 x 8 fp32 C tiles (columns 16 kk .. 16 kk + 15 of a
// score tile) rounded to T. The C layout of n-blocks 2 kk and 2 kk + 1 is the A layout of that k-step.
template <typename T>
MINILLM_DEVICE void c_to_a_frag(uint32_t* a, const float* c0, const float* c1) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

}  // namespace cuda
}  // namespace minillm
