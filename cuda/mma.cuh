// Tensor-core and asynchronous-copy primitives (sm_80+): mma.sync m16n8k16, ldmatrix, cp.async.
//
// Each PTX instruction sits behind one small device function; the emulator build (tests/cuda/simt_emu.h)
// replaces them with warp-collective CPU implementations of the same register-fragment layouts, so the
// kernels that use them run in the tests. The layouts, from the PTX ISA ("Matrix Fragments for
// mma.m16n8k16 with floating point type", "ldmatrix"), with g = lane / 4 and t = lane % 4:
//
//   A (16 x 16, row-major), 4 registers of 2 halves:  a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//                                                     a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B (16 x 8, k x n), 2 registers of 2 halves:       b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   C, D (16 x 8, fp32), 4 floats:                    c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
//   (the lower 16 bits of a register hold the first of its two elements)
//
//   ldmatrix .m8n8 .x1/.x2/.x4: lanes 8m .. 8m+7 give the addresses of the 8 rows (16 bytes each) of matrix m;
//   register r[m] of lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix m, or with .trans
//   rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4 (the transposed matrix's row l / 4).
//
// So an A tile is one ldmatrix.x4 over rows (0-7, 8-15) x column halves (0-7, 8-15); a B tile stored n-major
// ([n][k], as K's rows for q k^T) is ldmatrix without .trans, one stored k-major ([k][n], as V's rows for p v)
// is ldmatrix .trans; and a C tile of two adjacent n-blocks is, element for element, the A fragment of the
// next product (the probabilities of a score tile feed p v without leaving registers).
//
// cp.async: cp_async_16 copies 16 bytes global -> shared without blocking (or writes 16 zero bytes when
// `valid` is false: the src-size-0 form, for rows past the end or padded); cp_async_commit closes this
// thread's group of copies; cp_async_wait<N> returns when at most N of this thread's committed groups are
// still in flight. Data copied by other threads is visible only after a __syncthreads() that follows
// their wait.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace minillm {
namespace cuda {

// Two floats as the two 16-bit halves of one register (x in the lower half), rounded to T (bf16 or f16).
template <typename T>
MINILLM_DEVICE uint32_t pack2(float x, float y) {
  return uint32_t(from_float<T>(x).bits) | (uint32_t(from_float<T>(y).bits) << 16);
}

#if defined(__CUDACC__)

MINILLM_DEVICE uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// d = a b + c on tensor cores: A 16 x 16 and B 16 x 8 of T (bf16 or f16), C and D 16 x 8 fp32.
template <typename T>
MINILLM_DEVICE void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(T) == 2 && std::is_same<T, bf16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
#else
  __trap();  // the launchers never choose these kernels below sm_80
#endif
}

template <int X, bool Trans>
MINILLM_DEVICE void ldmatrix(uint32_t* r, const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t s = smem_addr(p);
  if constexpr (X == 4 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  else if constexpr (X == 4)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  else if constexpr (X == 2 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  else if constexpr (X == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  else if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
#else
  __trap();
#endif
}

MINILLM_DEVICE void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
#else
  __trap();
#endif
}

MINILLM_DEVICE void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
MINILLM_DEVICE void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

#else  // the emulator: simt_emu.h implements the same operations warp-collectively

template <typename T>
MINILLM_DEVICE void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  ::simt::mma_m16n8k16(d, a, b, c, std::is_same<T, bf16>::value);
}

template <int X, bool Trans>
MINILLM_DEVICE void ldmatrix(uint32_t* r, const void* p) {
  ::simt::ldmatrix(r, p, X, Trans);
}

MINILLM_DEVICE void cp_async_16(void* smem, const void* gmem, bool valid) { ::simt::cp_async_16(smem, gmem, valid); }
MINILLM_DEVICE void cp_async_commit() { ::simt::cp_async_commit(); }
template <int N>
MINILLM_DEVICE void cp_async_wait() {
  ::simt::cp_async_wait(N);
}

#endif

}  // namespace cuda
}  // namespace minillm
