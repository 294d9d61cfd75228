"""`kiln models`: the model registry's versions, their approval per environment, and what the
delivery pipeline deploys (the latest version approved for each environment).

One SageMaker model package group per model name lives in the registry's home environment
(`registry.home`); every environment reads it. A version is approved *for an environment*: the
approval (who, from STS; when; why) is a CustomerMetadataProperties entry `approval.<env>`, the
version's ModelApprovalStatus is Approved while any environment has it approved (SageMaker
deploys only Approved versions), and ApprovalDescription holds the last decision. Approving for
an environment needs the approvals of the environments before it in `config/delivery.yaml`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln import lmi, registry
from kiln.config import ConfigError, load_delivery, load_settings
from kiln.contract import Outputs, RegistryMetadata, model_package_group
from kiln.settings import MODEL_PACKAGE_PATTERN, Settings
from kiln_cli.operate.aws import Aws, AwsError, OperateError

APPROVED, REJECTED, PENDING = "Approved", "Rejected", "PendingManualApproval"
REJECTION_PREFIX = "rejection."
# UpdateModelPackage: ApprovalDescription is at most 1024 characters; a metadata value 256.
MAX_DESCRIPTION = 1024
MAX_VALUE = 256


@dataclass(frozen=True)
class Specification:
    """One inference specification of a version: the primary (`name` None) or an additional
    one, named by the engine whose image it holds (kiln/registry.py)."""

    name: str | None
    image: str | None
    artifact: str | None

    @property
    def engine(self) -> str:
        return registry.engine_of(self.image or "")

    @property
    def label(self) -> str:
        return "(primary)" if self.name is None else self.name


@dataclass(frozen=True)
class Version:
    """One model package version as the tool shows it."""

    arn: str
    group: str
    number: int
    status: str  # ModelApprovalStatus
    created: datetime | None
    artifact: str | None
    image: str | None
    description: str
    approval_description: str
    metadata: dict[str, str] = field(default_factory=dict)
    # The primary specification first, then the additional ones.
    specifications: tuple[Specification, ...] = ()

    @property
    def ref(self) -> str:
        """`<group>/<version>`, e.g. `kiln-llm/3`."""
        return f"{self.group}/{self.number}"

    @property
    def approvals(self) -> dict[str, str]:
        """Environment -> the approval's record, for each environment it is approved for."""
        prefix = RegistryMetadata.APPROVAL_PREFIX
        return {k[len(prefix) :]: v for k, v in self.metadata.items() if k.startswith(prefix)}

    def approved_for(self, environment: str) -> bool:
        return self.status == APPROVED and environment in self.approvals

    def specification_for(self, engine: str, *, home: str = "<registry home>") -> str | None:
        """The InferenceSpecificationName that serves this version with `engine`: None for
        the primary specification when it holds the engine's image, else the additional
        specification named by the engine. A version without one is refused, with the
        command that adds it (`home`: the registry's home environment)."""
        specifications = self.specifications or (Specification(None, self.image, None),)
        for spec in specifications:
            if spec.engine == engine and (spec.name is None or spec.name == engine):
                return spec.name
        held = ", ".join(f"{s.label}: {s.engine}" for s in specifications)
        raise OperateError(
            f"{self.ref} holds no specification for engine {engine} ({held}): SageMaker would "
            f"start another engine's image with {engine}'s variables. Add one over the same "
            f"model data (`kiln models add-engine {self.ref} --env {home} --engine {engine}`), "
            "then deploy it",
            exit_code=2,
        )


def _artifact(container: dict[str, Any]) -> str | None:
    artifact = container.get("ModelDataUrl") or (
        container.get("ModelDataSource", {}).get("S3DataSource", {}).get("S3Uri")
    )
    return str(artifact) if artifact else None


def _version(described: dict[str, Any]) -> Version:
    containers = described.get("InferenceSpecification", {}).get("Containers") or [{}]
    container = containers[0]
    artifact = _artifact(container)
    specifications = [Specification(None, container.get("Image"), artifact)]
    for extra in described.get("AdditionalInferenceSpecifications") or []:
        first = (extra.get("Containers") or [{}])[0]
        specifications.append(
            Specification(str(extra.get("Name")), first.get("Image"), _artifact(first))
        )
    created = described.get("CreationTime")
    return Version(
        arn=str(described["ModelPackageArn"]),
        group=str(described.get("ModelPackageGroupName", "")),
        number=int(described.get("ModelPackageVersion", 0)),
        status=str(described.get("ModelApprovalStatus", PENDING)),
        created=created.astimezone(UTC) if isinstance(created, datetime) else None,
        artifact=artifact,
        image=container.get("Image"),
        description=str(described.get("ModelPackageDescription", "")),
        approval_description=str(described.get("ApprovalDescription", "")),
        metadata={
            str(k): str(v) for k, v in (described.get("CustomerMetadataProperties") or {}).items()
        },
        specifications=tuple(specifications),
    )


