"""A SageMaker real-time endpoint with deployment guardrails, rollback alarms and autoscaling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aws_cdk import Acknowledgment, Aws, Duration, Stack, Validations
from aws_cdk import aws_applicationautoscaling as appscaling
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sagemaker as sagemaker
from constructs import Construct

from kiln import instances as serving_instances
from kiln.contract import (
    ENDPOINT_SCALABLE_DIMENSION,
    ENDPOINT_VARIANT,
    SAGEMAKER_ENDPOINTS,
    capture_prefix,
    endpoint_scaling_resource_id,
    is_model_prefix,
)
from platform_constructs.nag import unscoped_policies, wildcard_resource
from platform_constructs.network import https_egress
from platform_constructs.sagemaker_execution import execution_statements, sagemaker_principal

VARIANT = ENDPOINT_VARIANT  # blue/green needs the same variant name in every endpoint config
KAFKA_IAM_PORT = 9098


@dataclass(frozen=True)
class TrafficShifting:
    """Blue/green traffic shifting: `canary` (one step, then the rest), `linear` steps, or
    `all_at_once` (the new fleet takes all traffic in one shift, then bakes)."""

    mode: str  # "canary" | "linear" | "all_at_once"
    step_percent: int
    wait_minutes: int
    termination_wait_minutes: int
    max_deployment_minutes: int
    # A step in whole instances (INSTANCE_COUNT) instead of step_percent.
    step_instances: int | None = None


@dataclass(frozen=True)
class RollbackThresholds:
    error_rate_percent: float
    latency_p99_ms: int
    evaluation_minutes: int


@dataclass(frozen=True)
class Scaling:
    min_instances: int
    max_instances: int
    target_invocations_per_instance: int
    scale_in_cooldown_seconds: int
    scale_out_cooldown_seconds: int
    # UTC (start, end) hours of the working day; outside them the endpoint runs 1 instance.
    working_hours_utc: tuple[int, int] | None = None


def s3_object_arn(uri: str) -> str:
    """`s3://bucket/key` -> `arn:<partition>:s3:::bucket/key`."""
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    return f"arn:{Aws.PARTITION}:s3:::{uri[5:]}"


def model_read_statements(model_artifact: str) -> list[iam.PolicyStatement]:
    """What SageMaker needs to fetch the model data: the archive object; or, for an
    uncompressed model (an S3 prefix ending in `/`), the objects under that prefix and a
    listing of the bucket limited to it (SageMaker enumerates the prefix's objects)."""
    if not is_model_prefix(model_artifact):
        return [
            iam.PolicyStatement(actions=["s3:GetObject"], resources=[s3_object_arn(model_artifact)])
        ]
    bucket, _, prefix = model_artifact.removeprefix("s3://").partition("/")
    return [
        iam.PolicyStatement(
            actions=["s3:GetObject"], resources=[s3_object_arn(f"{model_artifact}*")]
        ),
        iam.PolicyStatement(
            actions=["s3:ListBucket"],
            resources=[f"arn:{Aws.PARTITION}:s3:::{bucket}"],
            conditions={"StringLike": {"s3:prefix": [f"{prefix}*"]}},
        ),
    ]


def model_container(
    image_uri: str, model_artifact: str, environment: Mapping[str, str]
) -> sagemaker.CfnModel.ContainerDefinitionProperty:
    """The model's container: a model.tar.gz as `ModelDataUrl` (SageMaker unpacks it into
    /opt/ml/model), or an S3 prefix as uncompressed `ModelDataSource` (S3Prefix, compression
    None: SageMaker copies each object under the prefix to /opt/ml/model/<rest of its key>)."""
    if not is_model_prefix(model_artifact):
        return sagemaker.CfnModel.ContainerDefinitionProperty(
            image=image_uri, model_data_url=model_artifact, environment=dict(environment)
        )
    return sagemaker.CfnModel.ContainerDefinitionProperty(
        image=image_uri,
        model_data_source=sagemaker.CfnModel.ModelDataSourceProperty(
            s3_data_source=sagemaker.CfnModel.S3DataSourceProperty(
                s3_uri=model_artifact, s3_data_type="S3Prefix", compression_type="None"
            )
        ),
        environment=dict(environment),
    )


def rollback_alarm_name(endpoint_name: str, kind: str) -> str:
    """`<endpoint>-rollback-<kind>`, e.g. `kiln-prod-llm-rollback-5xx-rate`."""
    return f"{endpoint_name}-rollback-{kind}"


class RollbackAlarms(Construct):
    """The alarms a deployment rolls back on, on the endpoint variant's own metrics:
    the 5XX error rate (%) and the p99 model latency; they also notify `actions` (on-call)
    when they fire and when they clear. Exposes `error_rate`, `latency_p99`, `all`, and
    `names` (`<endpoint>-rollback-5xx-rate`, `<endpoint>-rollback-p99-latency`)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        endpoint_name: str,
        thresholds: RollbackThresholds,
        actions: Sequence[cloudwatch.IAlarmAction],
    ) -> None:
        super().__init__(scope, construct_id)
        dimensions = {"EndpointName": endpoint_name, "VariantName": VARIANT}
        period = Duration.minutes(1)

        def metric(name: str, statistic: str) -> cloudwatch.Metric:
            return cloudwatch.Metric(
                namespace="AWS/SageMaker",
                metric_name=name,
                dimensions_map=dimensions,
                statistic=statistic,
                period=period,
            )

        error_rate = cloudwatch.MathExpression(
            expression="IF(invocations > 0, 100 * errors / invocations, 0)",
            using_metrics={
                "errors": metric("Invocation5XXErrors", "Sum"),
                "invocations": metric("Invocations", "Sum"),
            },
            label="5XX error rate (%)",
            period=period,
        )
        # Named from the endpoint's name: the endpoint's deployment config names them, and a
        # name the consumer derives itself cannot go stale the way a resolved-once
        # cross-stack reference to a replaced alarm would.
        self.error_rate = cloudwatch.Alarm(
            self,
            "ErrorRate",
            alarm_name=rollback_alarm_name(endpoint_name, "5xx-rate"),
            alarm_description=f"{endpoint_name}: 5XX error rate above "
            f"{thresholds.error_rate_percent}% (rolls a deployment back)",
            metric=error_rate,
            threshold=thresholds.error_rate_percent,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=thresholds.evaluation_minutes,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.latency_p99 = cloudwatch.Alarm(
            self,
            "LatencyP99",
            alarm_name=rollback_alarm_name(endpoint_name, "p99-latency"),
            alarm_description=f"{endpoint_name}: p99 model latency above "
            f"{thresholds.latency_p99_ms} ms (rolls a deployment back)",
            # SageMaker reports ModelLatency in microseconds.
            metric=metric("ModelLatency", "p99"),
            threshold=thresholds.latency_p99_ms * 1000,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=thresholds.evaluation_minutes,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.all = [self.error_rate, self.latency_p99]
        # The literal names, for consumers in other stacks (no cross-stack reference).
        self.names = [
            rollback_alarm_name(endpoint_name, "5xx-rate"),
            rollback_alarm_name(endpoint_name, "p99-latency"),
        ]
        for alarm in self.all:
            alarm.add_alarm_action(*actions)
            alarm.add_ok_action(*actions)


class GuardedEndpoint(Construct):
    """Model + EndpointConfig + Endpoint for one model artifact, or one registry version
    (`model_package`, the ARN of an approved model package, served from its additional
    inference specification `inference_specification` when given; `model_artifact` is then
    its artifact, which the role may read).

    The model runs the `image_uri` container in the private subnets behind a security group
    that sends only HTTPS to the VPC (interface endpoints) and to S3 (the gateway endpoint's
    prefix list, `s3_prefix_list_id`) and, with `kafka_egress`, Kafka-over-IAM inside the VPC,
    with an execution role that may read the artifact (a model.tar.gz, or the objects under an
    uncompressed model's S3 prefix) and the image, decrypt with
    `artifact_key`, write its logs, metrics and data capture, plus `extra_statements`. The
    endpoint config names `volume_key` for the ML storage volume only where the instance type
    has no local instance storage (CreateEndpointConfig rejects a key otherwise; the instance
    encrypts its NVMe volumes itself), and captures `capture_percent` of requests and
    responses to `capture_bucket` (KMS) only when it is above 0. A new artifact is a new model and
    config: the endpoint update then runs blue/green with the given traffic shifting and
    rolls back by itself when a rollback alarm fires. Target tracking scales the variant.

    Exposes `role`, `policy`, `security_group`, `model`, `config`, `endpoint`,
    `scalable_target`.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        endpoint_name: str,
        image_uri: str,
        image_repository: ecr.IRepository,
        model_artifact: str,
        artifact_key: kms.IKey,
        volume_key: kms.IKey,
        vpc: ec2.IVpc,
        vpc_cidr: str,
        instance_type: str,
        initial_instance_count: int,
        capture_bucket: s3.IBucket,
        capture_percent: int,
        startup_timeout_seconds: int,
        download_timeout_seconds: int,
        shifting: TrafficShifting,
        rollback_alarms: Sequence[cloudwatch.IAlarm],
        scaling: Scaling,
        environment: Mapping[str, str],
        extra_statements: Sequence[iam.PolicyStatement] = (),
        s3_prefix_list_id: str | None = None,
        kafka_egress: bool = True,
        model_package: str | None = None,
        inference_specification: str | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.security_group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=vpc,
            allow_all_outbound=False,
            description=f"{endpoint_name}: HTTPS (VPC endpoints, S3) and Kafka in the VPC only",
        )
        https_egress(
            self.security_group,
            vpc_cidr=vpc_cidr,
            s3_prefix_list_id=s3_prefix_list_id,
            what="Model container",
        )
        if kafka_egress:
            self.security_group.add_egress_rule(
                ec2.Peer.ipv4(vpc_cidr), ec2.Port.tcp(KAFKA_IAM_PORT), "MSK (IAM over TLS)"
            )
        stack = Stack.of(self)
        self.role = iam.Role(
            self,
            "ExecutionRole",
            assumed_by=sagemaker_principal(stack.account, stack.region, stack.partition),
            description=f"{endpoint_name}: SageMaker model execution",
        )
        capture_root = capture_prefix(endpoint_name)
        logs_arn = SAGEMAKER_ENDPOINTS.log_streams_arn(
            partition=Aws.PARTITION, region=Aws.REGION, account=Aws.ACCOUNT_ID, name=endpoint_name
        )
        runtime = execution_statements(
            SAGEMAKER_ENDPOINTS, repository=image_repository, logs_arn=logs_arn
        )
        capture = capture_percent > 0
        capture_objects = capture_bucket.arn_for_objects(f"{capture_root}/*")
        s3_via = {"StringEquals": {"kms:ViaService": f"s3.{Aws.REGION}.amazonaws.com"}}
        self.policy = iam.ManagedPolicy(
            self,
            "ExecutionPolicy",
            roles=[self.role],
            statements=[
                *model_read_statements(model_artifact),
                *(
                    [iam.PolicyStatement(actions=["s3:PutObject"], resources=[capture_objects])]
                    if capture
                    else []
                ),
                # The lake key, only as S3 uses it for the artifact (and capture objects).
                iam.PolicyStatement(
                    actions=["kms:Decrypt", "kms:GenerateDataKey"],
                    resources=[artifact_key.key_arn],
                    conditions=s3_via,
                ),
                runtime.pull_image,
                runtime.write_logs,
                *extra_statements,
            ],
        )
        self.unscoped_policies = unscoped_policies(self, [self.role], runtime.unscoped)
        Validations.of(self.policy).acknowledge(
            *(
                [
                    wildcard_resource(
                        self,
                        capture_objects,
                        "Data capture writes objects whose keys "
                        "SageMaker generates, under this endpoint's own prefix.",
                    )
                ]
                if capture
                else []
            ),
            wildcard_resource(
                self,
                logs_arn,
                "The log streams of this endpoint's own log "
                "group, which SageMaker names per instance.",
            ),
            *(
                [
                    wildcard_resource(
                        self,
                        s3_object_arn(f"{model_artifact}*"),
                        "An uncompressed model is every object under its own S3 prefix "
                        "(config, weight shards, tokenizer), which SageMaker copies to "
                        "/opt/ml/model; nothing outside the prefix is readable.",
                    )
                ]
                if is_model_prefix(model_artifact)
                else []
            ),
        )
        subnets = vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS).subnet_ids
        self.model = sagemaker.CfnModel(
            self,
            "Model",
            execution_role_arn=self.role.role_arn,
            # A registry version brings its own image and artifact; SageMaker creates the
            # model only while the version is Approved. `inference_specification` picks one of
            # its additional specifications (the engine's) instead of the primary.
            primary_container=sagemaker.CfnModel.ContainerDefinitionProperty(
                model_package_name=model_package,
                inference_specification_name=inference_specification,
                environment=dict(environment),
            )
            if model_package is not None
            else model_container(image_uri, model_artifact, environment),
            vpc_config=sagemaker.CfnModel.VpcConfigProperty(
                subnets=subnets,
                security_group_ids=[self.security_group.security_group_id],
            ),
        )
        # The role's permissions must exist before SageMaker validates the model with it.
        self.model.node.add_dependency(self.policy, *self.unscoped_policies.values())
        # CreateEndpointConfig fails when KmsKeyId is given for an instance type with local
        # (NVMe) storage, which the instance encrypts itself (SageMaker API Reference).
        self.volume_key_used = not serving_instances.has_instance_storage(instance_type)
        self.config = sagemaker.CfnEndpointConfig(
            self,
            "Config",
            kms_key_id=volume_key.key_arn if self.volume_key_used else None,
            production_variants=[
                sagemaker.CfnEndpointConfig.ProductionVariantProperty(
                    variant_name=VARIANT,
                    model_name=self.model.attr_model_name,
                    instance_type=instance_type,
                    initial_instance_count=initial_instance_count,
                    initial_variant_weight=1,
                    container_startup_health_check_timeout_in_seconds=startup_timeout_seconds,
                    model_data_download_timeout_in_seconds=download_timeout_seconds,
                )
            ],
            # Captured bodies are prompts and completions: only when capture is asked for
            # (the settings allow it only with events.allow_raw_text).
            data_capture_config=sagemaker.CfnEndpointConfig.DataCaptureConfigProperty(
                enable_capture=True,
                initial_sampling_percentage=capture_percent,
                destination_s3_uri=f"s3://{capture_bucket.bucket_name}/{capture_root}",
                kms_key_id=artifact_key.key_arn,
                capture_options=[
                    sagemaker.CfnEndpointConfig.CaptureOptionProperty(capture_mode="Input"),
                    sagemaker.CfnEndpointConfig.CaptureOptionProperty(capture_mode="Output"),
                ],
                capture_content_type_header=sagemaker.CfnEndpointConfig.CaptureContentTypeHeaderProperty(
                    json_content_types=["application/json"],
                ),
            )
            if capture
            else None,
        )
        if not self.volume_key_used:
            Validations.of(self.config).acknowledge(
                Acknowledgment(
                    id="NIST.800.53.R5-SageMakerEndpointConfigurationKMSKeyConfigured",
                    reason=f"{instance_type} has local NVMe instance storage, which the "
                    "instance encrypts with a hardware module; CreateEndpointConfig fails when "
                    "KmsKeyId is given for such a type (SageMaker API Reference).",
                )
            )
        step = (
            sagemaker.CfnEndpoint.CapacitySizeProperty(
                type="INSTANCE_COUNT", value=shifting.step_instances
            )
            if shifting.step_instances is not None
            else sagemaker.CfnEndpoint.CapacitySizeProperty(
                type="CAPACITY_PERCENT", value=shifting.step_percent
            )
        )
        self.endpoint = sagemaker.CfnEndpoint(
            self,
            "Endpoint",
            endpoint_name=endpoint_name,
            endpoint_config_name=self.config.attr_endpoint_config_name,
            # A new model version keeps the instance count autoscaling reached instead of
            # resetting to InitialInstanceCount; data capture still follows the new config.
            retain_all_variant_properties=True,
            exclude_retained_variant_properties=[
                sagemaker.CfnEndpoint.VariantPropertyProperty(
                    variant_property_type="DataCaptureConfig"
                )
            ],
            deployment_config=sagemaker.CfnEndpoint.DeploymentConfigProperty(
                blue_green_update_policy=sagemaker.CfnEndpoint.BlueGreenUpdatePolicyProperty(
                    traffic_routing_configuration=sagemaker.CfnEndpoint.TrafficRoutingConfigProperty(
                        type=shifting.mode.upper(),
                        canary_size=step if shifting.mode == "canary" else None,
                        linear_step_size=step if shifting.mode == "linear" else None,
                        wait_interval_in_seconds=shifting.wait_minutes * 60,
                    ),
                    termination_wait_in_seconds=shifting.termination_wait_minutes * 60,
                    maximum_execution_timeout_in_seconds=shifting.max_deployment_minutes * 60,
                ),
                auto_rollback_configuration=sagemaker.CfnEndpoint.AutoRollbackConfigProperty(
                    alarms=[
                        sagemaker.CfnEndpoint.AlarmProperty(alarm_name=alarm.alarm_name)
                        for alarm in rollback_alarms
                    ]
                ),
            ),
        )
        self.scalable_target = appscaling.ScalableTarget(
            self,
            "Scaling",
            service_namespace=appscaling.ServiceNamespace.SAGEMAKER,
            resource_id=endpoint_scaling_resource_id(endpoint_name),
            scalable_dimension=ENDPOINT_SCALABLE_DIMENSION,
            min_capacity=scaling.min_instances,
            max_capacity=scaling.max_instances,
        )
        self.scalable_target.node.add_dependency(self.endpoint)
        self.scalable_target.scale_to_track_metric(
            "InvocationsPerInstance",
            target_value=scaling.target_invocations_per_instance,
            predefined_metric=appscaling.PredefinedMetric.SAGEMAKER_VARIANT_INVOCATIONS_PER_INSTANCE,
            scale_in_cooldown=Duration.seconds(scaling.scale_in_cooldown_seconds),
            scale_out_cooldown=Duration.seconds(scaling.scale_out_cooldown_seconds),
        )
        if scaling.working_hours_utc is not None:
            start, end = scaling.working_hours_utc
            self.scalable_target.scale_on_schedule(
                "EveningScaleDown",
                schedule=appscaling.Schedule.cron(
                    hour=str(end % 24), minute="0", week_day="MON-FRI"
                ),
                min_capacity=1,
                max_capacity=1,
            )
            self.scalable_target.scale_on_schedule(
                "MorningScaleUp",
                schedule=appscaling.Schedule.cron(hour=str(start), minute="0", week_day="MON-FRI"),
                min_capacity=scaling.min_instances,
                max_capacity=scaling.max_instances,
            )
