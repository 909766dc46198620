// GEMM for linear layers and their gradients: B packed once, row blocks x panel groups in parallel.
#pragma once
#include "cpu/gemm_ukernel.h"
#include "cpu/parallel.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// ---- GEMM for linear layers: C (M, N) = A (M, K) B (K, N) [+ bias], any layout of A and B ----

// K per packed block: a block of one B panel (128 x 64 floats, 32 KB) stays in L1 while every
// 6-row strip of the item's rows streams past it.
constexpr int64_t kGemmKC = 128;
// Rows per work item: its A block (96 x 128) stays in L2 across the item's panels.
constexpr int64_t kGemmMC = 96;
// Packed B up to this many elements (1 MB of floats) is packed before the parallel region.
constexpr int64_t kPackFirstElems = 1 << 18;

// Packs rows [k0, k0 + kc) of B's panel jp (columns [jp * NR, jp * NR + NR)) into dst (kc, NR),
// zero-padding columns past N.
template <typename T>
inline void pack_b_block(const GemmArgs& g, int64_t jp, int64_t k0, int64_t kc, T* dst) {
  constexpr int64_t NR = kNV * Vec<T>::W;
  const T* Bm = static_cast<const T*>(g.b);
  const int64_t j0 = jp * NR, cols = imin(NR, g.N - j0);
  if (!g.b_colmajor) {
    for (int64_t p = 0; p < kc; ++p) {
      std::memcpy(dst + p * NR, Bm + (k0 + p) * g.ldb + j0, sizeof(T) * cols);
      for (int64_t c = cols; c < NR; ++c) dst[p * NR + c] = T(0);
    }
    return;
  }
  // Column-major B (W^T for nn.Linear's (N, K) weight): a transpose, in 16 x 16 blocks that stay in L1.
  for (int64_t c0 = 0; c0 < NR; c0 += 16)
    for (int64_t p0 = 0; p0 < kc; p0 += 16) {
      const int64_t pe = imin(kc, p0 + 16);
      for (int64_t c = c0; c < imin(NR, c0 + 16); ++c) {
        if (c < cols) {
          const T* src = Bm + (j0 + c) * g.ldb + k0;
          for (int64_t p = p0; p < pe; ++p) dst[p * NR + c] = src[p];
        } else {
          for (int64_t p = p0; p < pe; ++p) dst[p * NR + c] = T(0);
        }
      }
    }
}

template <typename T>
int gemm_impl(const GemmArgs& g) {
  constexpr int64_t NR = kNV * Vec<T>::W;
  const int64_t M = g.M, N = g.N, K = g.K;
  const T* A = static_cast<const T*>(g.a);
  const T* bias = static_cast<const T*>(g.bias);
  T* C = static_cast<T*>(g.c);
  const int nt = g.nthreads > 0 ? g.nthreads : 1;
  const int64_t np = (N + NR - 1) / NR, nkb = (K + kGemmKC - 1) / kGemmKC;
  // All of B, packed once: panel jp's rows p at Bp[(jp * K + p) * NR], NR columns each.
  T* Bp = static_cast<T*>(std::aligned_alloc(64, static_cast<size_t>(round_up(np * K * NR * static_cast<int64_t>(sizeof(T)), 64))));
  if (!Bp) return kOutOfMemory;
  // Work items: row blocks x panel groups, at least ~4 per thread so that dynamic scheduling balances.
  const int64_t mb = (M + kGemmMC - 1) / kGemmMC;
  const int64_t want_groups = imin(np, imax(1, (4 * nt + mb - 1) / mb));
  const int64_t pg = (np + want_groups - 1) / want_groups, groups = (np + pg - 1) / pg;
  const int64_t items = mb * groups;
  auto pack_b_item = [&](int64_t t) {
    const int64_t jp = t / nkb, k0 = (t % nkb) * kGemmKC;
    pack_b_block<T>(g, jp, k0, imin(kGemmKC, K - k0), Bp + (jp * K + k0) * NR);
  };
  const bool pack_first = nt == 1 || np * K * NR <= kPackFirstElems;
  if (pack_first)
    for (int64_t t = 0; t < np * nkb; ++t) pack_b_item(t);
  int status = kOk;
#pragma omp parallel num_threads(nt)
  {
    Arena arena(Arena::need<T>(kGemmMC * NR));
    const bool ok = thread_arena_ok(arena, &status);
    T* edge = ok ? arena.take<T>(kGemmMC * NR) : nullptr;  // (MC, NR): tile of the last, partial panel
    // A small B is packed by the calling thread before the region: a parallel packing loop would end in a
    // barrier that waits for the woken thread (~50-90 us under OMP_WAIT_POLICY=PASSIVE here), while the
    // dynamically scheduled products below start at once and take the other thread whenever it arrives.
#pragma omp for schedule(static)
    for (int64_t t = 0; t < (pack_first ? 0 : np * nkb); ++t) pack_b_item(t);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      if (!ok) continue;
      const int64_t i0 = (it / groups) * kGemmMC, rows = imin(kGemmMC, M - i0);
      const int64_t jp_end = imin(np, (it % groups + 1) * pg);
      for (int64_t jp = (it % groups) * pg; jp < jp_end; ++jp) {
        const int64_t j0 = jp * NR, cols = imin(NR, N - j0);
        T* Ct = cols == NR ? C + i0 * N + j0 : edge;
        const int64_t ldt = cols == NR ? N : NR;
        for (int64_t k0 = 0; k0 < K; k0 += kGemmKC) {
          const int64_t kc = imin(kGemmKC, K - k0);
          const T* Bb = Bp + (jp * K + k0) * NR;
          if (g.a_colmajor)
            gemm_panel<T, kNV, true>(rows, kc, A + i0 + k0 * g.lda, g.lda, Bb, NR, Ct, ldt, k0 > 0);
          else
            gemm_panel<T, kNV, false>(rows, kc, A + i0 * g.lda + k0, g.lda, Bb, NR, Ct, ldt, k0 > 0);
        }
        if (cols == NR && !bias) continue;
        for (int64_t r = 0; r < rows; ++r) {
          T* dst = C + (i0 + r) * N + j0;
          const T* src = Ct + r * ldt;
          for (int64_t c = 0; c < cols; ++c) dst[c] = src[c] + (bias ? bias[j0 + c] : T(0));
        }
      }
    }
  }
  std::free(Bp);
  return status;
}

}  // namespace

// The entry points of this SIMD level (csrc/kernels.h).
int gemm(const GemmArgs& g) { return g.dtype == kF64 ? gemm_impl<double>(g) : gemm_impl<float>(g); }

// Two independent products (a linear layer's dx and dW), one per thread: one parallel region instead of
// two, and no synchronisation inside either product. With dynamic scheduling the calling thread starts
// at once and takes the second product too if the other thread has not woken by then.
int gemm_pair(const GemmArgs& g1, const GemmArgs& g2, int nthreads) {
  GemmArgs one[2] = {g1, g2};
  one[0].nthreads = one[1].nthreads = 1;
  int status[2] = {kOk, kOk};
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads >= 2 ? 2 : 1)
  for (int i = 0; i < 2; ++i) status[i] = MINILLM_ISA::gemm(one[i]);
  return status[0] != kOk ? status[0] : status[1];
}

}  // namespace MINILLM_ISA
}  // namespace minillm
