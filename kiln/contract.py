"""The names that cross runtimes, written once: stacks, the `kiln` tool, the workloads and the tests
import them from here instead of repeating literals.

A stack writes an output that the `kiln` tool reads; a stack sets a container variable that the
server reads; training writes under a bucket prefix that a role policy allows. Each pair agrees
because both sides name the constant below. Only the standard library is imported, so the
inference and training images can carry this file without the rest of kiln.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

# --- components (stacks) -------------------------------------------------------------------


class Component(StrEnum):
    """One deployable stack of an environment; its stack name is `<project>-<env>-<component>`."""

    NETWORK = "network"
    DATA_LAKE = "data-lake"
    STREAMING = "streaming"
    WAREHOUSE = "warehouse"
    COMPUTE = "compute"
    OBSERVABILITY = "observability"
    MODELS = "models"
    SERVING = "serving"

    @property
    def construct_id(self) -> str:
        """The stack's id inside its Stage (`DataLake`), and so the CDK CLI's selector
        `<env>/DataLake`: the CLI matches stacks inside a Stage by path, not by name."""
        return "".join(part.title() for part in self.value.split("-"))


# Deploy order: the order of the members above.
COMPONENTS: tuple[Component, ...] = tuple(Component)


# --- stack outputs -------------------------------------------------------------------------


@dataclass(frozen=True)
class StackOutput:
    """One CloudFormation output: the stack that writes it and its key."""

    component: Component
    key: str


class Outputs:
    """Every output a kiln stack writes. A stack writes `CfnOutput(self, X.key, ...)`; the `kiln`
    tool reads `aws.output(X)`; tests read the keys from the synthesized templates."""

    VPC_ID = StackOutput(Component.NETWORK, "VpcId")

    RAW_BUCKET = StackOutput(Component.DATA_LAKE, "RawBucketName")
    CURATED_BUCKET = StackOutput(Component.DATA_LAKE, "CuratedBucketName")
    ARTIFACTS_BUCKET = StackOutput(Component.DATA_LAKE, "ArtifactsBucketName")
    CAPTURE_BUCKET = StackOutput(Component.DATA_LAKE, "CaptureBucketName")
    DATA_LAKE_KEY_ARN = StackOutput(Component.DATA_LAKE, "DataLakeKeyArn")

    MSK_CLUSTER_ARN = StackOutput(Component.STREAMING, "ClusterArn")
    TOPICS = StackOutput(Component.STREAMING, "Topics")
    DELIVERY_STREAM_NAME = StackOutput(Component.STREAMING, "DeliveryStreamName")

    WAREHOUSE_KIND = StackOutput(Component.WAREHOUSE, "WarehouseKind")
    DATABASE = StackOutput(Component.WAREHOUSE, "Database")
    WAREHOUSE_ROLE_ARN = StackOutput(Component.WAREHOUSE, "WarehouseRoleArn")

    CLUSTER_NAME = StackOutput(Component.COMPUTE, "ClusterName")
    TRAINING_NAMESPACE = StackOutput(Component.COMPUTE, "TrainingNamespace")
    TRAINER_SERVICE_ACCOUNT = StackOutput(Component.COMPUTE, "TrainerServiceAccount")
    TRAINER_ROLE_ARN = StackOutput(Component.COMPUTE, "TrainerRoleArn")
    TRAINING_IMAGE_URI = StackOutput(Component.COMPUTE, "TrainingImageUri")
    SAGEMAKER_TRAINING_ROLE_ARN = StackOutput(Component.COMPUTE, "SageMakerTrainingRoleArn")
    TRAINING_SECURITY_GROUP_ID = StackOutput(Component.COMPUTE, "TrainingSecurityGroupId")
    TRAINING_SUBNET_IDS = StackOutput(Component.COMPUTE, "TrainingSubnetIds")
    # Only with experiment_tracking.enabled: the MLflow tracking URI of training runs.
    TRACKING_SERVER_ARN = StackOutput(Component.COMPUTE, "TrackingServerArn")

    ON_CALL_TOPIC_ARN = StackOutput(Component.OBSERVABILITY, "OnCallTopicArn")
    DASHBOARD_NAME = StackOutput(Component.OBSERVABILITY, "DashboardName")

    MODEL_PACKAGE_GROUPS = StackOutput(Component.MODELS, "ModelPackageGroups")
    REGISTRY_ACCOUNT = StackOutput(Component.MODELS, "RegistryAccount")
    REGISTRY_KEY_ARN = StackOutput(Component.MODELS, "RegistryKeyArn")

    ENDPOINT_NAME = StackOutput(Component.SERVING, "EndpointName")
    IMAGE_URI = StackOutput(Component.SERVING, "ImageUri")
    MODEL_ARTIFACT = StackOutput(Component.SERVING, "ModelArtifact")
    MODEL_PACKAGE = StackOutput(Component.SERVING, "ModelPackage")


# --- the data lake ---------------------------------------------------------------------------

# The lake's zones; each is one bucket `<project>-<env>-<zone>-<account>-<region>`, so stacks,
# the `kiln` tool and SageMaker address it by name.
LAKE_ZONES = ("raw", "curated", "artifacts", "capture", "access-logs")


def lake_bucket_output(zone: str) -> StackOutput:
    """The data lake stack's output holding a zone bucket's name (`ArtifactsBucketName`)."""
    return StackOutput(Component.DATA_LAKE, f"{zone.title()}BucketName")


# Prefixes of the artifacts bucket that training writes (its role may write nothing else) and
# serving reads: `checkpoints/<job>/`, and `models/<job>/.../model.tar.gz`.
CHECKPOINTS_PREFIX = "checkpoints/"
MODELS_PREFIX = "models/"


def is_model_prefix(artifact: str) -> bool:
    """Whether a model artifact is an uncompressed model directory's S3 prefix (it ends in
    "/", as S3ModelDataSource's prefixes do) rather than a model.tar.gz."""
    return artifact.endswith("/")


