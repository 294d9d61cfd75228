"""Registers a finished training run as a version of a SageMaker model package group (kiln's
model registry): artifact, serving image, metrics, hyperparameters, data and code revision,
pending manual approval.

Imports only the standard library and kiln's contract; the caller passes its SageMaker client.
The training image carries it beside the contract, and the `kiln` tool imports it too. Nothing
is registered unless a group is named (`--model-package-group` or $KILN_MODEL_PACKAGE_GROUP);
once one is, a failure is an error that says what to fix.
"""

from __future__ import annotations

import math
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kiln import lmi
from kiln.contract import RegistryMetadata, TrainerEnv, is_model_prefix

PENDING = "PendingManualApproval"
# CreateModelPackage: CustomerMetadataProperties holds at most 50 entries, keys of at most 128
# and values of at most 256 characters; room is kept for one approval per environment.
MAX_METADATA = 50
APPROVAL_ROOM = 10
MAX_VALUE = 256
# Run facts that are not hyperparameters (paths, names) or not settable flags.
NOT_HYPERPARAMETERS = frozenset(
    {
        "data",
        "val_data",
        "checkpoint_dir",
        "output_dir",
        "job_name",
        "model_config",
        "suffixes",
        "model_package_group",
        "defaults",
        "threads",
        "device",
        "log_every",
    }
)
# Always recorded, set or not: what a reviewer compares first.
CORE_HYPERPARAMETERS = (
    "model",
    "init_from",
    "lr",
    "max_steps",
    "seq_len",
    "micro_batch_size",
    "grad_accum",
    "lora_rank",
    "strategy",
    "precision",
    "seed",
)


# The engines a version can hold a container for: kiln's server (the primary specification of
# a run's version) and the pinned LMI container (an additional specification named `lmi`).
# CreateModel's ContainerDefinition picks an additional one by `InferenceSpecificationName`;
# without it SageMaker uses the primary (SageMaker API Reference, ContainerDefinition).
ENGINES = ("kiln", "lmi")
# AdditionalInferenceSpecifications: 1 to 15 entries, each Name 1-63 characters of
# [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}, unique within the version (CreateModelPackage).
MAX_ADDITIONAL_SPECIFICATIONS = 15


def engine_of(image: str) -> str:
    """The engine an image runs: `lmi` for the LMI container's repository, else `kiln`."""
    return "lmi" if f"/{lmi.LMI_REPOSITORY}:" in image else "kiln"


class RegistrationError(ValueError):
    """Registration was asked for and cannot be done; the message says what to change."""


@dataclass(frozen=True)
class RunRecord:
    """What one finished run registers."""

    job: str
    artifact: str
    data: str
    steps: int
    tokens: int
    val_loss: float | None
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """Where and how to register: the group (name or ARN), the serving image, the registry key."""

    group: str
    image: str
    key_arn: str | None = None
    code_revision: str = "unknown"
    # The other engines' images (engine -> image): each becomes an additional inference
    # specification named by its engine, over the same model data. `register` adds the pinned
    # LMI image of the group's region when the primary is kiln's and none is given.
    additional: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_environment(
        cls, group: str | None, environ: Mapping[str, str] = os.environ
    ) -> Target | None:
        """The target the flags and $KILN_* variables name, or None when no group is named."""
        group = group or environ.get(TrainerEnv.MODEL_PACKAGE_GROUP) or None
        if group is None:
            return None
        image = environ.get(TrainerEnv.INFERENCE_IMAGE, "")
        if not image:
            raise RegistrationError(
                f"registering in {group} needs the serving image: set "
                f"${TrainerEnv.INFERENCE_IMAGE} to the serving stack's ImageUri output (`kiln "
                "train` sets it), or unset the group to skip registration"
            )
        return cls(
            group=group,
            image=image,
            key_arn=environ.get(TrainerEnv.REGISTRY_KEY_ARN) or None,
            code_revision=environ.get(TrainerEnv.CODE_REVISION) or git_revision(),
        )


def git_revision() -> str:
    """The checkout's commit (with `-dirty` when it has changes), or `unknown` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit or "unknown"


def _text(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 3] + "..."


def hyperparameters(args: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, str]:
    """The run's hyperparameters worth recording: the core ones, then every other flag set
    to something other than its default (in name order), within the metadata's room."""
    room = MAX_METADATA - APPROVAL_ROOM - 7  # the seven run facts of `create_request`
    chosen = {k: args[k] for k in CORE_HYPERPARAMETERS if k in args and args[k] is not None}
    for key in sorted(args):
        if key in chosen or key in NOT_HYPERPARAMETERS or args[key] is None:
            continue
        if key in defaults and args[key] == defaults[key]:
            continue
        chosen[key] = args[key]
    return {
        f"{RegistryMetadata.HYPERPARAMETER_PREFIX}{k}": _text(v)
        for k, v in list(chosen.items())[:room]
    }


def model_data(artifact: str) -> dict[str, Any]:
    """A version's model data: a model.tar.gz as `ModelDataUrl`, or an uncompressed model
    directory's S3 prefix (ending in /) as `ModelDataSource` (S3Prefix, no compression), as
    CreateModelPackage's ModelPackageContainerDefinition takes them."""
    if is_model_prefix(artifact):
        return {
            "ModelDataSource": {
                "S3DataSource": {
                    "S3Uri": artifact,
                    "S3DataType": "S3Prefix",
                    "CompressionType": "None",
                }
            }
        }
    return {"ModelDataUrl": artifact}


