"""A customer-managed KMS key with rotation and, where asked, a grant for CloudWatch Logs."""

from __future__ import annotations

from aws_cdk import Aws, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct


class PlatformKey(Construct):
    """A symmetric key with yearly rotation, an alias, and the account root as key administrator.

    `cloudwatch_logs=True` lets the regional Logs service use the key for this account's
    log groups only (the encryption context names the log group), which is what encrypted
    log groups need. `alarm_notifications=True` lets CloudWatch alarms of this account publish
    to SNS topics encrypted with the key.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        alias: str,
        description: str,
        removal_policy: RemovalPolicy,
        cloudwatch_logs: bool = False,
        alarm_notifications: bool = False,
    ) -> None:
        super().__init__(scope, construct_id)
        self.key = kms.Key(
            self,
            "Key",
            alias=alias,
            description=description,
            enable_key_rotation=True,
            removal_policy=removal_policy,
        )
        if cloudwatch_logs:
            region = Stack.of(self).region
            self.key.add_to_resource_policy(
                iam.PolicyStatement(
                    sid="AllowCloudWatchLogsForThisAccountsLogGroups",
                    principals=[iam.ServicePrincipal(f"logs.{region}.amazonaws.com")],
                    actions=[
                        "kms:Encrypt*",
                        "kms:Decrypt*",
                        "kms:ReEncrypt*",
                        "kms:GenerateDataKey*",
                        "kms:Describe*",
                    ],
                    resources=["*"],
                    conditions={
                        "ArnLike": {
                            "kms:EncryptionContext:aws:logs:arn": (
                                f"arn:{Aws.PARTITION}:logs:{region}:{Aws.ACCOUNT_ID}:log-group:*"
                            )
                        }
                    },
                )
            )
        if alarm_notifications:
            self.key.add_to_resource_policy(
                iam.PolicyStatement(
                    sid="AllowCloudWatchAlarmsToPublishToEncryptedTopics",
                    principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                    actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                    resources=["*"],
                    conditions={"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}},
                )
            )