# The MLflow tracking server's artifact store (experiment_tracking), in the artifacts bucket.
MLFLOW_PREFIX = "mlflow/"
# What a training run's MLflow client calls on the tracking server (training/tracking.py: find
# or create the experiment and read it, create the run, log parameters and metrics in batches,
# set tags, read the run for its artifact location, end it): the training roles get these
# actions on that one server, no deletes, registry or UI (tests/training/
# test_tracking_sagemaker.py records the calls).
MLFLOW_TRAINING_ACTIONS = (
    "sagemaker-mlflow:GetExperimentByName",
    "sagemaker-mlflow:GetExperiment",
    "sagemaker-mlflow:CreateExperiment",
    "sagemaker-mlflow:CreateRun",
    "sagemaker-mlflow:GetRun",
    "sagemaker-mlflow:LogBatch",
    "sagemaker-mlflow:SetTag",
    "sagemaker-mlflow:UpdateRun",
)


def events_prefix(topic: str) -> str:
    """Where Firehose writes a topic's events in the raw zone (then `year=/month=/day=/hour=/`)."""
    return f"events/{topic}"


def errors_prefix(topic: str) -> str:
    """Where Firehose writes a topic's records it could not deliver, in the raw zone."""
    return f"errors/{topic}"


def capture_prefix(endpoint_name: str) -> str:
    """Where SageMaker data capture writes an endpoint's requests, in the capture bucket."""
    return f"endpoints/{endpoint_name}"


# --- the model registry ----------------------------------------------------------------------


def model_package_group(project: str, model: str) -> str:
    """The SageMaker model package group of one model name, e.g. `kiln-llm` (one per registry)."""
    return f"{project}-{model}"


class RegistryMetadata:
    """Keys of a model package version's CustomerMetadataProperties: training writes the run's
    record; `kiln models approve|reject` writes one approval per environment."""

    VAL_LOSS = "val_loss"
    VAL_PERPLEXITY = "val_perplexity"
    TOKENS = "tokens"
    STEPS = "steps"
    JOB = "job"
    DATA = "data"
    CODE_REVISION = "code_revision"
    HYPERPARAMETER_PREFIX = "hp."
    APPROVAL_PREFIX = "approval."  # approval.<env>: "approved by <arn> at <time>: <why>"

    @staticmethod
    def approval(environment: str) -> str:
        return f"{RegistryMetadata.APPROVAL_PREFIX}{environment}"


# --- Kubernetes: the GPU node group's taint and labels ---------------------------------------

# The compute stack puts them on the nodes; the device plugins and training pods tolerate and
# select them.
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}
NODE_POOL_LABEL_KEY = "kiln.dev/node-pool"
GPU_POOL_LABEL = (NODE_POOL_LABEL_KEY, "gpu")
SYSTEM_POOL_LABEL = (NODE_POOL_LABEL_KEY, "system")
# Kueue admits a job to the LocalQueue this label names (on the job object); Karpenter never
# consolidates or drifts a node away while a pod with this annotation runs on it.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
DO_NOT_DISRUPT = "karpenter.sh/do-not-disrupt"
# Every object of one training run carries it (kiln_cli.training_job).
TRAINING_JOB_LABEL = "kiln.dev/training-job"

