"""The network stack: the environment's VPC, its flow logs and its VPC endpoints."""

from __future__ import annotations

from aws_cdk import CfnOutput, Stack
from aws_cdk import aws_iam as iam
from constructs import Construct

from kiln import naming
from kiln.contract import Component, Outputs
from kiln.settings import Settings
from platform_constructs.deploy_time_action import DeployTimeAction
from platform_constructs.kms import PlatformKey
from platform_constructs.logs import retention_days
from platform_constructs.nag import UnscopedStatement
from platform_constructs.network import WORKLOAD_INTERFACE_ENDPOINTS, PlatformVpc
from stacks.base import KilnStack, removal_policy


class NetworkStack(KilnStack):
    """Composes the log key and the VPC; later stacks receive `vpc`, `log_key` and
    `s3_prefix_list_id` (None without interface endpoints) from here."""

    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(
            scope,
            construct_id,
            settings=settings,
            component=Component.NETWORK,
            description=f"kiln {settings.name}: VPC, subnets, NAT, flow logs, VPC endpoints",
        )
        self.log_key = PlatformKey(
            self,
            "LogKey",
            alias=naming.kms_alias(settings, "logs"),
            description=f"kiln {settings.name}: encrypts CloudWatch log groups",
            removal_policy=removal_policy(settings),
            cloudwatch_logs=True,
        ).key
        network = settings.network
        self.platform_vpc = PlatformVpc(
            self,
            "Network",
            cidr=network.vpc_cidr,
            availability_zones=settings.availability_zones,
            nat_gateways=network.nat_gateways,
            public_mask=network.subnets.public_mask,
            private_mask=network.subnets.private_mask,
            isolated_mask=network.subnets.isolated_mask,
            flow_log_key=self.log_key,
            flow_log_retention=retention_days(settings.log_retention_days),
            removal_policy=removal_policy(settings),
            interface_endpoints=WORKLOAD_INTERFACE_ENDPOINTS if network.interface_endpoints else {},
        )
        self.vpc = self.platform_vpc.vpc
        self.s3_prefix_list_id: str | None = None
        if network.interface_endpoints:
            self.s3_prefix_list_id = self._s3_prefix_list(settings)
        CfnOutput(self, Outputs.VPC_ID.key, value=self.vpc.vpc_id)

    def _s3_prefix_list(self, settings: Settings) -> str:
        """The region's S3 prefix list id, found at deploy time, so that workload security
        groups can send HTTPS to S3 (gateway endpoint) instead of anywhere. This one action
        still sends HTTPS anywhere: it answers CloudFormation through S3 before the id exists."""
        lookup = DeployTimeAction(
            self,
            "S3PrefixList",
            module="managed_prefix_list",
            resource_type="Custom::ManagedPrefixList",
            description=f"kiln {settings.name}: S3 prefix list lookup",
            properties={"PrefixListName": f"com.amazonaws.{Stack.of(self).region}.s3"},
            statements=[],
            unscoped=[
                UnscopedStatement(
                    "DescribePrefixLists",
                    iam.PolicyStatement(
                        actions=["ec2:DescribeManagedPrefixLists"], resources=["*"]
                    ),
                    "ec2:DescribeManagedPrefixLists (finding the S3 prefix list's id) is a "
                    "Describe call, which takes no resource ARN.",
                )
            ],
            vpc=self.vpc,
            log_key=self.log_key,
            log_retention=retention_days(settings.log_retention_days),
            removal_policy=removal_policy(settings),
        )
        # The handler reaches EC2 through its interface endpoint.
        for endpoint in self.platform_vpc.interface_endpoints.values():
            lookup.resource.node.add_dependency(endpoint)
        return lookup.resource.get_att_string("PrefixListId")
