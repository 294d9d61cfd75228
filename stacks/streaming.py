"""The streaming stack: MSK (IAM auth, TLS only), its topics, and Firehose to the raw zone."""

from __future__ import annotations

from aws_cdk import CfnOutput
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_kms as kms
from constructs import Construct

from kiln import naming
from kiln.contract import Component, Outputs
from kiln.settings import Settings
from platform_constructs.firehose import MskToS3Delivery
from platform_constructs.kms import PlatformKey
from platform_constructs.logs import retention_days
from platform_constructs.msk import MskCluster, Topic
from stacks.base import KilnStack, removal_policy
from stacks.data_lake import lake_bucket


class StreamingStack(KilnStack):
    """Composes the streaming key, the MSK cluster and the Firehose delivery to the raw zone.

    Attributes: `key`, `msk` (MskCluster), `delivery` (MskToS3Delivery).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        vpc: ec2.IVpc,
        log_key: kms.IKey,
        lake_key: kms.IKey,
        s3_prefix_list_id: str | None = None,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            settings=settings,
            component=Component.STREAMING,
            description=f"kiln {settings.name}: MSK cluster, topics, Firehose to the raw zone",
        )
        streaming = settings.streaming
        policy = removal_policy(settings)
        retention = retention_days(settings.log_retention_days)
        self.key = PlatformKey(
            self,
            "StreamingKey",
            alias=naming.kms_alias(settings, "streaming"),
            description=f"kiln {settings.name}: encrypts MSK broker storage",
            removal_policy=policy,
        ).key
        self.msk = MskCluster(
            self,
            "Kafka",
            name=naming.prefix(settings),
            vpc=vpc,
            client_cidr=settings.network.vpc_cidr,
            kafka_version=streaming.kafka_version,
            instance_type=streaming.broker_instance_type,
            broker_count=settings.broker_count,
            storage_gib=streaming.broker_storage_gib,
            replication_factor=settings.kafka_replication_factor,
            topics=[Topic(t.name, t.partitions, t.retention_hours) for t in streaming.topics],
            key=self.key,
            log_key=log_key,
            log_retention=retention,
            removal_policy=policy,
        )
        self.msk.enable_firehose_access(
            log_key=log_key,
            log_retention=retention,
            removal_policy=policy,
            s3_prefix_list_id=s3_prefix_list_id,
        )
        self.delivery = MskToS3Delivery(
            self,
            "RawDelivery",
            cluster=self.msk,
            topic=streaming.firehose.topic,
            stream_name=naming.delivery_stream_name(settings),
            bucket=lake_bucket(self, settings, "raw"),
            bucket_key=lake_key,
            buffer_interval_seconds=streaming.firehose.buffer_interval_seconds,
            buffer_size_mib=streaming.firehose.buffer_size_mib,
            log_key=log_key,
            log_retention=retention,
            removal_policy=policy,
        )
        CfnOutput(self, Outputs.MSK_CLUSTER_ARN.key, value=self.msk.arn)
        CfnOutput(self, Outputs.TOPICS.key, value=",".join(t.name for t in streaming.topics))
        CfnOutput(self, Outputs.DELIVERY_STREAM_NAME.key, value=self.delivery.stream.ref)
