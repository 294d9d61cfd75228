"""kiln's guardrail rules: each fires on a non-compliant case and stays quiet on a compliant one."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Any

import pytest

from kiln.config import load_settings
from kiln.contract import GPU_TAINT
from kiln.settings import Settings
from kiln_policy.assembly import SynthesizedStack
from kiln_policy.guardrails import RULES, Violation, check, check_objects

PROD = load_settings("prod")
DEV = load_settings("dev")


def stack(resources: dict[str, Any], **changes: Any) -> SynthesizedStack:
    base = SynthesizedStack(
        environment="prod",
        artifact_id="prodProbe",
        stack_name="kiln-prod-probe",
        template={"Resources": copy.deepcopy(resources)},
        termination_protection=True,
        tags={"project": "kiln", "environment": "prod", "owner": PROD.owner},
    )
    return replace(base, **changes)


def run(rule_id: str, probe: SynthesizedStack, settings: Settings) -> list[Violation]:
    """One rule's violations, through the runner."""
    return check(probe, settings, [RULES[rule_id]])


KMS_BUCKET = {
    "Type": "AWS::S3::Bucket",
    "DeletionPolicy": "Retain",
    "UpdateReplacePolicy": "Retain",
    "Properties": {
        "BucketEncryption": {
            "ServerSideEncryptionConfiguration": [
                {
                    "ServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms"},
                    "BucketKeyEnabled": True,
                }
            ]
        }
    },
}


def test_data_stores_retained() -> None:
    assert run("data-stores-retained", stack({"B": KMS_BUCKET}), PROD) == []
    deleting = {**KMS_BUCKET, "DeletionPolicy": "Delete"}
    (violation,) = run("data-stores-retained", stack({"B": deleting}), PROD)
    assert violation.rule == "data-stores-retained" and "DeletionPolicy Delete" in violation.message
    missing = {"Type": "AWS::KMS::Key", "Properties": {}}
    assert len(run("data-stores-retained", stack({"K": missing}), PROD)) == 2
    # An environment that opted into destroy is not held to it.
    assert run("data-stores-retained", stack({"K": missing}), DEV) == []


def test_termination_protected() -> None:
    assert run("termination-protected", stack({}), PROD) == []
    (violation,) = run("termination-protected", stack({}, termination_protection=False), PROD)
    assert violation.rule == "termination-protected"
    assert run("termination-protected", stack({}, termination_protection=False), DEV) == []


def test_required_tags() -> None:
    assert run("required-tags", stack({}), PROD) == []
    wrong = stack({}, tags={"project": "kiln", "environment": "dev"})
    messages = sorted(v.message for v in run("required-tags", wrong, PROD))
    assert messages == [
        "tag 'environment' is 'dev', expected 'prod'",
        f"tag 'owner' is None, expected {PROD.owner!r}",
    ]


