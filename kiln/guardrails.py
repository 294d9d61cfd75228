"""kiln's own policy checks over synthesized stacks, for what cdk-nag has no rule for.

Each guardrail takes a `SynthesizedStack` and the environment's `Settings` and returns the
violations it finds; `check` runs them all. Tests run every guardrail over every template
of every environment, and each against one compliant and one non-compliant case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kiln.assembly import SynthesizedStack
from kiln.settings import Settings

# Resource types that hold data someone would miss: removing the stack must not delete them.
DATA_STORE_TYPES = frozenset(
    {
        "AWS::S3::Bucket",
        "AWS::KMS::Key",
        "AWS::Logs::LogGroup",
        "AWS::RedshiftServerless::Namespace",
        "AWS::Redshift::Cluster",
        "AWS::MSK::Cluster",
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


GUARDRAILS: tuple[Guardrail, ...] = (
    data_stores_retained,
    termination_protected,
    required_tags,
    kms_buckets_use_bucket_keys,
)


def check(stack: SynthesizedStack, settings: Settings) -> list[Violation]:
    """Every guardrail's violations for one stack."""
    return [violation for guardrail in GUARDRAILS for violation in guardrail(stack, settings)]
