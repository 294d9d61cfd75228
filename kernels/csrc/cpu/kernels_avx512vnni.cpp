// The W8A8 linear with AVX-512 VNNI (vpdpbusd): the avx512 variant uses it where the CPU has
// avx512_vnni (Cascade Lake and later, Zen 4), its own vpmaddubsw build elsewhere. Only
// int8_impl.h is compiled here, so no other kernel can pick up VNNI instructions that an
// AVX-512 CPU without them would fault on.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,bmi2,prefer-vector-width=512")
#include <cstdint>
#include <immintrin.h>

#include "kernels.h"

namespace kiln::cpu::avx512vnni {
namespace {

#define KILN_INT8_KIND 2
#include "int8_impl.h"

const Int8Kernels kInt8 = {"avx512_vnni", &quantize_rows_int8, &w8a8_panels, 1};

}  // namespace

const Int8Kernels& int8_kernels() { return kInt8; }

}  // namespace kiln::cpu::avx512vnni
#endif