def test_kms_buckets_use_bucket_keys() -> None:
    assert run("kms-bucket-keys", stack({"B": KMS_BUCKET}), PROD) == []
    no_key = copy.deepcopy(KMS_BUCKET)
    del no_key["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"][0][
        "BucketKeyEnabled"
    ]
    (violation,) = run("kms-bucket-keys", stack({"B": no_key}), PROD)
    assert violation.resource == "B"
    sse_s3 = {
        "Type": "AWS::S3::Bucket",
        "Properties": {
            "BucketEncryption": {
                "ServerSideEncryptionConfiguration": [
                    {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
                ]
            }
        },
    }
    assert run("kms-bucket-keys", stack({"L": sse_s3}), PROD) == []


MSK = {
    "Type": "AWS::MSK::Cluster",
    "Properties": {
        "ClientAuthentication": {
            "Sasl": {"Iam": {"Enabled": True}},
            "Unauthenticated": {"Enabled": False},
        },
        "EncryptionInfo": {"EncryptionInTransit": {"ClientBroker": "TLS", "InCluster": True}},
    },
}


def with_props(resource: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(resource)
    node = changed["Properties"]
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return changed


def test_msk_iam_and_tls_only() -> None:
    assert run("msk-iam-tls-only", stack({"K": MSK}), PROD) == []
    cases = {
        "IAM client authentication is not enabled": with_props(
            MSK, ["ClientAuthentication", "Sasl"], None
        ),
        "unauthenticated access is enabled": with_props(
            MSK, ["ClientAuthentication", "Unauthenticated", "Enabled"], True
        ),
        "an authentication method other than IAM is enabled": with_props(
            MSK, ["ClientAuthentication", "Sasl", "Scram"], {"Enabled": True}
        ),
        "client-broker encryption is TLS_PLAINTEXT, not TLS": with_props(
            MSK, ["EncryptionInfo", "EncryptionInTransit", "ClientBroker"], "TLS_PLAINTEXT"
        ),
        "traffic between brokers is not encrypted": with_props(
            MSK, ["EncryptionInfo", "EncryptionInTransit", "InCluster"], False
        ),
    }
    for message, cluster in cases.items():
        (violation,) = run("msk-iam-tls-only", stack({"K": cluster}), PROD)
        assert violation.message == message


WORKGROUP = {
    "Type": "AWS::RedshiftServerless::Workgroup",
    "Properties": {"PubliclyAccessible": False},
}
NAMESPACE = {"Type": "AWS::RedshiftServerless::Namespace", "Properties": {"KmsKeyId": "k"}}
CLUSTER = {
    "Type": "AWS::Redshift::Cluster",
    "Properties": {"PubliclyAccessible": False, "Encrypted": True, "KmsKeyId": "k"},
}


def test_warehouse_private_and_encrypted() -> None:
    good = stack({"W": WORKGROUP, "N": NAMESPACE, "C": CLUSTER})
    assert run("warehouse-private-encrypted", good, PROD) == []
    public = stack(
        {
            "W": with_props(WORKGROUP, ["PubliclyAccessible"], True),
            "C": with_props(CLUSTER, ["PubliclyAccessible"], None),
        }
    )
    assert sorted(v.resource for v in run("warehouse-private-encrypted", public, PROD)) == [
        "C",
        "W",
    ]
    unencrypted = stack(
        {
            "N": with_props(NAMESPACE, ["KmsKeyId"], None),
            "C": with_props(CLUSTER, ["Encrypted"], False),
        }
    )
    messages = sorted(v.message for v in run("warehouse-private-encrypted", unencrypted, PROD))
    assert messages == ["Encrypted is not true", "no customer-managed KmsKeyId"]


FIREHOSE = {
    "Type": "AWS::KinesisFirehose::DeliveryStream",
    "Properties": {
        "ExtendedS3DestinationConfiguration": {
            "EncryptionConfiguration": {"KMSEncryptionConfig": {"AWSKMSKeyARN": "arn:key"}}
        }
    },
}


def test_firehose_uses_kms() -> None:
    assert run("firehose-kms", stack({"F": FIREHOSE}), PROD) == []
    plain = with_props(
        FIREHOSE,
        ["ExtendedS3DestinationConfiguration", "EncryptionConfiguration"],
        {"NoEncryptionConfig": "NoEncryption"},
    )
    (violation,) = run("firehose-kms", stack({"F": plain}), PROD)
    assert violation.rule == "firehose-kms"


EKS = {
    "Type": "AWS::EKS::Cluster",
    "Properties": {
        "ResourcesVpcConfig": {"EndpointPrivateAccess": True, "EndpointPublicAccess": False}
    },
}
GPU_GROUP = {
    "Type": "AWS::EKS::Nodegroup",
    "Properties": {
        "AmiType": "AL2023_x86_64_NVIDIA",
        "LaunchTemplate": {"Id": "lt"},
        "Taints": [{"Key": "nvidia.com/gpu", "Value": "true", "Effect": "NO_SCHEDULE"}],
    },
}
TEMPLATE = {
    "Type": "AWS::EC2::LaunchTemplate",
    "Properties": {
        "LaunchTemplateData": {
            "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1}
        }
    },
}


def test_eks_endpoint_private() -> None:
    assert run("eks-endpoint-private", stack({"C": EKS}), PROD) == []
    public = with_props(EKS, ["ResourcesVpcConfig", "EndpointPublicAccess"], True)
    (violation,) = run("eks-endpoint-private", stack({"C": public}), PROD)
    assert violation.message == "public API endpoint in a prod-tier environment"
    restricted = with_props(public, ["ResourcesVpcConfig", "PublicAccessCidrs"], ["203.0.113.0/24"])
    assert run("eks-endpoint-private", stack({"C": restricted}), DEV) == []
    (violation,) = run("eks-endpoint-private", stack({"C": public}), DEV)  # no CIDRs: open to all
    assert violation.message == "public API endpoint open to the whole internet"
    # Two halves are the whole internet too (issue 17).
    halves = with_props(
        public, ["ResourcesVpcConfig", "PublicAccessCidrs"], ["0.0.0.0/1", "128.0.0.0/1"]
    )
    (violation,) = run("eks-endpoint-private", stack({"C": halves}), DEV)
    assert violation.message == "public API endpoint open to the whole internet"
    unset = with_props(EKS, ["ResourcesVpcConfig", "EndpointPublicAccess"], None)
    assert (
        len(run("eks-endpoint-private", stack({"C": unset}), PROD)) == 1
    )  # EKS defaults to public


def test_gpu_nodes_tainted() -> None:
    assert run("gpu-nodes-tainted", stack({"G": GPU_GROUP}), PROD) == []
    untainted = with_props(GPU_GROUP, ["Taints"], [])
    (violation,) = run("gpu-nodes-tainted", stack({"G": untainted}), PROD)
    assert violation.rule == "gpu-nodes-tainted"
    system = with_props(untainted, ["AmiType"], "AL2023_x86_64_STANDARD")
    assert run("gpu-nodes-tainted", stack({"S": system}), PROD) == []


def test_imdsv2_required() -> None:
    assert run("imdsv2-required", stack({"G": GPU_GROUP, "T": TEMPLATE}), PROD) == []
    optional = with_props(
        TEMPLATE, ["LaunchTemplateData", "MetadataOptions", "HttpTokens"], "optional"
    )
    (violation,) = run("imdsv2-required", stack({"T": optional}), PROD)
    assert violation.message == "MetadataOptions.HttpTokens is optional, so IMDSv1 is allowed"
    bare_group = with_props(GPU_GROUP, ["LaunchTemplate"], None)
    (violation,) = run("imdsv2-required", stack({"G": bare_group}), PROD)
    assert "without a launch template" in violation.message
    # Two hops let a pod reach the node role's credentials through IMDS.
    two_hops = with_props(
        TEMPLATE, ["LaunchTemplateData", "MetadataOptions", "HttpPutResponseHopLimit"], 2
    )
    (violation,) = run("imdsv2-required", stack({"T": two_hops}), PROD)
    assert violation.message.startswith("MetadataOptions.HttpPutResponseHopLimit is 2")


ENDPOINT = {
    "Type": "AWS::SageMaker::Endpoint",
    "Properties": {
        "RetainAllVariantProperties": True,
        "DeploymentConfig": {
            "BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": {"Type": "CANARY"}},
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "a"}]},
        },
    },
}
# ml.m5 has no local instance storage: its ML volume takes the customer-managed key.
ENDPOINT_CONFIG = {
    "Type": "AWS::SageMaker::EndpointConfig",
    "Properties": {
        "KmsKeyId": "k",
        "ProductionVariants": [
            {"VariantName": "AllTraffic", "InitialInstanceCount": 2, "InstanceType": "ml.m5.xlarge"}
        ],
        "DataCaptureConfig": {"EnableCapture": True, "KmsKeyId": "k"},
    },
}
# ml.g5 has NVMe instance storage: CreateEndpointConfig rejects a KmsKeyId for it (SageMaker
# API Reference, CreateEndpointConfig), and there is no data capture without raw text.
GPU_ENDPOINT_CONFIG = {
    "Type": "AWS::SageMaker::EndpointConfig",
    "Properties": {
        "ProductionVariants": [
            {"VariantName": "AllTraffic", "InitialInstanceCount": 2, "InstanceType": "ml.g5.xlarge"}
        ],
    },
}
RAW_TEXT = PROD.model_copy(
    update={"events": PROD.events.model_copy(update={"allow_raw_text": True})}
)
SCALING = {
    "Type": "AWS::ApplicationAutoScaling::ScalableTarget",
    "Properties": {"ServiceNamespace": "sagemaker", "MinCapacity": 2, "MaxCapacity": 4},
}


