"""The statements every SageMaker execution role of kiln needs to run kiln's image (pull it, write
its logs and metrics, attach network interfaces in the VPC): one definition for the endpoint's
role and the training jobs' role."""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Acknowledgment
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam

from kiln.contract import (
    ECR_PULL_ACTIONS,
    LOG_WRITE_ACTIONS,
    VPC_ACCESS_ACTIONS,
    SageMakerRuntime,
)


@dataclass(frozen=True)
class ExecutionStatements:
    """`pull_image` and `write_logs` name their resources; `unscoped` holds the actions that take
    no resource ARN, which `acknowledgment` explains to cdk-nag."""

    pull_image: iam.PolicyStatement
    write_logs: iam.PolicyStatement
    unscoped: tuple[iam.PolicyStatement, ...]
    acknowledgment: Acknowledgment


def execution_statements(
    runtime: SageMakerRuntime, *, repository: ecr.IRepository, logs_arn: str
) -> ExecutionStatements:
    """The statements of `runtime` (endpoints or training jobs) for the image in `repository`,
    writing the log streams `logs_arn` names."""
    return ExecutionStatements(
        pull_image=iam.PolicyStatement(
            actions=list(ECR_PULL_ACTIONS), resources=[repository.repository_arn]
        ),
        write_logs=iam.PolicyStatement(actions=list(LOG_WRITE_ACTIONS), resources=[logs_arn]),
        # These take no resource ARN (AWS documents "*").
        unscoped=(
            iam.PolicyStatement(actions=["ecr:GetAuthorizationToken"], resources=["*"]),
            iam.PolicyStatement(
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],
                conditions={"StringEquals": {"cloudwatch:namespace": runtime.metrics_namespace}},
            ),
            iam.PolicyStatement(actions=list(VPC_ACCESS_ACTIONS), resources=["*"]),
        ),
        acknowledgment=Acknowledgment(
            id="AwsSolutions-IAM5[Resource::*]",
            reason="ecr:GetAuthorizationToken, cloudwatch:PutMetricData (limited by a "
            "namespace condition) and the VPC network-interface actions take no resource "
            "ARN; every other statement names its resources.",
        ),
    )