class Registry:
    """The registry an environment reads: its groups, in the registry's account and region."""

    def __init__(self, aws: Aws) -> None:
        self.aws = aws
        self.settings = aws.settings
        self._account: str | None = None
        self._caller: str | None = None

    def caller(self) -> str:
        """The caller's account (STS, once)."""
        if self._caller is None:
            self._caller = self.aws.check_identity()
        return self._caller

    @property
    def models(self) -> list[str]:
        return list(self.settings.registry.models)

    def account(self) -> str:
        """The registry's account: `registry.account`, else the environment's, else the
        caller's (the shipped environments share one account)."""
        if self._account is None:
            reg = self.settings.registry
            self._account = reg.account or self.settings.account or self.caller()
        return self._account

    def group(self, model: str) -> str:
        """The group's name when it is in the caller's account, else its ARN (cross-account
        calls name it by ARN)."""
        if model not in self.models:
            raise OperateError(
                f"model {model!r} is not in registry.models of config/{self.settings.name}.yaml "
                f"({', '.join(self.models)})",
                exit_code=2,
            )
        name = model_package_group(self.settings.project, model)
        if self.account() == self.caller():
            return name
        return f"arn:aws:sagemaker:{self.aws.region}:{self.account()}:model-package-group/{name}"

    def resolve_ref(self, ref: str) -> str:
        """A version's ARN from its ARN, `<model>/<n>` or `<group>/<n>`."""
        if re.fullmatch(MODEL_PACKAGE_PATTERN, ref):
            return ref
        match = re.fullmatch(r"([a-z0-9-]+)/(\d+)", ref)
        if not match:
            raise OperateError(
                f"{ref!r} is not a model version: give its ARN or <model>/<version>, e.g. "
                f"{self.models[0]}/3 (`kiln models list --env {self.settings.name}`)",
                exit_code=2,
            )
        name, number = match.groups()
        prefix = f"{self.settings.project}-"
        model = name.removeprefix(prefix) if name.removeprefix(prefix) in self.models else name
        group = model_package_group(self.settings.project, model)
        self.group(model)  # refuses a model that is not configured
        return (
            f"arn:aws:sagemaker:{self.aws.region}:{self.account()}:model-package/{group}/{number}"
        )

    def describe(self, ref: str) -> Version:
        arn = self.resolve_ref(ref)
        try:
            described = self.aws.call("sagemaker", "describe_model_package", ModelPackageName=arn)
        except AwsError as err:
            if err.code in ("ValidationException", "ResourceNotFound") and (
                "not" in err.aws_message.lower()
            ):
                raise OperateError(
                    f"no model version {arn} ({err.aws_message}); `kiln models list --env "
                    f"{self.settings.name}` lists them"
                ) from err
            raise
        return _version(described)

    def versions(self, model: str, *, limit: int = 10, status: str | None = None) -> list[Version]:
        """The newest `limit` versions of `model` (of one approval status, when given)."""
        params: dict[str, Any] = {
            "ModelPackageGroupName": self.group(model),
            "ModelPackageType": "Versioned",
            "SortBy": "CreationTime",
            "SortOrder": "Descending",
        }
        if status:
            params["ModelApprovalStatus"] = status
        try:
            summaries = self.aws.pages(
                "sagemaker", "list_model_packages", "ModelPackageSummaryList", **params
            )
        except AwsError as err:
            if err.code in ("ValidationException", "ResourceNotFound"):
                raise OperateError(
                    f"cannot list {params['ModelPackageGroupName']}: {err.aws_message}. Deploy "
                    "the models stack of the registry's home environment first."
                ) from err
            raise
        return [self.describe(str(s["ModelPackageArn"])) for s in summaries[:limit]]

    def latest_approved(self, model: str, environment: str) -> Version | None:
        """The newest version approved for `environment`, or None."""
        for version in self.versions(model, limit=100, status=APPROVED):
            if version.approved_for(environment):
                return version
        return None

    # --- decisions --------------------------------------------------------------------------

    def _who(self) -> str:
        self.caller()
        return str(self.aws.identity_arn)

    def approve(self, ref: str, environment: str, reason: str, *, now: datetime) -> Version:
        """Approves `ref` for `environment`, once every environment before it approved it."""
        self._known(environment)
        version = self.describe(ref)
        missing = [e for e in previous_environments(environment) if e not in version.approvals]
        if missing:
            order = " -> ".join([*previous_environments(environment), environment])
            raise OperateError(
                f"{version.ref} is not approved for {', '.join(missing)} yet: promotion goes "
                f"{order}; approve it there first (`kiln models approve {version.ref} --env "
                f"{missing[0]} --reason ...`)",
                exit_code=2,
            )
        record = f"approved for {environment} by {self._who()} at {_iso(now)}: {reason}"
        self.aws.call(
            "sagemaker",
            "update_model_package",
            ModelPackageArn=version.arn,
            ModelApprovalStatus=APPROVED,
            ApprovalDescription=record[:MAX_DESCRIPTION],
            # The whole map: UpdateModelPackage adds keys, and an older API (or moto)
            # replaces the map; either way the run's record stays.
            CustomerMetadataProperties={
                **version.metadata,
                RegistryMetadata.approval(environment): record[:MAX_VALUE],
            },
        )
        return self.describe(version.arn)

    def reject(self, ref: str, environment: str, reason: str, *, now: datetime) -> Version:
        """Withdraws `ref`'s approval for `environment` (and records why); a version approved
        for no environment any more becomes Rejected, so SageMaker will not deploy it."""
        self._known(environment)
        version = self.describe(ref)
        record = f"rejected for {environment} by {self._who()} at {_iso(now)}: {reason}"
        remaining = [e for e in version.approvals if e != environment]
        params: dict[str, Any] = {
            "ModelPackageArn": version.arn,
            "ModelApprovalStatus": APPROVED if remaining else REJECTED,
            "ApprovalDescription": record[:MAX_DESCRIPTION],
            "CustomerMetadataProperties": {
                **{
                    k: v
                    for k, v in version.metadata.items()
                    if k != RegistryMetadata.approval(environment)
                },
                f"{REJECTION_PREFIX}{environment}": record[:MAX_VALUE],
            },
        }
        if environment in version.approvals:
            params["CustomerMetadataPropertiesToRemove"] = [RegistryMetadata.approval(environment)]
        self.aws.call("sagemaker", "update_model_package", **params)
        return self.describe(version.arn)

    def _known(self, environment: str) -> None:
        try:
            load_settings(environment, self.aws.config_dir)
        except ConfigError as err:
            raise OperateError(f"--for {environment}: {err}", exit_code=2) from err

    # --- registering by hand ----------------------------------------------------------------

    def register(self, run: registry.RunRecord, model: str, engine: str = "kiln") -> str:
        """Registers an artifact as a version pending approval, as training does at its end
        (for a run whose own registration failed, or a model trained elsewhere). `engine`
        picks the primary specification's image (kiln's server or the pinned LMI container);
        the other engine's is an additional specification named by it."""
        if not self.settings.registry.home:
            raise OperateError(
                f"{self.settings.name} is not the registry's home: register in the home "
                "environment (the one whose registry.home is true)",
                exit_code=2,
            )
        other = "kiln" if engine == "lmi" else "lmi"
        target = registry.Target(
            group=self.group(model),
            image=self.engine_image(engine),
            key_arn=self.aws.output(Outputs.REGISTRY_KEY_ARN),
            code_revision=registry.git_revision(),
            # The other engine beside it, so the version serves with either.
            additional={other: self.engine_image(other)},
        )
        try:
            request = registry.create_request(run, target)
        except registry.RegistrationError as err:
            raise OperateError(str(err), exit_code=2) from err
        response = self.aws.call("sagemaker", "create_model_package", **request)
        return str(response["ModelPackageArn"])

    def engine_image(self, engine: str) -> str:
        """The image `engine` serves with here: the serving stack's (kiln's server) or the
        pinned LMI container of the region."""
        if engine == "lmi":
            return lmi.image_uri(self.settings.region)
        return self.aws.output(Outputs.IMAGE_URI)

    def add_engine(self, ref: str, engine: str) -> Version:
        """Adds an additional specification for `engine` to a version registered without one
        (UpdateModelPackage, AdditionalInferenceSpecificationsToAdd), over the version's own
        model data; its approvals stay as they are."""
        if not self.settings.registry.home:
            raise OperateError(
                f"{self.settings.name} is not the registry's home: add engines in the home "
                "environment (the one whose registry.home is true)",
                exit_code=2,
            )
        version = self.describe(ref)
        try:
            version.specification_for(engine)
            return version  # it serves with the engine already
        except OperateError:
            pass
        if not version.artifact:
            raise OperateError(f"{version.ref} names no model data to serve; register it again")
        if len(version.specifications) > registry.MAX_ADDITIONAL_SPECIFICATIONS:
            raise OperateError(
                f"{version.ref} already holds {registry.MAX_ADDITIONAL_SPECIFICATIONS} "
                "additional specifications, SageMaker's limit: register the artifact again"
            )
        spec = registry.specification(engine, self.engine_image(engine), version.artifact)
        self.aws.call(
            "sagemaker",
            "update_model_package",
            ModelPackageArn=version.arn,
            AdditionalInferenceSpecificationsToAdd=[spec],
        )
        return self.describe(version.arn)


