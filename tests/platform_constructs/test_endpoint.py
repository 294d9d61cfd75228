"""GuardedEndpoint on its own: model, config, blue/green guardrails, alarms, scaling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk.assertions import Match, Template
from cdk_nag import AwsSolutionsChecks, NIST80053R5Checks

from app import cdk_json_context
from platform_constructs.endpoint import (
    GuardedEndpoint,
    RollbackAlarms,
    RollbackThresholds,
    Scaling,
    TrafficShifting,
    s3_object_arn,
)
from platform_constructs.network import PlatformVpc

ARTIFACT = "s3://kiln-dev-artifacts-123456789012-us-east-1/models/v3/model.tar.gz"


def build(
    tmp_path: Path,
    *,
    mode: str = "canary",
    hours: tuple[int, int] | None = (7, 19),
    nag: bool = False,
    instance_type: str = "ml.g5.xlarge",
    capture_percent: int = 20,
    s3_prefix_list_id: str | None = None,
) -> Template:
    app = cdk.App(context=cdk_json_context(), outdir=str(tmp_path))
    stack = cdk.Stack(cdk.Stage(app, "probe"), "Serving", env=cdk.Environment(region="us-east-1"))
    key = kms.Key(stack, "Key", enable_key_rotation=True)
    vpc = PlatformVpc(
        stack,
        "Network",
        cidr="10.9.0.0/16",
        availability_zones=["us-east-1a", "us-east-1b"],
        nat_gateways=1,
        public_mask=24,
        private_mask=20,
        isolated_mask=24,
        flow_log_key=key,
        flow_log_retention=logs.RetentionDays.ONE_WEEK,
        removal_policy=cdk.RemovalPolicy.DESTROY,
        interface_endpoints={},
    ).vpc
    topic = sns.Topic(stack, "OnCall", master_key=key, enforce_ssl=True)
    alarms = RollbackAlarms(
        stack,
        "Alarms",
        endpoint_name="kiln-dev-llm",
        thresholds=RollbackThresholds(
            error_rate_percent=1.0, latency_p99_ms=2000, evaluation_minutes=3
        ),
        actions=[cw_actions.SnsAction(topic)],
    )
    GuardedEndpoint(
        stack,
        "Llm",
        endpoint_name="kiln-dev-llm",
        image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/kiln-inference:abc",
        image_repository=ecr.Repository.from_repository_name(stack, "Repo", "kiln-inference"),
        model_artifact=ARTIFACT,
        artifact_key=key,
        volume_key=key,
        vpc=vpc,
        vpc_cidr="10.9.0.0/16",
        instance_type=instance_type,
        initial_instance_count=2,
        capture_bucket=s3.Bucket.from_bucket_name(stack, "Capture", "kiln-dev-capture"),
        capture_percent=capture_percent,
        s3_prefix_list_id=s3_prefix_list_id,
        startup_timeout_seconds=600,
        download_timeout_seconds=600,
        shifting=TrafficShifting(
            mode=mode,
            step_percent=10,
            wait_minutes=10,
            termination_wait_minutes=5,
            max_deployment_minutes=120,
        ),
        rollback_alarms=alarms.all,
        scaling=Scaling(
            min_instances=2,
            max_instances=4,
            target_invocations_per_instance=50,
            scale_in_cooldown_seconds=600,
            scale_out_cooldown_seconds=60,
            working_hours_utc=hours,
        ),
        environment={"KILN_EVENTS_TOPIC": "prediction-events"},
        extra_statements=[
            iam.PolicyStatement(
                actions=["kafka-cluster:Connect"],
                resources=["arn:aws:kafka:us-east-1:123456789012:cluster/kiln-dev/uuid"],
            )
        ],
    )
    if nag:
        cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app), NIST80053R5Checks(app))
        app.synth()
    return Template.from_stack(stack)


def test_endpoint_rolls_out_blue_green_canary_with_rollback_alarms(tmp_path: Path) -> None:
    template = build(tmp_path)
    template.has_resource_properties(
        "AWS::SageMaker::Endpoint",
        {
            "EndpointName": "kiln-dev-llm",
            "DeploymentConfig": {
                "BlueGreenUpdatePolicy": {
                    "TrafficRoutingConfiguration": {
                        "Type": "CANARY",
                        "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10},
                        "WaitIntervalInSeconds": 600,
                    },
                    "TerminationWaitInSeconds": 300,
                    "MaximumExecutionTimeoutInSeconds": 7200,
                },
                "AutoRollbackConfiguration": {
                    "Alarms": [
                        {"AlarmName": {"Ref": Match.string_like_regexp("AlarmsErrorRate")}},
                        {"AlarmName": {"Ref": Match.string_like_regexp("AlarmsLatencyP99")}},
                    ]
                },
            },
        },
    )


def test_linear_shifting(tmp_path: Path) -> None:
    build(tmp_path, mode="linear").has_resource_properties(
        "AWS::SageMaker::Endpoint",
        {
            "DeploymentConfig": Match.object_like(
                {
                    "BlueGreenUpdatePolicy": Match.object_like(
                        {
                            "TrafficRoutingConfiguration": {
                                "Type": "LINEAR",
                                "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 10},
                                "WaitIntervalInSeconds": 600,
                            }
                        }
                    )
                }
            ),
        },
    )


def test_config_encrypts_volume_and_captures_with_kms(tmp_path: Path) -> None:
    """ml.m5 has no local storage: its ML volume gets the customer-managed key."""
    build(tmp_path, instance_type="ml.m5.xlarge").has_resource_properties(
        "AWS::SageMaker::EndpointConfig",
        {
            "KmsKeyId": {"Fn::GetAtt": [Match.string_like_regexp("Key"), "Arn"]},
            "ProductionVariants": [
                Match.object_like(
                    {
                        "VariantName": "AllTraffic",
                        "InstanceType": "ml.m5.xlarge",
                        "InitialInstanceCount": 2,
                        "ContainerStartupHealthCheckTimeoutInSeconds": 600,
                        "ModelDataDownloadTimeoutInSeconds": 600,
                    }
                )
            ],
            "DataCaptureConfig": Match.object_like(
                {
                    "EnableCapture": True,
                    "InitialSamplingPercentage": 20,
                    "DestinationS3Uri": "s3://kiln-dev-capture/endpoints/kiln-dev-llm",
                    "KmsKeyId": Match.any_value(),
                }
            ),
        },
    )


def test_no_kms_key_for_instance_types_with_local_storage(tmp_path: Path) -> None:
    """Issue 17, item 1: CreateEndpointConfig fails when KmsKeyId is given for ml.g5 (NVMe
    instance storage); the config leaves it out, and the NIST finding says why."""
    template = build(tmp_path, nag=True)  # the NIST KMS finding is acknowledged, with why
    (config,) = template.find_resources("AWS::SageMaker::EndpointConfig").values()
    assert "KmsKeyId" not in config["Properties"]


def test_no_data_capture_without_a_sampling_percent(tmp_path: Path) -> None:
    """Issue 17, item 2: capture off means no capture config, and no write grant for it."""
    template = build(tmp_path, capture_percent=0)
    (config,) = template.find_resources("AWS::SageMaker::EndpointConfig").values()
    assert "DataCaptureConfig" not in config["Properties"]
    policies = template.find_resources("AWS::IAM::ManagedPolicy")
    assert "s3:PutObject" not in json.dumps(policies)


def test_model_runs_in_private_subnets_with_narrow_egress(tmp_path: Path) -> None:
    template = build(tmp_path, s3_prefix_list_id="pl-63a5400a")
    template.has_resource_properties(
        "AWS::SageMaker::Model",
        {
            "PrimaryContainer": {
                "Image": Match.string_like_regexp("kiln-inference"),
                "ModelDataUrl": ARTIFACT,
                "Environment": {"KILN_EVENTS_TOPIC": "prediction-events"},
            },
            "VpcConfig": {"Subnets": Match.any_value(), "SecurityGroupIds": Match.any_value()},
        },
    )
    # HTTPS to the VPC's interface endpoints and to S3's prefix list, Kafka in the VPC: no
    # route to the internet (issue 17, item 5).
    template.has_resource_properties(
        "AWS::EC2::SecurityGroup",
        {
            "SecurityGroupEgress": [
                {
                    "CidrIp": "10.9.0.0/16",
                    "Description": "Model container: AWS APIs (interface endpoints)",
                    "FromPort": 443,
                    "IpProtocol": "tcp",
                    "ToPort": 443,
                },
                {
                    "CidrIp": "10.9.0.0/16",
                    "Description": "MSK (IAM over TLS)",
                    "FromPort": 9098,
                    "IpProtocol": "tcp",
                    "ToPort": 9098,
                },
            ],
        },
    )
    template.has_resource_properties(
        "AWS::EC2::SecurityGroupEgress",
        {
            "Description": "Model container: S3 (gateway endpoint)",
            "DestinationPrefixListId": "pl-63a5400a",
            "FromPort": 443,
            "IpProtocol": "tcp",
            "ToPort": 443,
        },
    )


def test_execution_role_trusts_sagemaker_for_this_account_only(tmp_path: Path) -> None:
    """Issue 17, item 6."""
    template = build(tmp_path)
    template.has_resource_properties(
        "AWS::IAM::Role",
        {
            "AssumeRolePolicyDocument": {
                "Statement": [
                    Match.object_like(
                        {
                            "Principal": {"Service": "sagemaker.amazonaws.com"},
                            "Condition": {
                                "StringEquals": {"aws:SourceAccount": Match.any_value()},
                                "ArnLike": {"aws:SourceArn": Match.any_value()},
                            },
                        }
                    )
                ]
            }
        },
    )


def test_kms_grants_go_through_s3_only(tmp_path: Path) -> None:
    """Issue 17, item 8."""
    policies = build(tmp_path).find_resources("AWS::IAM::ManagedPolicy")
    kms_statements = [
        s
        for p in policies.values()
        for s in p["Properties"]["PolicyDocument"]["Statement"]
        if "kms:Decrypt" in json.dumps(s["Action"])
    ]
    assert kms_statements
    for statement in kms_statements:
        assert "kms:ViaService" in statement["Condition"]["StringEquals"]


def test_role_reads_exactly_the_artifact(tmp_path: Path) -> None:
    template = build(tmp_path)
    policies = template.find_resources("AWS::IAM::ManagedPolicy")
    (policy,) = [p for key, p in policies.items() if key.startswith("LlmExecutionPolicy")]
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    reads = [s for s in statements if s["Action"] == "s3:GetObject"]
    assert json.dumps(reads[0]["Resource"]).endswith('models/v3/model.tar.gz"]]}')
    assert any(s["Action"] == "kafka-cluster:Connect" for s in statements)


def test_alarms_watch_error_rate_and_p99_latency_in_microseconds(tmp_path: Path) -> None:
    template = build(tmp_path)
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "Threshold": 1,
            "ComparisonOperator": "GreaterThanThreshold",
            "EvaluationPeriods": 3,
            "TreatMissingData": "notBreaching",
            "Metrics": Match.array_with(
                [
                    Match.object_like(
                        {"Expression": "IF(invocations > 0, 100 * errors / invocations, 0)"}
                    )
                ]
            ),
        },
    )
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "MetricName": "ModelLatency",
            "ExtendedStatistic": "p99",
            "Threshold": 2_000_000,
            "Dimensions": [
                {"Name": "EndpointName", "Value": "kiln-dev-llm"},
                {"Name": "VariantName", "Value": "AllTraffic"},
            ],
        },
    )


def test_target_tracking_and_office_hours(tmp_path: Path) -> None:
    template = build(tmp_path)
    template.has_resource_properties(
        "AWS::ApplicationAutoScaling::ScalableTarget",
        {
            "ResourceId": "endpoint/kiln-dev-llm/variant/AllTraffic",
            "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
            "MinCapacity": 2,
            "MaxCapacity": 4,
            "ScheduledActions": [
                {
                    "ScheduledActionName": "EveningScaleDown",
                    "Schedule": "cron(0 19 ? * MON-FRI *)",
                    "ScalableTargetAction": {"MinCapacity": 1, "MaxCapacity": 1},
                },
                {
                    "ScheduledActionName": "MorningScaleUp",
                    "Schedule": "cron(0 7 ? * MON-FRI *)",
                    "ScalableTargetAction": {"MinCapacity": 2, "MaxCapacity": 4},
                },
            ],
        },
    )
    template.has_resource_properties(
        "AWS::ApplicationAutoScaling::ScalingPolicy",
        {
            "TargetTrackingScalingPolicyConfiguration": {
                "PredefinedMetricSpecification": {
                    "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
                },
                "TargetValue": 50,
                "ScaleInCooldown": 600,
                "ScaleOutCooldown": 60,
            },
        },
    )


def test_no_schedule_without_working_hours(tmp_path: Path) -> None:
    targets: dict[str, Any] = build(tmp_path, hours=None).find_resources(
        "AWS::ApplicationAutoScaling::ScalableTarget"
    )
    (target,) = targets.values()
    assert "ScheduledActions" not in target["Properties"]


def test_passes_the_policy_packs(tmp_path: Path) -> None:
    build(tmp_path, nag=True)  # raises on any unacknowledged finding


@pytest.mark.parametrize("uri", ["s3:/b/k", "https://b/k", "s3://bucket"])
def test_bad_artifact_uri(uri: str) -> None:
    with pytest.raises(ValueError, match="is not an s3://bucket/key URI"):
        s3_object_arn(uri)
