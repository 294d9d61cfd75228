"""Every CUDA kernel path of the kiln ops once, on small shapes: what compute-sanitizer checks.

`make gpu-check` runs this under compute-sanitizer's memcheck and racecheck. The shapes reach
each kernel's branches: 16-byte packs and scalar elements, rows kept in registers and rows read
twice, the int8 row kernel, the tiled float32 kernel and the tensor-core one, K % 4 != 0 and
weight rows off a 4-byte boundary. It prints "kiln sanitize: ok" at the end.
"""

from __future__ import annotations

import sys

import torch

from kernels import ops
from kernels import reference as ref

EPS = 1e-5
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device="cuda").to(dtype)


def main() -> int:
    if not torch.cuda.is_available() or not ops.HAVE_CUDA_KERNELS:
        print("kiln sanitize: needs a GPU and the extension built with CUDA", file=sys.stderr)
        return 1
    kiln = torch.ops.kiln
    for dt in DTYPES:
        # 7: scalar; 64: one pack per thread; 4104: packs in registers; 20000: two passes
        for n in (7, 64, 4104, 20000):
            x, r, w, g = (randn(3, n, dtype=dt) for _ in range(4))
            w = w[0]
            kiln.rms_norm(x, w, EPS)
            kiln.fused_add_rms_norm(x, r, w, EPS)
            kiln.fused_add_rms_norm_(x.clone(), r.clone(), w, EPS)
            kiln.rms_norm_backward(g, r, w, EPS, None)
            kiln.rms_norm_backward(g, r, w, EPS, x)
        kiln.rms_norm_backward(randn(300, 96, dtype=dt), randn(300, 96, dtype=dt),
                               randn(96, dtype=dt), EPS, None)  # fmt: skip
        for d in (5, 64):
            x = randn(4, 2 * d, dtype=dt)
            kiln.silu_and_mul(x)
            kiln.silu_and_mul_backward(randn(4, d, dtype=dt), x)
        cache = ref.rope_cache(16, 32, dtype=dt, device="cuda")
        pos = torch.tensor([0, 7, 15], device="cuda")
        for neox in (True, False):
            q, k = randn(3, 4, 48, dtype=dt), randn(3, 2, 48, dtype=dt)
            kiln.rotary_embedding_(pos, q, k, cache, neox)
            kiln.rotary_embedding_backward(pos, q, k, cache, neox)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for m in (3, 9, 70):
            for k in (64, 1001):
                # K = 1001: rows one byte past a 4-byte boundary, element-wise loads
                wq = ref.quantize_int8(torch.randn(70, k + 1))[0].cuda()[:, 1:]
                if k % 4 == 0:
                    wq = ref.quantize_int8(torch.randn(70, k))[0].cuda()
                scale = torch.rand(70, device="cuda")
                kiln.int8_linear(randn(m, k, dtype=dt), wq, scale, randn(70, dtype=dt))
    torch.cuda.synchronize()
    print("kiln sanitize: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