def latest_or_explain(reg: Registry, model: str) -> Version:
    """The newest version of `model` approved for the registry's environment, or an error
    that says how to get one."""
    env = reg.settings.name
    version = reg.latest_approved(model, env)
    if version is None:
        raise OperateError(
            f"no version of {model} is approved for {env}: `kiln models list --env {env}` "
            f"shows them; `kiln models approve <model>/<n> --env {env} --reason ...` approves one"
        )
    return version


def previous_environments(environment: str) -> list[str]:
    """The environments before `environment` in the delivery order (config/delivery.yaml)."""
    try:
        order = load_delivery().environments
    except ConfigError:
        return []
    return order[: order.index(environment)] if environment in order else []


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def resolve(environments: Sequence[Settings], aws_of: Any) -> dict[str, dict[str, str]]:
    """For the delivery pipeline: each environment's latest version approved for it, of the
    model it serves (the first of registry.models); environments with none are left out and
    serve their configured model."""
    found: dict[str, dict[str, str]] = {}
    for settings in environments:
        reg = Registry(aws_of(settings))
        version = reg.latest_approved(settings.registry.models[0], settings.name)
        if version is not None and version.artifact:
            found[settings.name] = {
                "model_package": version.arn,
                "model_artifact": version.artifact,
            }
            # A version without the engine's specification stops the pipeline here, with the
            # command that adds it, rather than starting the wrong image.
            name = version.specification_for(
                settings.serving.engine, home=home_environment(environments)
            )
            if name is not None:
                found[settings.name]["inference_specification"] = name
    return found


