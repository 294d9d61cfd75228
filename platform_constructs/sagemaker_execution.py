"""The statements every SageMaker execution role of kiln needs to run kiln's image (pull it, write
its logs and metrics, attach network interfaces in the VPC): one definition for the endpoint's
role and the training jobs' role."""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam

from kiln.contract import (
    ECR_PULL_ACTIONS,
    LOG_WRITE_ACTIONS,
    VPC_ACCESS_ACTIONS,
    SageMakerRuntime,
)
from platform_constructs.nag import UnscopedStatement


@dataclass(frozen=True)
class ExecutionStatements:
    """`pull_image` and `write_logs` name their resources; `unscoped` holds the actions that take
    no resource ARN, each with its reason (one managed policy each: `nag.unscoped_policies`)."""

    pull_image: iam.PolicyStatement
    write_logs: iam.PolicyStatement
    unscoped: tuple[UnscopedStatement, ...]


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
        # These take no resource ARN: the Service Authorization Reference lists no resource
        # type for them (ECR, CloudWatch, EC2 network interfaces of SageMaker's VPC mode).
        unscoped=(
            UnscopedStatement(
                "RegistryLogin",
                iam.PolicyStatement(actions=["ecr:GetAuthorizationToken"], resources=["*"]),
                "ecr:GetAuthorizationToken (the registry login before the image pull) takes "
                "no resource ARN; pulling is scoped to the image's repository.",
            ),
            UnscopedStatement(
                "Metrics",
                iam.PolicyStatement(
                    actions=["cloudwatch:PutMetricData"],
                    resources=["*"],
                    conditions={
                        "StringEquals": {"cloudwatch:namespace": runtime.metrics_namespace}
                    },
                ),
                "cloudwatch:PutMetricData takes no resource ARN; the statement is limited to "
                f"the {runtime.metrics_namespace} namespace by a condition.",
            ),
            UnscopedStatement(
                "NetworkInterfaces",
                iam.PolicyStatement(actions=list(VPC_ACCESS_ACTIONS), resources=["*"]),
                "SageMaker's VPC mode creates, describes and deletes network interfaces in "
                "the role's name; these EC2 actions and the Describe* calls take no "
                "resource ARN.",
            ),
        ),
    )


def sagemaker_principal(account: str, region: str, partition: str) -> iam.IPrincipal:
    """SageMaker, on behalf of this account's own SageMaker resources only (SageMaker Developer
    Guide, "Cross-service confused deputy prevention": aws:SourceAccount and aws:SourceArn in
    an execution role's trust policy, for inference and training)."""
    return iam.ServicePrincipal("sagemaker.amazonaws.com").with_conditions(
        {
            "StringEquals": {"aws:SourceAccount": account},
            "ArnLike": {"aws:SourceArn": f"arn:{partition}:sagemaker:{region}:{account}:*"},
        }
    )
