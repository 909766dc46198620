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
// Tensor cores and asynchronous copies (cuda/mma.cuh) are modelled at the level of their results:
// mma.sync m16n8k16 (bf16, f16; fp32 accumulation) and ldmatrix (.x1/.x2/.x4, .trans) are warp-collective
// operations that rebuild each operand from every lane's register fragment with the PTX ISA's layouts;
// ldmatrix checks that its row addresses are 16-byte aligned and inside the block's shared memory.
// cp.async poisons its destination (NaN bytes) when issued and writes the data only when a
// cp.async.wait_group releases its group, so a read before the wait sees NaN, and the poisoning write
// makes ThreadSanitizer report a copy issued into a buffer other threads may still be reading; copies
// still pending when a block ends abort.
//
// Kernels must keep to what this can check: full-warp shuffles (mask 0xffffffff) reached by all 32
// lanes, no reliance on warp-lockstep execution without __syncwarp(), blocks whose size is a multiple
// of 32, no wgmma or TMA.
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
enum Kind : int { kSyncThreads = 1, kBlockStart = 2, kBlockEnd = 3, kShuffle = 4, kSyncWarp = 5, kMma = 6, kLdmatrix = 7 };

inline const char* kind_name(int kind) {
  switch (kind) {
    case kSyncThreads: return "__syncthreads()";
    case kBlockStart: return "the start of a block";
    case kBlockEnd: return "the end of the kernel";
    case kShuffle: return "a warp shuffle";
    case kSyncWarp: return "__syncwarp()";
    case kMma: return "mma.sync";
    case kLdmatrix: return "ldmatrix";
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
  // Two slot sets used alternately: a lane can be at most one collective operation ahead of the slowest
  // lane (the barrier of the operation in between holds it), so it never overwrites a slot still being read.
  // Four words per lane: a shuffle's value, an mma's A and B fragments, an ldmatrix row address.
  uint64_t slots[2][kWarpSize][4];
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

// This lane's slots for the next warp-collective operation (alternating sets, see Warp::slots).
inline uint64_t* next_slots(unsigned* buf) {
  *buf = tl_parity;
  tl_parity ^= 1u;
  return tl_block->warps[tl_warp].slots[*buf][tl_lane];
}
inline const uint64_t* lane_slots(unsigned buf, int lane) { return tl_block->warps[tl_warp].slots[buf][lane]; }

template <typename T>
T shuffle(T v, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle of a 1-8 byte value");
  unsigned buf;
  std::memcpy(next_slots(&buf), &v, sizeof(T));
  tl_block->warps[tl_warp].barrier.arrive_and_wait(kShuffle);
  T out;
  std::memcpy(&out, lane_slots(buf, src_lane & (kWarpSize - 1)), sizeof(T));
  return out;
}

inline void check_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("only full-warp masks (0xffffffff) are emulated");
}

// ---- tensor cores (cuda/mma.cuh) ----

inline float half_bits_to_float(uint16_t h, bool is_bf16) {
  if (is_bf16) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return float(x);
}

// Element e (0 or 1) of a register holding two 16-bit values: the lower half first.
inline uint16_t half_of(uint32_t r, int e) { return uint16_t(e == 0 ? r & 0xffffu : r >> 16); }

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: every lane gives its fragments of A and B,
// the operands are rebuilt with the ISA's layouts (cuda/mma.cuh), and each lane gets its fragment of D = A B + C.
// The products of two 16-bit values are exact in fp32; they are summed in fp32 in k order (tensor cores
// sum in an unspecified order, so results may differ from a GPU's in the last bits).
inline void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c, bool is_bf16) {
  unsigned buf;
  uint64_t* mine = next_slots(&buf);
  mine[0] = uint64_t(a[0]) | (uint64_t(a[1]) << 32);
  mine[1] = uint64_t(a[2]) | (uint64_t(a[3]) << 32);
  mine[2] = uint64_t(b[0]) | (uint64_t(b[1]) << 32);
  tl_block->warps[tl_warp].barrier.arrive_and_wait(kMma);
  float A[16][16], B[16][8];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const uint64_t* s = lane_slots(buf, lane);
    const uint32_t ar[4] = {uint32_t(s[0]), uint32_t(s[0] >> 32), uint32_t(s[1]), uint32_t(s[1] >> 32)};
    const uint32_t br[2] = {uint32_t(s[2]), uint32_t(s[2] >> 32)};
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r)
      for (int e = 0; e < 2; ++e)
        A[g + 8 * (r & 1)][2 * t + e + 8 * (r >> 1)] = half_bits_to_float(half_of(ar[r], e), is_bf16);
    for (int r = 0; r < 2; ++r)
      for (int e = 0; e < 2; ++e) B[2 * t + e + 8 * r][g] = half_bits_to_float(half_of(br[r], e), is_bf16);
  }
  const int g = tl_lane / 4, t = tl_lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    out[i] = acc;
  }
  std::memcpy(d, out, sizeof out);  // d may alias c
}

