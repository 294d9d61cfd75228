"""Builds kiln's custom operators (kernels/_C*.so) against the torch that is installed.

CPU always; CUDA too when torch is a CUDA build and nvcc is on PATH (KILN_BUILD_CUDA=0 skips it,
=1 demands it). Install with `pip install --no-build-isolation ./kernels` so the extension is
built against the very torch it will be loaded into.
"""

from __future__ import annotations

import os
import platform
import shutil

import torch
from setuptools import setup
from setuptools.command.build_py import build_py
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

CSRC = "csrc"  # relative: setuptools wants relative source paths

# Without TORCH_CUDA_ARCH_LIST torch builds for the GPUs it sees, and fails where it sees none
# (CI, image builds). The default covers A100/A10/L4/H100/H200 with machine code, plus PTX of
# the newest for GPUs after them (the driver compiles it at load).
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"

CPU_SOURCES = [
    f"{CSRC}/registration.cpp",
    f"{CSRC}/cpu/ops_cpu.cpp",
    f"{CSRC}/cpu/parallel.cpp",
    f"{CSRC}/cpu/kernels_generic.cpp",
]
# The AVX2 and AVX-512 variants are the same kernels_impl.h under `#pragma GCC target`, so one
# set of compiler flags serves every file and the generic variant stays runnable on any x86-64.
if platform.machine() in ("x86_64", "AMD64"):
    CPU_SOURCES += [
        f"{CSRC}/cpu/kernels_avx2.cpp",
        f"{CSRC}/cpu/kernels_avx512.cpp",
        f"{CSRC}/cpu/kernels_avx512vnni.cpp",
        f"{CSRC}/cpu/kernels_amx.cpp",
    ]

# -g0 last: Python's own CFLAGS carry -g, which triples the object size for nothing.
# -fopenmp: at::parallel_for is an inline `#pragma omp parallel`, and the library then shares
# torch's libgomp (same soname, already loaded) rather than bringing a second thread pool.
# -fno-trapping-math: lets gcc vectorize the selects in the kernels' exp for AVX2 (no FP traps
# are used anywhere). -ffp-contract=fast (g++'s default, stated because panel_linear's speed
# rests on it): `acc += x * w` becomes one fused multiply-add where the ISA has FMA.
CXX_FLAGS = [
    "-O3",
    "-g0",
    "-fopenmp",
    "-fno-trapping-math",
    "-ffp-contract=fast",
    "-fvisibility=hidden",
    "-Wno-unknown-pragmas",
]
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler", "-g0"]
LINK_FLAGS = ["-fopenmp", "-Wl,--as-needed"]


def want_cuda() -> bool:
    choice = os.environ.get("KILN_BUILD_CUDA", "auto")
    if choice == "0":
        return False
    have = torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    )
    if choice == "1" and not have:
        raise SystemExit(
            "KILN_BUILD_CUDA=1 but torch is not a CUDA build or nvcc is missing: "
            f"torch {torch.__version__}, nvcc {shutil.which('nvcc')}"
        )
    return have


def cuda_arch_list(env: dict[str, str]) -> str:
    """The architectures to build for: TORCH_CUDA_ARCH_LIST when set, else the default."""
    return env.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS


def extension():  # type: ignore[no-untyped-def]
    if want_cuda():
        # torch's build reads the list from the environment when it runs nvcc.
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(dict(os.environ))
        return CUDAExtension(
            "kernels._C",
            [*CPU_SOURCES, f"{CSRC}/cuda/ops_cuda.cpp", f"{CSRC}/cuda/kernels.cu"],
            extra_compile_args={"cxx": [*CXX_FLAGS, "-DKILN_WITH_CUDA"], "nvcc": NVCC_FLAGS},
            extra_link_args=LINK_FLAGS,
        )
    return CppExtension(
        "kernels._C",
        CPU_SOURCES,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=LINK_FLAGS,
    )


class BuildPy(build_py):  # type: ignore[misc]
    """Leaves this file out of the installed package (kernels/ is both project and package)."""

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if m[1] != "setup"]


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import it
    # Two compile jobs unless told otherwise: the development machines have two shared cores.
    os.environ.setdefault("MAX_JOBS", "2")
    setup(
        # The repository's kernels/ directory is the `kernels` package itself.
        packages=["kernels"],
        package_dir={"kernels": "."},
        ext_modules=[extension()],
        cmdclass={
            "build_py": BuildPy,
            "build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None),
        },
    )
