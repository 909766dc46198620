// Runtime choice of the SIMD level: the best one this CPU and OS support, chosen once at load time;
// set_isa() (MINILLM_SIMD from Python, and the tests) can lower it.
#include <atomic>
#include <cstdlib>
#if defined(MINILLM_HAVE_X86_ISAS) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MINILLM_AMX_PROBE 1
#endif

#include "kernels.h"

namespace minillm {
namespace {

bool cpu_has(int isa) {
  if (isa == kScalar) return true;
#if defined(MINILLM_HAVE_X86_ISAS) && (defined(__GNUC__) || defined(__clang__))
  // libgcc's cpu model also checks XGETBV, i.e. that the OS saves the YMM/ZMM state.
  __builtin_cpu_init();
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
#endif
  return false;
}

std::atomic<int>& current() {
  static std::atomic<int> isa{best_isa()};
  return isa;
}

}  // namespace

const char* isa_name(int isa) {
  switch (isa) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "scalar";
  }
}

bool isa_supported(int isa) { return isa >= kScalar && isa <= kAvx512 && cpu_has(isa); }

int best_isa() {
  for (int isa = kAvx512; isa > kScalar; --isa)
    if (isa_supported(isa)) return isa;
  return kScalar;
}

int current_isa() { return current().load(); }
void set_isa(int isa) { current().store(isa); }

#if defined(MINILLM_HAVE_X86_ISAS) && (defined(__GNUC__) || defined(__clang__))
// __builtin_cpu_supports takes string literals only, hence the macro.
#define MINILLM_CPU_FLAG_UNLESS(flag, env) (__builtin_cpu_supports(flag) && !std::getenv(env))
#else
#define MINILLM_CPU_FLAG_UNLESS(flag, env) false
#endif

bool use_bf16_dot() {
  static const bool on = MINILLM_CPU_FLAG_UNLESS("avx512bf16", "MINILLM_NO_BF16DOT");
  return on;
}
bool use_vnni() {
  static const bool on = MINILLM_CPU_FLAG_UNLESS("avx512vnni", "MINILLM_NO_VNNI");
  return on;
}
#undef MINILLM_CPU_FLAG_UNLESS

bool use_amx() {
#if defined(MINILLM_AMX_PROBE)
  static const bool on = [] {
    if (!use_bf16_dot() || std::getenv("MINILLM_NO_AMX")) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
    if (!amx_bf16 || !amx_tile) return false;
    // Linux hands out the 8 KB tile state only to processes that ask (arch_prctl ARCH_REQ_XCOMP_PERM for
    // XFEATURE_XTILEDATA); a kernel or hypervisor that refuses leaves the AVX-512 paths in charge.
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return on;
#else
  return false;
#endif
}

bool use_scan_prefetch() {
  static const bool on = [] {
    if (const char* env = std::getenv("MINILLM_SCAN_PREFETCH")) return env[0] != '\0' && env[0] != '0';
#if defined(MINILLM_AMX_PROBE)
    // AMD Zen 5 (family 1Ah) and later: the row scans' own requests ahead of the demand loads took 16-bit
    // and int8 top-k scans to 0.69-0.86 of the time and fp32 ones (inner product) to 0.82-0.91; on a Zen 4
    // and on Intel Xeons (Sapphire Rapids class) the same requests slowed them (0.7-0.9 and 1.2-1.7x), so
    // elsewhere the hardware prefetcher runs alone.
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    const bool amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "AuthenticAMD"
    if (!amd || !__get_cpuid(1, &a, &b, &c, &d)) return false;
    const unsigned family = ((a >> 8) & 0xfu) + ((a >> 20) & 0xffu);
    return family >= 0x1a;
#else
    return false;
#endif
  }();
  return on;
}

}  // namespace minillm