# --- GPU metrics of a training job (Container Insights) ---------------------------------------
# The amazon-cloudwatch-observability add-on's CloudWatch agent publishes pod_gpu_* (from its
# DCGM exporter) under these dimension sets, among others: {ClusterName},
# {ClusterName, Namespace}, {ClusterName, Namespace, Service}, {ClusterName, Namespace,
# PodName}, {ClusterName, Namespace, PodName, FullPodName} (aws/amazon-cloudwatch-agent
# v1.300069.0, the add-on v6.2.0's agent: translator/translate/otel/exporter/awsemf/
# kubernetes.go, getGPUMetricDeclarations). With enhanced observability on (the add-on's
# default config) the agent prefers full names, and a pod owned by a Job gets PodName = the
# Job's name; FullPodName is the pod's own name (opentelemetry-collector-contrib, the amazon-
# contributing fork: awscontainerinsightreceiver/internal/stores/podstore.go,
# addPodOwnersAndPodName). Without that preference the agent would cut the Job's name at its
# first '-' or '.', and a Job whose name ends in '-' and a Unix time in minutes or seconds is
# taken for a CronJob's and loses that suffix (`cronjob_like_job_name`).
CONTAINER_INSIGHTS = "ContainerInsights"
POD_GPU_UTILIZATION = "pod_gpu_utilization"
GPU_JOB_DIMENSIONS = ("ClusterName", "Namespace", "PodName")
_UNIX_TIME_SUFFIX = re.compile(r"-\d{7,10}$")


def gpu_job_query(function: str, metric: str, cluster: str, namespace: str) -> str:
    """A Metrics Insights query with one series per training job (PodName) of a namespace."""
    schema = ", ".join(GPU_JOB_DIMENSIONS)
    return (
        f'SELECT {function}({metric}) FROM SCHEMA("{CONTAINER_INSIGHTS}", {schema}) '
        f"WHERE ClusterName = '{cluster}' AND Namespace = '{namespace}' GROUP BY PodName"
    )


def cronjob_like_job_name(name: str) -> bool:
    """Whether Container Insights would take a Job of this name for a CronJob's and report
    its GPU metrics under the name without its last segment (a run of 7 to 10 digits)."""
    return bool(_UNIX_TIME_SUFFIX.search(name))


# --- environment variables -------------------------------------------------------------------


class TrainerEnv:
    """What a training run's pods (EKS) or the trainer's flags' defaults read."""

    CHECKPOINT_DIR = "KILN_CHECKPOINT_DIR"  # checkpoints, written and resumed (S3 URI or path)
    OUTPUT_DIR = "KILN_OUTPUT_DIR"  # where the final model.tar.gz goes (S3 URI or path)
    JOB_NAME = "KILN_JOB_NAME"  # the run's name (tags metrics and checkpoints)
    # Registration of the finished run in the model registry (none set: no registration).
    MODEL_PACKAGE_GROUP = "KILN_MODEL_PACKAGE_GROUP"  # name or ARN of the package group
    REGISTRY_KEY_ARN = "KILN_REGISTRY_KEY_ARN"  # encrypts the version's record (optional)
    INFERENCE_IMAGE = "KILN_INFERENCE_IMAGE"  # the image that serves the version
    MODEL_ARTIFACT = "KILN_MODEL_ARTIFACT"  # SageMaker: the model.tar.gz SageMaker will write
    CODE_REVISION = "KILN_CODE_REVISION"  # the git commit the run's code came from
    DATA_URI = "KILN_DATA_URI"  # the data's S3 prefix (SageMaker: what the train channel reads)
    # MLflow's own variables (experiment tracking): `kiln train` sets the tracking server's ARN.
    TRACKING_URI = "MLFLOW_TRACKING_URI"
    EXPERIMENT = "MLFLOW_EXPERIMENT_NAME"


