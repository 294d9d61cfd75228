// The element types the kernels take, shared by the CPU and CUDA kernels (no torch header).
#pragma once

namespace kiln {

// bfloat16 and float16 travel as their 16 raw bits.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat64 = 2, kFloat16 = 3 };

}  // namespace kiln
