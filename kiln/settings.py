"""The typed schema of one environment's settings, validated from `config/<env>.yaml`."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kiln import instances as serving_instances
from kiln import lmi
from kiln.gpu_instances import GPU_INSTANCES

Tier = Literal["dev", "staging", "prod"]
RemovalPolicyName = Literal["retain", "destroy"]

# The values CloudWatch Logs accepts for RetentionInDays.
LOG_RETENTION_DAYS: tuple[int, ...] = (
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731,
    1096, 1827, 2192, 2557, 2922, 3288, 3653,
)  # fmt: skip

# Redshift Serverless base capacity above 512 RPUs (Management Guide, "Compute capacity").
REDSHIFT_1024_RPU_REGIONS = ("us-east-1", "us-east-2", "us-west-2", "eu-west-1", "eu-central-1")

ENV_NAME_PATTERN = r"^[a-z][a-z0-9-]{1,19}$"
_REGION_PATTERN = r"^[a-z]{2}(-gov)?-[a-z]+-\d$"

PositiveDays = Annotated[int, Field(ge=1, le=36500)]


def covers_the_internet(cidrs: list[str]) -> bool:
    """Whether the IPv4 (or IPv6) ranges together hold every address of their family, as
    `0.0.0.0/1` + `128.0.0.0/1` do: a public endpoint open to them is open to all."""
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    return (bool(v4) and _total(ipaddress.collapse_addresses(v4)) >= 2**32) or (
        bool(v6) and _total(ipaddress.collapse_addresses(v6)) >= 2**128
    )


def _total(nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> int:
    return sum(n.num_addresses for n in nets)


class StrictModel(BaseModel):
    """A frozen model that rejects unknown keys: a typo in YAML fails instead of being ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class SubnetLayout(StrictModel):
    """Prefix lengths of the three subnet tiers, one subnet of each per availability zone."""

    public_mask: int = Field(24, ge=16, le=28)
    private_mask: int = Field(20, ge=16, le=28)
    isolated_mask: int = Field(24, ge=16, le=28)