def test_prod_endpoints_roll_back() -> None:
    assert run("endpoint-auto-rollback", stack({"E": ENDPOINT}), PROD) == []
    no_alarms = with_props(ENDPOINT, ["DeploymentConfig", "AutoRollbackConfiguration"], None)
    (violation,) = run("endpoint-auto-rollback", stack({"E": no_alarms}), PROD)
    assert violation.message == "prod endpoint without auto-rollback alarms"
    assert run("endpoint-auto-rollback", stack({"E": no_alarms}), DEV) == []


def test_endpoints_encrypted() -> None:
    assert run("endpoint-kms", stack({"C": ENDPOINT_CONFIG}), PROD) == []
    plain = with_props(ENDPOINT_CONFIG, ["KmsKeyId"], None)
    plain = with_props(plain, ["DataCaptureConfig", "KmsKeyId"], None)
    messages = sorted(v.message for v in run("endpoint-kms", stack({"C": plain}), DEV))
    assert messages == [
        "data capture without a KMS key",
        "endpoint config without KmsKeyId for its volumes",
    ]


def test_endpoint_kms_follows_instance_storage_both_ways() -> None:
    """Issue 17, item 1: a key for EBS-only types, none for types with NVMe storage."""
    assert run("endpoint-kms", stack({"C": GPU_ENDPOINT_CONFIG}), PROD) == []
    keyed = with_props(GPU_ENDPOINT_CONFIG, ["KmsKeyId"], "k")
    (violation,) = run("endpoint-kms", stack({"C": keyed}), PROD)
    assert violation.message == (
        "KmsKeyId is set but ml.g5.xlarge has local instance storage: "
        "CreateEndpointConfig rejects it"
    )
    # A type outside kiln's catalog with an instance-store family name ("d") counts as local.
    m5d = with_props(
        keyed, ["ProductionVariants"], [{"VariantName": "A", "InstanceType": "ml.m5d.large"}]
    )
    assert len(run("endpoint-kms", stack({"C": m5d}), PROD)) == 1


