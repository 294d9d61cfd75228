// The element types the kernels take, shared by the CPU and CUDA kernels (no torch header).
#pragma once

namespace kiln {

// bfloat16 travels as its 16 raw bits.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat64 = 2 };

}  // namespace kiln
