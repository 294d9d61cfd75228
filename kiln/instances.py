"""The catalog of SageMaker hosting instance types kiln serves on: which have local NVMe
instance storage (and so refuse a KMS key on the endpoint config), and where each is offered.

Sources:
- CreateEndpointConfig, `KmsKeyId` (SageMaker API Reference,
  https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_CreateEndpointConfig.html):
  "You can't request a KmsKeyId when using an instance type with local storage ... If you
  specify a value for KmsKeyId when using any nitro-based instances with local storage, the
  call to CreateEndpointConfig fails." The list it points to is EC2's "Instance store
  volumes" (https://docs.aws.amazon.com/ec2/latest/UserGuide/InstanceStorage.html).
- Instance families per region: Amazon SageMaker AI pricing, "Real-Time Inference"
  (https://aws.amazon.com/sagemaker-ai/pricing/), which lists the instance types each region
  offers for hosting. Only pairs confirmed there are listed; a region missing here is refused
  with a message saying where to add it, rather than failing at CreateEndpointConfig.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


class UnknownServingInstanceError(ValueError):
    """A SageMaker instance type kiln does not serve on; the message lists the allowed ones."""


@dataclass(frozen=True)
class ServingFamily:
    """One SageMaker hosting instance family (`ml.g5`) and the sizes kiln allows of it.

    `instance_storage`: every size has local NVMe SSD instance store volumes, which the
    instance encrypts with a hardware module; CreateEndpointConfig then rejects `KmsKeyId`.
    """

    name: str
    sizes: tuple[str, ...]
    instance_storage: bool
    gpu: bool

    def types(self) -> tuple[str, ...]:
        return tuple(f"{self.name}.{size}" for size in self.sizes)


_GPU_SIZES = ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge")
_FAMILIES: tuple[ServingFamily, ...] = (
    # GPU families: all of them are "d"-style instances with NVMe instance storage.
    ServingFamily("ml.g4dn", _GPU_SIZES[:6], instance_storage=True, gpu=True),
    ServingFamily("ml.g5", (*_GPU_SIZES, "48xlarge"), instance_storage=True, gpu=True),
    ServingFamily("ml.g6", (*_GPU_SIZES, "48xlarge"), instance_storage=True, gpu=True),
    ServingFamily("ml.g6e", (*_GPU_SIZES, "48xlarge"), instance_storage=True, gpu=True),
    ServingFamily("ml.p4d", ("24xlarge",), instance_storage=True, gpu=True),
    ServingFamily("ml.p5", ("48xlarge",), instance_storage=True, gpu=True),
    # CPU families for small models and tests of the serving path: EBS only, so the endpoint
    # config names the serving key for the ML storage volume.
    ServingFamily(
        "ml.m5",
        ("large", "xlarge", "2xlarge", "4xlarge", "12xlarge", "24xlarge"),
        instance_storage=False,
        gpu=False,
    ),
    ServingFamily(
        "ml.c5",
        ("large", "xlarge", "2xlarge", "4xlarge", "9xlarge", "18xlarge"),
        instance_storage=False,
        gpu=False,
    ),
)

SERVING_FAMILIES: Mapping[str, ServingFamily] = MappingProxyType({f.name: f for f in _FAMILIES})
SERVING_INSTANCES: Mapping[str, ServingFamily] = MappingProxyType(
    {t: f for f in _FAMILIES for t in f.types()}
)

_ALL = frozenset(SERVING_FAMILIES)
# Families offered for real-time hosting per region (SageMaker AI pricing page).
FAMILIES_BY_REGION: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "us-east-1": _ALL,
        "us-west-2": _ALL,
        "us-east-2": frozenset({"ml.g4dn", "ml.g5", "ml.g6", "ml.g6e", "ml.p4d", "ml.m5", "ml.c5"}),
        "eu-west-1": frozenset({"ml.g4dn", "ml.g5", "ml.p4d", "ml.m5", "ml.c5"}),
        "eu-central-1": frozenset({"ml.g4dn", "ml.g5", "ml.m5", "ml.c5"}),
        "ap-northeast-1": frozenset({"ml.g4dn", "ml.g5", "ml.p4d", "ml.m5", "ml.c5"}),
    }
)


def family_of(instance_type: str) -> str:
    """`ml.g5` for `ml.g5.2xlarge`."""
    return instance_type.rsplit(".", 1)[0]


def lookup(instance_type: str) -> ServingFamily:
    """The family of a SageMaker instance type kiln serves on; unknown types name the allowed
    families."""
    try:
        return SERVING_INSTANCES[instance_type]
    except KeyError:
        raise UnknownServingInstanceError(
            f"{instance_type!r} is not a SageMaker instance type kiln serves on; allowed "
            f"families: {', '.join(SERVING_FAMILIES)} (sizes in kiln/instances.py)"
        ) from None


def has_instance_storage(instance_type: str) -> bool:
    """Whether the type has local NVMe storage, so its endpoint config takes no `KmsKeyId`.

    Types outside the catalog count as having it when their family ends in `d` (`ml.m5d`,
    `ml.g4dn`), as EC2 names its instance-store variants; the guardrail judges any template.
    """
    if instance_type in SERVING_INSTANCES:
        return SERVING_INSTANCES[instance_type].instance_storage
    family = family_of(instance_type).removeprefix("ml.")
    return family.endswith(("d", "dn")) or family.startswith(("g5", "g6", "p4", "p5"))


def region_problem(instance_type: str, region: str) -> str | None:
    """Why `instance_type` cannot be served in `region`, or None where it can."""
    family = family_of(instance_type)
    offered = FAMILIES_BY_REGION.get(region)
    if offered is None:
        return (
            f"kiln has no record of the SageMaker instance families offered in {region}; "
            f"check the SageMaker AI pricing page (Real-Time Inference) and add the region "
            f"to FAMILIES_BY_REGION in kiln/instances.py; recorded regions: "
            f"{', '.join(sorted(FAMILIES_BY_REGION))}"
        )
    if family not in offered:
        return (
            f"{family} is not offered for SageMaker hosting in {region}; allowed there: "
            f"{', '.join(sorted(offered))}"
        )
    return None


def gpu_count(instance_type: str) -> int | None:
    """GPUs on a SageMaker hosting type, from the EC2 GPU catalog (`ml.g5.12xlarge` is
    `g5.12xlarge`: 4); None for a type the catalog does not hold (CPU types, `ml.g4dn`)."""
    from kiln.gpu_instances import GPU_INSTANCES

    entry = GPU_INSTANCES.get(instance_type.removeprefix("ml."))
    return None if entry is None else entry.gpus
