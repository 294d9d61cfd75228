"""kiln's own guardrails: green on every synthesized stack, and each proven to fire."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

from kiln.config import load_settings
from kiln.settings import Settings
from kiln_policy.assembly import SynthesizedStack
from kiln_policy.guardrails import (
    check,
    data_stores_retained,
    eks_endpoint_private,
    endpoints_encrypted,
    firehose_uses_kms,
    gpu_nodes_tainted,
    imdsv2_required,
    kms_buckets_use_bucket_keys,
    msk_iam_and_tls_only,
    prod_endpoints_redundant,
    prod_endpoints_roll_back,
    required_tags,
    termination_protected,
    warehouse_private_and_encrypted,
)
from tests.support import Synthesis

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


def test_every_synthesized_stack_passes(
    synthesis: Synthesis, settings_by_env: dict[str, Settings]
) -> None:
    assert len(synthesis.stacks) == 7 * len(settings_by_env)
    violations = [
        str(v) for s in synthesis.stacks for v in check(s, settings_by_env[s.environment])
    ]
    assert not violations, "\n".join(violations)


def test_data_stores_retained() -> None:
    assert data_stores_retained(stack({"B": KMS_BUCKET}), PROD) == []
    deleting = {**KMS_BUCKET, "DeletionPolicy": "Delete"}
    (violation,) = data_stores_retained(stack({"B": deleting}), PROD)
    assert violation.rule == "data-stores-retained" and "DeletionPolicy Delete" in violation.message
    missing = {"Type": "AWS::KMS::Key", "Properties": {}}
    assert len(data_stores_retained(stack({"K": missing}), PROD)) == 2
    # An environment that opted into destroy is not held to it.
    assert data_stores_retained(stack({"K": missing}), DEV) == []


def test_termination_protected() -> None:
    assert termination_protected(stack({}), PROD) == []
    (violation,) = termination_protected(stack({}, termination_protection=False), PROD)
    assert violation.rule == "termination-protected"
    assert termination_protected(stack({}, termination_protection=False), DEV) == []


def test_required_tags() -> None:
    assert required_tags(stack({}), PROD) == []
    wrong = stack({}, tags={"project": "kiln", "environment": "dev"})
    messages = sorted(v.message for v in required_tags(wrong, PROD))
    assert messages == [
        "tag 'environment' is 'dev', expected 'prod'",
        f"tag 'owner' is None, expected {PROD.owner!r}",
    ]


def test_kms_buckets_use_bucket_keys() -> None:
    assert kms_buckets_use_bucket_keys(stack({"B": KMS_BUCKET}), PROD) == []
    no_key = copy.deepcopy(KMS_BUCKET)
    del no_key["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"][0][
        "BucketKeyEnabled"
    ]
    (violation,) = kms_buckets_use_bucket_keys(stack({"B": no_key}), PROD)
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
    assert kms_buckets_use_bucket_keys(stack({"L": sse_s3}), PROD) == []


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
    assert msk_iam_and_tls_only(stack({"K": MSK}), PROD) == []
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
        (violation,) = msk_iam_and_tls_only(stack({"K": cluster}), PROD)
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
    assert warehouse_private_and_encrypted(good, PROD) == []
    public = stack(
        {
            "W": with_props(WORKGROUP, ["PubliclyAccessible"], True),
            "C": with_props(CLUSTER, ["PubliclyAccessible"], None),
        }
    )
    assert sorted(v.resource for v in warehouse_private_and_encrypted(public, PROD)) == ["C", "W"]
    unencrypted = stack(
        {
            "N": with_props(NAMESPACE, ["KmsKeyId"], None),
            "C": with_props(CLUSTER, ["Encrypted"], False),
        }
    )
    messages = sorted(v.message for v in warehouse_private_and_encrypted(unencrypted, PROD))
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
    assert firehose_uses_kms(stack({"F": FIREHOSE}), PROD) == []
    plain = with_props(
        FIREHOSE,
        ["ExtendedS3DestinationConfiguration", "EncryptionConfiguration"],
        {"NoEncryptionConfig": "NoEncryption"},
    )
    (violation,) = firehose_uses_kms(stack({"F": plain}), PROD)
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
    "Properties": {"LaunchTemplateData": {"MetadataOptions": {"HttpTokens": "required"}}},
}


def test_eks_endpoint_private() -> None:
    assert eks_endpoint_private(stack({"C": EKS}), PROD) == []
    public = with_props(EKS, ["ResourcesVpcConfig", "EndpointPublicAccess"], True)
    (violation,) = eks_endpoint_private(stack({"C": public}), PROD)
    assert violation.message == "public API endpoint in a prod-tier environment"
    restricted = with_props(public, ["ResourcesVpcConfig", "PublicAccessCidrs"], ["203.0.113.0/24"])
    assert eks_endpoint_private(stack({"C": restricted}), DEV) == []
    (violation,) = eks_endpoint_private(stack({"C": public}), DEV)  # no CIDRs: open to all
    assert violation.message == "public API endpoint open to 0.0.0.0/0"
    unset = with_props(EKS, ["ResourcesVpcConfig", "EndpointPublicAccess"], None)
    assert len(eks_endpoint_private(stack({"C": unset}), PROD)) == 1  # EKS defaults to public


def test_gpu_nodes_tainted() -> None:
    assert gpu_nodes_tainted(stack({"G": GPU_GROUP}), PROD) == []
    untainted = with_props(GPU_GROUP, ["Taints"], [])
    (violation,) = gpu_nodes_tainted(stack({"G": untainted}), PROD)
    assert violation.rule == "gpu-nodes-tainted"
    system = with_props(untainted, ["AmiType"], "AL2023_x86_64_STANDARD")
    assert gpu_nodes_tainted(stack({"S": system}), PROD) == []


def test_imdsv2_required() -> None:
    assert imdsv2_required(stack({"G": GPU_GROUP, "T": TEMPLATE}), PROD) == []
    optional = with_props(
        TEMPLATE, ["LaunchTemplateData", "MetadataOptions", "HttpTokens"], "optional"
    )
    (violation,) = imdsv2_required(stack({"T": optional}), PROD)
    assert violation.message == "MetadataOptions.HttpTokens is optional, so IMDSv1 is allowed"
    bare_group = with_props(GPU_GROUP, ["LaunchTemplate"], None)
    (violation,) = imdsv2_required(stack({"G": bare_group}), PROD)
    assert "without a launch template" in violation.message


ENDPOINT = {
    "Type": "AWS::SageMaker::Endpoint",
    "Properties": {
        "DeploymentConfig": {
            "BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": {"Type": "CANARY"}},
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "a"}]},
        }
    },
}
ENDPOINT_CONFIG = {
    "Type": "AWS::SageMaker::EndpointConfig",
    "Properties": {
        "KmsKeyId": "k",
        "ProductionVariants": [{"VariantName": "AllTraffic", "InitialInstanceCount": 2}],
        "DataCaptureConfig": {"EnableCapture": True, "KmsKeyId": "k"},
    },
}
SCALING = {
    "Type": "AWS::ApplicationAutoScaling::ScalableTarget",
    "Properties": {"ServiceNamespace": "sagemaker", "MinCapacity": 2, "MaxCapacity": 4},
}


def test_prod_endpoints_roll_back() -> None:
    assert prod_endpoints_roll_back(stack({"E": ENDPOINT}), PROD) == []
    no_alarms = with_props(ENDPOINT, ["DeploymentConfig", "AutoRollbackConfiguration"], None)
    (violation,) = prod_endpoints_roll_back(stack({"E": no_alarms}), PROD)
    assert violation.message == "prod endpoint without auto-rollback alarms"
    assert prod_endpoints_roll_back(stack({"E": no_alarms}), DEV) == []


def test_endpoints_encrypted() -> None:
    assert endpoints_encrypted(stack({"C": ENDPOINT_CONFIG}), PROD) == []
    plain = with_props(ENDPOINT_CONFIG, ["KmsKeyId"], None)
    plain = with_props(plain, ["DataCaptureConfig", "KmsKeyId"], None)
    messages = sorted(v.message for v in endpoints_encrypted(stack({"C": plain}), DEV))
    assert messages == [
        "data capture without a KMS key",
        "endpoint config without KmsKeyId for its volumes",
    ]


def test_prod_endpoints_redundant() -> None:
    good = stack({"C": ENDPOINT_CONFIG, "S": SCALING})
    assert prod_endpoints_redundant(good, PROD) == []
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
    assert len(prod_endpoints_redundant(single, PROD)) == 2
    assert prod_endpoints_redundant(single, DEV) == []


@pytest.mark.parametrize("env", ["dev", "staging", "prod"])
def test_check_runs_every_guardrail(env: str) -> None:
    bad = stack(
        {
            "B": {"Type": "AWS::S3::Bucket"},
            "K": with_props(MSK, ["ClientAuthentication", "Sasl"], None),
            "W": with_props(WORKGROUP, ["PubliclyAccessible"], True),
            "F": with_props(
                FIREHOSE, ["ExtendedS3DestinationConfiguration", "EncryptionConfiguration"], None
            ),
        },
        termination_protection=False,
        tags={},
    )
    rules = {v.rule for v in check(bad, load_settings(env))}
    expected = {"required-tags", "msk-iam-tls-only", "warehouse-private-encrypted", "firehose-kms"}
    if env != "dev":
        expected |= {"data-stores-retained", "termination-protected"}
    assert rules == expected
