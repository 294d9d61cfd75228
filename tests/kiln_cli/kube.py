"""Judging rendered Kubernetes objects offline: core objects with kubernetes-validate, custom
resources against their pinned CRD schemas, and `kubectl apply` against a simulated cluster."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from kiln_cli.training_job import TRAINER_RELEASE
from tests import crd_cel

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
# Used until the environment files pin a cluster version (compute.kubernetes_version).
FALLBACK_KUBERNETES_VERSION = "1.33"
# The custom resources' schemas, vendored from the operator's release (README.md there).
TRAINER_SCHEMAS = Path(__file__).parent / "schemas" / f"kubeflow-trainer-{TRAINER_RELEASE}"


def pinned_kubernetes_versions() -> list[str]:
    """The cluster versions the environment files pin, read as plain YAML."""
    versions = set()
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        version = (data.get("compute") or {}).get("kubernetes_version")
        if version:
            versions.add(str(version))
    return sorted(versions) or [FALLBACK_KUBERNETES_VERSION]


VERSIONS = pinned_kubernetes_versions()


def validate(obj: dict[str, Any]) -> None:
    """A core object against every pinned cluster version's schema, unknown fields refused."""
    for version in VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def as_pod(template: dict[str, Any], name: str) -> dict[str, Any]:
    """A PodTemplateSpec wrapped as a Pod, so that the core Pod schema can judge it."""
    metadata = {**template.get("metadata", {}), "name": name}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def _closed(schema: Any) -> Any:
    """The schema with every object closed to unknown fields, as strict field validation is."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed


@cache
def crd(kind: str) -> dict[str, Any]:
    """The pinned CRD of `kind`: group, version, kind, scope, openAPIV3Schema."""
    path = TRAINER_SCHEMAS / f"{kind.lower()}.json"
    if not path.is_file():
        raise KeyError(f"no pinned CRD schema for {kind}")
    doc: dict[str, Any] = json.loads(path.read_text())
    assert doc["kind"] == kind
    return doc


@cache
def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    """A validator of the pinned CRD schema of `kind` (OpenAPI v3 is JSON Schema draft 4's
    vocabulary plus `x-kubernetes-*` extensions, which it ignores)."""
    return jsonschema.Draft4Validator(_closed(crd(kind)["openAPIV3Schema"]))


def validate_custom(obj: dict[str, Any]) -> list[str]:
    """A custom resource against its pinned CRD (its CEL rules evaluated as on create: returns
    those evaluated, raises crd_cel.CELValidationError naming the failed ones), its pod
    templates against the core Pod."""
    doc = crd(obj["kind"])
    assert obj["apiVersion"] == f"{doc['group']}/{doc['version']}"
    crd_validator(obj["kind"]).validate(obj)
    evaluated = crd_cel.evaluate(obj, doc["openAPIV3Schema"])
    if obj["kind"] == "TrainingRuntime":
        for job in obj["spec"]["template"]["spec"]["replicatedJobs"]:
            validate(as_pod(job["template"]["spec"]["template"], f"{obj['metadata']['name']}-0"))
    return evaluated


CORE_KINDS = frozenset({"Service", "Job"})


@dataclass
class FakeCluster:
    """What `kubectl apply -f -` would meet: objects judged by their schemas, custom kinds
    known only when their CRDs are installed, and the Trainer's admission check that a
    TrainJob's runtime exists in its namespace. Refusals exit 1 with kubectl's kind of error
    on `errors`; an accepted stream is kept whole in `objects`."""

    installed: Sequence[str] = ("TrainJob", "TrainingRuntime")
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    calls: list[list[str]] = field(default_factory=list)

    def __call__(self, argv: Sequence[str], text: str) -> int:
        self.calls.append(list(argv))
        if list(argv) != ["kubectl", "apply", "-f", "-"]:
            self.errors.append(f"unexpected command {list(argv)}")
            return 1
        for obj in yaml.safe_load_all(text):
            kind = obj["kind"]
            try:
                if kind in CORE_KINDS:
                    validate(obj)
                elif kind in self.installed:
                    validate_custom(obj)
                else:
                    self.errors.append(f'no matches for kind "{kind}" in "{obj["apiVersion"]}"')
                    return 1
            except (
                kubernetes_validate.ValidationError,
                jsonschema.ValidationError,
                crd_cel.CELValidationError,
            ) as err:
                self.errors.append(f"{kind}: {err}")
                return 1
            meta = obj["metadata"]
            if kind == "TrainJob":
                ref = obj["spec"]["runtimeRef"]
                if (ref["kind"], meta["namespace"], ref["name"]) not in self.objects:
                    self.errors.append(f"TrainJob {meta['name']}: {ref['kind']} not found")
                    return 1
            self.objects[(kind, meta["namespace"], meta["name"])] = obj
        return 0

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.objects]