def test_capture_only_what_events_allow() -> None:
    """Issue 17, item 2: no payload capture unless events.allow_raw_text."""
    assert run("endpoint-capture-privacy", stack({"C": GPU_ENDPOINT_CONFIG}), PROD) == []
    capturing = with_props(
        ENDPOINT_CONFIG,
        ["DataCaptureConfig", "CaptureOptions"],
        [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
    )
    (violation,) = run("endpoint-capture-privacy", stack({"C": capturing}), PROD)
    assert violation.message == (
        "data capture of Input, Output is on although events.allow_raw_text is false"
    )
    assert run("endpoint-capture-privacy", stack({"C": capturing}), RAW_TEXT) == []
    off = with_props(capturing, ["DataCaptureConfig", "EnableCapture"], False)
    assert run("endpoint-capture-privacy", stack({"C": off}), PROD) == []


def test_prod_endpoints_redundant() -> None:
    good = stack({"C": ENDPOINT_CONFIG, "S": SCALING})
    assert run("endpoint-redundancy", good, PROD) == []
    single = stack(
        {
            "C": with_props(
                ENDPOINT_CONFIG,
                ["ProductionVariants"],
                [{"VariantName": "AllTraffic", "InitialInstanceCount": 1}],
            ),
            "S": with_props(SCALING, ["MinCapacity"], 1),
        }
    )
    assert len(run("endpoint-redundancy", single, PROD)) == 2
    assert run("endpoint-redundancy", single, DEV) == []


# --- as deployed (issue 21) ------------------------------------------------------------

WEAK_OUTPUT = {
    "Type": "AWS::IAM::Policy",
    "Properties": {
        "Resource": {
            "Fn::Join": [
                "",
                [{"Fn::GetStackOutput": {"StackName": "kiln-prod-streaming", "OutputName": "A"}}],
            ]
        }
    },
}
STRONG_OUTPUT = {
    "Type": "AWS::IAM::Policy",
    "Properties": {"Resource": {"Fn::ImportValue": "kiln-prod-streaming:ExportsOutputA"}},
}


def waiter(interval: int, attempts: int) -> dict[str, Any]:
    # As the CDK's Provider framework writes it: a JSON string joined with resource ARNs.
    retry = f'"Retry":[{{"ErrorEquals":["States.ALL"],"IntervalSeconds":{interval},'
    retry += f'"MaxAttempts":{attempts},"BackoffRate":1}}]'
    return {
        "Type": "AWS::StepFunctions::StateMachine",
        "Properties": {"DefinitionString": {"Fn::Join": ["", ['{"States":{' + retry, "}}"]]}},
    }


CUSTOM = {"Type": "Custom::MskPrivateConnectivity", "Properties": {"ServiceTimeout": "3600"}}
GATE = {
    "Type": "Custom::MskPrivateConnectivity",
    "Properties": {"ClusterArn": "a", "Step": "active", "ServiceTimeout": "3600"},
}
TOPIC = {"Type": "AWS::MSK::Topic", "DependsOn": ["Gate"], "Properties": {"TopicName": "t"}}
CONNECTIVITY = {
    "Type": "Custom::MskPrivateConnectivity",
    "DependsOn": ["Topic"],
    "Properties": {"ClusterArn": "a", "ServiceTimeout": "3600"},
}


def alarm(namespace: str, name: str, *dimensions: str) -> dict[str, Any]:
    return {
        "Type": "AWS::CloudWatch::Alarm",
        "Properties": {
            "Namespace": namespace,
            "MetricName": name,
            "Dimensions": [{"Name": d, "Value": "v"} for d in dimensions],
        },
    }


def dashboard(*metrics: list[Any]) -> dict[str, Any]:
    body = {"widgets": [{"type": "metric", "properties": {"title": "w", "metrics": list(metrics)}}]}
    text = json.dumps(body)
    head, tail = text.split("TOKEN", 1) if "TOKEN" in text else (text, "")
    parts: list[Any] = [head, {"Ref": "Stream"}, tail] if tail else [head]
    return {
        "Type": "AWS::CloudWatch::Dashboard",
        "Properties": {"DashboardBody": {"Fn::Join": ["", parts]}},
    }


FRESHNESS = alarm("AWS/Firehose", "DeliveryToS3.DataFreshness", "DeliveryStreamName")
HOST_SEARCH = [
    {
        "expression": "SEARCH('{/aws/sagemaker/Endpoints,EndpointName,VariantName,Host} "
        "MetricName=\"GPUUtilization\"', 'Average', 60)",
        "id": "e1",
    }
]


def test_no_weak_references() -> None:
    assert run("no-weak-references", stack({"P": STRONG_OUTPUT}), PROD) == []
    (violation,) = run("no-weak-references", stack({"P": WEAK_OUTPUT}), PROD)
    assert "Fn::GetStackOutput" in violation.message


def test_custom_resources_fit_service_timeout() -> None:
    good = stack({"C": CUSTOM, "W": waiter(60, 52)})
    assert run("custom-resources-fit-service-timeout", good, PROD) == []
    # The CDK Provider's 2-hour waiter behind CloudFormation's 1-hour custom resource.
    (violation,) = run("custom-resources-fit-service-timeout", stack({"W": waiter(60, 120)}), PROD)
    assert "7200 s" in violation.message
    too_long = with_props(CUSTOM, ["ServiceTimeout"], "7200")
    assert len(run("custom-resources-fit-service-timeout", stack({"C": too_long}), PROD)) == 1


def test_endpoint_keeps_scaled_count() -> None:
    assert run("endpoint-keeps-scaled-count", stack({"E": ENDPOINT}), DEV) == []
    resetting = with_props(ENDPOINT, ["RetainAllVariantProperties"], None)
    (violation,) = run("endpoint-keeps-scaled-count", stack({"E": resetting}), DEV)
    assert "resets the instance count" in violation.message


def test_msk_topics_wait_for_active() -> None:
    ordered = stack({"Gate": GATE, "Topic": TOPIC, "Conn": CONNECTIVITY})
    assert run("msk-topics-wait-for-active", ordered, PROD) == []
    racing = stack(
        {
            "Gate": GATE,
            "Topic": {**TOPIC, "DependsOn": []},
            "Conn": {**CONNECTIVITY, "DependsOn": []},
        }
    )
    messages = [v.message for v in run("msk-topics-wait-for-active", racing, PROD)]
    assert messages == [
        "Topic: topic does not wait for the cluster to be ACTIVE",
        "Conn: the connectivity update may run beside topic Topic",
    ]


def test_metrics_published() -> None:
    good = stack(
        {
            "A": FRESHNESS,
            "D": dashboard(
                ["AWS/SageMaker", "Invocations", "EndpointName", "e", "VariantName", "TOKEN"]
            ),
        }
    )
    assert run("metrics-published", good, PROD) == []
    bad = stack(
        {
            "A": alarm("AWS/AutoScaling", "GroupInServiceInstances", "AutoScalingGroupName"),
            "D": dashboard(HOST_SEARCH),
            "F": alarm("AWS/Firehose", "DeliveryToS3.DataFreshness", "StreamName"),
        }
    )
    messages = sorted(v.message for v in run("metrics-published", bad, PROD))
    assert any("exists only with group metrics collection" in m for m in messages)
    assert any("no /aws/sagemaker/Endpoints GPUUtilization with dimensions" in m for m in messages)
    assert any("published with: DeliveryStreamName" in m for m in messages)


def insights_alarm(expression: object) -> dict[str, object]:
    """A Metrics Insights alarm, its query as CloudFormation carries it (a token inside)."""
    return {
        "Type": "AWS::CloudWatch::Alarm",
        "Properties": {"Metrics": [{"Id": "m", "Expression": expression, "Period": 300}]},
    }


def test_metrics_published_reads_metrics_insights_queries() -> None:
    """A SELECT ... FROM SCHEMA(...) alarm is checked like any other: SCHEMA names the exact
    dimension set, and Container Insights publishes no pod GPU metric per Job name alone."""
    per_job = {
        "Fn::Join": [
            "",
            [
                'SELECT AVG(pod_gpu_utilization) FROM SCHEMA("ContainerInsights", ClusterName, '
                "Namespace, PodName) WHERE ClusterName = '",
                {"Ref": "Cluster"},
                "' AND Namespace = 'training-a' GROUP BY PodName",
            ],
        ]
    }
    assert run("metrics-published", stack({"A": insights_alarm(per_job)}), PROD) == []
    no_namespace = (
        "SELECT AVG(pod_gpu_utilization) FROM SCHEMA(ContainerInsights, ClusterName, PodName)"
    )
    (violation,) = run("metrics-published", stack({"A": insights_alarm(no_namespace)}), PROD)
    assert (
        "no ContainerInsights pod_gpu_utilization with dimensions ['ClusterName', 'PodName']"
        in (violation.message)
    )
    # There is no cluster-level GPU request metric: capacity is node_gpu_* summed.
    (violation,) = run(
        "metrics-published",
        stack({"A": alarm("ContainerInsights", "cluster_gpu_request", "ClusterName")}),
        PROD,
    )
    assert "AWS publishes no ContainerInsights cluster_gpu_request" in violation.message


LMI_IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/djl-inference:0.36.0-lmi20.0.0-cu128-v1.0"
UNCOMPRESSED_MODEL = {
    "Type": "AWS::SageMaker::Model",
    "Properties": {
        "PrimaryContainer": {
            "Image": LMI_IMAGE,
            "ModelDataSource": {
                "S3DataSource": {
                    "S3Uri": "s3://b/models/v7/model/",
                    "S3DataType": "S3Prefix",
                    "CompressionType": "None",
                }
            },
            "Environment": {"OPTION_TENSOR_PARALLEL_DEGREE": "8"},
        }
    },
}
ARCHIVE_MODEL = {
    "Type": "AWS::SageMaker::Model",
    "Properties": {
        "PrimaryContainer": {
            "Image": {"Fn::Sub": "${AWS::AccountId}.dkr.ecr.us-east-1.amazonaws.com/x:abc"},
            "ModelDataUrl": "s3://b/models/v7/model.tar.gz",
        }
    },
}


def test_model_data_documented() -> None:
    rule = "model-data-documented"
    assert run(rule, stack({"M": UNCOMPRESSED_MODEL, "A": ARCHIVE_MODEL}), PROD) == []
    source = ["PrimaryContainer", "ModelDataSource", "S3DataSource"]
    no_slash = with_props(UNCOMPRESSED_MODEL, [*source, "S3Uri"], "s3://b/models/v7/model")
    (violation,) = run(rule, stack({"M": no_slash}), PROD)
    assert "does not end with /" in violation.message
    gzip_prefix = with_props(UNCOMPRESSED_MODEL, [*source, "CompressionType"], "Gzip")
    assert (
        "only an S3Object can be a tar.gz" in run(rule, stack({"M": gzip_prefix}), PROD)[0].message
    )
    multi = with_props(UNCOMPRESSED_MODEL, ["PrimaryContainer", "Mode"], "MultiModel")
    assert "multi-model" in run(rule, stack({"M": multi}), PROD)[0].message
    not_tar = with_props(ARCHIVE_MODEL, ["PrimaryContainer", "ModelDataUrl"], "s3://b/m/weights")
    assert "not a .tar.gz archive" in run(rule, stack({"M": not_tar}), PROD)[0].message
    env = ["PrimaryContainer", "Environment"]
    many = with_props(UNCOMPRESSED_MODEL, env, {f"V{i}": "x" for i in range(101)})
    assert "101 environment variables, over 100" in run(rule, stack({"M": many}), PROD)[0].message
    long = with_props(UNCOMPRESSED_MODEL, env, {"LONG": "x" * 1025})
    assert "holds over 1024 bytes" in run(rule, stack({"M": long}), PROD)[0].message
    bulky = with_props(UNCOMPRESSED_MODEL, env, {f"V{i}": "x" * 1000 for i in range(40)})
    assert "over 32768" in run(rule, stack({"M": bulky}), PROD)[0].message
    badly_named = with_props(UNCOMPRESSED_MODEL, env, {"1-BAD": "x"})
    assert "is not [a-zA-Z_]" in run(rule, stack({"M": badly_named}), PROD)[0].message


def test_mlflow_endpoint_private() -> None:
    rule = "mlflow-endpoint-private"
    assert run(rule, stack({"E": MLFLOW_ENDPOINT}), DEV) == []
    # Other services' endpoints are not this rule's business.
    ecr = with_props(MLFLOW_ENDPOINT, ["ServiceName"], "com.amazonaws.us-east-1.ecr.api")
    assert run(rule, stack({"E": with_props(ecr, ["PrivateDnsEnabled"], None)}), DEV) == []
    joined = {"Fn::Join": ["", ["aws.sagemaker.", {"Ref": "AWS::Region"}, ".experiments"]]}
    for broken, says in (
        (with_props(MLFLOW_ENDPOINT, ["PrivateDnsEnabled"], None), "no private DNS"),
        (with_props(MLFLOW_ENDPOINT, ["PolicyDocument"], None), "has no policy"),
        (
            with_props(
                MLFLOW_ENDPOINT,
                ["PolicyDocument", "Statement"],
                [{"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*"}],
            ),
            "Resource *",
        ),
        (
            with_props(
                with_props(MLFLOW_ENDPOINT, ["ServiceName"], joined), ["PrivateDnsEnabled"], False
            ),
            "no private DNS",
        ),
    ):
        (violation,) = run(rule, stack({"E": broken}), DEV)
        assert says in violation.message


def test_model_image_pinned() -> None:
    rule = "model-image-pinned"
    assert run(rule, stack({"M": UNCOMPRESSED_MODEL, "A": ARCHIVE_MODEL}), PROD) == []
    digest = with_props(
        UNCOMPRESSED_MODEL, ["PrimaryContainer", "Image"], f"{LMI_IMAGE.split(':')[0]}@sha256:ab"
    )
    assert run(rule, stack({"M": digest}), PROD) == []
    for image in (LMI_IMAGE.rsplit(":", 1)[0], LMI_IMAGE.rsplit(":", 1)[0] + ":latest"):
        floating = with_props(UNCOMPRESSED_MODEL, ["PrimaryContainer", "Image"], image)
        (violation,) = run(rule, stack({"M": floating}), PROD)
        assert "is not pinned" in violation.message


# One compliant and one non-compliant case per registered rule, judged under `settings`. A rule
# registered without a case here fails `test_every_rule_has_its_cases`.
PACKAGE = "arn:aws:sagemaker:us-east-1:123456789012:model-package/kiln-llm/3"
PACKAGED_MODEL = {
    "Type": "AWS::SageMaker::Model",
    "Properties": {"PrimaryContainer": {"ModelPackageName": PACKAGE, "Environment": {}}},
}
MLFLOW_ENDPOINT = {
    "Type": "AWS::EC2::VPCEndpoint",
    "Properties": {
        "ServiceName": "aws.sagemaker.us-east-1.experiments",
        "VpcEndpointType": "Interface",
        "PrivateDnsEnabled": True,
        "PolicyDocument": {
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": "*"},
                    "Action": "sagemaker-mlflow:*",
                    "Resource": {"Fn::GetAtt": ["Server", "TrackingServerArn"]},
                }
            ]
        },
    },
}
# The registry home sharing with another account, and an environment reading it.
DEV_SHARING = DEV.model_copy(
    update={"registry": DEV.registry.model_copy(update={"reader_accounts": ["222222222222"]})}
)
PROD_READING = PROD.model_copy(
    update={"registry": PROD.registry.model_copy(update={"account": "111111111111"})}
)
SHARED_PULL = {
    "Sid": "OtherEnvironmentsPull",
    "Effect": "Allow",
    "Principal": {"AWS": "arn:aws:iam::222222222222:root"},
    "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
    "Condition": {
        "Bool": {"aws:SecureTransport": "true"},
        "ArnLike": {"aws:PrincipalArn": ["arn:aws:iam::222222222222:role/kiln-*"]},
    },
}
SHARED_REPOSITORY = {
    "Type": "AWS::ECR::Repository",
    "Properties": {"RepositoryPolicyText": {"Statement": [SHARED_PULL]}},
}
HOME_KEY_STATEMENT = {
    "Sid": "HomeLakeKeyThroughS3",
    "Effect": "Allow",
    "Action": "kms:Decrypt",
    "Resource": "arn:aws:kms:us-east-1:111111111111:key/*",
    "Condition": {
        "StringEquals": {
            "kms:ViaService": "s3.us-east-1.amazonaws.com",
            "kms:EncryptionContext:aws:s3:arn": "arn:aws:s3:::kiln-dev-artifacts-1-us-east-1",
        }
    },
}
HOME_KEY_POLICY = {
    "Type": "AWS::IAM::ManagedPolicy",
    "Properties": {"PolicyDocument": {"Statement": [HOME_KEY_STATEMENT]}},
}
SPEC = "InferenceSpecificationName"
PROD_LMI = PROD.model_copy(update={"serving": PROD.serving.model_copy(update={"engine": "lmi"})})


