// The CPU kernels for the target's baseline instruction set (x86-64 SSE2, or the default of
// another architecture): the fallback where neither AVX2 nor AVX-512 is available.
#define KILN_ISA generic
#include "kernels_impl.h"
