// Runs the CUDA kernels of cuda/*.cuh on the CPU through the SIMT emulator (simt_emu.h).
// Driven by tests/cuda/test_emulated_kernels.py, which writes the inputs and checks the outputs
// against minillm.ops.reference:
//
//   emu_runner attention DIR   forward then backward; DIR/args.txt + q,k,v,dout[,mask,qmask,dlse,alibi,
//                              sinks].bin in, out,lse,dq,dk,dv.bin out; args choose the device's compute
//                              capability (sm) and simt_only, which the launchers use to pick a kernel
//   emu_runner topk DIR        DIR/args.txt + queries,corpus.bin in, scores,idx.bin out
//   emu_runner fragments DIR   tensor-core fragments: DIR/args.txt + a (16x16), b (16x8), c (16x8 fp32),
//                              afrag (32x4), bfrag (32x2) in; ldmatrix.bin, d_frag.bin, d_smem.bin out
//   emu_runner selftest        the emulator's own checks: barriers, shuffles, atomics, block indices,
//                              cp.async groups
//   emu_runner divergent       a thread leaves before __syncthreads(): must abort with a message
//   emu_runner race|norace     a shared-memory read without (with) the __syncthreads() it needs; under
//                              ThreadSanitizer `race` must be reported and `norace` must not
//
// Tensors are raw little-endian files holding a strided tensor's storage from its first element.
#include "simt_emu.h"
// clang-format off: the emulator must come before the kernels
#include "flash_launch.cuh"
#include "mma.cuh"
#include "topk_launch.cuh"
// clang-format on

#include <fstream>
#include <map>
#include <stdexcept>
#include <string>

using namespace minillm;

namespace {

std::map<std::string, std::string> read_args(const std::string& dir) {
  std::ifstream in(dir + "/args.txt");
  if (!in) throw std::runtime_error("cannot read " + dir + "/args.txt");
  std::map<std::string, std::string> args;
  std::string key, value;
  while (in >> key >> value) args[key] = value;
  return args;
}

int64_t geti(const std::map<std::string, std::string>& m, const std::string& key) {
  auto it = m.find(key);
  if (it == m.end()) throw std::runtime_error("args.txt lacks " + key);
  return std::stoll(it->second);
}

double getf(const std::map<std::string, std::string>& m, const std::string& key) {
  auto it = m.find(key);
  if (it == m.end()) throw std::runtime_error("args.txt lacks " + key);
  return std::stod(it->second);
}

std::vector<unsigned char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return std::vector<unsigned char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

bool exists(const std::string& path) { return std::ifstream(path).good(); }

void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), std::streamsize(bytes));
  if (!out) throw std::runtime_error("cannot write " + path);
}

void strides3(const std::map<std::string, std::string>& m, const std::string& name, int64_t* s) {
  for (int i = 0; i < 3; ++i) s[i] = geti(m, name + "_s" + std::to_string(i));
}

