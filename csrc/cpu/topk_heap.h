// The running top-k: candidates, their order (ties to the lower index) and a bounded min-heap.
#pragma once
#include "cpu/vec.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// A candidate of the running top-k. Keys are "larger is better" for every metric (L2 stores the
// negated distance); NaN scores carry key -inf and the nan flag, so they rank last.
struct Cand {
  float key;
  int32_t nan;
  int64_t idx;
};
inline bool worse(const Cand& x, const Cand& y) { return x.key < y.key || (x.key == y.key && x.idx > y.idx); }

// Min-heap on `worse`: the root is the worst candidate kept.
inline void sift_down(Cand* h, int64_t n, int64_t i) {
  for (;;) {
    int64_t w = i;
    const int64_t l = 2 * i + 1, r = l + 1;
    if (l < n && worse(h[l], h[w])) w = l;
    if (r < n && worse(h[r], h[w])) w = r;
    if (w == i) return;
    const Cand t = h[i];
    h[i] = h[w];
    h[w] = t;
    i = w;
  }
}
inline void heap_push(Cand* h, int64_t* n, int64_t k, const Cand& c) {
  if (*n < k) {
    int64_t i = (*n)++;
    h[i] = c;
    while (i > 0 && worse(h[i], h[(i - 1) / 2])) {
      const Cand t = h[i];
      h[i] = h[(i - 1) / 2];
      h[(i - 1) / 2] = t;
      i = (i - 1) / 2;
    }
  } else if (worse(h[0], c)) {
    h[0] = c;
    sift_down(h, *n, 0);
  }
}

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
