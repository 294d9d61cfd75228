"""An MSK provisioned cluster with IAM-only, TLS-only access, its topics, and Firehose access."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from aws_cdk import Acknowledgment, Aws, RemovalPolicy
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_msk as msk
from constructs import Construct

from platform_constructs.deploy_time_action import DeployTimeAction
from platform_constructs.nag import wildcard_resource

IAM_TLS_PORT = 9098  # brokers' port for SASL/IAM over TLS, the only listener clients get


@dataclass(frozen=True)
class Topic:
    """A topic to create: name, partitions, retention."""

    name: str
    partitions: int
    retention_hours: int


def server_properties(replication_factor: int) -> str:
    """Broker defaults: no implicit topics, durable writes, no unclean leader election."""
    return "\n".join(
        [
            "auto.create.topics.enable=false",
            f"default.replication.factor={replication_factor}",
            f"min.insync.replicas={max(1, replication_factor - 1)}",
            "unclean.leader.election.enable=false",
            "delete.topic.enable=true",
        ]
    )


def topic_configs(topic: Topic, replication_factor: int) -> str:
    """AWS::MSK::Topic's `Configs`: the topic settings as base64-encoded JSON."""
    configs = {
        "cleanup.policy": "delete",
        "retention.ms": str(topic.retention_hours * 3_600_000),
        "min.insync.replicas": str(max(1, replication_factor - 1)),
    }
    return base64.b64encode(json.dumps(configs, sort_keys=True).encode()).decode()


