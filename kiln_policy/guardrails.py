"""kiln's own policy checks over synthesized stacks, for what cdk-nag has no rule for.

Each guardrail takes a `SynthesizedStack` and the environment's `Settings` and returns the
violations it finds; `check` runs them all. Tests run every guardrail over every template
of every environment, and each against one compliant and one non-compliant case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kiln.settings import Settings
from kiln_policy.assembly import SynthesizedStack

# Resource types that hold data someone would miss: removing the stack must not delete them.
DATA_STORE_TYPES = frozenset(
    {
        "AWS::S3::Bucket",
        "AWS::KMS::Key",
        "AWS::Logs::LogGroup",
        "AWS::RedshiftServerless::Namespace",
        "AWS::Redshift::Cluster",
        "AWS::MSK::Cluster",
        "AWS::MSK::Topic",
        "AWS::SecretsManager::Secret",
    }
)
_KEEPING_POLICIES = frozenset({"Retain", "Snapshot", "RetainExceptOnCreate"})
REQUIRED_TAGS = ("project", "environment", "owner")


@dataclass(frozen=True)
class Violation:
    rule: str
    stack: str
    resource: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.stack}/{self.resource}: {self.message}"


Guardrail = Callable[[SynthesizedStack, Settings], list[Violation]]


def data_stores_retained(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """With `removal_policy: retain` (always in prod), data stores survive stack deletion
    and replacement."""
    if settings.removal_policy != "retain":
        return []
    violations = []
    for logical_id, resource in stack.resources_of_type(*DATA_STORE_TYPES).items():
        for attribute in ("DeletionPolicy", "UpdateReplacePolicy"):
            value = resource.get(attribute, "Delete")
            if value not in _KEEPING_POLICIES:
                violations.append(
                    Violation(
                        "data-stores-retained",
                        stack.stack_name,
                        logical_id,
                        f"{resource['Type']} has {attribute} {value}; removal_policy is retain, "
                        f"so it must be one of {sorted(_KEEPING_POLICIES)}",
                    )
                )
    return violations


def termination_protected(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """Stacks of an environment that asks for termination protection have it."""
    if settings.termination_protection and not stack.termination_protection:
        return [
            Violation(
                "termination-protected",
                stack.stack_name,
                "(stack)",
                "termination protection is off but the environment's settings require it",
            )
        ]
    return []


def required_tags(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """Every stack carries project, environment and owner tags with the environment's values."""
    expected = {"project": settings.project, "environment": settings.name, "owner": settings.owner}
    return [
        Violation(
            "required-tags",
            stack.stack_name,
            "(stack)",
            f"tag {key!r} is {stack.tags.get(key)!r}, expected {value!r}",
        )
        for key, value in expected.items()
        if stack.tags.get(key) != value
    ]