int run_attention(const std::string& dir) {
  const auto m = read_args(dir);
  AttnFwdArgs f{};
  f.B = geti(m, "B"), f.H = geti(m, "H"), f.Nq = geti(m, "Nq"), f.Nk = geti(m, "Nk"), f.D = geti(m, "D");
  f.causal = geti(m, "causal") != 0;
  f.causal_offset = geti(m, "causal_offset");
  f.scale = getf(m, "scale");
  f.dtype = int(geti(m, "dtype"));
  f.Hkv = geti(m, "Hkv");
  f.mods.window_left = geti(m, "window_left");
  f.mods.window_right = geti(m, "window_right");
  f.mods.softcap = getf(m, "softcap");
  const int sm = int(geti(m, "sm"));
  const bool simt_only = geti(m, "simt_only") != 0;
  const size_t es = elem_size(f.dtype);
  const size_t max_smem = size_t(geti(m, "max_smem"));
  auto q = read_file(dir + "/q.bin"), k = read_file(dir + "/k.bin"), v = read_file(dir + "/v.bin");
  auto dout = read_file(dir + "/dout.bin");
  std::vector<unsigned char> mask, qmask, dlse, alibi, sinks;
  if (exists(dir + "/alibi.bin")) alibi = read_file(dir + "/alibi.bin");
  if (exists(dir + "/sinks.bin")) sinks = read_file(dir + "/sinks.bin");
  f.mods.alibi = alibi.empty() ? nullptr : alibi.data();
  f.mods.sinks = sinks.empty() ? nullptr : sinks.data();
  if (exists(dir + "/mask.bin")) mask = read_file(dir + "/mask.bin");
  if (exists(dir + "/qmask.bin")) qmask = read_file(dir + "/qmask.bin");
  if (exists(dir + "/dlse.bin")) dlse = read_file(dir + "/dlse.bin");
  strides3(m, "q", f.q_stride);
  strides3(m, "k", f.k_stride);
  strides3(m, "v", f.v_stride);
  const int64_t Hkv = f.Hkv > 0 ? f.Hkv : f.H;
  const size_t nq = size_t(f.B * f.H * f.Nq), nk = size_t(f.B * Hkv * f.Nk);
  std::vector<unsigned char> out(nq * f.D * es), dq(nq * f.D * es), dk(nk * f.D * es), dv(nk * f.D * es);
  std::vector<float> lse(nq), delta(nq);
  f.q = q.data(), f.k = k.data(), f.v = v.data(), f.out = out.data(), f.lse = lse.data();
  f.kpm = mask.empty() ? nullptr : mask.data();
  f.qpm = qmask.empty() ? nullptr : qmask.data();
  int status = cuda::attention_fwd_launch(f, nullptr, max_smem, sm, simt_only);
  if (status != cuda::kLaunchOk) return status;

  AttnBwdArgs b{};
  b.dout = dout.data(), b.q = q.data(), b.k = k.data(), b.v = v.data(), b.out = out.data(), b.lse = lse.data();
  b.dlse = dlse.empty() ? nullptr : dlse.data();
  b.kpm = f.kpm;
  b.qpm = f.qpm;
  b.dq = dq.data(), b.dk = dk.data(), b.dv = dv.data();
  b.B = f.B, b.H = f.H, b.Nq = f.Nq, b.Nk = f.Nk, b.D = f.D;
  strides3(m, "dout", b.do_stride);
  for (int i = 0; i < 3; ++i) {
    b.q_stride[i] = f.q_stride[i], b.k_stride[i] = f.k_stride[i], b.v_stride[i] = f.v_stride[i];
  }
  b.o_stride[0] = f.H * f.Nq * f.D, b.o_stride[1] = f.Nq * f.D, b.o_stride[2] = f.D;  // out is contiguous
  b.causal = f.causal, b.causal_offset = f.causal_offset, b.scale = f.scale, b.dtype = f.dtype;
  b.Hkv = f.Hkv;
  b.mods = f.mods;
  b.mods.sinks = nullptr;  // the backward reads sinks through lse
  status = cuda::attention_bwd_launch(b, delta.data(), nullptr, max_smem, sm, simt_only);
  if (status != cuda::kLaunchOk) return status;

  write_file(dir + "/out.bin", out.data(), out.size());
  write_file(dir + "/lse.bin", lse.data(), lse.size() * 4);
  write_file(dir + "/dq.bin", dq.data(), dq.size());
  write_file(dir + "/dk.bin", dk.data(), dk.size());
  write_file(dir + "/dv.bin", dv.data(), dv.size());
  return 0;
}