def topic_gate_fingerprint(
    *,
    kafka_version: str,
    instance_type: str,
    broker_count: int,
    storage_gib: int,
    replication_factor: int,
    topics: Sequence[Topic],
) -> str:
    """What a topic change must wait behind, as a short hash: the cluster's own settings (a
    change to them starts a cluster operation) and the topics themselves. The gate carries it
    as a property, so CloudFormation runs the gate again whenever either changes."""
    spec = {
        "cluster": [kafka_version, instance_type, broker_count, storage_gib],
        "topics": [[t.name, t.partitions, t.retention_hours] for t in topics],
        "replication": replication_factor,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class MskCluster(Construct):
    """MSK in the private subnets, one broker group across the zones; clients in
    `client_cidr` (the VPC's literal range) may reach the brokers' IAM/TLS port.

    Clients authenticate with IAM only (no unauthenticated access, no SCRAM, no mTLS) and
    speak TLS only, also between brokers; data at rest uses `key`; broker logs go to a
    KMS-encrypted log group. Topics are declared here and created by CloudFormation.
    `enable_firehose_access()` adds what Amazon Data Firehose needs to read the cluster.
    Exposes `cluster`, `configuration`, `security_group`, `log_group`, `topics`, `arn`.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        name: str,
        vpc: ec2.IVpc,
        client_cidr: str,
        kafka_version: str,
        instance_type: str,
        broker_count: int,
        storage_gib: int,
        replication_factor: int,
        topics: Sequence[Topic],
        key: kms.IKey,
        log_key: kms.IKey,
        log_retention: logs.RetentionDays,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)
        self.name = name
        self.vpc = vpc
        self.client_cidr = client_cidr
        self.security_group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=vpc,
            allow_all_outbound=False,
            description=f"MSK {name}: Kafka over TLS with IAM from the VPC",
        )
        self.security_group.add_ingress_rule(
            ec2.Peer.ipv4(client_cidr),
            ec2.Port.tcp(IAM_TLS_PORT),
            "Kafka clients (SASL/IAM over TLS) from the VPC",
        )
        self.security_group.add_ingress_rule(
            self.security_group, ec2.Port.all_tcp(), "Brokers replicate among themselves"
        )
        self.security_group.add_egress_rule(
            self.security_group, ec2.Port.all_tcp(), "Brokers replicate among themselves"
        )
        self.log_group = logs.LogGroup(
            self,
            "BrokerLogs",
            encryption_key=log_key,
            retention=log_retention,
            removal_policy=removal_policy,
        )
        self.configuration = msk.CfnConfiguration(
            self,
            "Configuration",
            name=f"{name}-config",
            kafka_versions_list=[kafka_version],
            server_properties=server_properties(replication_factor),
            description=f"{name}: safe broker defaults",
        )
        subnets = vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)
        self.cluster = msk.CfnCluster(
            self,
            "Cluster",
            cluster_name=name,
            kafka_version=kafka_version,
            number_of_broker_nodes=broker_count,
            enhanced_monitoring="PER_BROKER",
            broker_node_group_info=msk.CfnCluster.BrokerNodeGroupInfoProperty(
                instance_type=instance_type,
                client_subnets=subnets.subnet_ids,
                security_groups=[self.security_group.security_group_id],
                storage_info=msk.CfnCluster.StorageInfoProperty(
                    ebs_storage_info=msk.CfnCluster.EBSStorageInfoProperty(volume_size=storage_gib)
                ),
                connectivity_info=msk.CfnCluster.ConnectivityInfoProperty(
                    public_access=msk.CfnCluster.PublicAccessProperty(type="DISABLED")
                ),
            ),
            client_authentication=msk.CfnCluster.ClientAuthenticationProperty(
                sasl=msk.CfnCluster.SaslProperty(iam=msk.CfnCluster.IamProperty(enabled=True)),
                unauthenticated=msk.CfnCluster.UnauthenticatedProperty(enabled=False),
            ),
            encryption_info=msk.CfnCluster.EncryptionInfoProperty(
                encryption_at_rest=msk.CfnCluster.EncryptionAtRestProperty(
                    data_volume_kms_key_id=key.key_arn
                ),
                encryption_in_transit=msk.CfnCluster.EncryptionInTransitProperty(
                    client_broker="TLS", in_cluster=True
                ),
            ),
            logging_info=msk.CfnCluster.LoggingInfoProperty(
                broker_logs=msk.CfnCluster.BrokerLogsProperty(
                    cloud_watch_logs=msk.CfnCluster.CloudWatchLogsProperty(
                        enabled=True, log_group=self.log_group.log_group_name
                    )
                )
            ),
            configuration_info=msk.CfnCluster.ConfigurationInfoProperty(
                arn=self.configuration.attr_arn,
                revision=self.configuration.attr_latest_revision_revision,
            ),
        )
        # Topics hold the data and the configuration is in use by the cluster: all three
        # follow the environment's removal policy together.
        self.cluster.apply_removal_policy(removal_policy)
        self.configuration.apply_removal_policy(removal_policy)
        self.arn = self.cluster.attr_arn
        self.topic_gate_fingerprint = topic_gate_fingerprint(
            kafka_version=kafka_version,
            instance_type=instance_type,
            broker_count=broker_count,
            storage_gib=storage_gib,
            replication_factor=replication_factor,
            topics=topics,
        )
        self.topics: dict[str, msk.CfnTopic] = {}
        for index, topic in enumerate(topics):
            self.topics[topic.name] = msk.CfnTopic(
                self,
                f"Topic{index}",
                cluster_arn=self.arn,
                topic_name=topic.name,
                partition_count=topic.partitions,
                replication_factor=replication_factor,
                configs=topic_configs(topic, replication_factor),
            )
            self.topics[topic.name].apply_removal_policy(removal_policy)
        self.firehose_access: DeployTimeAction | None = None

    def topic_arn(self, topic: str) -> str:
        """`arn:...:topic/<cluster name>/*/<topic>`.

        The cluster's uuid is a wildcard: cluster names are unique per account and region,
        and splitting the cluster ARN in another stack is not valid CloudFormation
        (`Fn::Split` takes no cross-stack output).
        """
        return f"{self._arn_stem}:topic/{self.name}/*/{topic}"

    @property
    def any_group_arn(self) -> str:
        """Every consumer group of this cluster: consumers such as Firehose and Redshift
        choose their group names at run time."""
        return f"{self._arn_stem}:group/{self.name}/*"

    @property
    def _arn_stem(self) -> str:
        return f"arn:{Aws.PARTITION}:kafka:{Aws.REGION}:{Aws.ACCOUNT_ID}"

    def wildcard_acknowledgements(
        self, scope: Construct, topics: Sequence[str], consumer: str
    ) -> list[Acknowledgment]:
        """The IAM5 acknowledgements for `read_statements(topics)` in `scope`'s policy."""
        return [
            *[
                wildcard_resource(
                    scope,
                    self.topic_arn(topic),
                    f"{consumer} reads topic {topic} of cluster "
                    f"{self.name}; the wildcard stands only for the cluster's generated uuid.",
                )
                for topic in topics
            ],
            wildcard_resource(
                scope,
                self.any_group_arn,
                f"{consumer} names its Kafka consumer groups at "
                f"run time; scoped to the groups of cluster {self.name}.",
            ),
        ]

    def read_statements(self, topics: Sequence[str]) -> list[iam.PolicyStatement]:
        """What a consumer of `topics` needs: connect, read the topics, use consumer groups."""
        return [
            iam.PolicyStatement(
                actions=[
                    "kafka-cluster:Connect",
                    "kafka-cluster:DescribeCluster",
                    "kafka:GetBootstrapBrokers",
                    "kafka:DescribeCluster",
                    "kafka:DescribeClusterV2",
                ],
                resources=[self.arn],
            ),
            iam.PolicyStatement(
                actions=[
                    "kafka-cluster:DescribeTopic",
                    "kafka-cluster:DescribeTopicDynamicConfiguration",
                    "kafka-cluster:ReadData",
                ],
                resources=[self.topic_arn(t) for t in topics],
            ),
            iam.PolicyStatement(
                actions=["kafka-cluster:DescribeGroup", "kafka-cluster:AlterGroup"],
                resources=[self.any_group_arn],
            ),
        ]

    def write_statements(self, topics: Sequence[str]) -> list[iam.PolicyStatement]:
        """What a producer to `topics` needs (idempotent writes included)."""
        return [
            iam.PolicyStatement(
                actions=[
                    "kafka-cluster:Connect",
                    "kafka-cluster:DescribeCluster",
                    "kafka-cluster:WriteDataIdempotently",
                ],
                resources=[self.arn],
            ),
            iam.PolicyStatement(
                actions=["kafka-cluster:DescribeTopic", "kafka-cluster:WriteData"],
                resources=[self.topic_arn(t) for t in topics],
            ),
        ]

    def enable_firehose_access(
        self,
        *,
        log_key: kms.IKey,
        log_retention: logs.RetentionDays,
        removal_policy: RemovalPolicy,
        s3_prefix_list_id: str | None = None,
    ) -> DeployTimeAction:
        """Multi-VPC private connectivity for IAM clients plus a cluster policy for Firehose.

        MSK cannot enable the connectivity at creation, so a deploy-time action switches it
        on once the cluster exists and waits until the cluster is active again.
        """
        if self.firehose_access is not None:
            return self.firehose_access
        # The policy Firehose documents for an MSK source: its service principal may call
        # CreateVpcConnection on the cluster ("Configure source settings for Amazon MSK",
        # https://docs.aws.amazon.com/firehose/latest/dev/writing-with-msk.html). An
        # `aws:SourceAccount` condition was here; neither that page nor MSK's cluster-policy
        # page (mvpc-cluster-owner-action-policy.html) says Firehose sends that key on this
        # call, and a StringEquals on a key absent from the request fails, which would deny
        # the connection and fail the delivery stream's creation. It is left out: the
        # connection alone reads nothing, since every Kafka action still needs IAM
        # permissions in this account (the delivery role's, `read_statements`).
        self.cluster_policy = msk.CfnClusterPolicy(
            self,
            "FirehosePolicy",
            cluster_arn=self.arn,
            policy={
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Sid": "FirehoseReadsOverPrivateConnectivity",
                        "Effect": "Allow",
                        "Principal": {"Service": "firehose.amazonaws.com"},
                        "Action": [
                            "kafka:CreateVpcConnection",
                            "kafka:GetBootstrapBrokers",
                            "kafka:DescribeCluster",
                            "kafka:DescribeClusterV2",
                        ],
                        "Resource": self.arn,
                    }
                ],
            },
        )
        self.firehose_access = DeployTimeAction(
            self,
            "PrivateConnectivity",
            module="msk_connectivity",
            resource_type="Custom::MskPrivateConnectivity",
            description=f"MSK {self.name}: multi-VPC private connectivity",
            properties={"ClusterArn": self.arn},
            statements=[
                iam.PolicyStatement(
                    actions=["kafka:DescribeClusterV2", "kafka:UpdateConnectivity"],
                    resources=[self.arn],
                ),
            ],
            vpc=self.vpc,
            log_key=log_key,
            log_retention=log_retention,
            removal_policy=removal_policy,
            vpc_cidr=self.client_cidr,
            s3_prefix_list_id=s3_prefix_list_id,
            poll=True,
            # Its calls are single API requests: a short function timeout leaves the waiter
            # most of CloudFormation's hour (DeployTimeAction.total_timeout_minutes).
            timeout_minutes=3,
        )
        # The cluster itself is a dependency through ClusterArn; the policy must exist too.
        self.firehose_access.resource.node.add_dependency(self.cluster_policy)
        # Topics before connectivity: UpdateConnectivity takes the cluster out of ACTIVE for
        # tens of minutes and the topic APIs need it ACTIVE. Topics wait behind a gate of the
        # same handler that completes once the cluster is ACTIVE and runs again whenever the
        # topics or the cluster's settings change (its fingerprint property).
        self.topic_gate = self.firehose_access.add_resource(
            "TopicsWaitForActive",
            {"ClusterArn": self.arn, "Step": "active", "Fingerprint": self.topic_gate_fingerprint},
        )
        for topic in self.topics.values():
            topic.node.add_dependency(self.topic_gate)
            self.firehose_access.resource.node.add_dependency(topic)
        return self.firehose_access
