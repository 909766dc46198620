// Per-thread scratch (Arena) and the OpenMP helpers every parallel region uses.
#pragma once
#include <chrono>
#include <cstdlib>
#include "cpu/vec.h"

namespace minillm {
namespace MINILLM_ISA {
namespace {

// Per-thread scratch, 64-byte aligned, carved into sub-buffers in order.
class Arena {
 public:
  explicit Arena(size_t bytes) : base_(std::aligned_alloc(64, round_up(static_cast<int64_t>(bytes) + 64, 64))) {}
  ~Arena() { std::free(base_); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  bool ok() const { return base_ != nullptr; }
  template <typename T>
  T* take(int64_t n) {
    T* p = reinterpret_cast<T*>(static_cast<char*>(base_) + used_);
    used_ += round_up(n * static_cast<int64_t>(sizeof(T)), 64);
    return p;
  }
  // Bytes `take` consumes for n elements of T (to size an Arena before carving it).
  template <typename T>
  static size_t need(int64_t n) {
    return static_cast<size_t>(round_up(n * static_cast<int64_t>(sizeof(T)), 64));
  }

 private:
  void* base_;
  int64_t used_ = 0;
};

// With OMP_WAIT_POLICY=PASSIVE a thread that reaches a barrier first sleeps in the kernel, and waking it
// costs tens of microseconds on a VM. An attention region's work loop ends without a barrier (nowait) and
// each thread, its share done, spins here until the whole team is done (at most ~100 us), so that they reach
// the region's closing barrier together. Measurements: docs/performance.md, "Finishing a parallel region".
inline void finish_share(int* done) {
#if defined(_OPENMP)
  const int team = omp_get_num_threads();
  if (__atomic_add_fetch(done, 1, __ATOMIC_ACQ_REL) >= team) return;
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
  while (__atomic_load_n(done, __ATOMIC_ACQUIRE) < team && std::chrono::steady_clock::now() < until) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }
#else
  (void)done;
#endif
}

// Called by each thread of a parallel region on its own Arena: a failed allocation marks the whole call
// as out of memory (the Python side raises MemoryError) and the thread skips its work items.
inline bool thread_arena_ok(const Arena& arena, int* status) {
  if (arena.ok()) return true;
#pragma omp atomic write
  *status = kOutOfMemory;
  return false;
}

}  // namespace
}  // namespace MINILLM_ISA
}  // namespace minillm
