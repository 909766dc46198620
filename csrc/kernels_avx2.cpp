// AVX2 + FMA level; compiled with -mavx2 -mfma -mf16c (see CMakeLists.txt), run only when the CPU has them.
#define MINILLM_ISA avx2
#define MINILLM_VBYTES 32
#include "cpu/entry_points.h"
