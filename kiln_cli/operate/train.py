"""`kiln train`: a training run on SageMaker (CreateTrainingJob), on the EKS GPU nodes, or on
this machine with your AWS credentials (`--on local`).

All three read the dataset from the curated zone and write checkpoints to the artifacts bucket's
`checkpoints/<job>/` and the model to `models/<job>/`, the prefixes the trainer's role may
write. Trainer arguments (`--flag value` pairs) become SageMaker hyperparameters, or the
command line of `torchrun ... -m training.train` on EKS.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, cast, get_args

from kiln import naming, registry
from kiln.contract import (
    CHECKPOINTS_PREFIX,
    DO_NOT_DISRUPT,
    MODELS_PREFIX,
    QUEUE_LABEL,
    Component,
    Outputs,
    TrainerEnv,
    model_package_group,
)
from kiln.gpu_instances import UnknownInstanceTypeError, lookup
from kiln.memory_plan import PlanError
from kiln.settings import Settings
from kiln_cli import training_job
from kiln_cli.operate.aws import Aws, AwsError, OperateError, parse_s3_uri
from kiln_cli.operate.progress import Progress, elapsed, wait_for
from kiln_policy.guardrails import check_objects
from platform_constructs.gpu_capacity import queue_name

Platform = Literal["sagemaker", "eks", "local"]
Capacity = Literal["spot", "on_demand"]

# The trainer's JSON-lines metrics (training/README.md), as SageMaker metric definitions.
METRIC_DEFINITIONS: tuple[dict[str, str], ...] = (
    {"Name": "train:loss", "Regex": r'"train_loss": ([0-9.eE+-]+)'},
    {"Name": "validation:loss", "Regex": r'"val_loss": ([0-9.eE+-]+)'},
    {"Name": "validation:perplexity", "Regex": r'"val_perplexity": ([0-9.eE+-]+)'},
    {"Name": "train:tokens_per_s", "Regex": r'"tokens_per_s": ([0-9.eE+-]+)'},
)
SAGEMAKER_CHECKPOINT_DIR = "/opt/ml/checkpoints"  # synced with CheckpointConfig.S3Uri
# Trainer flags kiln sets itself (the channels, where checkpoints and the model go).
RESERVED_FLAGS = frozenset({"data", "val_data", "checkpoint_dir", "output_dir", "job_name"})
# The trainer's --model-format values (training/train.py), and how SageMaker writes each: a
# run that asks for the model directory uncompressed gets OutputDataConfig.CompressionType NONE.
MODEL_FORMATS = ("tarball", "directory", "both")
# Room for pod hostnames (`<job>-<index>`, `<job>-worker-<index>`) inside 63 characters.
MAX_JOB_NAME = 50
MAX_RUNTIME_HOURS = 28 * 24  # SageMaker's limit on MaxRuntimeInSeconds
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DONE = ("Completed", "Failed", "Stopped")

Apply = Callable[[Sequence[str], str], int]


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """What `kiln train` was asked for; None fields take the environment's defaults."""

    on: Platform
    name: str = "train"
    instance_type: str | None = None
    instance_count: int = 1
    data: str = "train/"
    val_data: str | None = None
    max_hours: float = 24.0
    max_wait_hours: float | None = None
    volume_gib: int = 100
    capacity: Capacity | None = None
    trainer_args: tuple[str, ...] = ()
    model: str | None = None  # for the memory plan (EKS), and the trainer when it can read it
    team: str | None = None  # EKS: whose namespace, queue and GPU quota (default: the first)
    # EKS: what runs the pods (`kiln_cli.training_job.Operator`, or a retired one, refused).
    operator: str | None = None
    # Register the finished run in the registry (in the registry's home environment, once the
    # models stack is deployed); the first of registry.models unless `register_model` names one.
    register: bool = True
    register_model: str | None = None


def job_name(settings: Settings, name: str, now: datetime) -> str:
    """`<project>-<env>-<name>-<YYYYmmdd-HHMMSS>`: unique, listed by `kiln status`."""
    prefix = naming.prefix(settings)
    room = MAX_JOB_NAME - len(prefix) - len("--20250101-000000")
    if not _NAME.fullmatch(name) or len(name) > room:
        raise OperateError(
            f"--name {name!r}: use at most {room} lowercase letters, digits and '-', starting "
            "with a letter (the job is named <project>-<env>-<name>-<timestamp>)",
            exit_code=2,
        )
    return f"{prefix}-{name}-{now:%Y%m%d-%H%M%S}"


