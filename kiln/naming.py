"""The one place physical names are derived, so every name carries project and environment."""

from __future__ import annotations

from kiln.contract import LAKE_ZONES, Component
from kiln.settings import Settings


def prefix(settings: Settings) -> str:
    """`<project>-<env>`, the stem of every name kiln gives a resource."""
    return f"{settings.project}-{settings.name}"


def standard_tags(settings: Settings) -> dict[str, str]:
    """The tags every stack and resource carries (cost allocation, ownership, on-call)."""
    return {"project": settings.project, "environment": settings.name, "owner": settings.owner}


def stack_name(settings: Settings, component: Component) -> str:
    """CloudFormation stack name of one component, e.g. `kiln-dev-network`."""
    return f"{prefix(settings)}-{component}"


def kms_alias(settings: Settings, purpose: str) -> str:
    """KMS alias of a key, e.g. `alias/kiln/dev/data-lake`."""
    return f"alias/{settings.project}/{settings.name}/{purpose}"


def bucket_name(settings: Settings, zone: str, *, account: str, region: str) -> str:
    """`<project>-<env>-<zone>-<account>-<region>`: globally unique per account and region.

    `account` and `region` are the deploy-time values (CloudFormation pseudo parameters in
    templates); the settings schema checks the longest name fits S3's 63 characters.
    """
    if zone not in LAKE_ZONES:
        raise ValueError(f"unknown data lake zone {zone!r}; zones: {', '.join(LAKE_ZONES)}")
    return f"{prefix(settings)}-{zone}-{account}-{region}"


def endpoint_name(settings: Settings) -> str:
    """The SageMaker endpoint's name: fixed, so alarms and clients can name it before it exists."""
    return f"{prefix(settings)}-llm"


def delivery_stream_name(settings: Settings) -> str:
    """The Firehose stream from MSK to the raw zone (alarms find its metrics by this name)."""
    return f"{prefix(settings)}-raw-delivery"


def tracking_server_name(settings: Settings) -> str:
    """The MLflow tracking server's name (part of its ARN, the runs' tracking URI)."""
    return f"{prefix(settings)}-mlflow"


def nodegroup_name(settings: Settings, pool: str) -> str:
    """A managed node group's name; its Auto Scaling group is `eks-<this>-<uuid>`."""
    return f"{prefix(settings)}-{pool}"
