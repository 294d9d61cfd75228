"""The base every kiln stack derives from: environment, name, protection and tags from settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aws_cdk import Environment, IgnoreMode, IStackSynthesizer, RemovalPolicy, Stack
from constructs import Construct

from kiln import naming
from kiln.contract import Component
from kiln.settings import Settings

REPO = Path(__file__).resolve().parent.parent


# Every workload image carries kiln's contract (the names it shares with the stacks), and
# nothing else of the platform core.
CONTRACT_FILES = ("kiln/__init__.py", "kiln/contract.py")


def image_context(folders: list[str]) -> dict[str, Any]:
    """DockerImageAsset options whose build context (the repository) holds only `folders` and
    the contract files: the image's hash, and so its rebuilds, follow only what it copies."""
    return {
        "ignore_mode": IgnoreMode.DOCKER,
        "exclude": [
            "*",
            *(f"!{path}" for path in (*folders, *CONTRACT_FILES)),
            "**/__pycache__",
            "**/*.so",
            "**/*.egg-info",
            "kernels/build",
        ],
    }


def removal_policy(settings: Settings) -> RemovalPolicy:
    """RETAIN unless the environment opts into DESTROY (the schema forbids that in prod)."""
    return RemovalPolicy.DESTROY if settings.removal_policy == "destroy" else RemovalPolicy.RETAIN


class KilnStack(Stack):
    """A stack placed in the environment's account and region with its configured zones.

    `availability_zones` comes from config instead of a context lookup, so synth never
    needs AWS credentials.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        component: Component,
        description: str,
        synthesizer: IStackSynthesizer | None = None,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            env=Environment(account=settings.account, region=settings.region),
            stack_name=naming.stack_name(settings, component),
            description=description,
            termination_protection=settings.termination_protection,
            tags=naming.standard_tags(settings),
            synthesizer=synthesizer,
        )
        self.settings = settings

    @property
    def availability_zones(self) -> list[str]:
        return list(self.settings.availability_zones)
