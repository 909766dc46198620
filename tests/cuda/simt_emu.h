// SIMT emulation of the CUDA execution model, so that the kernel bodies in cuda/*.cuh can be compiled
// by g++ and executed on a CPU. Test-only: never shipped.
//
// One OS thread per CUDA thread of a block; the blocks of a grid run one after another. Each block has
// its own dynamic shared memory (poisoned with NaN bytes before every block, so a read of shared memory
// that was never written shows up as NaN). __syncthreads() is a barrier over the block's threads; warp
// shuffles and __syncwarp() are rendezvous of the warp's 32 threads; atomics go through
// std::atomic_ref. Every barrier checks that all threads arrived at the same kind of barrier (a thread
// that left the kernel while others wait at __syncthreads, or a shuffle meeting a __syncwarp, aborts with
// a message) and aborts instead of hanging when a barrier is not reached within a time limit.
//
// Synchronisation uses pthread mutexes and condition variables, which ThreadSanitizer understands, so
// under -fsanitize=thread a shared-memory access that no barrier orders against another thread's
// write is reported as a data race, as a missing __syncthreads() would be on a GPU.
//
// Kernels must keep to what this can check: full-warp shuffles (mask 0xffffffff) reached by all 32
// lanes, no reliance on warp-lockstep execution without __syncwarp(), blocks whose size is a multiple
// of 32, no tensor-core or asynchronous-copy instructions.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace simt {

constexpr int kWarpSize = 32;
constexpr size_t kMaxSharedBytes = 227 * 1024;  // sm_90's opt-in limit per block

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "simt emulator: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

inline int timeout_seconds() {
  const char* s = std::getenv("SIMT_TIMEOUT_S");
  return s ? std::atoi(s) : 600;
}

// Kinds of barrier arrival; all threads meeting at one barrier must agree on the kind.
enum Kind : int { kSyncThreads = 1, kBlockStart = 2, kBlockEnd = 3, kShuffle = 4, kSyncWarp = 5 };

inline const char* kind_name(int kind) {
  switch (kind) {
    case kSyncThreads: return "__syncthreads()";
    case kBlockStart: return "the start of a block";
    case kBlockEnd: return "the end of the kernel";
    case kShuffle: return "a warp shuffle";
    case kSyncWarp: return "__syncwarp()";
  }
  return "?";
}

class Barrier {
 public:
  void init(int n) { n_ = n; }

  void arrive_and_wait(int kind) {
    std::unique_lock<std::mutex> lock(mu_);
    if (arrived_ == 0) {
      kind_ = kind;
    } else if (kind != kind_) {
      char msg[256];
      std::snprintf(msg, sizeof msg, "divergent barrier: one thread reached %s while another waits at %s",
                    kind_name(kind), kind_name(kind_));
      fail(msg);
    }
    const uint64_t gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(timeout_seconds()), [&] { return gen_ != gen; })) {
      char msg[256];
      std::snprintf(msg, sizeof msg, "deadlock: %d of %d threads waited at %s past the time limit", arrived_, n_,
                    kind_name(kind_));
      fail(msg);
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_ = 0, arrived_ = 0, kind_ = 0;
  uint64_t gen_ = 0;
};

struct Warp {
  Barrier barrier;
  // Two slot sets used alternately: a lane can be at most one shuffle ahead of the slowest lane
  // (the barrier of the shuffle in between holds it), so it never overwrites a slot still being read.
  uint64_t slots[2][kWarpSize];
};

struct Block {
  Barrier barrier;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;
};

inline thread_local dim3 tl_threadIdx, tl_blockIdx, tl_blockDim, tl_gridDim;
inline thread_local Block* tl_block = nullptr;
inline thread_local int tl_lane = 0, tl_warp = 0;
inline thread_local unsigned tl_parity = 0;

inline void* dynamic_smem() { return tl_block->smem.data(); }

template <typename T>
T shuffle(T v, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle of a 1-8 byte value");
  Warp& w = tl_block->warps[tl_warp];
  const unsigned buf = tl_parity;
  tl_parity ^= 1u;
  std::memcpy(&w.slots[buf][tl_lane], &v, sizeof(T));
  w.barrier.arrive_and_wait(kShuffle);
  T out;
  std::memcpy(&out, &w.slots[buf][src_lane & (kWarpSize - 1)], sizeof(T));
  return out;
}

inline void check_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("only full-warp masks (0xffffffff) are emulated");
}

// Runs body() as the kernel over grid x block threads; returns after the last block.
template <typename F>
void launch(dim3 grid, dim3 block, size_t smem_bytes, F&& body) {
  const long nthreads = long(block.x) * block.y * block.z;
  if (nthreads <= 0 || nthreads > 1024 || nthreads % kWarpSize != 0)
    fail("block size must be a multiple of 32 and at most 1024 threads");
  if (smem_bytes > kMaxSharedBytes) fail("dynamic shared memory above the 227 KB per-block limit");
  const long nblocks = long(grid.x) * grid.y * grid.z;
  if (nblocks <= 0) return;
  Block blk;
  blk.barrier.init(int(nthreads));
  blk.warps = std::vector<Warp>(size_t(nthreads / kWarpSize));
  for (Warp& w : blk.warps) w.barrier.init(kWarpSize);
  blk.smem.assign(smem_bytes + 16, 0);
  std::vector<std::thread> threads;
  threads.reserve(size_t(nthreads));
  for (long t = 0; t < nthreads; ++t) {
    threads.emplace_back([&, t] {
      tl_block = &blk;
      tl_blockDim = block;
      tl_gridDim = grid;
      tl_threadIdx = dim3(unsigned(t % block.x), unsigned((t / block.x) % block.y), unsigned(t / (long(block.x) * block.y)));
      tl_lane = int(t % kWarpSize);
      tl_warp = int(t / kWarpSize);
      tl_parity = 0;
      for (long b = 0; b < nblocks; ++b) {
        // 0xff bytes are NaN as floats: shared memory read before any write shows up in the results.
        if (t == 0) std::memset(blk.smem.data(), 0xff, blk.smem.size());
        blk.barrier.arrive_and_wait(kBlockStart);
        tl_blockIdx = dim3(unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / (long(grid.x) * grid.y)));
        body();
        blk.barrier.arrive_and_wait(kBlockEnd);
      }
    });
  }
  for (std::thread& th : threads) th.join();
}

}  // namespace simt

#define threadIdx (::simt::tl_threadIdx)
#define blockIdx (::simt::tl_blockIdx)
#define blockDim (::simt::tl_blockDim)
#define gridDim (::simt::tl_gridDim)

inline void __syncthreads() { ::simt::tl_block->barrier.arrive_and_wait(::simt::kSyncThreads); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::simt::check_full_mask(mask);
  ::simt::tl_block->warps[::simt::tl_warp].barrier.arrive_and_wait(::simt::kSyncWarp);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  ::simt::check_full_mask(mask);
  if (width != 32) ::simt::fail("only width-32 shuffles are emulated");
  return ::simt::shuffle(v, src_lane);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  ::simt::check_full_mask(mask);
  if (width != 32) ::simt::fail("only width-32 shuffles are emulated");
  return ::simt::shuffle(v, ::simt::tl_lane ^ lane_mask);
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

template <typename T>
T atomicMax(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}

#define MINILLM_EMULATED_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::simt::launch((grid), (block), (smem), [&] { kernel(__VA_ARGS__); })