class ServerEnv:
    """What the inference container reads. The serving stack sets the identity and event
    variables; the tuning ones (`MAX_BATCH`...) default the server's flags."""

    MODEL_VERSION = "KILN_MODEL_VERSION"
    ENDPOINT_NAME = "KILN_ENDPOINT_NAME"
    EVENTS_CLUSTER_ARN = "KILN_EVENTS_CLUSTER_ARN"  # MSK: the server asks for its brokers
    EVENTS_BOOTSTRAP = "KILN_EVENTS_BOOTSTRAP"  # or brokers named directly (host:port,...)
    EVENTS_TOPIC = "KILN_EVENTS_TOPIC"  # no topic, no events
    EVENTS_REGION = "KILN_EVENTS_REGION"
    EVENTS_AUTH = "KILN_EVENTS_AUTH"  # iam (default) or plaintext (a loopback test cluster)
    ALLOW_RAW_TEXT = "KILN_ALLOW_RAW_TEXT"
    HOST = "KILN_HOST"
    MAX_BATCH = "KILN_MAX_BATCH"
    MAX_QUEUE = "KILN_MAX_QUEUE"
    REQUEST_TIMEOUT_S = "KILN_REQUEST_TIMEOUT_S"
    GRACEFUL_TIMEOUT_S = "KILN_GRACEFUL_TIMEOUT_S"
    MAX_NEW_TOKENS = "KILN_MAX_NEW_TOKENS"
    MAX_SEQ_LEN = "KILN_MAX_SEQ_LEN"
    THREADS = "KILN_THREADS"
    KV_CACHE_GIB = "KILN_KV_CACHE_GIB"
    PREFILL_CHUNK = "KILN_PREFILL_CHUNK"
    WEIGHT_DTYPE = "KILN_WEIGHT_DTYPE"
    CUDA_GRAPHS = "KILN_CUDA_GRAPHS"  # 1/0: decode steps captured as CUDA graphs (on CUDA)
    DEVICE = "KILN_DEVICE"
    LOG_LEVEL = "KILN_LOG_LEVEL"


# SageMaker stops a container with SIGTERM and kills it 30 s later (SageMaker Developer Guide,
# "Use Your Own Inference Code with Hosting Services": "... SIGKILL after 30 seconds"). The
# server drains in-flight requests for at most SERVER_DRAIN_SECONDS, then flushes prediction
# events for at most EVENT_FLUSH_SECONDS (plus 1 s to purge what is left); the rest is margin
# for stopping the engine thread and the process exit.
SAGEMAKER_STOP_SECONDS = 30
SERVER_DRAIN_SECONDS = 20
EVENT_FLUSH_SECONDS = 5


# --- SageMaker execution roles ---------------------------------------------------------------


@dataclass(frozen=True)
class SageMakerRuntime:
    """What a SageMaker execution role needs to run kiln's image for one kind of job
    (`Endpoints` or `TrainingJobs`): its log group, metrics namespace and the actions below.
    The serving construct and the compute stack's training role both build theirs from it."""

    kind: str

    @property
    def log_group(self) -> str:
        """The log group SageMaker writes this kind's logs to (one per endpoint: `/<name>`)."""
        return f"/aws/sagemaker/{self.kind}"

    @property
    def metrics_namespace(self) -> str:
        return f"/aws/sagemaker/{self.kind}"

    def log_streams_arn(self, *, partition: str, region: str, account: str, name: str = "") -> str:
        """The ARN of the log streams of this kind's log group (of endpoint `name`, if given)."""
        group = f"{self.log_group}/{name}" if name else self.log_group
        return f"arn:{partition}:logs:{region}:{account}:log-group:{group}:*"


SAGEMAKER_ENDPOINTS = SageMakerRuntime("Endpoints")
SAGEMAKER_TRAINING_JOBS = SageMakerRuntime("TrainingJobs")

# Pulling the image from its repository.
ECR_PULL_ACTIONS = (
    "ecr:BatchGetImage",
    "ecr:GetDownloadUrlForLayer",
    "ecr:BatchCheckLayerAvailability",
)
# Writing the job's logs.
LOG_WRITE_ACTIONS = (
    "logs:CreateLogGroup",
    "logs:CreateLogStream",
    "logs:PutLogEvents",
    "logs:DescribeLogStreams",
)
# Running in the VPC: SageMaker attaches network interfaces in the role's name.
VPC_ACCESS_ACTIONS = (
    "ec2:CreateNetworkInterface",
    "ec2:CreateNetworkInterfacePermission",
    "ec2:DeleteNetworkInterface",
    "ec2:DeleteNetworkInterfacePermission",
    "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeVpcs",
    "ec2:DescribeDhcpOptions",
    "ec2:DescribeSubnets",
    "ec2:DescribeSecurityGroups",
)

# The endpoint's one production variant: blue/green needs the same variant name in every
# endpoint config, and Application Auto Scaling addresses it as
# `endpoint/<endpoint>/variant/<this>`.
ENDPOINT_VARIANT = "AllTraffic"


def endpoint_scaling_resource_id(endpoint_name: str) -> str:
    """Application Auto Scaling's ResourceId of the endpoint's variant."""
    return f"endpoint/{endpoint_name}/variant/{ENDPOINT_VARIANT}"


ENDPOINT_SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