int run_topk(const std::string& dir) {
  const auto m = read_args(dir);
  TopkArgs a{};
  a.Q = geti(m, "Q"), a.N = geti(m, "N"), a.d = geti(m, "d"), a.k = geti(m, "k");
  a.metric = int(geti(m, "metric"));
  a.dtype = int(geti(m, "dtype"));
  a.corpus_stride = geti(m, "corpus_stride");
  auto queries = read_file(dir + "/queries.bin"), corpus = read_file(dir + "/corpus.bin");
  std::vector<float> scores(size_t(a.Q * a.k));
  std::vector<int64_t> idx(size_t(a.Q * a.k));
  a.queries = reinterpret_cast<const float*>(queries.data());
  a.out_scores = scores.data();
  a.out_idx = idx.data();
  // The corpus at an offset of `corpus_offset` bytes from a 16-byte boundary (cp.async needs 0).
  const int64_t offset = geti(m, "corpus_offset");
  std::vector<unsigned char> shifted(corpus.size() + 16);
  unsigned char* base = shifted.data() + (16 - reinterpret_cast<uintptr_t>(shifted.data()) % 16) % 16 + offset;
  if (base + corpus.size() > shifted.data() + shifted.size()) throw std::runtime_error("corpus_offset too large");
  std::memcpy(base, corpus.data(), corpus.size());
  a.corpus = base;
  cuda::TopkPlan plan;
  int status = cuda::topk_plan_for(a, size_t(geti(m, "max_smem")), geti(m, "target_blocks"), int(geti(m, "sm")), &plan,
                                   geti(m, "simt_only") != 0);
  if (status != cuda::kLaunchOk) return status;
  std::vector<unsigned char> workspace(cuda::topk_workspace_bytes(plan, a.Q, a.k));
  status = cuda::topk_launch(a, plan, workspace.data(), nullptr);
  if (status != cuda::kLaunchOk) return status;
  write_file(dir + "/scores.bin", scores.data(), scores.size() * 4);
  write_file(dir + "/idx.bin", idx.data(), idx.size() * 8);
  std::printf("parts %lld queries_per_block %d cap %d mma %d\n", static_cast<long long>(plan.parts), plan.qb, plan.cap,
              int(plan.mma));
  return 0;
}


// ---- tensor-core fragments ----

// ldmatrix of every kind over four 8 x 8 matrices of 16-bit ids (element (m, r, c) = 64 m + 8 r + c), rows
// 48 bytes apart; out: per lane the registers of x1, x1.trans, x2, x2.trans, x4, x4.trans (1+1+2+2+4+4).
__global__ void ldmatrix_kernel(uint32_t* out) {
  MINILLM_SHARED_FLOATS(smem);
  auto* base = reinterpret_cast<uint16_t*>(smem);
  constexpr int kPitch = 24;  // halves per row
  const int lane = int(threadIdx.x);
  for (int e = lane; e < 32 * kPitch; e += 32) base[e] = 0xdead;
  __syncwarp();
  for (int e = lane; e < 4 * 64; e += 32) base[(e / 8) * kPitch + e % 8] = uint16_t(e);
  __syncwarp();
  const uint16_t* row = base + lane * kPitch;  // lane l: row l % 8 of matrix l / 8
  uint32_t r[14];
  cuda::ldmatrix<1, false>(r + 0, row);
  cuda::ldmatrix<1, true>(r + 1, row);
  cuda::ldmatrix<2, false>(r + 2, row);
  cuda::ldmatrix<2, true>(r + 4, row);
  cuda::ldmatrix<4, false>(r + 6, row);
  cuda::ldmatrix<4, true>(r + 10, row);
  for (int i = 0; i < 14; ++i) out[lane * 14 + i] = r[i];
}

