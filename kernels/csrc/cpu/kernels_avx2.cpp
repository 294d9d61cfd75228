// The CPU kernels for AVX2 + FMA (256-bit vectors). The pragma, not a command-line flag, sets
// the instruction set, so every file of the extension builds with the same flags.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,bmi2")
#define KILN_ISA avx2
// panel_linear's register tile: 4 rows x 2 vectors of 8 floats.
#define KILN_VEC_FLOATS 8
#define KILN_TILE_VECS 2
#define KILN_TILE_ROWS 4
// W8A8: vpmaddubsw with the sign trick (int8_impl.h).
#define KILN_INT8_KIND 1
#include "kernels_impl.h"
#endif
