"""The reusable constructs on their own: what they create, expose, and how they map config."""

from __future__ import annotations

import itertools

import aws_cdk as cdk
import pytest
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_logs as logs
from aws_cdk.assertions import Match, Template
from pydantic import ValidationError

from app import cdk_json_context
from kiln.settings import LOG_RETENTION_DAYS, Settings
from platform_constructs.aspects import LogGroupRetention
from platform_constructs.kms import PlatformKey
from platform_constructs.logs import retention_days
from platform_constructs.secure_bucket import AccessLogsBucket, SecureBucket
from tests.support import minimal_settings

ZONES = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]


def new_stack() -> cdk.Stack:
    # cdk.json's feature flags, as `cdk synth` would apply them.
    app = cdk.App(context=cdk_json_context())
    return cdk.Stack(app, "Probe", env=cdk.Environment(region="eu-west-1"))


def test_retention_days_maps_every_cloudwatch_value() -> None:
    stack = new_stack()
    for days in LOG_RETENTION_DAYS:
        logs.LogGroup(stack, f"G{days}", retention=retention_days(days))
    groups = Template.from_stack(stack).find_resources("AWS::Logs::LogGroup")
    assert sorted(g["Properties"]["RetentionInDays"] for g in groups.values()) == sorted(
        LOG_RETENTION_DAYS
    )
    with pytest.raises(ValueError, match="not a CloudWatch Logs retention"):
        retention_days(2)


def test_secure_bucket_exposes_its_bucket_and_uses_the_given_key() -> None:
    stack = new_stack()
    key = PlatformKey(
        stack,
        "Key",
        alias="alias/probe",
        description="probe",
        removal_policy=cdk.RemovalPolicy.RETAIN,
    ).key
    logs_bucket = AccessLogsBucket(
        stack,
        "Logs",
        removal_policy=cdk.RemovalPolicy.RETAIN,
        expiration=cdk.Duration.days(30),
        noncurrent_version_expiration=cdk.Duration.days(7),
    ).bucket
    secure = SecureBucket(
        stack,
        "Data",
        encryption_key=key,
        access_logs_bucket=logs_bucket,
        access_logs_prefix="data/",
        removal_policy=cdk.RemovalPolicy.RETAIN,
        noncurrent_version_expiration=cdk.Duration.days(7),
    )
    assert secure.bucket.encryption_key is key
    template = Template.from_stack(stack)
    template.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "LoggingConfiguration": {
                "DestinationBucketName": Match.any_value(),
                "LogFilePrefix": "data/",
            },
        },
    )
    # The access-log bucket admits S3's log delivery, scoped to this account's buckets.
    template.has_resource_properties(
        "AWS::S3::BucketPolicy",
        {
            "PolicyDocument": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "Principal": {"Service": "logging.s3.amazonaws.com"},
                                "Condition": Match.object_like(
                                    {"StringEquals": {"aws:SourceAccount": Match.any_value()}}
                                ),
                            }
                        )
                    ]
                )
            }
        },
    )


def test_platform_key_without_logs_grant_has_no_service_statement() -> None:
    stack = new_stack()
    PlatformKey(
        stack,
        "Key",
        alias="alias/probe",
        description="probe",
        removal_policy=cdk.RemovalPolicy.DESTROY,
    )
    (key,) = Template.from_stack(stack).find_resources("AWS::KMS::Key").values()
    principals = [s["Principal"] for s in key["Properties"]["KeyPolicy"]["Statement"]]
    assert all("Service" not in p for p in principals)
    assert key["DeletionPolicy"] == "Delete"


def cdk_accepts(cidr: str, masks: tuple[int, int, int]) -> bool:
    stack = new_stack()
    try:
        ec2.Vpc(
            stack,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr(cidr),
            availability_zones=ZONES,
            nat_gateways=1,
            subnet_configuration=[
                ec2.SubnetConfiguration(name=name, subnet_type=kind, cidr_mask=mask)
                for name, kind, mask in zip(
                    ("Public", "Private", "Isolated"),
                    (
                        ec2.SubnetType.PUBLIC,
                        ec2.SubnetType.PRIVATE_WITH_EGRESS,
                        ec2.SubnetType.PRIVATE_ISOLATED,
                    ),
                    masks,
                    strict=True,
                )
            ],
        )
    except RuntimeError:
        return False
    return True


def schema_accepts(cidr: str, masks: tuple[int, int, int]) -> bool:
    try:
        Settings.model_validate(
            minimal_settings(
                tier="dev",
                network={
                    "vpc_cidr": cidr,
                    "nat_gateways": 1,
                    "subnets": dict(
                        zip(("public_mask", "private_mask", "isolated_mask"), masks, strict=True)
                    ),
                },
            )
        )
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("cidr", ["10.0.0.0/22", "10.0.0.0/20"])
def test_schema_subnet_capacity_check_agrees_with_the_cdk(cidr: str) -> None:
    """The schema rejects exactly the layouts the CDK's allocator cannot place."""
    for masks in itertools.product((24, 25, 26), (20, 22, 24, 25), (24, 26)):
        assert schema_accepts(cidr, masks) == cdk_accepts(cidr, masks), (cidr, masks)


def test_log_group_retention_aspect_fills_only_missing_retention() -> None:
    stack = new_stack()
    logs.CfnLogGroup(stack, "Unset")
    logs.CfnLogGroup(stack, "Set", retention_in_days=7)
    cdk.Aspects.of(stack).add(LogGroupRetention(90))
    groups = Template.from_stack(stack).find_resources("AWS::Logs::LogGroup")
    retention = {key: g["Properties"]["RetentionInDays"] for key, g in groups.items()}
    assert retention == {"Unset": 90, "Set": 7}