// D = A B + C from fragments given per lane (the caller computed them from the ISA's layout).
template <typename T>
__global__ void mma_frag_kernel(const uint32_t* afrag, const uint32_t* bfrag, const float* c, float* dfrag) {
  const int lane = int(threadIdx.x), g = lane / 4, t = lane % 4;
  const float cf[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  float d[4];
  cuda::mma_m16n8k16<T>(d, afrag + 4 * lane, bfrag + 2 * lane, cf);
  for (int i = 0; i < 4; ++i) dfrag[4 * lane + i] = d[i];
}

// D = A B through shared memory as the attention kernels load operands: A (16 x 16 row-major) by ldmatrix.x4,
// B once n-major (B^T's rows, as K) by ldmatrix.x2 and once k-major (B's rows, as V) by ldmatrix.x2.trans,
// both copied in by cp.async. d: (2, 16, 8), the two products, written from the C layout.
template <typename T>
__global__ void mma_smem_kernel(const uint16_t* a, const uint16_t* bt, const uint16_t* b, float* d) {
  MINILLM_SHARED_FLOATS(smem);
  auto* As = reinterpret_cast<uint16_t*>(smem);  // (16, 16)
  uint16_t* Bts = As + 256;                       // (8, 16)
  uint16_t* Bs = Bts + 128;                       // (16, 8)
  const int lane = int(threadIdx.x), g = lane / 4, t = lane % 4;
  for (int e = lane; e < 32 + 16 + 16; e += 32) {  // 16-byte chunks: A 32, B^T 16, B 16
    if (e < 32) cuda::cp_async_16(As + 8 * e, a + 8 * e, true);
    else if (e < 48) cuda::cp_async_16(Bts + 8 * (e - 32), bt + 8 * (e - 32), true);
    else cuda::cp_async_16(Bs + 8 * (e - 48), b + 8 * (e - 48), true);
  }
  cuda::cp_async_commit();
  cuda::cp_async_wait<0>();
  __syncwarp();
  uint32_t af[4], bf[2], bft[2];
  cuda::ldmatrix<4, false>(af, As + (lane % 16) * 16 + (lane / 16) * 8);
  cuda::ldmatrix<2, false>(bf, Bts + (lane % 8) * 16 + ((lane / 8) % 2) * 8);
  cuda::ldmatrix<2, true>(bft, Bs + (lane % 16) * 8);
  const float zero[4] = {0, 0, 0, 0};
  float d0[4], d1[4];
  cuda::mma_m16n8k16<T>(d0, af, bf, zero);
  cuda::mma_m16n8k16<T>(d1, af, bft, zero);
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    d[row * 8 + col] = d0[i];
    d[128 + row * 8 + col] = d1[i];
  }
}

int run_fragments(const std::string& dir) {
  const auto m = read_args(dir);
  const bool is_bf16 = geti(m, "dtype") == kBF16;
  auto a = read_file(dir + "/a.bin"), bt = read_file(dir + "/bt.bin"), b = read_file(dir + "/b.bin");
  auto c = read_file(dir + "/c.bin"), afrag = read_file(dir + "/afrag.bin"), bfrag = read_file(dir + "/bfrag.bin");
  std::vector<uint32_t> ld(32 * 14);
  std::vector<float> dfrag(32 * 4), dsmem(2 * 128);
  uint32_t* ldp = ld.data();
  MINILLM_LAUNCH(ldmatrix_kernel, dim3(1), dim3(32), 32 * 24 * 2, nullptr, ldp);
  const auto* af = reinterpret_cast<const uint32_t*>(afrag.data());
  const auto* bf = reinterpret_cast<const uint32_t*>(bfrag.data());
  const auto* cf = reinterpret_cast<const float*>(c.data());
  const auto* a16 = reinterpret_cast<const uint16_t*>(a.data());
  const auto* bt16 = reinterpret_cast<const uint16_t*>(bt.data());
  const auto* b16 = reinterpret_cast<const uint16_t*>(b.data());
  float* dfp = dfrag.data();
  float* dsp = dsmem.data();
  if (is_bf16) {
    MINILLM_LAUNCH(mma_frag_kernel<cuda::bf16>, dim3(1), dim3(32), 0, nullptr, af, bf, cf, dfp);
    MINILLM_LAUNCH(mma_smem_kernel<cuda::bf16>, dim3(1), dim3(32), 1024, nullptr, a16, bt16, b16, dsp);
  } else {
    MINILLM_LAUNCH(mma_frag_kernel<cuda::f16>, dim3(1), dim3(32), 0, nullptr, af, bf, cf, dfp);
    MINILLM_LAUNCH(mma_smem_kernel<cuda::f16>, dim3(1), dim3(32), 1024, nullptr, a16, bt16, b16, dsp);
  }
  write_file(dir + "/ldmatrix.bin", ld.data(), ld.size() * 4);
  write_file(dir + "/d_frag.bin", dfrag.data(), dfrag.size() * 4);
  write_file(dir + "/d_smem.bin", dsmem.data(), dsmem.size() * 4);
  return 0;
}

