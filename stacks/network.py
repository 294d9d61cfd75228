"""The network stack: the environment's VPC, its flow logs and its VPC endpoints."""

from __future__ import annotations

from aws_cdk import CfnOutput
from constructs import Construct

from kiln import naming
from kiln.contract import Component, Outputs
from kiln.settings import Settings
from platform_constructs.kms import PlatformKey
from platform_constructs.logs import retention_days
from platform_constructs.network import WORKLOAD_INTERFACE_ENDPOINTS, PlatformVpc
from stacks.base import KilnStack, removal_policy


class NetworkStack(KilnStack):
    """Composes the log key and the VPC; later stacks receive `vpc` and `log_key` from here."""

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
        CfnOutput(self, Outputs.VPC_ID.key, value=self.vpc.vpc_id)