def kms_buckets_use_bucket_keys(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """SSE-KMS buckets enable S3 Bucket Keys: without them every object read and write is a
    KMS request (cost, and KMS request-rate throttling under training-data reads)."""
    del settings
    violations = []
    for logical_id, bucket in stack.resources_of_type("AWS::S3::Bucket").items():
        encryption = bucket.get("Properties", {}).get("BucketEncryption", {})
        for rule in encryption.get("ServerSideEncryptionConfiguration", []):
            algorithm = rule.get("ServerSideEncryptionByDefault", {}).get("SSEAlgorithm")
            if (
                algorithm in ("aws:kms", "aws:kms:dsse")
                and rule.get("BucketKeyEnabled") is not True
            ):
                violations.append(
                    Violation(
                        "kms-bucket-keys",
                        stack.stack_name,
                        logical_id,
                        "SSE-KMS bucket without BucketKeyEnabled: true",
                    )
                )
    return violations


def msk_iam_and_tls_only(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """MSK clusters admit IAM-authenticated clients only, over TLS, with TLS between brokers."""
    del settings
    violations = []
    for logical_id, cluster in stack.resources_of_type("AWS::MSK::Cluster").items():
        props = cluster.get("Properties", {})
        auth = props.get("ClientAuthentication", {})
        transit = props.get("EncryptionInfo", {}).get("EncryptionInTransit", {})
        problems = []
        if auth.get("Sasl", {}).get("Iam", {}).get("Enabled") is not True:
            problems.append("IAM client authentication is not enabled")
        if auth.get("Unauthenticated", {}).get("Enabled") is True:
            problems.append("unauthenticated access is enabled")
        if auth.get("Sasl", {}).get("Scram", {}).get("Enabled") is True or auth.get("Tls"):
            problems.append("an authentication method other than IAM is enabled")
        # MSK's default for ClientBroker is TLS; only an explicit plaintext mode is a violation.
        if transit.get("ClientBroker", "TLS") != "TLS":
            problems.append(f"client-broker encryption is {transit['ClientBroker']}, not TLS")
        if transit.get("InCluster") is False:
            problems.append("traffic between brokers is not encrypted")
        violations += [
            Violation("msk-iam-tls-only", stack.stack_name, logical_id, p) for p in problems
        ]
    return violations


def warehouse_private_and_encrypted(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """Redshift is never publicly accessible and always KMS-encrypted with our key."""
    del settings
    violations = []
    for logical_id, resource in stack.resources_of_type(
        "AWS::RedshiftServerless::Workgroup",
        "AWS::Redshift::Cluster",
        "AWS::RedshiftServerless::Namespace",
    ).items():
        props = resource.get("Properties", {})
        kind = resource["Type"]
        problems = []
        if (
            kind != "AWS::RedshiftServerless::Namespace"
            and props.get("PubliclyAccessible") is not False
        ):
            problems.append("PubliclyAccessible is not explicitly false")
        if kind == "AWS::Redshift::Cluster" and props.get("Encrypted") is not True:
            problems.append("Encrypted is not true")
        if kind != "AWS::RedshiftServerless::Workgroup" and not props.get("KmsKeyId"):
            problems.append("no customer-managed KmsKeyId")
        violations += [
            Violation("warehouse-private-encrypted", stack.stack_name, logical_id, p)
            for p in problems
        ]
    return violations


def firehose_uses_kms(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """Firehose deliveries to S3 encrypt what they write with a KMS key."""
    del settings
    violations = []
    for logical_id, stream in stack.resources_of_type(
        "AWS::KinesisFirehose::DeliveryStream"
    ).items():
        props = stream.get("Properties", {})
        for key in ("ExtendedS3DestinationConfiguration", "S3DestinationConfiguration"):
            if key not in props:
                continue
            encryption = props[key].get("EncryptionConfiguration", {})
            if not encryption.get("KMSEncryptionConfig", {}).get("AWSKMSKeyARN"):
                violations.append(
                    Violation(
                        "firehose-kms",
                        stack.stack_name,
                        logical_id,
                        f"{key} writes S3 objects without a KMS key",
                    )
                )
    return violations


def eks_endpoint_private(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """EKS API endpoints are private outside dev; a dev public endpoint is CIDR-restricted."""
    violations = []
    for logical_id, cluster in stack.resources_of_type("AWS::EKS::Cluster").items():
        vpc_config = cluster.get("Properties", {}).get("ResourcesVpcConfig", {})
        public = vpc_config.get("EndpointPublicAccess", True)  # EKS's default is public
        if public and settings.tier != "dev":
            violations.append(
                Violation(
                    "eks-endpoint-private",
                    stack.stack_name,
                    logical_id,
                    f"public API endpoint in a {settings.tier}-tier environment",
                )
            )
        elif public and "0.0.0.0/0" in vpc_config.get("PublicAccessCidrs", ["0.0.0.0/0"]):
            violations.append(
                Violation(
                    "eks-endpoint-private",
                    stack.stack_name,
                    logical_id,
                    "public API endpoint open to 0.0.0.0/0",
                )
            )
    return violations


def gpu_nodes_tainted(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """GPU node groups carry `nvidia.com/gpu=true:NoSchedule`, so only pods that ask for GPUs
    (and tolerate it) land on the expensive nodes."""
    del settings
    wanted = {"Key": "nvidia.com/gpu", "Value": "true", "Effect": "NO_SCHEDULE"}
    return [
        Violation(
            "gpu-nodes-tainted",
            stack.stack_name,
            logical_id,
            f"GPU node group ({group['Properties'].get('AmiType')}) lacks the taint "
            "nvidia.com/gpu=true:NoSchedule",
        )
        for logical_id, group in stack.resources_of_type("AWS::EKS::Nodegroup").items()
        if "NVIDIA" in str(group.get("Properties", {}).get("AmiType", "")).upper()
        and wanted not in group["Properties"].get("Taints", [])
    ]


def imdsv2_required(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """Nodes answer only IMDSv2: every node group has a launch template, and every launch
    template requires session tokens (a node group without one allows IMDSv1)."""
    del settings
    violations = [
        Violation(
            "imdsv2-required",
            stack.stack_name,
            logical_id,
            "node group without a launch template (EKS then allows IMDSv1)",
        )
        for logical_id, group in stack.resources_of_type("AWS::EKS::Nodegroup").items()
        if "LaunchTemplate" not in group.get("Properties", {})
    ]
    for logical_id, template in stack.resources_of_type("AWS::EC2::LaunchTemplate").items():
        data = template.get("Properties", {}).get("LaunchTemplateData", {})
        tokens = data.get("MetadataOptions", {}).get("HttpTokens", "optional")
        if tokens != "required":
            violations.append(
                Violation(
                    "imdsv2-required",
                    stack.stack_name,
                    logical_id,
                    f"MetadataOptions.HttpTokens is {tokens}, so IMDSv1 is allowed",
                )
            )
    return violations


def prod_endpoints_roll_back(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """A prod endpoint deploys blue/green and rolls back by itself on CloudWatch alarms."""
    if not settings.is_prod:
        return []
    violations = []
    for logical_id, endpoint in stack.resources_of_type("AWS::SageMaker::Endpoint").items():
        config = endpoint.get("Properties", {}).get("DeploymentConfig", {})
        if not config.get("AutoRollbackConfiguration", {}).get("Alarms"):
            violations.append(
                Violation(
                    "endpoint-auto-rollback",
                    stack.stack_name,
                    logical_id,
                    "prod endpoint without auto-rollback alarms",
                )
            )
        if "BlueGreenUpdatePolicy" not in config:
            violations.append(
                Violation(
                    "endpoint-auto-rollback",
                    stack.stack_name,
                    logical_id,
                    "prod endpoint without a blue/green update policy",
                )
            )
    return violations


def endpoints_encrypted(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """Endpoint storage volumes and captured data are encrypted with customer-managed keys."""
    del settings
    violations = []
    for logical_id, config in stack.resources_of_type("AWS::SageMaker::EndpointConfig").items():
        props = config.get("Properties", {})
        if not props.get("KmsKeyId"):
            violations.append(
                Violation(
                    "endpoint-kms",
                    stack.stack_name,
                    logical_id,
                    "endpoint config without KmsKeyId for its volumes",
                )
            )
        capture = props.get("DataCaptureConfig", {})
        if capture.get("EnableCapture", True) and capture and not capture.get("KmsKeyId"):
            violations.append(
                Violation(
                    "endpoint-kms", stack.stack_name, logical_id, "data capture without a KMS key"
                )
            )
    return violations


def prod_endpoints_redundant(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """A prod endpoint runs at least 2 instances, and autoscaling never goes below 2."""
    if not settings.is_prod:
        return []
    violations = []
    for logical_id, config in stack.resources_of_type("AWS::SageMaker::EndpointConfig").items():
        for variant in config.get("Properties", {}).get("ProductionVariants", []):
            if variant.get("InitialInstanceCount", 1) < 2:
                violations.append(
                    Violation(
                        "endpoint-redundancy",
                        stack.stack_name,
                        logical_id,
                        f"variant {variant.get('VariantName')} starts with fewer than 2 instances",
                    )
                )
    for logical_id, target in stack.resources_of_type(
        "AWS::ApplicationAutoScaling::ScalableTarget"
    ).items():
        props = target.get("Properties", {})
        if props.get("ServiceNamespace") == "sagemaker" and props.get("MinCapacity", 0) < 2:
            violations.append(
                Violation(
                    "endpoint-redundancy",
                    stack.stack_name,
                    logical_id,
                    "autoscaling may scale the endpoint below 2 instances",
                )
            )
    return violations


GUARDRAILS: tuple[Guardrail, ...] = (
    data_stores_retained,
    termination_protected,
    required_tags,
    kms_buckets_use_bucket_keys,
    msk_iam_and_tls_only,
    warehouse_private_and_encrypted,
    firehose_uses_kms,
    eks_endpoint_private,
    gpu_nodes_tainted,
    imdsv2_required,
    prod_endpoints_roll_back,
    endpoints_encrypted,
    prod_endpoints_redundant,
)


def check(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """Every guardrail's violations for one stack."""
    return [violation for guardrail in GUARDRAILS for violation in guardrail(stack, settings)]