// ---- the emulator's own checks ----

__global__ void neighbours_kernel(int* out) {
  MINILLM_SHARED_FLOATS(smem);
  const int tid = int(threadIdx.x), n = int(blockDim.x);
  smem[tid] = float(tid + 1000 * int(blockIdx.x) + 100000 * int(blockIdx.y));
  __syncthreads();
  out[(blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + tid] = int(smem[(tid + 1) % n]);
}

__global__ void shuffle_kernel(float* out) {
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  const float v = float(lane + 100 * warp);
  const float from3 = __shfl_sync(0xffffffffu, v, 3);
  const float swapped = __shfl_xor_sync(0xffffffffu, v, 1);
  const float total = cuda::warp_sum(v);
  __syncwarp();
  out[threadIdx.x * 3 + 0] = from3;
  out[threadIdx.x * 3 + 1] = swapped;
  out[threadIdx.x * 3 + 2] = total;
}

__global__ void atomic_kernel(int* counter, float* fsum) {
  atomicAdd(counter, 1);
  atomicAdd(fsum, 0.5f);
}

__global__ void poison_kernel(float* out) {
  MINILLM_SHARED_FLOATS(smem);
  out[threadIdx.x] = smem[threadIdx.x];  // never written: must read as NaN
}


// cp.async: the destination reads NaN until a wait releases its group; wait<1> leaves the newest group in
// flight; invalid sources write zeros. out: (32, 4) per lane: before wait, after wait<1> (group 0, group 1),
// after wait<0> (group 1).
__global__ void cp_async_kernel(const float* src, float* out) {
  MINILLM_SHARED_FLOATS(smem);
  const int lane = int(threadIdx.x);
  float* g0 = smem + 4 * lane;          // 16 bytes per lane, group 0
  float* g1 = smem + 128 + 4 * lane;    // group 1: a zero fill
  cuda::cp_async_16(g0, src + 4 * lane, true);
  cuda::cp_async_commit();
  cuda::cp_async_16(g1, src, false);
  cuda::cp_async_commit();
  out[lane * 4 + 0] = g0[1];  // in flight
  cuda::cp_async_wait<1>();
  out[lane * 4 + 1] = g0[1];
  out[lane * 4 + 2] = g1[2];  // still in flight
  cuda::cp_async_wait<0>();
  out[lane * 4 + 3] = g1[2];
}

int expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "selftest failed: %s\n", what);
    return 1;
  }
  return 0;
}

