"""Amazon Data Firehose from one MSK topic to date-partitioned, KMS-encrypted S3 objects."""

from __future__ import annotations

from aws_cdk import Acknowledgment, Aws, RemovalPolicy, Validations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kinesisfirehose as firehose
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import Construct

from kiln.contract import errors_prefix, events_prefix
from platform_constructs.msk import MskCluster
from platform_constructs.nag import wildcard_resource


def partitioned_prefix(root: str) -> str:
    """`<root>/year=YYYY/month=MM/day=DD/hour=HH/`: Hive-style, so Athena and Glue prune by it."""
    return (
        f"{root}/year=!{{timestamp:yyyy}}/month=!{{timestamp:MM}}/"
        "day=!{timestamp:dd}/hour=!{timestamp:HH}/"
    )


class MskToS3Delivery(Construct):
    """Reads `topic` from `cluster` over private connectivity with IAM, and writes GZIP
    batches under `events/<topic>/` (failures under `errors/<topic>/<type>/`) in `bucket`,
    encrypted with `bucket_key`. Exposes `stream`, `role`, `policy`, `log_group`.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        cluster: MskCluster,
        topic: str,
        stream_name: str,
        bucket: s3.IBucket,
        bucket_key: kms.IKey,
        buffer_interval_seconds: int,
        buffer_size_mib: int,
        log_key: kms.IKey,
        log_retention: logs.RetentionDays,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)
        self.log_group = logs.LogGroup(
            self,
            "Logs",
            encryption_key=log_key,
            retention=log_retention,
            removal_policy=removal_policy,
        )
        log_stream = self.log_group.add_stream("S3Delivery")
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("firehose.amazonaws.com").with_conditions(
                {"StringEquals": {"sts:ExternalId": Aws.ACCOUNT_ID}}
            ),
            description=f"Firehose: MSK topic {topic} to {bucket.node.id}",
        )
        prefix, errors = events_prefix(topic), errors_prefix(topic)
        objects = [bucket.arn_for_objects(f"{prefix}/*"), bucket.arn_for_objects(f"{errors}/*")]
        self.policy = iam.ManagedPolicy(
            self,
            "Policy",
            roles=[self.role],
            statements=[
                *cluster.read_statements([topic]),
                iam.PolicyStatement(
                    actions=[
                        "s3:GetBucketLocation",
                        "s3:ListBucket",
                        "s3:ListBucketMultipartUploads",
                    ],
                    resources=[bucket.bucket_arn],
                ),
                iam.PolicyStatement(
                    actions=["s3:AbortMultipartUpload", "s3:GetObject", "s3:PutObject"],
                    resources=objects,
                ),
                iam.PolicyStatement(
                    actions=["kms:GenerateDataKey", "kms:Decrypt"],
                    resources=[bucket_key.key_arn],
                    conditions={
                        "StringEquals": {"kms:ViaService": f"s3.{Aws.REGION}.amazonaws.com"}
                    },
                ),
                iam.PolicyStatement(
                    actions=["logs:PutLogEvents"],
                    resources=[self.log_group.log_group_arn],
                ),
            ],
        )
        Validations.of(self.policy).acknowledge(
            *[
                wildcard_resource(
                    self,
                    arn,
                    "Firehose writes batch objects whose keys it generates, under "
                    "this delivery's own events/ and errors/ prefixes only.",
                )
                for arn in objects
            ],
            *cluster.wildcard_acknowledgements(self, [topic], "Firehose"),
        )
        self.stream = firehose.CfnDeliveryStream(
            self,
            "Stream",
            # Named, so the name the stack outputs and the alarms watch is the stream's own.
            delivery_stream_name=stream_name,
            delivery_stream_type="MSKAsSource",
            msk_source_configuration=firehose.CfnDeliveryStream.MSKSourceConfigurationProperty(
                msk_cluster_arn=cluster.arn,
                topic_name=topic,
                authentication_configuration=firehose.CfnDeliveryStream.AuthenticationConfigurationProperty(
                    role_arn=self.role.role_arn, connectivity="PRIVATE"
                ),
            ),
            extended_s3_destination_configuration=firehose.CfnDeliveryStream.ExtendedS3DestinationConfigurationProperty(
                bucket_arn=bucket.bucket_arn,
                role_arn=self.role.role_arn,
                prefix=partitioned_prefix(prefix),
                error_output_prefix=partitioned_prefix(f"{errors}/!{{firehose:error-output-type}}"),
                buffering_hints=firehose.CfnDeliveryStream.BufferingHintsProperty(
                    interval_in_seconds=buffer_interval_seconds, size_in_m_bs=buffer_size_mib
                ),
                compression_format="GZIP",
                encryption_configuration=firehose.CfnDeliveryStream.EncryptionConfigurationProperty(
                    kms_encryption_config=firehose.CfnDeliveryStream.KMSEncryptionConfigProperty(
                        awskms_key_arn=bucket_key.key_arn
                    )
                ),
                cloud_watch_logging_options=firehose.CfnDeliveryStream.CloudWatchLoggingOptionsProperty(
                    enabled=True,
                    log_group_name=self.log_group.log_group_name,
                    log_stream_name=log_stream.log_stream_name,
                ),
            ),
        )
        Validations.of(self.stream).acknowledge(
            Acknowledgment(
                id="AwsSolutions-KDF1",
                reason="Stream-side SSE applies to Direct PUT streams only; this one reads MSK, "
                "whose storage is KMS-encrypted, and writes S3 objects with the lake's KMS key.",
            )
        )
        # The role's policy must exist before Firehose first assumes the role.
        self.stream.node.add_dependency(self.policy)
        if cluster.firehose_access is not None:
            self.stream.node.add_dependency(cluster.firehose_access.resource)
