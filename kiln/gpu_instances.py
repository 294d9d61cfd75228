"""The catalog of EC2 GPU instance types kiln runs on EKS, with the figures scheduling needs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


class UnknownInstanceTypeError(ValueError):
    """An instance type that is not in the catalog; the message lists the supported ones."""


@dataclass(frozen=True)
class GpuInstance:
    """One EC2 GPU instance size, as the EC2 instance-type documentation lists it.

    `efa_interfaces` is the number of Elastic Fabric Adapter interfaces a launch template can
    attach (one per network card), 0 where the size has no EFA. `gpudirect_rdma` says whether
    EFA reads GPU memory directly (NCCL's `FI_EFA_USE_DEVICE_RDMA=1`); setting that variable on
    a type without the feature makes libfabric refuse to start.
    """

    name: str
    gpus: int
    gpu_model: str
    gpu_memory_gib: int  # per GPU
    vcpus: int
    memory_gib: int
    efa_interfaces: int
    gpudirect_rdma: bool = False

    @property
    def family(self) -> str:
        """`p4d` for `p4d.24xlarge`."""
        return self.name.split(".", 1)[0]


# Figures from the EC2 accelerated-computing specifications and the EFA supported-types list.
# Left out on purpose: p5.4xlarge (one H100; its EFA support on EC2 could not be confirmed),
# p5e/p5en, g6f/gr6 (fractional or graphics variants) and every size not listed below.
_CATALOG: tuple[GpuInstance, ...] = (
    # g5: NVIDIA A10G, 24 GiB. EFA from 8xlarge up, one interface, no GPUDirect RDMA.
    GpuInstance("g5.xlarge", 1, "A10G", 24, 4, 16, 0),
    GpuInstance("g5.2xlarge", 1, "A10G", 24, 8, 32, 0),
    GpuInstance("g5.4xlarge", 1, "A10G", 24, 16, 64, 0),
    GpuInstance("g5.8xlarge", 1, "A10G", 24, 32, 128, 1),
    GpuInstance("g5.12xlarge", 4, "A10G", 24, 48, 192, 1),
    GpuInstance("g5.16xlarge", 1, "A10G", 24, 64, 256, 1),
    GpuInstance("g5.24xlarge", 4, "A10G", 24, 96, 384, 1),
    GpuInstance("g5.48xlarge", 8, "A10G", 24, 192, 768, 1),
    # g6: NVIDIA L4, 24 GiB. Same shape as g5.
    GpuInstance("g6.xlarge", 1, "L4", 24, 4, 16, 0),
    GpuInstance("g6.2xlarge", 1, "L4", 24, 8, 32, 0),
    GpuInstance("g6.4xlarge", 1, "L4", 24, 16, 64, 0),
    GpuInstance("g6.8xlarge", 1, "L4", 24, 32, 128, 1),
    GpuInstance("g6.12xlarge", 4, "L4", 24, 48, 192, 1),
    GpuInstance("g6.16xlarge", 1, "L4", 24, 64, 256, 1),
    GpuInstance("g6.24xlarge", 4, "L4", 24, 96, 384, 1),
    GpuInstance("g6.48xlarge", 8, "L4", 24, 192, 768, 1),
    # g6e: NVIDIA L40S, 48 GiB, twice g6's memory; the two largest sizes have more network cards.
    GpuInstance("g6e.xlarge", 1, "L40S", 48, 4, 32, 0),
    GpuInstance("g6e.2xlarge", 1, "L40S", 48, 8, 64, 0),
    GpuInstance("g6e.4xlarge", 1, "L40S", 48, 16, 128, 0),
    GpuInstance("g6e.8xlarge", 1, "L40S", 48, 32, 256, 1),
    GpuInstance("g6e.12xlarge", 4, "L40S", 48, 48, 384, 1),
    GpuInstance("g6e.16xlarge", 1, "L40S", 48, 64, 512, 1),
    GpuInstance("g6e.24xlarge", 4, "L40S", 48, 96, 768, 2),
    GpuInstance("g6e.48xlarge", 8, "L40S", 48, 192, 1536, 4),
    # p4d/p4de: 8x A100 (40 / 80 GiB), 4 EFA interfaces with GPUDirect RDMA.
    GpuInstance("p4d.24xlarge", 8, "A100", 40, 96, 1152, 4, gpudirect_rdma=True),
    GpuInstance("p4de.24xlarge", 8, "A100", 80, 96, 1152, 4, gpudirect_rdma=True),
    # p5: 8x H100 80 GiB, 32 network cards, each with an EFA interface.
    GpuInstance("p5.48xlarge", 8, "H100", 80, 192, 2048, 32, gpudirect_rdma=True),
)

GPU_INSTANCES: Mapping[str, GpuInstance] = MappingProxyType({i.name: i for i in _CATALOG})


def lookup(instance_type: str) -> GpuInstance:
    """The catalog entry of `instance_type`; an unknown type names every supported one."""
    try:
        return GPU_INSTANCES[instance_type]
    except KeyError:
        raise UnknownInstanceTypeError(
            f"{instance_type!r} is not a GPU instance type kiln supports on EKS; "
            f"supported: {', '.join(GPU_INSTANCES)}"
        ) from None


def efa_capable(instance_type: str) -> bool:
    """Whether `instance_type` has at least one EFA interface (raises for unknown types)."""
    return lookup(instance_type).efa_interfaces > 0
