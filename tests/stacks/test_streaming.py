"""The streaming stack's posture, as synthesized for every environment."""

from __future__ import annotations

import base64
import json

import pytest
from aws_cdk.assertions import Match, Template

from kiln.settings import Settings
from tests.support import ENVIRONMENTS, Synthesis


@pytest.fixture(params=ENVIRONMENTS)
def env(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def streaming(synthesis: Synthesis, env: str) -> Template:
    return Template.from_json(synthesis.stack(env, "streaming").template)


def test_cluster_is_iam_only_tls_only_kms_encrypted_and_logged(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    settings = settings_by_env[env]
    streaming(synthesis, env).has_resource_properties(
        "AWS::MSK::Cluster",
        {
            "ClusterName": f"kiln-{env}",
            "KafkaVersion": settings.streaming.kafka_version,
            "NumberOfBrokerNodes": settings.broker_count,
            "ClientAuthentication": {
                "Sasl": {"Iam": {"Enabled": True}},
                "Unauthenticated": {"Enabled": False},
            },
            "EncryptionInfo": {
                "EncryptionAtRest": {
                    "DataVolumeKMSKeyId": {
                        "Fn::GetAtt": [Match.string_like_regexp("StreamingKey"), "Arn"]
                    }
                },
                "EncryptionInTransit": {"ClientBroker": "TLS", "InCluster": True},
            },
            "LoggingInfo": {
                "BrokerLogs": {"CloudWatchLogs": {"Enabled": True, "LogGroup": Match.any_value()}}
            },
            "BrokerNodeGroupInfo": Match.object_like(
                {
                    "InstanceType": settings.streaming.broker_instance_type,
                    "ConnectivityInfo": {"PublicAccess": {"Type": "DISABLED"}},
                    "StorageInfo": {
                        "EBSStorageInfo": {"VolumeSize": settings.streaming.broker_storage_gib}
                    },
                }
            ),
        },
    )


def test_brokers_are_a_multiple_of_zones_one_subnet_per_zone(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    settings = settings_by_env[env]
    (cluster,) = synthesis.stack(env, "streaming").resources_of_type("AWS::MSK::Cluster").values()
    props = cluster["Properties"]
    zones = len(settings.availability_zones)
    assert props["NumberOfBrokerNodes"] % zones == 0
    assert len(props["BrokerNodeGroupInfo"]["ClientSubnets"]) == zones


def test_broker_configuration_is_safe(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    rf = settings_by_env[env].kafka_replication_factor
    (config,) = (
        synthesis.stack(env, "streaming").resources_of_type("AWS::MSK::Configuration").values()
    )
    lines = set(config["Properties"]["ServerProperties"].splitlines())
    assert {
        "auto.create.topics.enable=false",
        f"default.replication.factor={rf}",
        f"min.insync.replicas={rf - 1}",
        "unclean.leader.election.enable=false",
    } <= lines


def test_topics_come_from_config(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    settings = settings_by_env[env]
    topics = synthesis.stack(env, "streaming").resources_of_type("AWS::MSK::Topic").values()
    declared = {t.name: t for t in settings.streaming.topics}
    assert {t["Properties"]["TopicName"] for t in topics} == set(declared)
    for topic in topics:
        props = topic["Properties"]
        wanted = declared[props["TopicName"]]
        assert props["PartitionCount"] == wanted.partitions
        assert props["ReplicationFactor"] == settings.kafka_replication_factor
        configs = json.loads(base64.b64decode(props["Configs"]))
        assert configs["retention.ms"] == str(wanted.retention_hours * 3_600_000)
        assert configs["min.insync.replicas"] == str(settings.kafka_replication_factor - 1)


def test_brokers_reachable_only_on_the_iam_port_from_the_vpc(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    groups = synthesis.stack(env, "streaming").resources_of_type("AWS::EC2::SecurityGroup")
    (msk_group,) = [g for k, g in groups.items() if k.startswith("KafkaSecurityGroup")]
    ingress = msk_group["Properties"]["SecurityGroupIngress"]
    assert ingress == [
        {
            "CidrIp": settings_by_env[env].network.vpc_cidr,
            "FromPort": 9098,
            "ToPort": 9098,
            "IpProtocol": "tcp",
            "Description": "Kafka clients (SASL/IAM over TLS) from the VPC",
        }
    ]


def test_firehose_reads_msk_privately_and_writes_partitioned_kms_objects(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    firehose = settings_by_env[env].streaming.firehose
    streaming(synthesis, env).has_resource_properties(
        "AWS::KinesisFirehose::DeliveryStream",
        {
            "DeliveryStreamType": "MSKAsSource",
            "MSKSourceConfiguration": {
                "MSKClusterARN": {"Fn::GetAtt": [Match.string_like_regexp("KafkaCluster"), "Arn"]},
                "TopicName": firehose.topic,
                "AuthenticationConfiguration": {
                    "Connectivity": "PRIVATE",
                    "RoleARN": Match.any_value(),
                },
            },
            "ExtendedS3DestinationConfiguration": Match.object_like(
                {
                    "BucketARN": Match.any_value(),
                    "Prefix": f"events/{firehose.topic}/year=!{{timestamp:yyyy}}/"
                    "month=!{timestamp:MM}/day=!{timestamp:dd}/hour=!{timestamp:HH}/",
                    "ErrorOutputPrefix": Match.string_like_regexp(
                        r"^errors/prediction-events/!\{firehose:error-output-type\}/year="
                    ),
                    "BufferingHints": {
                        "IntervalInSeconds": firehose.buffer_interval_seconds,
                        "SizeInMBs": firehose.buffer_size_mib,
                    },
                    "CompressionFormat": "GZIP",
                    "EncryptionConfiguration": {
                        "KMSEncryptionConfig": {"AWSKMSKeyARN": Match.any_value()}
                    },
                    "CloudWatchLoggingOptions": Match.object_like({"Enabled": True}),
                }
            ),
        },
    )


def test_firehose_gets_a_cluster_policy_and_private_connectivity_first(
    synthesis: Synthesis, env: str
) -> None:
    stack = synthesis.stack(env, "streaming")
    (policy,) = stack.resources_of_type("AWS::MSK::ClusterPolicy").values()
    (statement,) = policy["Properties"]["Policy"]["Statement"]
    assert statement["Principal"] == {"Service": "firehose.amazonaws.com"}
    assert "kafka:CreateVpcConnection" in statement["Action"]
    assert statement["Condition"] == {
        "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    }
    (connectivity_id,) = stack.resources_of_type("Custom::MskPrivateConnectivity")
    (stream,) = stack.resources_of_type("AWS::KinesisFirehose::DeliveryStream").values()
    assert connectivity_id in stream["DependsOn"]


def test_firehose_role_is_scoped_to_its_topic_prefixes_and_key(
    synthesis: Synthesis, env: str
) -> None:
    stack = synthesis.stack(env, "streaming")
    policies = [
        p
        for k, p in stack.resources_of_type("AWS::IAM::ManagedPolicy").items()
        if k.startswith("RawDelivery")
    ]
    (policy,) = policies
    text = json.dumps(policy["Properties"]["PolicyDocument"])
    assert f"kiln-{env}-raw-" in text
    assert "/events/prediction-events/*" in text and "/errors/prediction-events/*" in text
    assert '"s3:PutObject"' in text and '"s3:DeleteObject"' not in text
    assert "kafka-cluster:WriteData" not in text  # Firehose only reads
