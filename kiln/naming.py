"""The one place physical names are derived, so every name carries project and environment."""

from __future__ import annotations

from kiln.settings import Settings


def prefix(settings: Settings) -> str:
    """`<project>-<env>`, the stem of every name kiln gives a resource."""
    return f"{settings.project}-{settings.name}"


def stack_name(settings: Settings, component: str) -> str:
    """CloudFormation stack name of one component, e.g. `kiln-dev-network`."""
    return f"{prefix(settings)}-{component}"


def kms_alias(settings: Settings, purpose: str) -> str:
    """KMS alias of a key, e.g. `alias/kiln/dev/data-lake`."""
    return f"alias/{settings.project}/{settings.name}/{purpose}"