def test_a_model_picks_the_specification_of_its_engine_from_a_package() -> None:
    """An additional specification is named by its engine: prod on LMI picks `lmi`, prod on
    kiln's engine the primary (no name); a name without a package, or another engine's, is
    refused."""
    rule = "model-specification-of-the-engine"
    picks_lmi = with_props(PACKAGED_MODEL, ["PrimaryContainer", SPEC], "lmi")
    assert run(rule, stack({"M": picks_lmi}), PROD_LMI) == []
    assert run(rule, stack({"M": PACKAGED_MODEL}), PROD) == []
    (violation,) = run(rule, stack({"M": picks_lmi}), PROD)
    assert "not this environment's engine (kiln)" in violation.message
    bare = with_props(RAW_MODEL, ["PrimaryContainer", SPEC], "lmi")
    (violation,) = run(rule, stack({"M": bare}), PROD_LMI)
    assert "without a ModelPackageName" in violation.message
    # The package rule still holds beside it: a named specification is still the version's.
    assert run("prod-serves-approved-packages", stack({"M": picks_lmi}), PROD_LMI) == []


RAW_MODEL = {
    "Type": "AWS::SageMaker::Model",
    "Properties": {
        "PrimaryContainer": {
            "Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/inference:1",
            "ModelDataUrl": "s3://kiln-prod-artifacts/models/v7/model.tar.gz",
        }
    },
}


