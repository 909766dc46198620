// Software prefetch helpers: rows ahead of use (attention items, GEMM tiles, top-k scans).
#pragma once
#include "cpu/vec.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// Requests rows [0, n) (row_bytes each, stride_bytes apart) into the cache ahead of use. A work item's
// inputs are cold (another (b, h) ran last), and the p v product reads V in place inside its inner loop:
// asking for V's first blocks and the next query rows while K is being transposed hides that latency.
inline void prefetch_strided(const void* base, int64_t n, int64_t stride_bytes, int64_t row_bytes) {
  const char* p = static_cast<const char*>(base);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(p + r * stride_bytes + b, 0, 2);
}

// Few-query top-k scans read each corpus row once, in order: with use_scan_prefetch() the row `pf` rows
// ahead (about 6 KB) is requested as non-temporal, so that it neither waits on the hardware prefetcher nor
// displaces the queries and heaps from the caches. Rows past the corpus (`avail` rows from `base`) are not
// requested.
inline void prefetch_scan_row(const void* base, int64_t row, int64_t pf, int64_t avail, int64_t row_bytes) {
  if (pf == 0 || row + pf >= avail) return;
  const char* r = static_cast<const char*>(base) + (row + pf) * row_bytes;
  for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(r + b, 0, 0);
}

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
