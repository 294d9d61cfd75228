"""A VPC with public, private and isolated subnets, encrypted flow logs and VPC endpoints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aws_cdk import Acknowledgment, Aws, RemovalPolicy, Validations
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from constructs import Construct

# The AWS services workloads reach without leaving the VPC (ECR pulls, STS for IRSA and
# Pod Identity, Logs, SageMaker control and runtime APIs, KMS, Secrets Manager).
WORKLOAD_INTERFACE_ENDPOINTS: Mapping[str, ec2.InterfaceVpcEndpointAwsService] = {
    "EcrApi": ec2.InterfaceVpcEndpointAwsService.ECR,
    "EcrDocker": ec2.InterfaceVpcEndpointAwsService.ECR_DOCKER,
    "Sts": ec2.InterfaceVpcEndpointAwsService.STS,
    "Logs": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_LOGS,
    "SageMakerApi": ec2.InterfaceVpcEndpointAwsService.SAGEMAKER_API,
    "SageMakerRuntime": ec2.InterfaceVpcEndpointAwsService.SAGEMAKER_RUNTIME,
    "Kms": ec2.InterfaceVpcEndpointAwsService.KMS,
    "SecretsManager": ec2.InterfaceVpcEndpointAwsService.SECRETS_MANAGER,
    # What the deploy-time handlers, the model container and training call besides: EKS
    # (DescribeCluster), MSK (GetBootstrapBrokers, UpdateConnectivity), the Redshift Data API
    # and Redshift Serverless (GetNamespace), CloudWatch metrics, EC2 (the S3 prefix-list
    # lookup), and Lambda and Step Functions (the CDK's custom-resource framework in the VPC).
    "Eks": ec2.InterfaceVpcEndpointAwsService.EKS,
    "Kafka": ec2.InterfaceVpcEndpointAwsService.KAFKA,
    "RedshiftData": ec2.InterfaceVpcEndpointAwsService.REDSHIFT_DATA,
    "RedshiftServerless": ec2.InterfaceVpcEndpointAwsService.REDSHIFT_SERVERLESS,
    "Monitoring": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_MONITORING,
    "Ec2": ec2.InterfaceVpcEndpointAwsService.EC2,
    "Lambda": ec2.InterfaceVpcEndpointAwsService.LAMBDA_,
    "StepFunctions": ec2.InterfaceVpcEndpointAwsService.STEP_FUNCTIONS,
}


def account_only_endpoint_policy(endpoint: ec2.InterfaceVpcEndpoint) -> None:
    """The endpoint serves this account's principals only: stolen credentials of another
    account cannot use it to move data out of the VPC (PrivateLink guide, "Control access to
    VPC endpoints using endpoint policies"; global key aws:PrincipalAccount)."""
    endpoint.add_to_policy(
        iam.PolicyStatement(
            principals=[iam.AnyPrincipal()],
            actions=["*"],
            resources=["*"],
            conditions={"StringEquals": {"aws:PrincipalAccount": Aws.ACCOUNT_ID}},
        )
    )


def https_egress(
    group: ec2.SecurityGroup, *, vpc_cidr: str, s3_prefix_list_id: str | None, what: str
) -> None:
    """HTTPS out of `group`: to the VPC (its interface endpoints, private API servers) and to S3
    through the gateway endpoint (`s3_prefix_list_id`, the region's S3 prefix list), nothing
    else. Without a prefix list id (an environment without interface endpoints), AWS APIs are
    reached through the NAT gateways: HTTPS to any address."""
    if s3_prefix_list_id is None:
        group.add_egress_rule(
            ec2.Peer.any_ipv4(), ec2.Port.tcp(443), f"{what}: AWS APIs through NAT"
        )
        return
    group.add_egress_rule(
        ec2.Peer.ipv4(vpc_cidr), ec2.Port.tcp(443), f"{what}: AWS APIs (interface endpoints)"
    )
    group.add_egress_rule(
        ec2.Peer.prefix_list(s3_prefix_list_id), ec2.Port.tcp(443), f"{what}: S3 (gateway endpoint)"
    )


class PlatformVpc(Construct):
    """The VPC and what makes it production-grade.

    Subnets: `Public` (NAT gateways only), `Private` (workloads, egress through NAT),
    `Isolated` (data stores, no route out). The default security group is stripped of all
    rules, every flow is logged to a KMS-encrypted log group, S3 is reached through a
    gateway endpoint and the `interface_endpoints` services through private endpoints.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        cidr: str,
        availability_zones: Sequence[str],
        nat_gateways: int,
        public_mask: int,
        private_mask: int,
        isolated_mask: int,
        flow_log_key: kms.IKey,
        flow_log_retention: logs.RetentionDays,
        removal_policy: RemovalPolicy,
        interface_endpoints: Mapping[str, ec2.InterfaceVpcEndpointAwsService],
    ) -> None:
        super().__init__(scope, construct_id)
        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr(cidr),
            availability_zones=list(availability_zones),
            nat_gateways=nat_gateways,
            subnet_configuration=[
                ec2.SubnetConfiguration(
                    name="Public",
                    subnet_type=ec2.SubnetType.PUBLIC,
                    cidr_mask=public_mask,
                    map_public_ip_on_launch=False,
                ),
                ec2.SubnetConfiguration(
                    name="Private",
                    subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS,
                    cidr_mask=private_mask,
                ),
                ec2.SubnetConfiguration(
                    name="Isolated",
                    subnet_type=ec2.SubnetType.PRIVATE_ISOLATED,
                    cidr_mask=isolated_mask,
                ),
            ],
            restrict_default_security_group=True,
            gateway_endpoints={
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)
            },
        )
        for subnet in [
            *self.vpc.public_subnets,
            *self.vpc.private_subnets,
            *self.vpc.isolated_subnets,
        ]:
            Validations.of(subnet.node.find_child("Subnet")).acknowledge(
                Acknowledgment(
                    id="CloudFormation-Validate::W3010",
                    reason="Zones come from config so synth needs no AWS lookup; the settings "
                    "schema checks that each zone belongs to the environment's region.",
                )
            )
        for subnet in self.vpc.public_subnets:
            Validations.of(subnet.node.find_child("DefaultRoute")).acknowledge(
                Acknowledgment(
                    id="NIST.800.53.R5-VPCNoUnrestrictedRouteToIGW",
                    reason="Public subnets hold only the NAT gateways, whose egress needs the "
                    "default route to the internet gateway; no workload runs in them.",
                )
            )
        self.flow_log_group = logs.LogGroup(
            self,
            "FlowLogs",
            encryption_key=flow_log_key,
            retention=flow_log_retention,
            removal_policy=removal_policy,
        )
        # A role with a customer-managed policy (not the inline default policy the CDK would
        # add), trusted only by this account's flow logs.
        self.flow_log_role = iam.Role(
            self,
            "FlowLogRole",
            assumed_by=iam.ServicePrincipal("vpc-flow-logs.amazonaws.com").with_conditions(
                {
                    "StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID},
                    "ArnLike": {
                        "aws:SourceArn": f"arn:{Aws.PARTITION}:ec2:{Aws.REGION}:"
                        f"{Aws.ACCOUNT_ID}:vpc-flow-log/*"
                    },
                }
            ),
        )
        self.flow_log_policy = iam.ManagedPolicy(
            self,
            "FlowLogPolicy",
            roles=[self.flow_log_role],
            statements=[
                iam.PolicyStatement(
                    actions=[
                        "logs:CreateLogStream",
                        "logs:PutLogEvents",
                        "logs:DescribeLogStreams",
                    ],
                    resources=[self.flow_log_group.log_group_arn],
                )
            ],
        )
        self.flow_log = self.vpc.add_flow_log(
            "FlowLog",
            destination=ec2.FlowLogDestination.to_cloud_watch_logs(
                self.flow_log_group, self.flow_log_role.without_policy_updates()
            ),
            traffic_type=ec2.FlowLogTrafficType.ALL,
        )
        # One security group for every interface endpoint: HTTPS from inside the VPC only.
        self.endpoint_security_group = ec2.SecurityGroup(
            self,
            "EndpointSecurityGroup",
            vpc=self.vpc,
            description="Interface VPC endpoints: HTTPS from the VPC",
            allow_all_outbound=False,
        )
        self.endpoint_security_group.add_ingress_rule(
            ec2.Peer.ipv4(cidr), ec2.Port.tcp(443), "HTTPS from the VPC"
        )
        self.interface_endpoints: dict[str, ec2.InterfaceVpcEndpoint] = {
            name: self.vpc.add_interface_endpoint(
                name,
                service=service,
                private_dns_enabled=True,
                open=False,
                security_groups=[self.endpoint_security_group],
                subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
            )
            for name, service in interface_endpoints.items()
        }
        for endpoint in self.interface_endpoints.values():
            account_only_endpoint_policy(endpoint)