def test_prod_models_come_from_approved_registry_versions() -> None:
    (violation,) = run("prod-serves-approved-packages", stack({"M": RAW_MODEL}), PROD)
    assert "without ModelPackageName" in violation.message
    mixed = with_props(PACKAGED_MODEL, ["PrimaryContainer", "ModelDataUrl"], "s3://b/m.tar.gz")
    (violation,) = run("prod-serves-approved-packages", stack({"M": mixed}), PROD)
    assert violation.message == "container sets ModelDataUrl beside the registry version's own"
    # Dev may serve any artifact (the rule is prod's).
    assert run("prod-serves-approved-packages", stack({"M": RAW_MODEL}), DEV) == []


CASES: dict[str, tuple[Settings, SynthesizedStack, SynthesizedStack]] = {
    "data-stores-retained": (
        PROD,
        stack({"B": KMS_BUCKET}),
        stack({"B": {**KMS_BUCKET, "DeletionPolicy": "Delete"}}),
    ),
    "termination-protected": (PROD, stack({}), stack({}, termination_protection=False)),
    "required-tags": (PROD, stack({}), stack({}, tags={})),
    "kms-bucket-keys": (
        PROD,
        stack({"B": KMS_BUCKET}),
        stack(
            {
                "B": with_props(
                    KMS_BUCKET,
                    ["BucketEncryption", "ServerSideEncryptionConfiguration"],
                    [{"ServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms"}}],
                )
            }
        ),
    ),
    "msk-iam-tls-only": (
        PROD,
        stack({"K": MSK}),
        stack({"K": with_props(MSK, ["ClientAuthentication", "Sasl"], None)}),
    ),
    "warehouse-private-encrypted": (
        PROD,
        stack({"W": WORKGROUP, "N": NAMESPACE, "C": CLUSTER}),
        stack({"W": with_props(WORKGROUP, ["PubliclyAccessible"], True)}),
    ),
    "firehose-kms": (
        PROD,
        stack({"F": FIREHOSE}),
        stack(
            {
                "F": with_props(
                    FIREHOSE,
                    ["ExtendedS3DestinationConfiguration", "EncryptionConfiguration"],
                    None,
                )
            }
        ),
    ),
    "eks-endpoint-private": (
        PROD,
        stack({"C": EKS}),
        stack({"C": with_props(EKS, ["ResourcesVpcConfig", "EndpointPublicAccess"], True)}),
    ),
    "gpu-nodes-tainted": (
        PROD,
        stack({"G": GPU_GROUP}),
        stack({"G": with_props(GPU_GROUP, ["Taints"], [])}),
    ),
    "imdsv2-required": (
        PROD,
        stack({"G": GPU_GROUP, "T": TEMPLATE}),
        stack({"G": with_props(GPU_GROUP, ["LaunchTemplate"], None)}),
    ),
    "endpoint-auto-rollback": (
        PROD,
        stack({"E": ENDPOINT}),
        stack({"E": with_props(ENDPOINT, ["DeploymentConfig", "BlueGreenUpdatePolicy"], None)}),
    ),
    "endpoint-kms": (
        PROD,
        stack({"C": ENDPOINT_CONFIG, "G": GPU_ENDPOINT_CONFIG}),
        stack({"G": with_props(GPU_ENDPOINT_CONFIG, ["KmsKeyId"], "k")}),
    ),
    "endpoint-capture-privacy": (
        PROD,
        stack({"G": GPU_ENDPOINT_CONFIG}),
        stack({"C": ENDPOINT_CONFIG}),
    ),
    "endpoint-redundancy": (
        PROD,
        stack({"C": ENDPOINT_CONFIG, "S": SCALING}),
        stack({"S": with_props(SCALING, ["MinCapacity"], 1)}),
    ),
    "no-weak-references": (PROD, stack({"P": STRONG_OUTPUT}), stack({"P": WEAK_OUTPUT})),
    "custom-resources-fit-service-timeout": (
        PROD,
        stack({"C": CUSTOM, "W": waiter(60, 52)}),
        stack({"W": waiter(60, 120)}),
    ),
    "endpoint-keeps-scaled-count": (
        PROD,
        stack({"E": ENDPOINT}),
        stack({"E": with_props(ENDPOINT, ["RetainAllVariantProperties"], None)}),
    ),
    "msk-topics-wait-for-active": (
        PROD,
        stack({"Gate": GATE, "Topic": TOPIC, "Conn": CONNECTIVITY}),
        stack({"Gate": GATE, "Topic": {**TOPIC, "DependsOn": []}, "Conn": CONNECTIVITY}),
    ),
    "metrics-published": (PROD, stack({"A": FRESHNESS}), stack({"D": dashboard(HOST_SEARCH)})),
    "model-data-documented": (
        PROD,
        stack({"M": UNCOMPRESSED_MODEL, "A": ARCHIVE_MODEL}),
        stack(
            {
                "M": with_props(
                    UNCOMPRESSED_MODEL,
                    ["PrimaryContainer", "ModelDataSource", "S3DataSource", "S3Uri"],
                    "s3://b/models/v7/model",
                )
            }
        ),
    ),
    "model-image-pinned": (
        PROD,
        stack({"M": UNCOMPRESSED_MODEL, "A": ARCHIVE_MODEL}),
        stack(
            {
                "M": with_props(
                    UNCOMPRESSED_MODEL, ["PrimaryContainer", "Image"], "x.dkr.ecr/r:latest"
                )
            }
        ),
    ),
    "prod-serves-approved-packages": (PROD, stack({"M": PACKAGED_MODEL}), stack({"M": RAW_MODEL})),
    "mlflow-endpoint-private": (
        DEV,
        stack({"E": MLFLOW_ENDPOINT}),
        stack({"E": with_props(MLFLOW_ENDPOINT, ["PrivateDnsEnabled"], False)}),
    ),
    "cross-account-grants-read-only": (
        DEV_SHARING,
        stack({"R": SHARED_REPOSITORY}),
        stack(
            {
                "R": with_props(
                    SHARED_REPOSITORY,
                    ["RepositoryPolicyText", "Statement"],
                    [{**SHARED_PULL, "Action": ["ecr:PutImage"]}],
                )
            }
        ),
    ),
    "home-key-use-scoped": (
        PROD_READING,
        stack({"P": HOME_KEY_POLICY}),
        stack(
            {
                "P": with_props(
                    HOME_KEY_POLICY,
                    ["PolicyDocument", "Statement"],
                    [{k: v for k, v in HOME_KEY_STATEMENT.items() if k != "Condition"}],
                )
            }
        ),
    ),
    "model-specification-of-the-engine": (
        PROD_LMI,
        stack({"M": with_props(PACKAGED_MODEL, ["PrimaryContainer", SPEC], "lmi")}),
        stack({"M": with_props(PACKAGED_MODEL, ["PrimaryContainer", SPEC], "kiln")}),
    ),
}