def hyperparameters(trainer_args: Sequence[str]) -> dict[str, str]:
    """`--max-steps 100 --model=tiny` -> {"max_steps": "100", "model": "tiny"}.

    The trainer's flags all take a value, and SageMaker hands hyperparameters back to it as
    `--flag value` (training/sagemaker.py), so nothing is lost on the way.
    """
    args = list(trainer_args)
    result: dict[str, str] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--") or arg == "--":
            raise OperateError(
                f"trainer argument {arg!r}: give trainer flags as --flag value pairs after --",
                exit_code=2,
            )
        key, equals, value = arg[2:].partition("=")
        if equals:
            index += 1
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            value = args[index + 1]
            index += 2
        else:
            raise OperateError(
                f"trainer argument --{key} needs a value (flags that switch take true or false)",
                exit_code=2,
            )
        key = key.replace("-", "_")
        if key in RESERVED_FLAGS:
            raise OperateError(
                f"trainer argument --{key.replace('_', '-')} is set by kiln train: use its "
                "--data and --val-data (curated-zone prefixes); checkpoints and the model go "
                "to the artifacts bucket",
                exit_code=2,
            )
        result[key] = value
    return result


def curated_uri(bucket: str, location: str) -> str:
    """A curated-zone prefix (`train/`) or `s3://<curated bucket>/...` as a folder URI."""
    if location.startswith("s3://"):
        other, _, prefix = location[5:].partition("/")
        if other != bucket:
            raise OperateError(
                f"{location}: training reads only the curated zone (s3://{bucket}/); copy the "
                "data there or give a prefix inside it",
                exit_code=2,
            )
        location = prefix
    prefix = location.strip("/")
    if not prefix:
        raise OperateError("the dataset prefix is empty: name a folder of the curated zone", 2)
    return f"s3://{bucket}/{prefix}/"