def home_environment(environments: Sequence[Settings]) -> str:
    """The name of the registry's home among `environments` (`<registry home>` if absent)."""
    return next((s.name for s in environments if s.registry.home), "<registry home>")


def registry_home(settings: Settings, config_dir: Path) -> str:
    """The registry's home environment as seen from `settings` (its own name on the home,
    else the delivery order's home, else `<registry home>`)."""
    if settings.registry.home:
        return settings.name
    try:
        names = load_delivery(config_dir).environments
        return home_environment([load_settings(n, config_dir) for n in names])
    except ConfigError:
        return "<registry home>"


def write_resolved(found: dict[str, dict[str, str]], out: Path) -> None:
    out.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --- what a person sees ---------------------------------------------------------------------


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M") if moment else "-"


def render_list(model: str, versions: Sequence[Version]) -> str:
    if not versions:
        return f"{model}: no versions yet (training registers one when it finishes)\n"
    rows = [("version", "status", "approved for", "val_loss", "steps", "created", "job")]
    for v in versions:
        rows.append(
            (
                v.ref,
                v.status,
                ",".join(sorted(v.approvals)) or "-",
                v.metadata.get(RegistryMetadata.VAL_LOSS, "-"),
                v.metadata.get(RegistryMetadata.STEPS, "-"),
                _when(v.created),
                v.metadata.get(RegistryMetadata.JOB, "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(len(rows[0]))]
    return "".join(
        "".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in rows
    )


def render_show(version: Version) -> str:
    rows: list[tuple[str, str]] = [
        ("version", version.ref),
        ("arn", version.arn),
        ("status", version.status),
        ("created", f"{_when(version.created)} UTC" if version.created else "-"),
        ("artifact", version.artifact or "-"),
        ("image", version.image or "-"),
        *[
            (f"specification {spec.label}", f"{spec.engine}  {spec.image or '-'}")
            for spec in version.specifications
        ],
        ("description", version.description or "-"),
        ("last decision", version.approval_description or "-"),
    ]
    for env, record in sorted(version.approvals.items()):
        rows.append((f"approval {env}", record))
    for key, value in sorted(version.metadata.items()):
        if not key.startswith((RegistryMetadata.APPROVAL_PREFIX, REJECTION_PREFIX)):
            rows.append((key, value))
    width = max(len(key) for key, _ in rows) + 2
    return "".join(f"{key:<{width}}{value}\n" for key, value in rows)
