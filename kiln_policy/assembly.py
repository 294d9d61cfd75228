"""Reads a synthesized cloud assembly (`cdk.out/`) into plain records, without the CDK."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SynthesizedStack:
    """One stack as synthesized: its stage (environment), names, template and deploy options."""

    environment: str
    artifact_id: str
    stack_name: str
    template: dict[str, Any]
    termination_protection: bool
    tags: dict[str, str]

    @property
    def resources(self) -> dict[str, dict[str, Any]]:
        resources: dict[str, dict[str, Any]] = self.template.get("Resources", {})
        return resources

    def resources_of_type(self, *types: str) -> dict[str, dict[str, Any]]:
        return {k: r for k, r in self.resources.items() if r.get("Type") in types}

    @property
    def acknowledgements(self) -> list[Acknowledged]:
        """The policy findings acknowledged on this stack's resources, with their reasons
        (written into each resource's `Metadata.cdk_nag` at synth)."""
        return [
            Acknowledged(logical_id, resource["Type"], rule["id"], rule.get("reason", ""))
            for logical_id, resource in self.resources.items()
            for rule in resource.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", [])
        ]


@dataclass(frozen=True)
class Acknowledged:
    """One acknowledged finding on one resource."""

    logical_id: str
    resource_type: str
    rule: str
    reason: str


def read_assembly(outdir: Path) -> list[SynthesizedStack]:
    """Every stack of every stage (`assembly-<env>`) in the cloud assembly at `outdir`."""
    stacks: list[SynthesizedStack] = []
    root = _manifest(outdir)
    for artifact in root.get("artifacts", {}).values():
        if artifact["type"] != "cdk:cloud-assembly":
            continue
        stage_dir = outdir / artifact["properties"]["directoryName"]
        environment = artifact["properties"]["displayName"]
        for artifact_id, stack in _manifest(stage_dir).get("artifacts", {}).items():
            if stack["type"] != "aws:cloudformation:stack":
                continue
            props = stack["properties"]
            stacks.append(
                SynthesizedStack(
                    environment=environment,
                    artifact_id=artifact_id,
                    stack_name=props.get("stackName", artifact_id),
                    template=json.loads((stage_dir / props["templateFile"]).read_text()),
                    termination_protection=bool(props.get("terminationProtection", False)),
                    tags=dict(props.get("tags", {})),
                )
            )
    return stacks


def _manifest(directory: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
    return manifest
