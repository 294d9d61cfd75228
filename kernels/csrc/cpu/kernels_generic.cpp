// The CPU kernels for the target's baseline instruction set (x86-64 SSE2, or the default of
// another architecture): the fallback where neither AVX2 nor AVX-512 is available.
#define KILN_ISA generic
// panel_linear's register tile: 2 rows x 4 vectors of 4 floats.
#define KILN_VEC_FLOATS 4
#define KILN_TILE_VECS 4
#define KILN_TILE_ROWS 2
// W8A8: plain int32 multiply-adds.
#define KILN_INT8_KIND 0
#include "kernels_impl.h"
