// The CPU kernels for AVX-512 F/BW/VL/DQ. gcc 12 keeps 256-bit vectors even for AVX-512 targets
// unless told to prefer 512; the pragma sets both, for this file only.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2,prefer-vector-width=512")
#define KILN_ISA avx512
// panel_linear's register tile: 6 rows x 4 vectors of 16 floats.
#define KILN_VEC_FLOATS 16
#define KILN_TILE_VECS 4
#define KILN_TILE_ROWS 6
// W8A8 without VNNI: AVX2's vpmaddubsw (the VNNI build is kernels_avx512vnni.cpp).
#define KILN_INT8_KIND 1
#include "kernels_impl.h"
#endif
