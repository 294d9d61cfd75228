"""The network stack's posture, as synthesized for every environment."""

from __future__ import annotations

import pytest
from aws_cdk.assertions import Match, Template

from kiln.settings import Settings
from tests.support import ENVIRONMENTS, Synthesis


@pytest.fixture(params=ENVIRONMENTS)
def env(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def network(synthesis: Synthesis, env: str) -> Template:
    return Template.from_json(synthesis.stack(env, "network").template)


def test_vpc_has_configured_cidr_and_three_subnet_tiers_per_zone(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    settings = settings_by_env[env]
    template = network(synthesis, env)
    template.has_resource_properties(
        "AWS::EC2::VPC",
        {
            "CidrBlock": settings.network.vpc_cidr,
            "EnableDnsHostnames": True,
            "EnableDnsSupport": True,
        },
    )
    zones = len(settings.availability_zones)
    template.resource_count_is("AWS::EC2::Subnet", 3 * zones)
    for zone in settings.availability_zones:
        template.has_resource_properties("AWS::EC2::Subnet", {"AvailabilityZone": zone})
    template.resource_count_is("AWS::EC2::NatGateway", settings.network.nat_gateways)


def test_no_subnet_assigns_public_ips(synthesis: Synthesis, env: str) -> None:
    subnets = synthesis.stack(env, "network").resources_of_type("AWS::EC2::Subnet")
    assert subnets
    for subnet in subnets.values():
        assert subnet["Properties"].get("MapPublicIpOnLaunch") is False


def test_isolated_subnets_have_no_route_out(synthesis: Synthesis, env: str) -> None:
    stack = synthesis.stack(env, "network")
    isolated_tables = {
        key for key in stack.resources_of_type("AWS::EC2::RouteTable") if "Isolated" in key
    }
    assert isolated_tables
    for route in stack.resources_of_type("AWS::EC2::Route").values():
        assert route["Properties"]["RouteTableId"]["Ref"] not in isolated_tables


def test_flow_logs_capture_all_traffic_into_an_encrypted_retained_log_group(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    template = network(synthesis, env)
    template.has_resource_properties(
        "AWS::EC2::FlowLog",
        {"ResourceType": "VPC", "TrafficType": "ALL", "LogDestinationType": "cloud-watch-logs"},
    )
    template.has_resource_properties(
        "AWS::Logs::LogGroup",
        {
            "KmsKeyId": Match.object_like({"Fn::GetAtt": Match.any_value()}),
            "RetentionInDays": settings_by_env[env].log_retention_days,
        },
    )


def test_flow_log_role_is_scoped_to_this_accounts_flow_logs(synthesis: Synthesis, env: str) -> None:
    template = network(synthesis, env)
    template.has_resource_properties(
        "AWS::IAM::Role",
        {
            "AssumeRolePolicyDocument": {
                "Statement": [
                    Match.object_like(
                        {
                            "Principal": {"Service": "vpc-flow-logs.amazonaws.com"},
                            "Condition": {
                                "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}},
                                "ArnLike": Match.any_value(),
                            },
                        }
                    )
                ]
            }
        },
    )
    # The policy is customer-managed and names the log group, no wildcard resource.
    template.has_resource_properties(
        "AWS::IAM::ManagedPolicy",
        {
            "PolicyDocument": {
                "Statement": [
                    Match.object_like(
                        {
                            "Action": [
                                "logs:CreateLogStream",
                                "logs:DescribeLogStreams",
                                "logs:PutLogEvents",
                            ],
                            "Resource": {
                                "Fn::GetAtt": [Match.string_like_regexp("FlowLogs"), "Arn"]
                            },
                        }
                    )
                ]
            }
        },
    )
    # The only inline policy is the CDK Provider framework's, of the S3 prefix-list lookup.
    inline = synthesis.stack(env, "network").resources_of_type("AWS::IAM::Policy")
    assert all("Providerframework" in logical_id for logical_id in inline), sorted(inline)


def test_log_key_rotates_and_admits_only_this_accounts_log_groups(
    synthesis: Synthesis, env: str
) -> None:
    template = network(synthesis, env)
    template.has_resource_properties(
        "AWS::KMS::Key",
        {
            "EnableKeyRotation": True,
            "KeyPolicy": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "Principal": {"Service": "logs.us-east-1.amazonaws.com"},
                                "Condition": {
                                    "ArnLike": {
                                        "kms:EncryptionContext:aws:logs:arn": Match.any_value()
                                    }
                                },
                            }
                        )
                    ]
                )
            },
        },
    )
    template.has_resource_properties("AWS::KMS::Alias", {"AliasName": f"alias/kiln/{env}/logs"})


def test_endpoints_private_dns_in_private_subnets_https_from_vpc_only(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    template = network(synthesis, env)
    stack = synthesis.stack(env, "network")
    interface = [
        e
        for e in stack.resources_of_type("AWS::EC2::VPCEndpoint").values()
        if e["Properties"].get("VpcEndpointType") == "Interface"
    ]
    services = sorted(
        "".join(str(part) for part in e["Properties"]["ServiceName"]["Fn::Join"][1])
        if isinstance(e["Properties"]["ServiceName"], dict)
        else e["Properties"]["ServiceName"]
        for e in interface
    )
    assert [s.split(".", 3)[-1] for s in services] == sorted(
        [
            "ecr.api",
            "ecr.dkr",
            "sts",
            "logs",
            "sagemaker.api",
            "sagemaker.runtime",
            "kms",
            "secretsmanager",
            # What handlers, the model and training call besides (issue 17, item 5).
            "eks",
            "kafka",
            "redshift-data",
            "redshift-serverless",
            "monitoring",
            "ec2",
            "lambda",
            "states",
        ]
    )
    for endpoint in interface:
        assert endpoint["Properties"]["PrivateDnsEnabled"] is True
        assert all("PrivateSubnet" in s["Ref"] for s in endpoint["Properties"]["SubnetIds"])
    template.has_resource_properties(
        "AWS::EC2::SecurityGroup",
        {
            "GroupDescription": "Interface VPC endpoints: HTTPS from the VPC",
            "SecurityGroupIngress": [
                {
                    "CidrIp": settings_by_env[env].network.vpc_cidr,
                    "FromPort": 443,
                    "ToPort": 443,
                    "IpProtocol": "tcp",
                    "Description": "HTTPS from the VPC",
                }
            ],
            "SecurityGroupEgress": [Match.object_like({"CidrIp": "255.255.255.255/32"})],
        },
    )
    template.has_resource_properties(
        "AWS::EC2::VPCEndpoint",
        {
            "VpcEndpointType": "Gateway",
            "ServiceName": {"Fn::Join": ["", ["com.amazonaws.", {"Ref": "AWS::Region"}, ".s3"]]},
        },
    )


def test_default_security_group_is_stripped(synthesis: Synthesis, env: str) -> None:
    assert synthesis.stack(env, "network").resources_of_type("Custom::VpcRestrictDefaultSG")