NODE_POOL = {
    "apiVersion": "karpenter.sh/v1",
    "kind": "NodePool",
    "metadata": {"name": "gpu-p4d"},
    "spec": {"template": {"spec": {"taints": [dict(GPU_TAINT)]}}},
}
NODE_CLASS = {
    "apiVersion": "karpenter.k8s.aws/v1",
    "kind": "EC2NodeClass",
    "metadata": {"name": "gpu-p4d"},
    "spec": {"metadataOptions": {"httpTokens": "required", "httpPutResponseHopLimit": 1}},
}
TRAINING_JOB = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {
        "name": "run",
        "labels": {"kiln.dev/training-job": "run", "kueue.x-k8s.io/queue-name": "ml-gpu"},
    },
    "spec": {
        "template": {
            "metadata": {"annotations": {"karpenter.sh/do-not-disrupt": "true"}},
            "spec": {"containers": [{"name": "trainer", "image": "x"}]},
        }
    },
}


def objects(*manifests: dict[str, Any]) -> dict[str, Any]:
    """A deploy-time objects resource. A `TOKEN` string in an object becomes a `Ref`: the
    property is then an Fn::Join, as when the objects hold deploy-time values."""
    before, *after = json.dumps(list(manifests)).split("TOKEN")
    value: Any = before
    if after:
        parts: list[Any] = [before]
        for text in after:
            parts += [{"Ref": "X"}, text]
        value = {"Fn::Join": ["", parts]}
    return {"Type": "Custom::KubernetesObjects", "Properties": {"Manifests": value}}


