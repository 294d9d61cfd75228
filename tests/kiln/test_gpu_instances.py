"""The GPU instance catalog: figures that hold for every entry, and the lookup errors."""

from __future__ import annotations

import dataclasses
import re

import pytest

from kiln.gpu_instances import (
    GPU_INSTANCES,
    GpuInstance,
    UnknownInstanceTypeError,
    efa_capable,
    lookup,
)

FAMILIES = {"g5", "g6", "g6e", "p4d", "p4de", "p5"}


def test_catalog_covers_the_supported_families_and_only_them() -> None:
    assert {i.family for i in GPU_INSTANCES.values()} == FAMILIES
    assert len(GPU_INSTANCES) == 8 + 8 + 8 + 1 + 1 + 1


@pytest.mark.parametrize("instance", GPU_INSTANCES.values(), ids=lambda i: i.name)
def test_every_entry_is_consistent(instance: GpuInstance) -> None:
    assert GPU_INSTANCES[instance.name] is instance
    assert re.fullmatch(r"[a-z0-9]+\.\d*xlarge", instance.name)
    assert instance.gpus in (1, 4, 8)
    assert instance.vcpus % 4 == 0 and instance.vcpus >= 4 * instance.gpus
    assert instance.memory_gib >= 4 * instance.vcpus  # GPU types carry >= 4 GiB per vCPU
    assert instance.gpu_memory_gib in (24, 40, 48, 80)
    assert instance.efa_interfaces >= 0
    # GPUDirect RDMA rides on EFA, so it never appears without it.
    assert not instance.gpudirect_rdma or instance.efa_interfaces > 0
    assert efa_capable(instance.name) == (instance.efa_interfaces > 0)


@pytest.mark.parametrize(
    ("name", "gpus", "model", "gpu_gib", "vcpus", "memory", "efa"),
    [
        ("g5.xlarge", 1, "A10G", 24, 4, 16, 0),
        ("g5.8xlarge", 1, "A10G", 24, 32, 128, 1),
        ("g5.48xlarge", 8, "A10G", 24, 192, 768, 1),
        ("g6.12xlarge", 4, "L4", 24, 48, 192, 1),
        ("g6e.4xlarge", 1, "L40S", 48, 16, 128, 0),
        ("g6e.24xlarge", 4, "L40S", 48, 96, 768, 2),
        ("g6e.48xlarge", 8, "L40S", 48, 192, 1536, 4),
        ("p4d.24xlarge", 8, "A100", 40, 96, 1152, 4),
        ("p4de.24xlarge", 8, "A100", 80, 96, 1152, 4),
        ("p5.48xlarge", 8, "H100", 80, 192, 2048, 32),
    ],
)
def test_published_figures(
    name: str, gpus: int, model: str, gpu_gib: int, vcpus: int, memory: int, efa: int
) -> None:
    assert lookup(name) == GpuInstance(
        name, gpus, model, gpu_gib, vcpus, memory, efa, gpudirect_rdma=name.startswith("p")
    )


def test_small_g_sizes_have_no_efa_and_only_p_types_have_gpudirect_rdma() -> None:
    for size in ("xlarge", "2xlarge", "4xlarge"):
        for family in ("g5", "g6", "g6e"):
            assert not efa_capable(f"{family}.{size}")
    assert {i.family for i in GPU_INSTANCES.values() if i.gpudirect_rdma} == {"p4d", "p4de", "p5"}


def test_entries_and_catalog_are_read_only() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        lookup("g5.xlarge").gpus = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        GPU_INSTANCES["x.large"] = lookup("g5.xlarge")  # type: ignore[index]


@pytest.mark.parametrize("name", ["m7i.large", "G5.XLARGE", "p5.4xlarge", "g5", ""])
def test_unknown_type_names_every_supported_type(name: str) -> None:
    with pytest.raises(UnknownInstanceTypeError) as err:
        lookup(name)
    message = str(err.value)
    assert f"{name!r} is not a GPU instance type kiln supports on EKS" in message
    assert all(supported in message for supported in GPU_INSTANCES)
    with pytest.raises(ValueError, match=re.escape("supported: g5.xlarge")):
        efa_capable(name)