int selftest() {
  int fails = 0;
  {
    const dim3 grid(3, 2), block(64);
    std::vector<int> out(3 * 2 * 64, -1);
    int* o = out.data();
    MINILLM_LAUNCH(neighbours_kernel, grid, block, 64 * sizeof(float), nullptr, o);
    bool ok = true;
    for (int by = 0; by < 2; ++by)
      for (int bx = 0; bx < 3; ++bx)
        for (int t = 0; t < 64; ++t)
          ok = ok && out[size_t((by * 3 + bx) * 64 + t)] == (t + 1) % 64 + 1000 * bx + 100000 * by;
    fails += expect(ok, "__syncthreads orders shared-memory writes before reads, per block");
  }
  {
    std::vector<float> out(128 * 3);
    float* o = out.data();
    MINILLM_LAUNCH(shuffle_kernel, dim3(1), dim3(128), 0, nullptr, o);
    bool ok = true;
    for (int t = 0; t < 128; ++t) {
      const int lane = t % 32, warp = t / 32;
      ok = ok && out[size_t(t * 3)] == float(3 + 100 * warp);
      ok = ok && out[size_t(t * 3 + 1)] == float((lane ^ 1) + 100 * warp);
      ok = ok && out[size_t(t * 3 + 2)] == float(496 + 3200 * warp);
    }
    fails += expect(ok, "__shfl_sync, __shfl_xor_sync and warp_sum within each warp");
  }
  {
    int counter = 0;
    float fsum = 0.0f;
    int* c = &counter;
    float* f = &fsum;
    MINILLM_LAUNCH(atomic_kernel, dim3(5), dim3(96), 0, nullptr, c, f);
    fails += expect(counter == 480 && fsum == 240.0f, "atomicAdd on int and float from every thread");
  }
  {
    std::vector<float> out(32, 0.0f);
    float* o = out.data();
    MINILLM_LAUNCH(poison_kernel, dim3(1), dim3(32), 32 * sizeof(float), nullptr, o);
    bool ok = true;
    for (float x : out) ok = ok && x != x;
    fails += expect(ok, "unwritten shared memory reads as NaN");
  }
  {
    std::vector<float> src(128), out(128, -1.0f);
    for (int i = 0; i < 128; ++i) src[size_t(i)] = float(i);
    const float* s = src.data();
    float* o = out.data();
    MINILLM_LAUNCH(cp_async_kernel, dim3(1), dim3(32), 256 * sizeof(float), nullptr, s, o);
    bool ok = true;
    for (int l = 0; l < 32; ++l) {
      ok = ok && out[size_t(l * 4)] != out[size_t(l * 4)];             // NaN before the wait
      ok = ok && out[size_t(l * 4 + 1)] == float(4 * l + 1);          // group 0 released by wait<1>
      ok = ok && out[size_t(l * 4 + 2)] != out[size_t(l * 4 + 2)];    // group 1 still in flight
      ok = ok && out[size_t(l * 4 + 3)] == 0.0f;                      // zero fill released by wait<0>
    }
    fails += expect(ok, "cp.async: NaN while in flight, wait_group releases the oldest groups, zero fill");
  }
  if (fails == 0) std::printf("selftest ok\n");
  return fails;
}

__global__ void divergent_kernel(float* out) {
  MINILLM_SHARED_FLOATS(smem);
  if (threadIdx.x == 0) return;  // leaves the others waiting at the barrier
  smem[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = smem[threadIdx.x];
}

template <bool kSync>
__global__ void neighbour_read_kernel(float* out) {
  MINILLM_SHARED_FLOATS(smem);
  const int tid = int(threadIdx.x);
  smem[tid] = float(tid);
  if (kSync) __syncthreads();
  out[tid] = smem[(tid + 1) % int(blockDim.x)];  // written by another thread
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: emu_runner attention|topk DIR | selftest | divergent | race | norace\n");
    return 2;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "attention" && argc == 3) return run_attention(argv[2]);
    if (cmd == "topk" && argc == 3) return run_topk(argv[2]);
    if (cmd == "fragments" && argc == 3) return run_fragments(argv[2]);
    if (cmd == "selftest") return selftest();
    std::vector<float> out(64, 0.0f);
    float* o = out.data();
    if (cmd == "divergent") {
      MINILLM_LAUNCH(divergent_kernel, dim3(1), dim3(64), 64 * sizeof(float), nullptr, o);
      return 0;
    }
    if (cmd == "race" || cmd == "norace") {
      auto kernel = cmd == "race" ? neighbour_read_kernel<false> : neighbour_read_kernel<true>;
      MINILLM_LAUNCH(kernel, dim3(2), dim3(64), 64 * sizeof(float), nullptr, o);
      return 0;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emu_runner: %s\n", e.what());
    return 3;
  }
  std::fprintf(stderr, "emu_runner: unknown command %s\n", cmd.c_str());
  return 2;
}