def with_lmi(target: Target, region: str | None) -> Target:
    """`target` with an `lmi` specification (the pinned LMI image of `region`) beside a kiln
    primary, so one version serves with either engine; unchanged where it has one, where the
    primary is LMI's, or where kiln/lmi.py records no LMI registry for the region."""
    if (
        region is None
        or lmi.region_problem(region) is not None
        or engine_of(target.image) == "lmi"
        or "lmi" in target.additional
    ):
        return target
    return Target(
        group=target.group,
        image=target.image,
        key_arn=target.key_arn,
        code_revision=target.code_revision,
        additional={**target.additional, "lmi": lmi.image_uri(region)},
    )


def specification(name: str, image: str, artifact: str) -> dict[str, Any]:
    """An additional inference specification: engine `name`'s image over the model data."""
    return {
        "Name": name,
        "Description": f"{name} engine: {image}"[:1024],
        "Containers": [{"Image": image, **model_data(artifact)}],
        "SupportedContentTypes": ["application/json"],
        "SupportedResponseMIMETypes": ["application/json", "text/event-stream"],
    }


def create_request(run: RunRecord, target: Target) -> dict[str, Any]:
    """The CreateModelPackage request of one run (no AWS call: tests read it as it is): the
    primary specification with `target.image`, and one additional specification per engine in
    `target.additional`, all over the same model data."""
    if not run.artifact.startswith("s3://"):
        raise RegistrationError(
            f"the model is at {run.artifact}, but a registry version needs an S3 artifact: "
            "pass an s3:// --output-dir, or unset the group to skip registration"
        )
    metadata = {
        RegistryMetadata.JOB: _text(run.job),
        RegistryMetadata.DATA: _text(run.data),
        RegistryMetadata.CODE_REVISION: _text(target.code_revision),
        RegistryMetadata.STEPS: str(run.steps),
        RegistryMetadata.TOKENS: str(run.tokens),
    }
    if run.val_loss is not None and math.isfinite(run.val_loss):
        metadata[RegistryMetadata.VAL_LOSS] = f"{run.val_loss:.6g}"
        metadata[RegistryMetadata.VAL_PERPLEXITY] = f"{math.exp(min(run.val_loss, 700)):.6g}"
    metadata.update(run.hyperparameters)
    loss = metadata.get(RegistryMetadata.VAL_LOSS, "n/a")
    request: dict[str, Any] = {
        "ModelPackageGroupName": target.group,
        "ModelPackageDescription": _text(
            f"{run.job}: {run.steps} steps, {run.tokens} tokens, val_loss {loss}"
        ),
        "InferenceSpecification": {
            "Containers": [{"Image": target.image, **model_data(run.artifact)}],
            "SupportedContentTypes": ["application/json"],
            "SupportedResponseMIMETypes": ["application/json", "text/event-stream"],
        },
        "ModelApprovalStatus": PENDING,
        "MetadataProperties": {"CommitId": target.code_revision, "GeneratedBy": run.job},
        "CustomerMetadataProperties": metadata,
    }
    primary = engine_of(target.image)
    for name in target.additional:
        if name not in ENGINES or name == primary:
            raise RegistrationError(
                f"an additional specification is named {name!r}: name it by an engine that "
                f"is not the primary's ({primary}); engines: {', '.join(ENGINES)}"
            )
    if target.additional:
        request["AdditionalInferenceSpecifications"] = [
            specification(name, image, run.artifact) for name, image in target.additional.items()
        ][:MAX_ADDITIONAL_SPECIFICATIONS]
    if target.key_arn:
        request["SecurityConfig"] = {"KmsKeyId": target.key_arn}
    return request


def region_of(group: str) -> str | None:
    """The region in a group ARN (`arn:aws:sagemaker:<region>:...`), or None for a name."""
    parts = group.split(":")
    return parts[3] if group.startswith("arn:") and len(parts) > 3 else None


def register(run: RunRecord, target: Target, client: Any) -> str:
    """Creates the version with `client` (a boto3 SageMaker client in the group's region);
    returns its ARN. A failure is a RegistrationError naming the fix. A kiln primary gets an
    `lmi` specification for the client's region beside it (`with_lmi`)."""
    region = region_of(target.group) or getattr(getattr(client, "meta", None), "region_name", None)
    request = create_request(run, with_lmi(target, region))
    try:
        response = client.create_model_package(**request)
    except Exception as err:
        raise RegistrationError(_advice(err, run, target)) from err
    return str(response["ModelPackageArn"])


def _advice(err: Exception, run: RunRecord, target: Target) -> str:
    code = str(getattr(err, "response", {}).get("Error", {}).get("Code", type(err).__name__))
    retry = (
        f"The model itself is saved at {run.artifact}; register it once fixed with "
        f"`kiln models register --env <env> --artifact {run.artifact} --job {run.job}`."
    )
    if code in ("AccessDenied", "AccessDeniedException"):
        return (
            f"registering in {target.group} was denied ({err}): the run's role needs "
            "sagemaker:CreateModelPackage on the group and its versions (the models stack's "
            "RegisterPolicy grants it to kiln's trainer roles: deploy the models stack), and "
            f"kms:GenerateDataKey on the registry key. {retry}"
        )
    if code in ("ResourceNotFound", "ValidationException") and "not" in str(err).lower():
        return (
            f"model package group {target.group} was not found ({err}): deploy the models "
            f"stack of the registry's home environment, or name an existing group. {retry}"
        )
    if code in ("NoCredentialsError", "NoRegionError", "PartialCredentialsError"):
        return (
            f"cannot call SageMaker to register in {target.group} ({err}): give the run AWS "
            "credentials and a region (AWS_REGION), or unset the group to skip "
            f"registration. {retry}"
        )
    return f"registering in {target.group} failed: {code}: {err}. {retry}"
