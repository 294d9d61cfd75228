"""The serving stack: the inference image, and the guarded SageMaker endpoint of one model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aws_cdk import Aws, CfnOutput, DefaultStackSynthesizer, Stack, Validations
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

from kiln import instances as serving_instances
from kiln import lmi, naming
from kiln.contract import SERVER_DRAIN_SECONDS, Component, Outputs, ServerEnv
from kiln.settings import Settings
from platform_constructs.endpoint import GuardedEndpoint, Scaling, TrafficShifting
from platform_constructs.kms import PlatformKey
from platform_constructs.model_sharing import (
    cross_account_model_statements,
    model_image_repository_name,
)
from platform_constructs.msk import MskCluster
from platform_constructs.nag import wildcard_resource
from stacks.base import REPO, KilnStack, image_context, removal_policy
from stacks.data_lake import lake_bucket


def model_version(artifact: str, package: str | None = None) -> str:
    """A readable version for events and logs: the registry version (`kiln-llm/7`) when the
    endpoint serves a model package, else the folder holding the model archive or the
    uncompressed model directory, e.g. `v7` for `.../v7/model.tar.gz` and `.../v7/model/`."""
    if package is not None:
        return package.split(":model-package/", 1)[1]
    parts = artifact.removeprefix("s3://").rstrip("/").split("/")
    return parts[-2] if len(parts) > 2 else parts[-1].removesuffix(".tar.gz")


class ServingStack(KilnStack):
    """Composes the serving key, the inference image (built on deploy) and, when a model
    artifact is configured (a model.tar.gz, or an uncompressed model directory's S3 prefix),
    the guarded endpoint that serves it: with kiln's engine, which publishes prediction events
    to MSK, or with `serving.engine: lmi`, SageMaker's LMI container (vLLM, tensor parallel
    over the instance's GPUs) behind the same rollout, alarms, autoscaling and KMS rules.
    With `serving.model_package` the endpoint's model is that registry version (its image and
    artifact come from the package, which SageMaker deploys only while it is Approved).

    Attributes: `key`, `image`, `endpoint` (GuardedEndpoint, or None before a model exists).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        vpc: ec2.IVpc,
        lake_key: kms.IKey,
        msk: MskCluster,
        rollback_alarm_names: Sequence[str],
        s3_prefix_list_id: str | None = None,
    ) -> None:
        registry = settings.registry
        shares_images = registry.home and bool(registry.reader_accounts)
        super().__init__(
            scope,
            construct_id,
            settings=settings,
            component=Component.SERVING,
            description=f"kiln {settings.name}: inference image and SageMaker endpoint",
            # A registry shared with other accounts: the image goes to the models stack's
            # repository, which they may pull from (the bootstrap's cannot be shared by an
            # app). The stage deploys the models stack first.
            synthesizer=DefaultStackSynthesizer(
                image_assets_repository_name=model_image_repository_name(settings.project)
            )
            if shares_images
            else None,
        )
        serving = settings.serving
        self.key = PlatformKey(
            self,
            "ServingKey",
            alias=naming.kms_alias(settings, "serving"),
            description=f"kiln {settings.name}: encrypts the endpoint's ML storage volumes",
            removal_policy=removal_policy(settings),
        ).key
        self.image = ecr_assets.DockerImageAsset(
            self,
            "InferenceImage",
            directory=str(REPO),
            file="inference/Dockerfile",
            platform=ecr_assets.Platform.LINUX_AMD64,
            # The server imports kiln_events, modeling (the model) and the kernels.
            **image_context(["kernels", "kiln_events", "modeling", "inference"]),
        )
        name = naming.endpoint_name(settings)
        self.endpoint: GuardedEndpoint | None = None
        if serving.model_artifact is not None:
            topic = settings.streaming.firehose.topic
            scaling = serving.autoscaling
            schedule = scaling.scheduled_scale_down
            container = (
                self._lmi_container(settings)
                if serving.engine == "lmi"
                else self._kiln_container(settings, msk, name, topic)
            )
            self.endpoint = GuardedEndpoint(
                self,
                "Endpoint",
                endpoint_name=name,
                image_uri=container.image_uri,
                image_repository=container.repository,
                model_artifact=serving.model_artifact,
                model_package=serving.model_package,
                inference_specification=serving.inference_specification,
                artifact_key=lake_key,
                volume_key=self.key,
                vpc=vpc,
                vpc_cidr=settings.network.vpc_cidr,
                instance_type=serving.instance_type,
                initial_instance_count=serving.initial_instance_count,
                capture_bucket=lake_bucket(self, settings, "capture"),
                capture_percent=serving.data_capture_percent,
                startup_timeout_seconds=serving.container_startup_timeout_seconds,
                download_timeout_seconds=serving.model_download_timeout_seconds,
                shifting=TrafficShifting(
                    mode=serving.deployment.traffic,
                    step_percent=serving.deployment.step_percent,
                    wait_minutes=serving.deployment.wait_minutes,
                    termination_wait_minutes=serving.deployment.termination_wait_minutes,
                    max_deployment_minutes=serving.deployment.max_deployment_minutes,
                    step_instances=serving.deployment.step_instances,
                ),
                # By name: the alarms' names are derived from the endpoint's, so the
                # deployment config cannot keep a stale reference to a replaced alarm.
                rollback_alarms=[
                    cloudwatch.Alarm.from_alarm_name(self, f"RollbackAlarm{i}", alarm)
                    for i, alarm in enumerate(rollback_alarm_names)
                ],
                scaling=Scaling(
                    min_instances=scaling.min_instances,
                    max_instances=scaling.max_instances,
                    target_invocations_per_instance=scaling.target_invocations_per_instance,
                    scale_in_cooldown_seconds=scaling.scale_in_cooldown_seconds,
                    scale_out_cooldown_seconds=scaling.scale_out_cooldown_seconds,
                    working_hours_utc=(schedule.work_start_hour_utc, schedule.work_end_hour_utc)
                    if schedule
                    else None,
                ),
                environment=container.environment,
                s3_prefix_list_id=s3_prefix_list_id,
                extra_statements=container.statements,
                kafka_egress=container.publishes_events,
            )
            if container.publishes_events:
                Validations.of(self.endpoint.policy).acknowledge(
                    wildcard_resource(
                        self,
                        msk.topic_arn(topic),
                        f"The endpoint publishes prediction events to topic {topic}; the "
                        "wildcard stands only for the cluster's generated uuid.",
                    )
                )
            home = settings.registry.account
            if serving.model_package is not None and home and home != settings.account:
                # A version of another account's registry: the role reads its model data and
                # (kiln's engine) its image there; the home's policies let it (data lake stack;
                # README, "Registry across accounts").
                self.endpoint.policy.add_statements(
                    *cross_account_model_statements(
                        self,
                        home_account=home,
                        artifact=serving.model_artifact,
                        image_repository_arn=None
                        if serving.engine == "lmi"
                        else home_image_repository_arn(settings, home),
                        policy=self.endpoint.policy,
                    )
                )
            CfnOutput(self, Outputs.MODEL_ARTIFACT.key, value=serving.model_artifact)
            if serving.model_package is not None:
                CfnOutput(self, Outputs.MODEL_PACKAGE.key, value=serving.model_package)
        CfnOutput(self, Outputs.ENDPOINT_NAME.key, value=name)
        CfnOutput(self, Outputs.IMAGE_URI.key, value=self.image.image_uri)

    def _kiln_container(
        self, settings: Settings, msk: MskCluster, name: str, topic: str
    ) -> ServingContainer:
        """kiln's inference image: it publishes prediction events to the MSK topic itself."""
        serving = settings.serving
        assert serving.model_artifact is not None
        environment = {
            ServerEnv.MODEL_VERSION: model_version(serving.model_artifact, serving.model_package),
            ServerEnv.ENDPOINT_NAME: name,
            ServerEnv.EVENTS_CLUSTER_ARN: msk.arn,
            ServerEnv.EVENTS_TOPIC: topic,
            ServerEnv.EVENTS_REGION: Stack.of(self).region,
            ServerEnv.ALLOW_RAW_TEXT: str(settings.events.allow_raw_text).lower(),
            ServerEnv.MAX_NEW_TOKENS: str(serving.max_new_tokens),
            # Drain, then flush events, inside SageMaker's SIGTERM-to-SIGKILL window.
            ServerEnv.GRACEFUL_TIMEOUT_S: str(SERVER_DRAIN_SECONDS),
        }
        if serving.max_model_len is not None:
            environment[ServerEnv.MAX_SEQ_LEN] = str(serving.max_model_len)
        return ServingContainer(
            image_uri=self.image.image_uri,
            repository=self.image.repository,
            environment=environment,
            statements=[
                *msk.write_statements([topic]),
                iam.PolicyStatement(actions=["kafka:GetBootstrapBrokers"], resources=[msk.arn]),
            ],
            publishes_events=True,
        )

    def _lmi_container(self, settings: Settings) -> ServingContainer:
        """SageMaker's LMI image (pinned in kiln/lmi.py), vLLM sharded over every GPU of the
        instance. It publishes no events to MSK: its requests and responses reach S3 through
        the endpoint's data capture where that is on."""
        serving = settings.serving
        gpus = serving_instances.gpu_count(serving.instance_type)
        assert gpus is not None  # the settings refuse lmi on a type without a GPU count
        repository = ecr.Repository.from_repository_attributes(
            self,
            "LmiRepository",
            repository_arn=lmi.repository_arn(settings.region, Aws.PARTITION),
            repository_name=lmi.LMI_REPOSITORY,
        )
        return ServingContainer(
            image_uri=lmi.image_uri(settings.region),
            repository=repository,
            environment=lmi.environment(
                tensor_parallel_degree=gpus,
                max_model_len=serving.max_model_len,
                model_loading_timeout_seconds=serving.container_startup_timeout_seconds,
            ),
            statements=[],
            publishes_events=False,
        )


def home_image_repository_arn(settings: Settings, home_account: str) -> str:
    """The repository of kiln's inference image in the registry's home, where its serving
    stack publishes the image a version names when it shares the registry with other
    accounts (`ModelImageRepository`)."""
    name = model_image_repository_name(settings.project)
    return f"arn:{Aws.PARTITION}:ecr:{Aws.REGION}:{home_account}:repository/{name}"


@dataclass(frozen=True)
class ServingContainer:
    """What an engine puts in the model: its image, the repository the role pulls it from,
    its variables and its extra permissions, and whether it publishes prediction events."""

    image_uri: str
    repository: ecr.IRepository
    environment: dict[str, str]
    statements: list[iam.PolicyStatement]
    publishes_events: bool