def changed(obj: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """A copy of a Kubernetes object with one field set (or removed with None)."""
    copied = copy.deepcopy(obj)
    node = copied
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return copied


CASES["gpu-pools-tainted"] = (
    PROD,
    stack({"O": objects(NODE_POOL)}),
    stack({"O": objects(changed(NODE_POOL, ["spec", "template", "spec", "taints"], []))}),
)
CASES["karpenter-imdsv2"] = (
    PROD,
    stack({"O": objects(changed(NODE_CLASS, ["spec", "role"], "TOKEN"))}),
    stack(
        {
            "O": objects(
                changed(NODE_CLASS, ["spec", "metadataOptions", "httpPutResponseHopLimit"], 2)
            )
        }
    ),
)
CASES["training-pods-not-disrupted"] = (
    PROD,
    stack({"O": objects(TRAINING_JOB)}),
    stack(
        {"O": objects(changed(TRAINING_JOB, ["spec", "template", "metadata", "annotations"], {}))}
    ),
)


def test_kubernetes_object_rules_judge_objects_directly_too() -> None:
    assert check_objects([NODE_POOL, NODE_CLASS, TRAINING_JOB]) == []
    unqueued = copy.deepcopy(TRAINING_JOB)
    del unqueued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    unqueued["spec"]["template"]["metadata"] = {}
    assert check_objects([unqueued]) == [
        "[training-pods-not-disrupted] Job run: has no kueue.x-k8s.io/queue-name label: "
        "Kueue would not queue or gang-admit it",
        "[training-pods-not-disrupted] Job run: a pod template lacks the annotation "
        'karpenter.sh/do-not-disrupt: "true"',
    ]
    # Not a kiln training run (no kiln.dev/training-job label): not judged.
    other = copy.deepcopy(unqueued)
    del other["metadata"]["labels"]["kiln.dev/training-job"]
    assert check_objects([other]) == []
    (problem,) = check_objects([changed(NODE_CLASS, ["spec", "metadataOptions"], {})])[:1]
    assert problem.startswith("[karpenter-imdsv2] EC2NodeClass gpu-p4d: metadataOptions")


def test_every_rule_has_its_cases() -> None:
    assert sorted(CASES) == sorted(RULES), "give each new rule a compliant and a failing case"


@pytest.mark.parametrize("rule_id", sorted(RULES))
def test_every_registered_rule_fires_on_its_non_compliant_case(rule_id: str) -> None:
    settings, compliant, non_compliant = CASES[rule_id]
    # The full runner, every rule: the failing case is this rule's, the good case nobody's.
    assert {v.rule for v in check(non_compliant, settings)} >= {rule_id}
    assert [v for v in check(compliant, settings) if v.rule == rule_id] == []
    assert check(compliant, settings, [RULES[rule_id]]) == []


@pytest.mark.parametrize("rule_id", sorted(RULES))
def test_every_rule_says_why_and_what_it_judges(rule_id: str) -> None:
    rule = RULES[rule_id]
    assert rule.id == rule_id and len(rule.reason) > 20
    assert all(t.startswith(("AWS::", "Custom::")) for t in rule.resource_types)


def test_violations_name_rule_stack_and_resource() -> None:
    bad = stack({"K": with_props(MSK, ["ClientAuthentication", "Sasl"], None)})
    (violation,) = run("msk-iam-tls-only", bad, PROD)
    assert str(violation) == (
        "[msk-iam-tls-only] kiln-prod-probe/K: IAM client authentication is not enabled"
    )
    (violation,) = run("termination-protected", stack({}, termination_protection=False), PROD)
    assert violation.resource == "(stack)"