class NetworkSettings(StrictModel):
    """The VPC: its address range, subnet sizes and egress."""

    vpc_cidr: str
    nat_gateways: int = Field(ge=1, le=6)
    subnets: SubnetLayout = SubnetLayout()
    # Interface endpoints keep ECR/STS/Logs/SageMaker/KMS/Secrets Manager traffic off the NAT.
    interface_endpoints: bool = True

    @field_validator("vpc_cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        try:
            net = ipaddress.IPv4Network(value, strict=True)
        except ValueError as err:
            raise PydanticCustomError(
                "cidr",
                "'{value}' is not an IPv4 network in CIDR form like 10.0.0.0/16 ({err})",
                {"value": value, "err": str(err)},
            ) from None
        if not net.is_private:
            raise PydanticCustomError(
                "cidr",
                "{value} is not a private range; allowed: 10.0.0.0/8, 172.16.0.0/12, "
                "192.168.0.0/16",
                {"value": value},
            )
        if not 16 <= net.prefixlen <= 24:
            raise PydanticCustomError(
                "cidr",
                "prefix /{p} is outside what a VPC allows here; allowed: /16 to /24",
                {"p": net.prefixlen},
            )
        return value


class DataLakeSettings(StrictModel):
    """Lifecycle of the data lake's buckets (days; null means never)."""

    raw_transition_to_infrequent_access_days: int | None = Field(30, ge=30, le=36500)
    raw_expiration_days: PositiveDays | None = None
    capture_expiration_days: PositiveDays | None = 90
    checkpoint_expiration_days: PositiveDays | None = 30
    noncurrent_version_expiration_days: PositiveDays = 30
    access_logs_expiration_days: PositiveDays = 365

    @model_validator(mode="after")
    def _transition_before_expiration(self) -> DataLakeSettings:
        transition, expiration = (
            self.raw_transition_to_infrequent_access_days,
            self.raw_expiration_days,
        )
        if transition is not None and expiration is not None and expiration <= transition:
            raise PydanticCustomError(
                "lifecycle",
                "raw_expiration_days ({e}) must be greater than "
                "raw_transition_to_infrequent_access_days ({t}), or null",
                {"e": expiration, "t": transition},
            )
        return self


class ServerlessWarehouseSettings(StrictModel):
    """Redshift Serverless capacity in RPUs (8 to 1024, in steps of 8)."""

    base_capacity: int = Field(8, ge=8, le=1024, multiple_of=8)
    max_capacity: int = Field(64, ge=8, le=5632, multiple_of=8)

    @model_validator(mode="after")
    def _max_at_least_base(self) -> ServerlessWarehouseSettings:
        if self.max_capacity < self.base_capacity:
            raise PydanticCustomError(
                "capacity",
                "max_capacity ({m}) must be at least base_capacity ({b})",
                {"m": self.max_capacity, "b": self.base_capacity},
            )
        return self


class ProvisionedWarehouseSettings(StrictModel):
    """A provisioned Redshift cluster: RA3 node type and count."""

    node_type: Literal["ra3.large", "ra3.xlplus", "ra3.4xlarge", "ra3.16xlarge"] = "ra3.large"
    nodes: int = Field(2, ge=1, le=128)


class WarehouseSettings(StrictModel):
    """The Redshift warehouse: Serverless by default, a provisioned cluster when asked."""

    kind: Literal["serverless", "provisioned"] = "serverless"
    database: str = Field("analytics", pattern=r"^[a-z][a-z0-9_]{0,63}$")
    # Not `admin`/`awsuser`: well-known names are the first ones guessed.
    admin_username: str = Field("kiln_admin", pattern=r"^[a-z][a-z0-9_]{0,126}$")
    serverless: ServerlessWarehouseSettings = ServerlessWarehouseSettings()
    provisioned: ProvisionedWarehouseSettings = ProvisionedWarehouseSettings()
    snapshot_retention_days: int = Field(7, ge=1, le=35)

    @field_validator("admin_username")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in {"admin", "awsuser", "rdsadmin", "root", "postgres"}:
            raise PydanticCustomError(
                "reserved",
                "'{value}' is a default or reserved name; choose another",
                {"value": value},
            )
        return value


class TopicSettings(StrictModel):
    """A Kafka topic created by CloudFormation."""

    name: str = Field(pattern=r"^[a-zA-Z0-9._-]{1,249}$")
    partitions: int = Field(ge=1, le=1000)
    retention_hours: int = Field(168, ge=1, le=8760)


class FirehoseSettings(StrictModel):
    """Delivery of one topic from MSK to the raw zone."""

    topic: str = "prediction-events"
    buffer_interval_seconds: int = Field(300, ge=0, le=900)
    buffer_size_mib: int = Field(64, ge=1, le=128)


class StreamingSettings(StrictModel):
    """The MSK cluster (one broker per zone per `brokers_per_zone`), its topics, Firehose."""

    kafka_version: str = Field(pattern=r"^\d+\.\d+\.(\d+|x)(\.kraft)?$")
    broker_instance_type: str = Field(pattern=r"^(kafka|express)\.[a-z0-9]+\.[a-z0-9]+$")
    brokers_per_zone: int = Field(1, ge=1, le=10)
    broker_storage_gib: int = Field(100, ge=1, le=16384)
    topics: list[TopicSettings] = Field(min_length=1)
    firehose: FirehoseSettings = FirehoseSettings()

    @field_validator("broker_instance_type")
    @classmethod
    def _private_connectivity_capable(cls, value: str) -> str:
        # Firehose reads MSK through multi-VPC private connectivity, which t3.small lacks.
        if value == "kafka.t3.small":
            raise PydanticCustomError(
                "broker",
                "kafka.t3.small cannot serve Firehose (no multi-VPC private "
                "connectivity); allowed: kafka.m5.large, kafka.m7g.large or larger",
                {},
            )
        return value

    @model_validator(mode="after")
    def _topics(self) -> StreamingSettings:
        names = [t.name for t in self.topics]
        if len(set(names)) != len(names):
            raise PydanticCustomError("topics", "topics: names repeat: {n}", {"n": names})
        if self.firehose.topic not in names:
            raise PydanticCustomError(
                "topics",
                "firehose.topic '{t}' is not a declared topic; declared: {n}",
                {"t": self.firehose.topic, "n": ", ".join(names)},
            )
        return self


class NodePoolSettings(StrictModel):
    """Size of a managed node group."""

    min_size: int = Field(ge=0, le=1000)
    desired_size: int = Field(ge=0, le=1000)
    max_size: int = Field(ge=1, le=1000)

    @model_validator(mode="after")
    def _ordered(self) -> NodePoolSettings:
        if not self.min_size <= self.desired_size <= self.max_size:
            raise PydanticCustomError(
                "sizes",
                "sizes must satisfy min_size <= desired_size <= max_size; got {a} <= {b} <= {c}",
                {"a": self.min_size, "b": self.desired_size, "c": self.max_size},
            )
        return self


class SystemNodeSettings(NodePoolSettings):
    """The on-demand node group for cluster services (CoreDNS, device plugins, ...)."""

    instance_type: str = Field("m7i.large", pattern=r"^[a-z0-9]+\.[a-z0-9]+$")


class CapacityReservationSettings(StrictModel):
    """One On-Demand Capacity Reservation or Capacity Block for ML that GPU nodes launch into
    before any on-demand capacity: by id, or by tags (every reservation carrying them)."""

    # Karpenter's EC2NodeClass: "'id' is mutually exclusive, cannot be set along with other
    # fields in a capacity reservation selector term"; ids are `cr-` and hex.
    id: str | None = Field(None, pattern=r"^cr-[0-9a-f]{8,17}$")
    # At most 20 tags, none empty (EC2NodeClass capacityReservationSelectorTerms[].tags).
    tags: dict[
        Annotated[str, Field(min_length=1, max_length=128)],
        Annotated[str, Field(min_length=1, max_length=256)],
    ] = Field({}, max_length=20)

    @model_validator(mode="after")
    def _id_or_tags(self) -> CapacityReservationSettings:
        if (self.id is None) == (not self.tags):
            raise PydanticCustomError(
                "reservation",
                "name a reservation by id (cr-0123456789abcdef0) or by tags, not both and "
                "not neither",
                {},
            )
        return self


class GpuNodeSettings(StrictModel):
    """The GPU nodes training pods run on, provisioned by Karpenter from zero when a job is
    admitted and removed when empty (tainted `nvidia.com/gpu=true:NoSchedule`). One NodePool
    per instance family listed."""

    instance_types: list[str] = Field(min_length=1, max_length=10)
    capacity: Literal["on_demand", "spot"] = "on_demand"
    root_volume_gib: int = Field(200, ge=50, le=16384)
    # The zone an EFA pool (one cluster placement group) is pinned to; null: the first of
    # availability_zones. p4d/p4de/p5 are not offered in every zone, and which zone a name
    # means differs per account: check `aws ec2 describe-instance-type-offerings
    # --location-type availability-zone --filters Name=instance-type,Values=<type>`.
    efa_zone: str | None = None
    # The most GPUs the pools may hold at once (each NodePool's `limits`); Karpenter launches
    # nothing that would pass it.
    max_gpus: int = Field(ge=1, le=4096)
    # How long an empty GPU node lives before Karpenter removes it (consolidateAfter).
    empty_node_minutes: int = Field(5, ge=0, le=1440)
    # The EKS-optimized AL2023 AMI release GPU nodes boot (Karpenter picks its NVIDIA variant
    # for GPU types): pinned, so a new AMI reaches nodes through a config change, not overnight
    # drift (github.com/awslabs/amazon-eks-ami/releases lists them).
    ami_release: str = Field(pattern=r"^v\d{8}$")
    # Reserved capacity (ODCRs, Capacity Blocks) used before on-demand; empty: none.
    capacity_reservations: list[CapacityReservationSettings] = Field([], max_length=30)


class TeamSettings(StrictModel):
    """A team that trains on the cluster: its own namespace and LocalQueue, and a GPU quota in
    the shared ClusterQueue's cohort (it may borrow GPUs other teams leave idle)."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")
    gpu_quota: int = Field(ge=0, le=4096)


class ComputeSettings(StrictModel):
    """The EKS cluster: version, endpoint access, node groups, pinned add-ons and plugins."""

    kubernetes_version: str = Field(pattern=r"^1\.(2[89]|3[0-6])$")
    # Non-empty opens a public endpoint to these CIDRs beside the private one (dev only).
    public_endpoint_cidrs: list[str] = []
    # IAM roles or users given cluster-admin access entries (nobody else has standing access).
    admin_principal_arns: list[str] = Field([], max_length=20)
    system_nodes: SystemNodeSettings
    gpu_nodes: GpuNodeSettings
    # EKS managed add-on versions, pinned (aws eks describe-addon-versions lists them).
    addons: dict[
        Literal[
            "vpc-cni",
            "coredns",
            "kube-proxy",
            "eks-pod-identity-agent",
            "amazon-cloudwatch-observability",
        ],
        str,
    ]
    nvidia_device_plugin_version: str = Field(pattern=r"^v\d+\.\d+\.\d+$")
    efa_device_plugin_version: str = Field(pattern=r"^v\d+\.\d+\.\d+$")
    training_namespace: str = Field("training", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    trainer_service_account: str = Field("trainer", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    # Karpenter (GPU nodes from pending pods) and Kueue (queues, quotas, gang admission), each
    # at the release kiln vendors (platform_constructs/handlers/bundles).
    karpenter_version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    kueue_version: str = Field(pattern=r"^v\d+\.\d+\.\d+$")
    # Teams with a GPU quota; each trains in its own namespace, `<training_namespace>-<team>`.
    teams: list[TeamSettings] = Field(min_length=1, max_length=50)

    def team_namespace(self, team: str) -> str:
        """The namespace a team's training runs in (its LocalQueue and service account)."""
        return f"{self.training_namespace}-{team}"

    @property
    def team_namespaces(self) -> list[str]:
        return [self.team_namespace(team.name) for team in self.teams]

    @property
    def gpu_families(self) -> dict[str, list[str]]:
        """The listed GPU instance types by family (`p4d`), in the order listed."""
        families: dict[str, list[str]] = {}
        for instance_type in self.gpu_nodes.instance_types:
            families.setdefault(instance_type.split(".", 1)[0], []).append(instance_type)
        return families

    @field_validator("public_endpoint_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                net = ipaddress.ip_network(cidr, strict=True)
            except ValueError as err:
                raise PydanticCustomError(
                    "cidr",
                    "'{cidr}' is not a network in CIDR form ({err})",
                    {"cidr": cidr, "err": str(err)},
                ) from None
            if net.prefixlen == 0:
                raise PydanticCustomError(
                    "cidr",
                    "'{cidr}' opens the endpoint to the whole internet; list your "
                    "office or VPN ranges instead",
                    {"cidr": cidr},
                )
        if covers_the_internet(value):
            raise PydanticCustomError(
                "cidr",
                "{cidrs} together cover the whole internet (like 0.0.0.0/0); list your "
                "office or VPN ranges instead",
                {"cidrs": ", ".join(value)},
            )
        return value

    @field_validator("admin_principal_arns")
    @classmethod
    def _principals(cls, value: list[str]) -> list[str]:
        for arn in value:
            if not re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:(role|user)/[\w+=,.@/-]+", arn):
                raise PydanticCustomError(
                    "principal",
                    "'{arn}' is not an IAM role or user ARN like "
                    "arn:aws:iam::123456789012:role/platform-admins",
                    {"arn": arn},
                )
        return value

    @field_validator("addons")
    @classmethod
    def _all_addons(cls, value: dict[str, str]) -> dict[str, str]:
        missing = {
            "vpc-cni",
            "coredns",
            "kube-proxy",
            "eks-pod-identity-agent",
            "amazon-cloudwatch-observability",
        } - set(value)
        if missing:
            raise PydanticCustomError(
                "addons",
                "pin a version for every managed add-on; missing: {m}",
                {"m": ", ".join(sorted(missing))},
            )
        for name, version in value.items():
            if not re.fullmatch(r"v\d+\.\d+\.\d+-eksbuild\.\d+", version):
                raise PydanticCustomError(
                    "addons",
                    "{n}: '{v}' is not an EKS add-on version like v1.19.2-eksbuild.1",
                    {"n": name, "v": version},
                )
        return value


# A model.tar.gz (SageMaker unpacks it), or the S3 prefix of an uncompressed model directory
# (ending in "/": S3ModelDataSource "A valid key name prefix identified by S3Uri always ends with
# a forward slash"), under a key of its own (never a whole bucket: the role reads only the model).
MODEL_ARCHIVE_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/(.+/)?[^/]+\.tar\.gz$"
MODEL_PREFIX_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/([^/]+/)+$"
MODEL_ARTIFACT_PATTERN = f"{MODEL_ARCHIVE_PATTERN}|{MODEL_PREFIX_PATTERN}"
# S3ModelDataSource.S3Uri and ContainerDefinition.ModelDataUrl: at most 1024 characters.
MAX_MODEL_URI_CHARS = 1024
MODEL_ARTIFACT_FORMS = (
    "s3://<bucket>/<key>.tar.gz (a model archive, what training writes) or "
    "s3://<bucket>/<prefix>/ (an uncompressed model directory; the trailing / marks a prefix)"
)


def model_artifact_problem(artifact: str) -> str | None:
    """Why `artifact` cannot be served, in words, or None: its form, its bucket name and
    SageMaker's length limit."""
    if len(artifact) > MAX_MODEL_URI_CHARS:
        return (
            f"{artifact[:60]}... has {len(artifact)} characters; SageMaker takes an S3 URI of "
            f"at most {MAX_MODEL_URI_CHARS} (S3ModelDataSource.S3Uri, ModelDataUrl)"
        )
    if re.fullmatch(MODEL_ARCHIVE_PATTERN, artifact) or re.fullmatch(
        MODEL_PREFIX_PATTERN, artifact
    ):
        return None
    if not artifact.startswith("s3://"):
        return f"{artifact!r} is not an S3 URI; allowed: {MODEL_ARTIFACT_FORMS}"
    bucket, _, key = artifact[len("s3://") :].partition("/")
    if not 3 <= len(bucket) <= 63:
        return (
            f"{artifact!r}: the bucket name {bucket!r} has {len(bucket)} "
            f"character{'' if len(bucket) == 1 else 's'}; S3 bucket names have 3 to 63 (the "
            "artifacts bucket's name is the data-lake stack's ArtifactsBucketName output)"
        )
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*[a-z0-9]", bucket):
        return (
            f"{artifact!r}: the bucket name {bucket!r} is not valid: S3 bucket names use "
            "lower-case letters, digits, '.' and '-', and start and end with a letter or digit"
        )
    if not key:
        return f"{artifact!r} is a whole bucket; give the model's own: {MODEL_ARTIFACT_FORMS}"
    return (
        f"{artifact!r} is neither a .tar.gz archive nor a prefix; allowed: {MODEL_ARTIFACT_FORMS}"
    )


# A versioned model package (a registry version): `.../model-package/<group>/<version>`.
MODEL_PACKAGE_PATTERN = (
    r"^arn:aws[a-z-]*:sagemaker:[a-z0-9-]+:\d{12}:model-package/"
    r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}/\d+$"
)
# A model name in the registry: a package group `<project>-<model>` (at most 63 characters).
MODEL_NAME_PATTERN = r"^[a-z0-9](-?[a-z0-9]){0,39}$"


class DeploymentSettings(StrictModel):
    """How a new model version reaches traffic: blue/green with canary, linear or all-at-once
    shifting (the only one a single-instance fleet allows)."""

    traffic: Literal["canary", "linear", "all_at_once"] = "canary"
    # The canary's size, or each linear step's, in % of the new fleet (a canary is <= 50%).
    step_percent: int = Field(10, ge=1, le=50)
    # The same step in whole instances (SageMaker's INSTANCE_COUNT); when set, step_percent
    # is not used.
    step_instances: int | None = Field(None, ge=1, le=50)
    # Baking time after each shift while the rollback alarms watch.
    wait_minutes: int = Field(10, ge=0, le=60)
    # How long the old fleet stays after the last shift (instant rollback until then).
    termination_wait_minutes: int = Field(5, ge=0, le=60)
    max_deployment_minutes: int = Field(120, ge=10, le=240)


class RollbackAlarmSettings(StrictModel):
    """Thresholds of the alarms that roll a deployment back (and page on-call)."""

    error_rate_percent: float = Field(1.0, gt=0, le=100)
    latency_p99_ms: int = Field(2000, ge=1, le=600_000)
    evaluation_minutes: int = Field(3, ge=1, le=60)


class ScheduledScaleDownSettings(StrictModel):
    """Outside these UTC hours on weekdays (and all weekend) the endpoint runs at 1 instance."""

    work_start_hour_utc: int = Field(7, ge=0, le=23)
    work_end_hour_utc: int = Field(19, ge=1, le=24)

    @model_validator(mode="after")
    def _ordered(self) -> ScheduledScaleDownSettings:
        if self.work_end_hour_utc <= self.work_start_hour_utc:
            raise PydanticCustomError(
                "hours",
                "work_end_hour_utc ({e}) must be after work_start_hour_utc ({s})",
                {"e": self.work_end_hour_utc, "s": self.work_start_hour_utc},
            )
        return self


class AutoscalingSettings(StrictModel):
    """Target tracking on invocations per instance."""

    min_instances: int = Field(ge=1, le=100)
    max_instances: int = Field(ge=1, le=100)
    target_invocations_per_instance: int = Field(ge=1, le=100_000)
    scale_in_cooldown_seconds: int = Field(600, ge=0, le=3600)
    scale_out_cooldown_seconds: int = Field(60, ge=0, le=3600)
    scheduled_scale_down: ScheduledScaleDownSettings | None = None


class ServingSettings(StrictModel):
    """The SageMaker real-time endpoint: what it serves, on what, and how it changes."""

    # The model.tar.gz to serve; `-c modelArtifact=s3://...` overrides it at deploy time.
    # Without one, the serving stack holds the role, image and alarms but no endpoint.
    model_artifact: str | None = None
    # The registry version (model package ARN) the endpoint serves; `model_artifact` is then
    # that version's artifact (what the execution role may read). `kiln deploy-model
    # --model-package/--latest-approved` and the delivery pipeline set both
    # (`-c modelPackage=... -c modelArtifact=...`). Prod serves approved packages only.
    model_package: str | None = None
    # The version's inference specification that serves it: null for the primary (kiln's
    # server, as training registers it), else the additional one named by the engine (`lmi`).
    # CreateModel's ContainerDefinition.InferenceSpecificationName: 1-63 characters of
    # [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}. `kiln deploy-model` and the pipeline set it
    # (`-c inferenceSpecification=lmi`) from what the version holds.
    inference_specification: str | None = Field(None, pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
    instance_type: str = Field(pattern=r"^ml\.[a-z0-9]+\.[a-z0-9]+$")
    initial_instance_count: int = Field(ge=1, le=100)
    # Percent of requests whose bodies SageMaker captures (prompts and completions: only
    # where events.allow_raw_text is true).
    data_capture_percent: int = Field(0, ge=0, le=100)
    container_startup_timeout_seconds: int = Field(600, ge=60, le=3600)
    model_download_timeout_seconds: int = Field(600, ge=60, le=3600)
    deployment: DeploymentSettings = DeploymentSettings()
    alarms: RollbackAlarmSettings = RollbackAlarmSettings()
    autoscaling: AutoscalingSettings
    # The server's cap on a request's max_new_tokens ($KILN_MAX_NEW_TOKENS, set by the stack;
    # kiln's engine only: LMI bounds a request by max_model_len alone).
    max_new_tokens: int = Field(512, ge=1, le=32768)
    # What serves the model: kiln's own inference container, or SageMaker's LMI container
    # (vLLM) for what kiln's engine does not serve (tensor parallel over the instance's GPUs).
    engine: Literal["kiln", "lmi"] = "kiln"
    # Tokens of context per sequence (prompt + answer) the server is sized for; null: the
    # model's own. kiln: $KILN_MAX_SEQ_LEN; lmi: OPTION_MAX_MODEL_LEN.
    max_model_len: int | None = Field(None, ge=16, le=1_048_576)

    @field_validator("instance_type")
    @classmethod
    def _serving_instance(cls, value: str) -> str:
        # CreateEndpointConfig fails on a type SageMaker does not host; the catalog also knows
        # which types refuse a KMS key (kiln/instances.py).
        try:
            serving_instances.lookup(value)
        except serving_instances.UnknownServingInstanceError as err:
            raise PydanticCustomError("instance_type", "{err}", {"err": str(err)}) from None
        return value

    @field_validator("model_artifact")
    @classmethod
    def _artifact(cls, value: str | None) -> str | None:
        problem = None if value is None else model_artifact_problem(value)
        if problem is not None:
            raise PydanticCustomError("artifact", "{problem}", {"problem": problem})
        return value

    @field_validator("model_package")
    @classmethod
    def _package(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(MODEL_PACKAGE_PATTERN, value):
            raise PydanticCustomError(
                "artifact",
                "'{value}' is not the ARN of a model package version; allowed: "
                "arn:aws:sagemaker:<region>:<account>:model-package/<group>/<version> "
                "(`kiln models list` shows them)",
                {"value": value},
            )
        return value

    @model_validator(mode="after")
    def _specification_of_a_package(self) -> ServingSettings:
        if self.inference_specification is None:
            return self
        if self.model_package is None:
            raise PydanticCustomError(
                "artifact",
                "inference_specification names a registry version's specification, but no "
                "model_package is set: give the version too (`kiln deploy-model "
                "--model-package` passes both), or remove inference_specification",
                {},
            )
        if self.inference_specification != self.engine:
            raise PydanticCustomError(
                "artifact",
                "inference_specification '{name}' is not this environment's engine "
                "({engine}): an additional specification is named by the engine whose image "
                "it holds; name {engine}, or leave it out to serve the primary specification",
                {"name": self.inference_specification, "engine": self.engine},
            )
        return self

    @model_validator(mode="after")
    def _package_has_artifact(self) -> ServingSettings:
        if self.model_package is not None and self.model_artifact is None:
            raise PydanticCustomError(
                "artifact",
                "model_package is set without model_artifact: give the package's artifact too "
                "(`kiln models show` prints it), so the endpoint's role may read exactly it",
                {},
            )
        return self

    @model_validator(mode="after")
    def _rollout(self) -> ServingSettings:
        problems = rollout_problems(self)
        if problems:
            raise PydanticCustomError("rollout", "\n  - ".join(problems))
        return self

    @model_validator(mode="after")
    def _capacity(self) -> ServingSettings:
        scaling = self.autoscaling
        if not scaling.min_instances <= self.initial_instance_count <= scaling.max_instances:
            raise PydanticCustomError(
                "capacity",
                "initial_instance_count ({i}) must lie within autoscaling "
                "min_instances ({lo}) .. max_instances ({hi})",
                {
                    "i": self.initial_instance_count,
                    "lo": scaling.min_instances,
                    "hi": scaling.max_instances,
                },
            )
        return self


def engine_problems(serving: ServingSettings, region: str) -> list[str]:
    """What keeps `serving.engine` from running here: LMI's vLLM container needs GPUs (its
    tensor parallel degree is the instance's GPU count, from kiln's GPU catalog) and a
    registry of the pinned image in the region (kiln/lmi.py)."""
    if serving.engine != "lmi":
        return []
    problems = []
    family = serving_instances.lookup(serving.instance_type)
    if not family.gpu:
        problems.append(
            f"serving.engine: lmi runs vLLM on GPUs and {serving.instance_type} has none; "
            "choose a GPU type (ml.g5, ml.g6, ml.g6e, ml.p4d, ml.p5) or engine: kiln"
        )
    elif serving_instances.gpu_count(serving.instance_type) is None:
        problems.append(
            f"serving.engine: lmi sets its tensor parallel degree from the GPU count, and "
            f"kiln's GPU catalog (kiln/gpu_instances.py) has no entry for "
            f"{serving.instance_type}; add it there, or choose ml.g5, ml.g6, ml.g6e, ml.p4d "
            "or ml.p5"
        )
    unavailable = lmi.region_problem(region)
    if unavailable:
        problems.append(f"serving.engine: lmi: {unavailable}")
    return problems


def fleet_sizes(serving: ServingSettings) -> list[int]:
    """Every instance count the variant can have when a deployment starts: endpoint updates
    keep the scaled count (RetainAllVariantProperties), so anything autoscaling may reach,
    and 1 outside working hours where a scheduled scale-down is configured."""
    scaling = serving.autoscaling
    sizes = set(range(scaling.min_instances, scaling.max_instances + 1))
    sizes.add(serving.initial_instance_count)
    if scaling.scheduled_scale_down is not None:
        sizes.add(1)
    return sorted(sizes)


def step_instances(deployment: DeploymentSettings, fleet: int) -> int:
    """Instances one canary or linear step turns on in a fleet of `fleet`: a percentage is
    rounded up to whole instances (an instance cannot take a fraction of a step)."""
    if deployment.step_instances is not None:
        return deployment.step_instances
    return max(1, -(-deployment.step_percent * fleet // 100))


def traffic_shifts(deployment: DeploymentSettings, fleet: int) -> int:
    """How many times traffic moves (each followed by `wait_minutes` of baking): all at once
    1, canary 2 (the canary, then the rest), linear one per step until the fleet is covered."""
    if deployment.traffic == "all_at_once":
        return 1
    if deployment.traffic == "canary":
        return 2
    return -(-fleet // step_instances(deployment, fleet))


def rollout_problems(serving: ServingSettings) -> list[str]:
    """Deployment settings SageMaker refuses, or whose waits cannot fit the deployment timeout.

    AWS::SageMaker::Endpoint TrafficRoutingConfig: `CanarySize` "must be less than or equal
    to 50% of the variant's total instance count", `LinearStepSize` "must be 10-50% of the
    variant's total instance count"
    (https://docs.aws.amazon.com/AWSCloudFormation/latest/TemplateReference/aws-properties-sagemaker-endpoint-trafficroutingconfig.html);
    BlueGreenUpdatePolicy: `MaximumExecutionTimeoutInSeconds` "should be larger than the
    total waiting time specified in TerminationWaitInSeconds and WaitIntervalInSeconds"
    (https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_BlueGreenUpdatePolicy.html).
    Every fleet size a deployment can start from is checked (`fleet_sizes`).
    """
    deployment = serving.deployment
    problems: list[str] = []
    sizes = fleet_sizes(serving)
    step = (
        f"{deployment.step_instances} instance(s)"
        if deployment.step_instances is not None
        else f"{deployment.step_percent}%"
    )
    if deployment.traffic == "canary":
        refused = [n for n in sizes if 2 * step_instances(deployment, n) > n]
        if refused:
            problems.append(
                f"serving.deployment: a canary of {step} turns on more than half of a fleet of "
                f"{', '.join(map(str, refused))} instance(s) (SageMaker requires a canary of at "
                "most 50% of the variant's instances); use traffic: all_at_once where the "
                "endpoint can run 1 instance, or a smaller step, or a larger "
                "autoscaling.min_instances"
            )
    elif (
        deployment.traffic == "linear"
        and deployment.step_instances is None
        and (deployment.step_percent < 10)
    ):
        # A CAPACITY_PERCENT step is judged as given, before any rounding to instances.
        problems.append(
            f"serving.deployment.step_percent: {deployment.step_percent} is below what "
            "SageMaker allows for a linear step (TrafficRoutingConfig.LinearStepSize: "
            "10 to 50 percent); allowed: 10 to 50"
        )
    elif deployment.traffic == "linear":
        refused = [n for n in sizes if not 10 * n <= 100 * step_instances(deployment, n) <= 50 * n]
        if refused:
            problems.append(
                f"serving.deployment: a linear step of {step} is not 10-50% of a fleet of "
                f"{', '.join(map(str, refused))} instance(s) (SageMaker requires linear steps "
                "of 10-50% of the variant's instances); use traffic: all_at_once where the "
                "endpoint can run 1 instance, or another step"
            )
    if not problems:
        longest = max(
            traffic_shifts(deployment, n) * deployment.wait_minutes
            + deployment.termination_wait_minutes
            for n in sizes
        )
        if longest >= deployment.max_deployment_minutes:
            problems.append(
                f"serving.deployment: the waits add up to {longest} minutes (shifts x "
                "wait_minutes + termination_wait_minutes), which does not fit "
                f"max_deployment_minutes ({deployment.max_deployment_minutes}); SageMaker "
                "needs the deployment timeout to exceed the total waiting time: shorten the "
                "waits or raise max_deployment_minutes"
            )
    return problems


class ExperimentTrackingSettings(StrictModel):
    """An optional SageMaker managed MLflow tracking server (CreateMlflowTrackingServer's
    fields), its artifact store under the artifacts bucket's `mlflow/` prefix."""

    enabled: bool = False
    # "Small" for teams of up to 25 users, "Medium" up to 50, "Large" up to 100.
    size: Literal["Small", "Medium", "Large"] = "Small"
    # The server's MLflow version (SageMaker offers 2.13.x, 2.16.x, 3.0.x); clients should
    # match it (the `tracking` extra pins mlflow-skinny).
    mlflow_version: str = Field("3.0", pattern=r"^\d+\.\d+(\.\d+)?$")
    weekly_maintenance_window_start: str = Field(
        "Sun:03:00", pattern=r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun):([01]\d|2[0-3]):[0-5]\d$"
    )


class RegistrySettings(StrictModel):
    """The model registry: one SageMaker model package group per model name, created by the
    models stack of the environment that is its home (`home: true`); the other environments
    read it, and approve its versions for themselves."""

    # Each name is a package group `<project>-<name>`; training registers its runs there.
    models: list[Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]] = Field(
        ["llm"], min_length=1, max_length=20
    )
    # This environment's models stack creates the groups (exactly one environment per
    # registry); the others read them in `account` (null: their own account).
    home: bool = True
    account: str | None = Field(None, pattern=r"^\d{12}$")
    # On the home: the accounts of the environments that read the registry from another
    # account (the groups' resource policy and the registry key let them read, nothing else).
    reader_accounts: list[Annotated[str, Field(pattern=r"^\d{12}$")]] = Field([], max_length=20)
    # When set, readers must also belong to this AWS Organization (aws:PrincipalOrgID).
    organization_id: str | None = Field(None, pattern=r"^o-[a-z0-9]{10,32}$")

    @model_validator(mode="after")
    def _consistent(self) -> RegistrySettings:
        problems = []
        if len(set(self.models)) != len(self.models):
            problems.append(f"registry.models: a name is listed twice: {self.models}")
        if self.home and self.account is not None:
            problems.append(
                "registry.account: names another account's registry, but registry.home is "
                "true (this environment holds the registry); remove account or set home: false"
            )
        if not self.home and self.reader_accounts:
            problems.append(
                "registry.reader_accounts: only the registry's home lists its readers; move "
                "them to the home environment's file"
            )
        if problems:
            raise PydanticCustomError("invariant", "\n  - ".join(problems))
        return self


class ObservabilitySettings(StrictModel):
    """Who hears the alarms."""

    # Each address gets an SNS subscription to confirm; leave empty to subscribe by hand.
    alert_emails: list[Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]] = []


class EventSettings(StrictModel):
    """What prediction events may carry."""

    # Raw prompts and completions are user data: off unless the environment's owner opts in.
    allow_raw_text: bool = False


class Settings(StrictModel):
    """Everything that differs between environments. Field order matters: `tier` is read first."""

    name: str = Field(pattern=ENV_NAME_PATTERN)
    tier: Tier
    project: str = Field("kiln", pattern=r"^[a-z][a-z0-9-]{1,19}$")
    owner: str = Field(min_length=1, max_length=256)
    account: str | None = Field(None, pattern=r"^\d{12}$")
    region: str = Field(pattern=_REGION_PATTERN)
    availability_zones: list[str] = Field(min_length=2, max_length=6)
    termination_protection: bool
    removal_policy: RemovalPolicyName
    log_retention_days: int
    network: NetworkSettings
    data_lake: DataLakeSettings = DataLakeSettings()
    warehouse: WarehouseSettings = WarehouseSettings()
    streaming: StreamingSettings
    compute: ComputeSettings
    serving: ServingSettings
    observability: ObservabilitySettings = ObservabilitySettings()
    events: EventSettings = EventSettings()
    experiment_tracking: ExperimentTrackingSettings = ExperimentTrackingSettings()
    registry: RegistrySettings = RegistrySettings()

    @field_validator("log_retention_days")
    @classmethod
    def _retention(cls, value: int) -> int:
        if value not in LOG_RETENTION_DAYS:
            raise PydanticCustomError(
                "log_retention",
                "{value} is not a CloudWatch Logs retention; allowed: {allowed}",
                {"value": value, "allowed": ", ".join(map(str, LOG_RETENTION_DAYS))},
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        problems = [
            *self._name_problems(),
            *self._zone_problems(),
            *self._capacity_problems(),
            *self._data_plane_problems(),
            *self._compute_problems(),
            *self._prod_problems(),
            *self._documented_limit_problems(),
        ]
        if problems:
            raise PydanticCustomError("invariant", "\n  - ".join(problems))
        return self

    def _name_problems(self) -> list[str]:
        # The longest bucket name: <project>-<env>-access-logs-<12-digit account>-<region>.
        longest = len(f"{self.project}-{self.name}-access-logs-123456789012-{self.region}")
        if longest > 63:
            return [
                f"project: with environment {self.name!r} and region {self.region} the data "
                f"lake's bucket names reach {longest} characters, over S3's 63; shorten the "
                "project or environment name"
            ]
        return []

    def _zone_problems(self) -> list[str]:
        problems = []
        if len(set(self.availability_zones)) != len(self.availability_zones):
            problems.append(f"availability_zones: {self.availability_zones} repeats a zone")
        for zone in self.availability_zones:
            if not re.fullmatch(re.escape(self.region) + r"[a-z]", zone):
                problems.append(
                    f"availability_zones: {zone!r} is not a zone of region {self.region}: a "
                    f"zone is the region's name and a letter ({self.region}a, {self.region}b, "
                    f"{self.region}c); `aws ec2 describe-availability-zones --region "
                    f"{self.region}` lists the account's zones"
                )
        if self.network.nat_gateways > len(self.availability_zones):
            problems.append(
                f"network.nat_gateways: {self.network.nat_gateways} exceeds the "
                f"{len(self.availability_zones)} availability zones; allowed: 1 to "
                f"{len(self.availability_zones)}"
            )
        return problems

    def _capacity_problems(self) -> list[str]:
        """Emulates the CDK's aligned, in-order subnet allocation to fail early and clearly."""
        vpc = ipaddress.IPv4Network(self.network.vpc_cidr)
        layout = self.network.subnets
        cursor = 0
        for mask in (layout.public_mask, layout.private_mask, layout.isolated_mask):
            if mask < vpc.prefixlen:
                return [
                    f"network.subnets: a /{mask} subnet does not fit in the /{vpc.prefixlen} VPC"
                ]
            size = 2 ** (32 - mask)
            for _ in self.availability_zones:
                cursor = -(-cursor // size) * size + size
        if cursor > vpc.num_addresses:
            return [
                f"network.subnets: {len(self.availability_zones)} zones of /{layout.public_mask} "
                f"public, /{layout.private_mask} private and /{layout.isolated_mask} isolated "
                f"subnets need {cursor} addresses but network.vpc_cidr {vpc} has "
                f"{vpc.num_addresses}; use a larger VPC or smaller subnets"
            ]
        return []

    def _data_plane_problems(self) -> list[str]:
        problems = []
        zones = len(self.availability_zones)
        if self.warehouse.kind == "serverless" and zones < 3:
            problems.append(
                f"availability_zones: Redshift Serverless needs subnets in 3 zones, this "
                f"environment has {zones}; add a zone or set warehouse.kind: provisioned"
            )
        if zones > 3:
            problems.append(
                f"availability_zones: MSK places brokers in 2 or 3 zones, this environment "
                f"has {zones}; list 2 or 3"
            )
        return problems

    def _compute_problems(self) -> list[str]:
        compute = self.compute
        problems = []
        if compute.public_endpoint_cidrs and self.tier != "dev":
            problems.append(
                f"compute.public_endpoint_cidrs: a {self.tier}-tier cluster keeps its endpoint "
                "private; remove the CIDRs (reach it from the VPC or through a VPN)"
            )
        unknown = [t for t in compute.gpu_nodes.instance_types if t not in GPU_INSTANCES]
        if unknown:
            problems.append(
                f"compute.gpu_nodes.instance_types: {', '.join(unknown)} not supported; "
                f"allowed: {', '.join(sorted(GPU_INSTANCES))}"
            )
            return problems
        # One NodePool and EC2NodeClass per family: a node class names its network interfaces
        # (one EFA per network card), so a family's listed sizes must agree on that count.
        for family, types in compute.gpu_families.items():
            counts = {GPU_INSTANCES[t].efa_interfaces for t in types}
            if len(counts) > 1:
                problems.append(
                    f"compute.gpu_nodes.instance_types: the {family} sizes listed "
                    f"({', '.join(types)}) have different EFA interface counts "
                    f"({sorted(counts)}); one node class per family gives them one network "
                    "layout, so list sizes of one count"
                )
        zone = compute.gpu_nodes.efa_zone
        if zone is not None and zone not in self.availability_zones:
            problems.append(
                f"compute.gpu_nodes.efa_zone: {zone!r} is not one of availability_zones "
                f"({', '.join(self.availability_zones)})"
            )
        largest = max(GPU_INSTANCES[t].gpus for t in compute.gpu_nodes.instance_types)
        if compute.gpu_nodes.max_gpus < largest:
            problems.append(
                f"compute.gpu_nodes.max_gpus: {compute.gpu_nodes.max_gpus} is fewer than one "
                f"node of the largest listed type has ({largest}); Karpenter could never "
                "launch it"
            )
        problems += self._team_problems()
        return problems

    def _team_problems(self) -> list[str]:
        compute = self.compute
        problems = []
        names = [team.name for team in compute.teams]
        if len(set(names)) != len(names):
            problems.append(f"compute.teams: {names} repeats a team name")
        for namespace in compute.team_namespaces:
            if len(namespace) > 63:
                problems.append(
                    f"compute.teams: namespace {namespace!r} is longer than Kubernetes' 63 "
                    "characters; shorten the team name or compute.training_namespace"
                )
        for team in compute.teams:
            if team.gpu_quota > compute.gpu_nodes.max_gpus:
                problems.append(
                    f"compute.teams.{team.name}.gpu_quota: {team.gpu_quota} exceeds "
                    f"compute.gpu_nodes.max_gpus ({compute.gpu_nodes.max_gpus}); the nodes "
                    "could never hold it"
                )
        if not any(team.gpu_quota for team in compute.teams):
            problems.append("compute.teams: every gpu_quota is 0, so no job could be admitted")
        return problems

    def _prod_problems(self) -> list[str]:
        if self.tier != "prod":
            return []
        problems = []
        if not self.termination_protection:
            problems.append("termination_protection: must be true in a prod-tier environment")
        if self.removal_policy != "retain":
            problems.append(
                f"removal_policy: {self.removal_policy!r} is not allowed in a prod-tier "
                "environment; allowed: 'retain'"
            )
        if self.compute.gpu_nodes.capacity == "spot":
            problems.append(
                "compute.gpu_nodes.capacity: spot is not allowed in a prod-tier environment; "
                "allowed: 'on_demand'"
            )
        serving = self.serving
        if serving.initial_instance_count < 2 or serving.autoscaling.min_instances < 2:
            problems.append(
                "serving: a prod-tier endpoint runs at least 2 instances (one per zone "
                "survives an instance or zone failure); set initial_instance_count and "
                "autoscaling.min_instances to 2 or more"
            )
        if serving.autoscaling.scheduled_scale_down is not None:
            problems.append(
                "serving.autoscaling.scheduled_scale_down: not allowed in a prod-tier environment"
            )
        if self.network.nat_gateways < 2:
            problems.append(
                "network.nat_gateways: a prod-tier environment needs at least 2 NAT gateways "
                "so that one zone's failure does not cut egress"
            )
        return problems

    def _documented_limit_problems(self) -> list[str]:
        """Constraints the AWS API references document and no linter checks: a value past one
        of them fails CreateEndpointConfig/CreateEndpoint/CreateCluster/CreateWorkgroup/
        CreateAddon mid-deploy. Each names its source; README, "Rules for what AWS documents"."""
        problems: list[str] = []
        serving = self.serving
        # SageMaker AI pricing (Real-Time Inference): the families each region hosts.
        unavailable = serving_instances.region_problem(serving.instance_type, self.region)
        if unavailable:
            problems.append(f"serving.instance_type: {serving.instance_type}: {unavailable}")
        # The deployment's documented limits (CanarySize, LinearStepSize, the blue/green
        # timeout against its waits) are ServingSettings.rollout_problems', per fleet size.
        # Redshift Management Guide, "Compute capacity for Amazon Redshift Serverless": base
        # capacity up to 512 RPUs in steps of 8; 512 to 1024 in steps of 32, in five regions.
        base = self.warehouse.serverless.base_capacity
        if self.warehouse.kind == "serverless" and base > 512:
            if self.region not in REDSHIFT_1024_RPU_REGIONS:
                problems.append(
                    f"warehouse.serverless.base_capacity: {base} RPUs exceeds 512, the most "
                    f"Redshift Serverless allows in {self.region}; 1024 is offered in "
                    f"{', '.join(REDSHIFT_1024_RPU_REGIONS)}"
                )
            elif base % 32:
                problems.append(
                    f"warehouse.serverless.base_capacity: {base} RPUs; above 512 Redshift "
                    "Serverless takes steps of 32 (544, 576, ... 1024)"
                )
        # Amazon EKS User Guide, "Manage kube-proxy": each Kubernetes version has its own
        # kube-proxy add-on line (v<k8s minor>.x-eksbuild.N); CreateAddon refuses others.
        proxy = self.compute.addons.get("kube-proxy", "")
        if proxy and not proxy.startswith(f"v{self.compute.kubernetes_version}."):
            problems.append(
                f"compute.addons.kube-proxy: {proxy} is not built for Kubernetes "
                f"{self.compute.kubernetes_version}; use a v{self.compute.kubernetes_version}.x"
                "-eksbuild.N version (aws eks describe-addon-versions --addon-name kube-proxy "
                f"--kubernetes-version {self.compute.kubernetes_version})"
            )
        problems += engine_problems(serving, self.region)
        # CreateModelPackageGroup: a group name is at most 63 characters.
        for model in self.registry.models:
            if len(f"{self.project}-{model}") > 63:
                problems.append(
                    f"registry.models: {self.project}-{model} exceeds the 63 characters of a "
                    "model package group name; shorten the model name"
                )
        if self.account and self.account in self.registry.reader_accounts:
            problems.append(
                f"registry.reader_accounts: {self.account} is this environment's own account; "
                "list only the other environments' accounts"
            )
        # A registry in another account is what turns on the cross-account grants (the
        # reader's role reads the home's bucket, key and image): it must be another account.
        home = self.registry.account
        if home and self.account == home:
            problems.append(
                f"registry.account: {home} is this environment's own account; leave it out "
                "(a registry in the same account needs no cross-account access)"
            )
        package = serving.model_package
        if home and package and package.split(":")[4] != home:
            problems.append(
                f"serving.model_package: {package} is not in the registry's account ({home}, "
                "registry.account); deploy a version of the registry (`kiln models list`)"
            )
        # Privacy, not AWS: data capture stores request and response bodies (prompts and
        # completions), which only an environment that allows raw text may keep.
        if serving.data_capture_percent > 0 and not self.events.allow_raw_text:
            problems.append(
                f"serving.data_capture_percent: {serving.data_capture_percent} would store "
                "prompts and completions in the capture bucket, but events.allow_raw_text is "
                "false; set data_capture_percent: 0, or allow raw text"
            )
        return problems

    @property
    def is_prod(self) -> bool:
        return self.tier == "prod"

    @property
    def broker_count(self) -> int:
        """Brokers in the MSK cluster: always a multiple of the zone count."""
        return self.streaming.brokers_per_zone * len(self.availability_zones)

    @property
    def kafka_replication_factor(self) -> int:
        """3 where there are 3 or more brokers; otherwise every broker holds a replica."""
        return min(3, self.broker_count)


class DeliverySettings(StrictModel):
    """The optional CDK Pipelines delivery (`config/delivery.yaml`): test, then deploy the
    listed environments in order, with a manual approval before the ones that ask for it."""

    enabled: bool = False
    account: str | None = Field(None, pattern=r"^\d{12}$")
    region: str = Field("us-east-1", pattern=_REGION_PATTERN)
    repository: str = Field(pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
    branch: str = Field("main", min_length=1)
    # A CodeConnections (CodeStar) connection to the repository host, made once by hand.
    connection_arn: str | None = Field(
        None,
        pattern=r"^arn:aws[a-z-]*:(codeconnections|codestar-connections):[a-z0-9-]+:\d{12}:connection/[\w-]+$",
    )
    environments: list[str] = Field(min_length=1)
    manual_approval_before: list[str] = []
    smoke_prompt: str = Field("def fibonacci(n):", min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> DeliverySettings:
        problems = []
        if self.enabled and self.connection_arn is None:
            problems.append(
                "connection_arn: required when enabled (create a CodeConnections "
                "connection to the repository host first)"
            )
        unknown = [e for e in self.manual_approval_before if e not in self.environments]
        if unknown:
            problems.append(f"manual_approval_before: {unknown} are not in environments")
        if len(set(self.environments)) != len(self.environments):
            problems.append("environments: an environment is listed twice")
        if problems:
            raise PydanticCustomError("invariant", "\n  - ".join(problems))
        return self
