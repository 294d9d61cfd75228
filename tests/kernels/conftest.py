"""Fixtures of the kernel tests: the compiled ops (or a skip that says why) and the CPU variants.

Every test module here starts with `pytest.importorskip("torch")`: the infrastructure environment
has no torch and skips them all. Where torch is installed but the extension is not built, the
tests that need it skip, unless KILN_REQUIRE_KERNELS=1 (set by `make test`) makes that a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

CPU_VARIANTS = ("avx512", "avx2", "generic")


@pytest.fixture(scope="session")
def kops() -> ModuleType:
    """kernels.ops with the compiled extension loaded."""
    pytest.importorskip("torch", reason="the kernel tests need torch (the `ml` extra)")
    from kernels import ops

    if not ops.HAVE_EXTENSION:
        message = f"the kiln kernels are not built: {ops.UNAVAILABLE_REASON}"
        if os.environ.get("KILN_REQUIRE_KERNELS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return ops


@pytest.fixture(params=CPU_VARIANTS)
def cpu_variant(request: pytest.FixtureRequest, kops: Any) -> Iterator[str]:
    """Runs the test once per CPU variant this machine supports (AVX-512, AVX2, generic)."""
    name = request.param
    if name not in kops.cpu_isas():
        pytest.skip(f"this build or CPU has no {name} variant (it has {kops.cpu_isas()})")
    with kops.use_cpu_isa(name):
        yield name
