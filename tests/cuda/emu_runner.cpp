// Runs the CUDA kernels of cuda/*.cuh on the CPU through the SIMT emulator (simt_emu.h).
// Driven by tests/cuda/test_emulated_kernels.py, which writes the inputs and checks the outputs
// against minillm.ops.reference:
//
//   emu_runner attention DIR   forward then backward; DIR/args.txt + q,k,v,dout[,mask,qmask,dlse].bin in,
//                              out,lse,dq,dk,dv.bin out
//   emu_runner topk DIR        DIR/args.txt + queries,corpus.bin in, scores,idx.bin out
//   emu_runner selftest        the emulator's own checks: barriers, shuffles, atomics, block indices
//   emu_runner divergent       a thread leaves before __syncthreads(): must abort with a message
//   emu_runner race|norace     a shared-memory read without (with) the __syncthreads() it needs; under
//                              ThreadSanitizer `race` must be reported and `norace` must not
//
// Tensors are raw little-endian files holding a strided tensor's storage from its first element.
#include "simt_emu.h"
// clang-format off: the emulator must come before the kernels
#include "attention.cuh"
#include "topk.cuh"
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
  const size_t es = elem_size(f.dtype);
  const size_t max_smem = size_t(geti(m, "max_smem"));
  auto q = read_file(dir + "/q.bin"), k = read_file(dir + "/k.bin"), v = read_file(dir + "/v.bin");
  auto dout = read_file(dir + "/dout.bin");
  std::vector<unsigned char> mask, qmask, dlse;
  if (exists(dir + "/mask.bin")) mask = read_file(dir + "/mask.bin");
  if (exists(dir + "/qmask.bin")) qmask = read_file(dir + "/qmask.bin");
  if (exists(dir + "/dlse.bin")) dlse = read_file(dir + "/dlse.bin");
  strides3(m, "q", f.q_stride);
  strides3(m, "k", f.k_stride);
  strides3(m, "v", f.v_stride);
  const size_t nq = size_t(f.B * f.H * f.Nq), nk = size_t(f.B * f.H * f.Nk);
  std::vector<unsigned char> out(nq * f.D * es), dq(nq * f.D * es), dk(nk * f.D * es), dv(nk * f.D * es);
  std::vector<float> lse(nq), delta(nq);
  f.q = q.data(), f.k = k.data(), f.v = v.data(), f.out = out.data(), f.lse = lse.data();
  f.kpm = mask.empty() ? nullptr : mask.data();
  f.qpm = qmask.empty() ? nullptr : qmask.data();
  int status = cuda::attention_fwd_launch(f, nullptr, max_smem);
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
  status = cuda::attention_bwd_launch(b, delta.data(), nullptr, max_smem);
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
  a.corpus = corpus.data();
  a.out_scores = scores.data();
  a.out_idx = idx.data();
  cuda::TopkPlan plan;
  int status = cuda::topk_make_plan(a.Q, a.N, a.k, size_t(geti(m, "max_smem")), geti(m, "target_blocks"), &plan);
  if (status != cuda::kLaunchOk) return status;
  std::vector<unsigned char> workspace(cuda::topk_workspace_bytes(plan, a.Q, a.k));
  status = cuda::topk_launch(a, plan, workspace.data(), nullptr);
  if (status != cuda::kLaunchOk) return status;
  write_file(dir + "/scores.bin", scores.data(), scores.size() * 4);
  write_file(dir + "/idx.bin", idx.data(), idx.size() * 8);
  std::printf("parts %lld queries_per_block %d cap %d\n", static_cast<long long>(plan.parts), plan.qb, plan.cap);
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