def _check_dataset(aws: Aws, uri: str, warn: Callable[[str], None]) -> None:
    bucket, _, prefix = uri[5:].partition("/")
    try:
        listed = aws.call("s3", "list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except AwsError as err:
        warn(f"could not check {uri} for data ({err.code}); starting anyway")
        return
    if not listed.get("KeyCount"):
        raise OperateError(
            f"no objects under {uri}: upload the dataset first "
            f"(`aws s3 sync ./my-text {uri}`), or point --data at its prefix"
        )


def _capacity(settings: Settings, asked: Capacity | None) -> Capacity:
    allowed: Capacity = "spot" if settings.compute.gpu_nodes.capacity == "spot" else "on_demand"
    if asked == "spot" and (allowed != "spot" or settings.tier == "prod"):
        raise OperateError(
            f"spot training is not allowed in {settings.name}: compute.gpu_nodes.capacity is "
            f"{settings.compute.gpu_nodes.capacity} in its config (prod never uses spot)",
            exit_code=2,
        )
    return asked or allowed


def _eks_only(options: TrainOptions) -> None:
    """Refuses options that only EKS runs use."""
    if options.operator is not None:
        raise OperateError(
            "--operator applies to --on eks; SageMaker runs the containers itself", exit_code=2
        )


def _instance_type(settings: Settings, asked: str | None, on: Platform) -> str:
    base = (asked or settings.compute.gpu_nodes.instance_types[0]).removeprefix("ml.")
    return f"ml.{base}" if on == "sagemaker" else base


def _limits(options: TrainOptions) -> tuple[int, int | None]:
    if not 0 < options.max_hours <= MAX_RUNTIME_HOURS:
        raise OperateError(f"--max-hours must lie in (0, {MAX_RUNTIME_HOURS}]", exit_code=2)
    runtime = int(options.max_hours * 3600)
    if options.max_wait_hours is None:
        return runtime, 2 * runtime
    wait = int(options.max_wait_hours * 3600)
    if wait < runtime:
        raise OperateError("--max-wait-hours must be at least --max-hours", exit_code=2)
    return runtime, wait


def sagemaker_request(
    settings: Settings,
    *,
    job: str,
    image: str,
    role_arn: str,
    subnets: Sequence[str],
    security_group: str,
    train_uri: str,
    val_uri: str | None,
    artifacts_bucket: str,
    options: TrainOptions,
) -> dict[str, Any]:
    """The CreateTrainingJob request of one run."""
    if options.instance_count < 1:
        raise OperateError("--instance-count must be at least 1", exit_code=2)
    if options.volume_gib < 1:
        raise OperateError("--volume-gib must be at least 1", exit_code=2)
    spot = _capacity(settings, options.capacity) == "spot"
    runtime, wait = _limits(options)
    uncompressed = model_format(options.trainer_args, "sagemaker") == "directory"
    channels = [("train", train_uri)] + ([("validation", val_uri)] if val_uri else [])
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": runtime}
    if spot and wait is not None:
        stopping["MaxWaitTimeInSeconds"] = wait
    return {
        "TrainingJobName": job,
        "RoleArn": role_arn,
        "AlgorithmSpecification": {
            "TrainingImage": image,
            "TrainingInputMode": "File",
            "MetricDefinitions": [dict(m) for m in METRIC_DEFINITIONS],
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "HyperParameters": hyperparameters(options.trainer_args),
        "InputDataConfig": [
            {
                "ChannelName": channel,
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": uri,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
                "InputMode": "File",
            }
            for channel, uri in channels
        ],
        # SageMaker writes <path>/<job>/output/model.tar.gz, or with CompressionType NONE the
        # files of /opt/ml/model under <path>/<job>/output/model/; the bucket's default SSE-KMS
        # (the lake key) encrypts them, so no KmsKeyId (that would need kms:Encrypt for the role).
        "OutputDataConfig": {
            "S3OutputPath": f"s3://{artifacts_bucket}/{MODELS_PREFIX}".rstrip("/"),
            **({"CompressionType": "NONE"} if uncompressed else {}),
        },
        "ResourceConfig": {
            "InstanceType": _instance_type(settings, options.instance_type, "sagemaker"),
            "InstanceCount": options.instance_count,
            "VolumeSizeInGB": options.volume_gib,
        },
        "VpcConfig": {"SecurityGroupIds": [security_group], "Subnets": list(subnets)},
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": spot,
        "CheckpointConfig": {
            "S3Uri": f"s3://{artifacts_bucket}/{CHECKPOINTS_PREFIX}{job}/",
            "LocalPath": SAGEMAKER_CHECKPOINT_DIR,
        },
        "Tags": [
            {"Key": "project", "Value": settings.project},
            {"Key": "environment", "Value": settings.name},
            {"Key": "owner", "Value": settings.owner},
        ],
    }


def model_format(trainer_args: Sequence[str], on: Platform) -> str:
    """The trainer's --model-format of this run (default tarball), checked for `on`.

    SageMaker uploads /opt/ml/model once, either as model.tar.gz (CompressionType GZIP, the
    default) or file by file (NONE), so `both` has no SageMaker form; on EKS the trainer
    uploads the model itself and writes either or both."""
    value = hyperparameters(trainer_args).get("model_format", "tarball")
    if value not in MODEL_FORMATS:
        raise OperateError(
            f"trainer argument --model-format {value!r}: use one of {', '.join(MODEL_FORMATS)}",
            exit_code=2,
        )
    if value == "both" and on == "sagemaker":
        raise OperateError(
            "trainer argument --model-format both: SageMaker writes the model either as "
            "model.tar.gz or uncompressed (OutputDataConfig.CompressionType), not both; use "
            "tarball, or directory for a large model served from its S3 prefix",
            exit_code=2,
        )
    return value


def tracking_environment(aws: Aws) -> dict[str, str]:
    """$MLFLOW_TRACKING_URI for the run: the environment's MLflow tracking server (the compute
    stack's TrackingServerArn output) when `experiment_tracking.enabled`; the trainer's
    `sagemaker-mlflow` plugin signs its requests with the run's own role. A `--tracking-uri`
    among the trainer arguments still wins (the trainer prefers its flag)."""
    if not aws.settings.experiment_tracking.enabled:
        return {}
    return {TrainerEnv.TRACKING_URI: aws.output(Outputs.TRACKING_SERVER_ARN)}


def registration_environment(
    aws: Aws,
    options: TrainOptions,
    *,
    artifact: str,
    data_uri: str,
    warn: Callable[[str], None],
) -> dict[str, str]:
    """The trainer's $KILN_* variables that make it register its finished run: the group, the
    registry key, the serving image, the artifact, the data and the code revision. Empty (and a
    warning saying why) where the run cannot register; the run itself goes ahead."""
    settings = aws.settings
    if not options.register:
        return {}
    if not settings.registry.home:
        warn(
            f"not registering the run: {settings.name} reads the registry of another "
            "environment; train in the registry's home to register versions"
        )
        return {}
    model = options.register_model or settings.registry.models[0]
    if model not in settings.registry.models:
        raise OperateError(
            f"--register-model {model!r} is not in registry.models "
            f"({', '.join(settings.registry.models)})",
            exit_code=2,
        )
    if aws.stack(Component.MODELS) is None or aws.stack(Component.SERVING) is None:
        warn(
            "not registering the run: deploy the models and serving stacks first "
            f"(`npx cdk deploy --all -c env={settings.name}`), or pass --no-register"
        )
        return {}
    return {
        TrainerEnv.MODEL_PACKAGE_GROUP: model_package_group(settings.project, model),
        TrainerEnv.REGISTRY_KEY_ARN: aws.output(Outputs.REGISTRY_KEY_ARN),
        # kiln's server is the version's primary specification; the trainer adds the pinned
        # LMI container as its `lmi` specification (kiln/registry.py), so one version serves
        # with either engine.
        TrainerEnv.INFERENCE_IMAGE: aws.output(Outputs.IMAGE_URI),
        TrainerEnv.MODEL_ARTIFACT: artifact,
        TrainerEnv.DATA_URI: data_uri,
        TrainerEnv.CODE_REVISION: registry.git_revision(),
    }


def sagemaker_artifact(request: dict[str, Any]) -> str:
    """Where SageMaker puts the model of `request`'s job: its model.tar.gz, or uncompressed
    (CompressionType NONE) the prefix of the model directory's files, which registers and
    deploys as S3Prefix model data (kiln.contract.is_model_prefix)."""
    output = request["OutputDataConfig"]
    base = f"{output['S3OutputPath']}/{request['TrainingJobName']}/output"
    return f"{base}/model/" if output.get("CompressionType") == "NONE" else f"{base}/model.tar.gz"


@dataclass(frozen=True)
class Started:
    job: str
    artifact: str
    summary: list[tuple[str, str]]
    request: dict[str, Any] | None = None  # SageMaker
    manifests: str | None = None  # EKS (YAML)
    command: list[str] | None = None  # local: the trainer's command line ...
    environment: dict[str, str] | None = None  # ... and what it adds to this environment


def _data_uris(
    aws: Aws, options: TrainOptions, warn: Callable[[str], None]
) -> tuple[str, str | None]:
    curated = aws.output(Outputs.CURATED_BUCKET)
    train_uri = curated_uri(curated, options.data)
    val_uri = curated_uri(curated, options.val_data) if options.val_data else None
    for uri in (train_uri, val_uri):
        if uri:
            _check_dataset(aws, uri, warn)
    return train_uri, val_uri


def start_sagemaker(
    aws: Aws,
    options: TrainOptions,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
    warn: Callable[[str], None] = lambda text: print(f"kiln train: {text}", file=sys.stderr),
) -> Started:
    """Creates the SageMaker training job (or only builds its request with `dry_run`)."""
    settings = aws.settings
    _eks_only(options)
    job = job_name(settings, options.name, now or datetime.now(UTC))
    hyperparameters(options.trainer_args)  # bad arguments fail before any AWS call
    _capacity(settings, options.capacity)
    _limits(options)
    image = aws.output(Outputs.TRAINING_IMAGE_URI)
    role_arn = aws.output(Outputs.SAGEMAKER_TRAINING_ROLE_ARN)
    security_group = aws.output(Outputs.TRAINING_SECURITY_GROUP_ID)
    subnets = [s for s in aws.output(Outputs.TRAINING_SUBNET_IDS).split(",") if s]
    artifacts = aws.output(Outputs.ARTIFACTS_BUCKET)
    train_uri, val_uri = _data_uris(aws, options, warn)
    request = sagemaker_request(
        settings,
        job=job,
        image=image,
        role_arn=role_arn,
        subnets=subnets,
        security_group=security_group,
        train_uri=train_uri,
        val_uri=val_uri,
        artifacts_bucket=artifacts,
        options=options,
    )
    environment = registration_environment(
        aws, options, artifact=sagemaker_artifact(request), data_uri=train_uri, warn=warn
    )
    environment.update(tracking_environment(aws))
    if environment:
        request["Environment"] = environment
    if not dry_run:
        try:
            aws.call("sagemaker", "create_training_job", **request)
        except AwsError as err:
            if err.code == "ResourceLimitExceeded":
                kind = "spot training" if request["EnableManagedSpotTraining"] else "training"
                raise OperateError(
                    f"SageMaker refused the job: {err.aws_message} Request a higher quota for "
                    f"'{request['ResourceConfig']['InstanceType']} for {kind} job usage' in "
                    f"Service Quotas ({aws.region}), or pick another --instance-type."
                ) from err
            raise
    resources = request["ResourceConfig"]
    summary = [
        ("job", job),
        ("instances", f"{resources['InstanceCount']} x {resources['InstanceType']}"),
        ("capacity", "managed spot" if request["EnableManagedSpotTraining"] else "on-demand"),
        (
            "data",
            ", ".join(c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]),
        ),
        ("checkpoints", request["CheckpointConfig"]["S3Uri"]),
        ("model", sagemaker_artifact(request)),
        ("registry", environment.get(TrainerEnv.MODEL_PACKAGE_GROUP, "-")),
        ("tracking", environment.get(TrainerEnv.TRACKING_URI, "-")),
        ("max runtime", elapsed(request["StoppingCondition"]["MaxRuntimeInSeconds"])),
    ]
    return Started(job, sagemaker_artifact(request), summary, request=request)


def follow_sagemaker(
    aws: Aws,
    job: str,
    *,
    progress: Progress,
    interval: float = 30.0,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Follows a training job to its end; returns its last DescribeTrainingJob."""
    last: dict[str, Any] = {}

    def poll() -> tuple[str, str]:
        last.clear()
        last.update(aws.call("sagemaker", "describe_training_job", TrainingJobName=job))
        status = str(last["TrainingJobStatus"])
        secondary = str(last.get("SecondaryStatus", ""))
        if status in _DONE:
            return status, secondary if secondary and secondary != status else ""
        transitions = last.get("SecondaryStatusTransitions") or [{}]
        return status, f"{secondary}: {transitions[-1].get('StatusMessage', '')}".rstrip(": ")

    wait_for(
        poll,
        _DONE,
        progress=progress,
        subject=f"training job {job}",
        interval=interval,
        timeout=timeout,
        hint=f"kiln status --env {aws.settings.name}",
        sleep=sleep,
    )
    return dict(last)


def eks_manifests(
    aws: Aws,
    options: TrainOptions,
    *,
    now: datetime | None = None,
    warn: Callable[[str], None] = lambda text: print(f"kiln train: {text}", file=sys.stderr),
) -> Started:
    """The run's Kubernetes objects (`kiln_cli.training_job`) with names from the stacks."""
    settings = aws.settings
    if options.capacity is not None:
        raise OperateError(
            "--capacity applies to --on sagemaker; on EKS the GPU node group's capacity "
            "(compute.gpu_nodes.capacity) decides",
            exit_code=2,
        )
    operator = options.operator or "none"
    if operator in training_job.RETIRED_OPERATORS:
        message = training_job.RETIRED_OPERATORS[operator]
        raise OperateError(
            f"--operator {operator}: {message.format(release=training_job.TRAINER_RELEASE)}",
            exit_code=2,
        )
    if operator not in get_args(training_job.Operator):
        raise OperateError(f"--operator {operator!r}: use none or trainer", exit_code=2)
    job = job_name(settings, options.name, now or datetime.now(UTC))
    hyperparameters(options.trainer_args)  # the same checks as on SageMaker
    form = model_format(options.trainer_args, "eks")
    runtime, _ = _limits(options)
    image = aws.output(Outputs.TRAINING_IMAGE_URI)
    artifacts = aws.output(Outputs.ARTIFACTS_BUCKET)
    train_uri, val_uri = _data_uris(aws, options, warn)
    instance_type = _instance_type(settings, options.instance_type, "eks")
    try:
        gpus = lookup(instance_type).gpus
    except UnknownInstanceTypeError:
        gpus = 1  # the spec names the unknown type
    data_args = ["--data", train_uri] + (["--val-data", val_uri] if val_uri else [])
    trainer_args = training_job.model_trainer_args(
        options.model, [*data_args, *options.trainer_args]
    )

    def read_s3(uri: str) -> bytes:
        bucket, key = parse_s3_uri(uri)
        try:
            body: bytes = aws.call("s3", "get_object", Bucket=bucket, Key=key)["Body"].read()
        except AwsError as err:
            raise PlanError(training_job.s3_problem(uri, err.code, str(err))) from None
        return body

    try:
        plan = training_job.memory_plan(
            options.model,
            instance_type,
            options.instance_count * gpus,
            trainer_args,
            read_s3=read_s3,
        )
    except (PlanError, UnknownInstanceTypeError, ValueError) as err:
        raise OperateError(f"--model: {err}", exit_code=2) from err
    warn(plan.render().rstrip())
    if (problem := training_job.plan_problem(plan, gpus)) is not None:
        raise OperateError(f"refused, nothing applied: {problem}", exit_code=2)
    output = f"s3://{artifacts}/{MODELS_PREFIX}{job}/"
    namespace, queue = team_queue(settings, options.team)
    # The trainer writes <output>/model.tar.gz, or the directory under <output>/model/ alone.
    artifact = f"{output}model/" if form == "directory" else f"{output}model.tar.gz"
    environment = registration_environment(
        aws, options, artifact=artifact, data_uri=train_uri, warn=warn
    )
    # On EKS the trainer uploads the model itself and registers the URI it wrote.
    environment.pop(TrainerEnv.MODEL_ARTIFACT, None)
    environment.update(tracking_environment(aws))
    try:
        spec = training_job.TrainingJobSpec(
            name=job,
            image=image,
            instance_type=instance_type,
            nodes=options.instance_count,
            gpus_per_node=gpus,
            checkpoint_path=f"s3://{artifacts}/{CHECKPOINTS_PREFIX}{job}/",
            output_path=output,
            namespace=namespace,
            service_account=settings.compute.trainer_service_account,
            trainer_args=training_job.planned_trainer_args(plan, trainer_args),
            active_deadline_seconds=runtime,
            operator=cast(training_job.Operator, operator),
            # Kueue admits the run from its team's queue, whole; Karpenter never takes a node
            # from under its pods (the guardrail below checks both).
            workload_labels={QUEUE_LABEL: queue},
            pod_annotations={DO_NOT_DISRUPT: "true"},
            env=environment,
        )
    except training_job.TrainingJobError as err:
        problems = "; ".join(f"{arg}: {message}" for arg, message in err.problems)
        raise OperateError(f"cannot render the run: {problems}", exit_code=2) from err
    manifests = training_job.render(spec)
    violations = check_objects(manifests)
    if violations:
        raise OperateError("refused, nothing applied: " + "; ".join(violations), exit_code=2)
    summary = [
        ("job", job),
        ("nodes", f"{spec.nodes} x {instance_type} ({gpus} GPU{'s' if gpus > 1 else ''} each)"),
        ("namespace", f"{spec.namespace} (service account {spec.service_account})"),
        ("queue", f"{queue} (Kueue; {spec.nodes * gpus} GPUs, admitted all at once)"),
        ("objects", ", ".join(m["kind"] for m in manifests)),
        ("data", ", ".join(u for u in (train_uri, val_uri) if u)),
        ("checkpoints", spec.checkpoint_path),
        ("model", artifact),
        ("registry", environment.get(TrainerEnv.MODEL_PACKAGE_GROUP, "-")),
        ("tracking", environment.get(TrainerEnv.TRACKING_URI, "-")),
        (
            "memory",
            f"{plan.total / (1 << 30):.1f} GiB of {plan.capacity / (1 << 30):.1f} per GPU"
            f" ({plan.strategy})",
        ),
    ]
    yaml_text = training_job.to_yaml(manifests)
    return Started(job, artifact, summary, manifests=yaml_text)


def team_queue(settings: Settings, team: str | None) -> tuple[str, str]:
    """(namespace, LocalQueue) of a team; the first configured team by default."""
    teams = [t.name for t in settings.compute.teams]
    name = team or teams[0]
    if name not in teams:
        raise OperateError(
            f"--team {name!r} is not a team of {settings.name}; configured: {', '.join(teams)} "
            "(compute.teams)",
            exit_code=2,
        )
    return settings.compute.team_namespace(name), queue_name(name)


def run_with_input(argv: Sequence[str], text: str) -> int:
    """Runs a command with `text` on its stdin (`kubectl apply -f -`); its exit status."""
    return subprocess.run(list(argv), input=text, text=True, check=False).returncode


def apply_manifests(aws: Aws, started: Started, apply: Apply | None = None) -> None:
    """Applies the run with `kubectl apply -f -`; OperateError when kubectl is missing or fails."""
    cluster = aws.output(Outputs.CLUSTER_NAME)
    kubeconfig = f"aws eks update-kubeconfig --name {cluster} --region {aws.region}"
    if apply is None:
        if shutil.which("kubectl") is None:
            raise OperateError(
                f"kubectl is not on PATH: install it (then `{kubeconfig}`), or leave out "
                "--apply and pipe the printed YAML to `kubectl apply -f -`"
            )
        apply = run_with_input
    if started.manifests is None:
        raise OperateError("nothing to apply: the run was not rendered for EKS")
    code = apply(["kubectl", "apply", "-f", "-"], started.manifests)
    if code != 0:
        raise OperateError(
            f"kubectl apply failed (exit {code}): is kubectl pointed at cluster {cluster}? "
            f"(`{kubeconfig}`; your identity needs an access entry on the cluster)"
        )


def local_run(
    aws: Aws,
    options: TrainOptions,
    *,
    now: datetime | None = None,
    warn: Callable[[str], None] = lambda text: print(f"kiln train: {text}", file=sys.stderr),
) -> Started:
    """The trainer's command and variables for a run on this machine with your AWS credentials:
    the same data, checkpoint and model prefixes as on EKS (the trainer reads and writes S3
    itself), registration in the registry's home, and the MLflow tracking server."""
    settings = aws.settings
    for given, flag in (
        (options.operator is not None, "--operator"),
        (options.capacity is not None, "--capacity"),
        (options.instance_type is not None, "--instance-type"),
        (options.instance_count != 1, "--instance-count"),
    ):
        if given:
            raise OperateError(f"{flag} applies to --on sagemaker or eks", exit_code=2)
    job = job_name(settings, options.name, now or datetime.now(UTC))
    hyperparameters(options.trainer_args)
    form = model_format(options.trainer_args, "local")
    artifacts = aws.output(Outputs.ARTIFACTS_BUCKET)
    train_uri, val_uri = _data_uris(aws, options, warn)
    output = f"s3://{artifacts}/{MODELS_PREFIX}{job}/"
    artifact = f"{output}model/" if form == "directory" else f"{output}model.tar.gz"
    environment = registration_environment(
        aws, options, artifact=artifact, data_uri=train_uri, warn=warn
    )
    environment.pop(TrainerEnv.MODEL_ARTIFACT, None)  # the trainer registers what it wrote
    environment.update(tracking_environment(aws))
    environment.update(
        {
            TrainerEnv.JOB_NAME: job,
            TrainerEnv.CHECKPOINT_DIR: f"s3://{artifacts}/{CHECKPOINTS_PREFIX}{job}/",
            TrainerEnv.OUTPUT_DIR: output,
        }
    )
    command = [
        sys.executable,
        "-m",
        "training.train",
        "--data",
        train_uri,
        *(["--val-data", val_uri] if val_uri else []),
        *options.trainer_args,
    ]
    summary = [
        ("job", job),
        ("where", "this machine, with your AWS credentials"),
        ("data", ", ".join(u for u in (train_uri, val_uri) if u)),
        ("checkpoints", environment[TrainerEnv.CHECKPOINT_DIR]),
        ("model", artifact),
        ("registry", environment.get(TrainerEnv.MODEL_PACKAGE_GROUP, "-")),
        ("tracking", environment.get(TrainerEnv.TRACKING_URI, "-")),
    ]
    return Started(job, artifact, summary, command=command, environment=environment)
