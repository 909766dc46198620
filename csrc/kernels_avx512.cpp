// AVX-512 level (F, BW, VL, DQ + FMA); compiled with the matching -m flags (see CMakeLists.txt), run only
// when the CPU and OS support them.
#define MINILLM_ISA avx512
#define MINILLM_VBYTES 64
#include "cpu/entry_points.h"