inline void check_shared(const void* p, size_t bytes, const char* what) {
  const unsigned char* base = tl_block->smem.data();
  const unsigned char* q = static_cast<const unsigned char*>(p);
  if (q < base || q + bytes > base + tl_block->smem.size() - 16) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "%s: address outside the block's dynamic shared memory", what);
    fail(msg);
  }
  if (reinterpret_cast<uintptr_t>(q) % 16 != 0) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "%s: shared-memory address not 16-byte aligned", what);
    fail(msg);
  }
}

// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16: lanes 8m .. 8m+7 give matrix m's row addresses.
inline void ldmatrix(uint32_t* r, const void* p, int x, bool trans) {
  unsigned buf;
  uint64_t* mine = next_slots(&buf);
  mine[0] = uint64_t(reinterpret_cast<uintptr_t>(p));
  tl_block->warps[tl_warp].barrier.arrive_and_wait(kLdmatrix);
  const int l = tl_lane;
  for (int m = 0; m < x; ++m) {
    uint16_t e[2];
    for (int k = 0; k < 2; ++k) {
      // not transposed: row l/4, column 2(l%4)+k; transposed: row 2(l%4)+k, column l/4
      const int row = trans ? 2 * (l % 4) + k : l / 4, col = trans ? l / 4 : 2 * (l % 4) + k;
      const auto* rowp = reinterpret_cast<const unsigned char*>(uintptr_t(lane_slots(buf, 8 * m + row)[0]));
      check_shared(rowp, 16, "ldmatrix");
      std::memcpy(&e[k], rowp + 2 * col, 2);
    }
    r[m] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
  }
}

// ---- asynchronous copies: per-thread groups, performed when a wait releases them ----

struct AsyncCopy {
  void* dst;
  const void* src;  // nullptr: zero fill
};

inline thread_local std::vector<AsyncCopy> tl_cp_open;                  // issued, not yet committed
inline thread_local std::vector<std::vector<AsyncCopy>> tl_cp_groups;   // committed, oldest first

inline void cp_async_16(void* dst, const void* src, bool valid) {
  check_shared(dst, 16, "cp.async destination");
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async: global source not 16-byte aligned");
  std::memset(dst, 0xff, 16);  // in flight: NaN until a wait releases it
  tl_cp_open.push_back({dst, valid ? src : nullptr});
}

inline void cp_async_commit() {
  tl_cp_groups.push_back(std::move(tl_cp_open));
  tl_cp_open.clear();
}

inline void cp_async_wait(int n) {
  while (int(tl_cp_groups.size()) > n) {
    for (const AsyncCopy& c : tl_cp_groups.front()) {
      if (c.src) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    }
    tl_cp_groups.erase(tl_cp_groups.begin());
  }
}

inline void check_no_pending_copies() {
  bool pending = !tl_cp_open.empty();
  for (const auto& g : tl_cp_groups) pending = pending || !g.empty();
  if (pending) fail("a block ended with cp.async copies that no cp.async.wait_group released");
  tl_cp_groups.clear();
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
        check_no_pending_copies();
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
