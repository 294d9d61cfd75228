"""A custom resource that runs one of kiln's Python handlers at deploy time, inside the VPC."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aws_cdk import Acknowledgment, CustomResource, Duration, RemovalPolicy, Validations
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import custom_resources as cr
from constructs import Construct

from platform_constructs.nag import (
    UnscopedStatement,
    acknowledge_provider_framework,
    unscoped_policies,
)
from platform_constructs.network import https_egress

HANDLERS_DIR = Path(__file__).resolve().parent / "handlers"
RUNTIME = lambda_.Runtime.PYTHON_3_14
# CloudFormation waits at most an hour for a custom resource's answer: `ServiceTimeout` "must
# be an integer from 1 to 3600" (AWS::CloudFormation::CustomResource, https://docs.aws.amazon.
# com/AWSCloudFormation/latest/TemplateReference/aws-resource-cloudformation-customresource.html).
SERVICE_TIMEOUT_SECONDS = 3600
# What the provider's waiter may use of that hour: the hour less one `on_event` run and a
# margin for the framework's own calls, so the waiter gives up (and says why) before
# CloudFormation does.
_MARGIN_MINUTES = 5

# A VPC function's network interfaces: Lambda creates and deletes them in the role's name, and
# these EC2 actions (Describe* above all) take no resource ARN.
_ENI = UnscopedStatement(
    "NetworkInterfaces",
    iam.PolicyStatement(
        actions=[
            "ec2:CreateNetworkInterface",
            "ec2:DescribeNetworkInterfaces",
            "ec2:DeleteNetworkInterface",
            "ec2:AssignPrivateIpAddresses",
            "ec2:UnassignPrivateIpAddresses",
        ],
        resources=["*"],
    ),
    "A VPC Lambda function's network-interface actions (ec2:Create/Describe/"
    "DeleteNetworkInterface, Assign/UnassignPrivateIpAddresses) do not support "
    "resource-level permissions.",
)


class DeployTimeAction(Construct):
    """Runs `handlers/<module>.py` (`on_event`, and `is_complete` when `poll` is set) through
    the CDK's custom-resource Provider framework.

    The handler functions run in the VPC's private subnets behind a security group that only
    sends HTTPS to the VPC (interface endpoints) and S3 (`s3_prefix_list_id`; without one,
    HTTPS anywhere through NAT), log to one KMS-encrypted log group, and use a role holding
    exactly the given `statements` (plus its logs) as a customer-managed policy, and each of
    `unscoped` (plus the network interfaces) as a policy of its own;
    `acknowledgements` for findings `statements` raise go on their policy.
    Exposes `functions`, `role`, `policy`, `security_group`, `log_group`, `provider`, `resource`.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        module: str,
        resource_type: str,
        description: str,
        properties: Mapping[str, Any],
        statements: Sequence[iam.PolicyStatement],
        vpc: ec2.IVpc,
        log_key: kms.IKey,
        log_retention: logs.RetentionDays,
        removal_policy: RemovalPolicy,
        acknowledgements: Sequence[Acknowledgment] = (),
        unscoped: Sequence[UnscopedStatement] = (),
        role: iam.Role | None = None,
        vpc_cidr: str | None = None,
        s3_prefix_list_id: str | None = None,
        poll: bool = False,
        timeout_minutes: int = 14,
        extra_files: Sequence[str] = (),
    ) -> None:
        super().__init__(scope, construct_id)
        if not (HANDLERS_DIR / f"{module}.py").exists():
            raise ValueError(f"no handler module {module!r} in {HANDLERS_DIR}")
        self.resource_type = resource_type
        self.total_timeout_minutes = (
            SERVICE_TIMEOUT_SECONDS // 60 - timeout_minutes - _MARGIN_MINUTES
        )
        self.log_group = logs.LogGroup(
            self,
            "Logs",
            encryption_key=log_key,
            retention=log_retention,
            removal_policy=removal_policy,
        )
        self.security_group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=vpc,
            allow_all_outbound=False,
            description=f"{description}: HTTPS to AWS APIs only",
        )
        https_egress(
            self.security_group,
            vpc_cidr=vpc_cidr or vpc.vpc_cidr_block,
            s3_prefix_list_id=s3_prefix_list_id,
            what="Deploy-time handler",
        )
        # A caller passes its own `role` when a statement must name it (its own access entry).
        self.role = role or iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"{description}: deploy-time handler",
        )
        self.policy = iam.ManagedPolicy(
            self,
            "Policy",
            roles=[self.role],
            statements=[
                iam.PolicyStatement(
                    actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                    resources=[self.log_group.log_group_arn],
                ),
                *statements,
            ],
        )
        if acknowledgements:
            Validations.of(self.policy).acknowledge(*acknowledgements)
        self.unscoped_policies = unscoped_policies(self, [self.role], [_ENI, *unscoped])
        entry_points = {"OnEvent": "on_event", **({"IsComplete": "is_complete"} if poll else {})}
        # The role gets no grants from the CDK: everything it may do is in `policy` above.
        fixed_role = self.role.without_policy_updates()
        self.functions: dict[str, lambda_.Function] = {
            name: lambda_.Function(
                self,
                name,
                description=f"{description} ({entry})",
                runtime=RUNTIME,
                handler=f"{module}.{entry}",
                # Only this handler's file (and the data files it reads, relative to
                # HANDLERS_DIR): an edit to another handler leaves this asset alone.
                code=lambda_.Code.from_asset(
                    str(HANDLERS_DIR),
                    exclude=["*", f"!{module}.py", *(f"!{f}" for f in extra_files)],
                ),
                timeout=Duration.minutes(timeout_minutes),
                memory_size=256,
                role=fixed_role,
                vpc=vpc,
                vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
                security_groups=[self.security_group],
                log_group=self.log_group,
                # Deploys are serial: one at a time is enough, and it caps a runaway loop.
                reserved_concurrent_executions=2,
            )
            for name, entry in entry_points.items()
        }
        for function in self.functions.values():
            # Lambda checks at creation that the role may create the VPC network interfaces.
            function.node.add_dependency(self.policy, *self.unscoped_policies.values())
            Validations.of(function).acknowledge(
                Acknowledgment(
                    id="NIST.800.53.R5-LambdaDLQ",
                    reason="Invoked synchronously by the custom-resource framework, which "
                    "reports any failure to CloudFormation; there is no async event to keep.",
                )
            )
        self.provider = cr.Provider(
            self,
            "Provider",
            on_event_handler=self.functions["OnEvent"],
            is_complete_handler=self.functions.get("IsComplete"),
            query_interval=Duration.minutes(1) if poll else None,
            total_timeout=Duration.minutes(self.total_timeout_minutes) if poll else None,
            vpc=vpc,
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
            security_groups=[self.security_group],
            log_group=self.log_group,
            disable_waiter_state_machine_logging=False if poll else None,
            waiter_state_machine_log_options=cr.LogOptions(
                destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=False
            )
            if poll
            else None,
        )
        acknowledge_provider_framework(self.provider, list(self.functions.values()))
        self.resource = self.add_resource("Resource", properties)

    def add_resource(self, construct_id: str, properties: Mapping[str, Any]) -> CustomResource:
        """Another custom resource served by this action's handler and provider (one more
        step of the same kind, ordered with `node.add_dependency`), with the same timeout."""
        return CustomResource(
            self,
            construct_id,
            service_token=self.provider.service_token,
            resource_type=self.resource_type,
            properties=dict(properties),
            service_timeout=Duration.seconds(SERVICE_TIMEOUT_SECONDS),
        )
