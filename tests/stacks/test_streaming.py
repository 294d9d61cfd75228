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
    # As Firehose documents it: its principal may CreateVpcConnection, with no condition
    # (https://docs.aws.amazon.com/firehose/latest/dev/writing-with-msk.html); an
    # aws:SourceAccount the request may not carry would deny it.
    assert "Condition" not in statement
    actions = stack.resources_of_type("Custom::MskPrivateConnectivity")
    (connectivity_id,) = [k for k, r in actions.items() if "Step" not in r["Properties"]]
    (stream,) = stack.resources_of_type("AWS::KinesisFirehose::DeliveryStream").values()
    assert connectivity_id in stream["DependsOn"]


def test_delivery_stream_has_the_name_the_output_and_alarm_use(
    synthesis: Synthesis, env: str
) -> None:
    """Without DeliveryStreamName CloudFormation generates a name and an alarm on
    `kiln-<env>-raw-delivery` watches a stream that does not exist
    (AWS::KinesisFirehose::DeliveryStream `DeliveryStreamName`, https://docs.aws.amazon.com/
    AWSCloudFormation/latest/TemplateReference/aws-resource-kinesisfirehose-deliverystream.html)."""
    stack = synthesis.stack(env, "streaming")
    ((logical_id, stream),) = stack.resources_of_type(
        "AWS::KinesisFirehose::DeliveryStream"
    ).items()
    assert stream["Properties"]["DeliveryStreamName"] == f"kiln-{env}-raw-delivery"
    outputs = stack.template["Outputs"]
    assert outputs["DeliveryStreamName"]["Value"] == {"Ref": logical_id}


def test_topics_wait_for_an_active_cluster_and_come_before_connectivity(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    """AWS::MSK::Topic needs an ACTIVE cluster; UpdateConnectivity takes it out of ACTIVE for
    tens of minutes (Firehose requires the cluster "active" with multi-VPC connectivity:
    https://docs.aws.amazon.com/firehose/latest/dev/writing-with-msk.html). Topics wait
    behind a gate that re-runs when the topics or the cluster's settings change; the
    connectivity update waits for every topic. Each fits CloudFormation's 3600 s."""
    stack = synthesis.stack(env, "streaming")
    actions = stack.resources_of_type("Custom::MskPrivateConnectivity")
    (gate_id,) = [k for k, r in actions.items() if r["Properties"].get("Step") == "active"]
    (connectivity_id,) = [k for k in actions if k != gate_id]
    topics = stack.resources_of_type("AWS::MSK::Topic")
    assert len(topics) == len(settings_by_env[env].streaming.topics)
    for topic_id, topic in topics.items():
        assert gate_id in topic["DependsOn"]
        assert topic_id in actions[connectivity_id]["DependsOn"]
    assert len(actions[gate_id]["Properties"]["Fingerprint"]) == 16
    for action in actions.values():
        assert action["Properties"]["ServiceTimeout"] == "3600"


def test_the_gate_reruns_when_topics_or_the_cluster_change() -> None:
    from platform_constructs.msk import Topic, topic_gate_fingerprint

    base = {
        "kafka_version": "3.8.x",
        "instance_type": "kafka.m7g.large",
        "broker_count": 3,
        "storage_gib": 100,
        "replication_factor": 3,
        "topics": [Topic("t", 3, 24)],
    }
    same = topic_gate_fingerprint(**base)  # type: ignore[arg-type]
    assert same == topic_gate_fingerprint(**base)  # type: ignore[arg-type]
    for change in ({"topics": [Topic("t", 6, 24)]}, {"storage_gib": 200}):
        assert topic_gate_fingerprint(**{**base, **change}) != same  # type: ignore[arg-type]


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
