"""The cdk-nag gate: zero unacknowledged findings, and every acknowledgement has a reason."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import aws_cdk as cdk
import pytest
from aws_cdk import aws_s3 as s3
from cdk_nag import AwsSolutionsChecks, NIST80053R5Checks

from app import cdk_json_context
from tests.support import Synthesis

# The rules acknowledged today, per component, by rule (the part of an id before `[`). A new
# acknowledgement must be added here on purpose, where a reviewer sees it.
_PROVIDER_FRAMEWORK = {
    # The CDK's custom-resource Provider framework (platform_constructs/nag.py).
    "AwsSolutions-IAM4",
    "AwsSolutions-IAM5",
    "NIST.800.53.R5-IAMNoInlinePolicy",
    "NIST.800.53.R5-LambdaConcurrency",
    "NIST.800.53.R5-LambdaDLQ",
}
EXPECTED_ACKNOWLEDGED_RULES = {
    "network": {
        "NIST.800.53.R5-VPCNoUnrestrictedRouteToIGW",
        "CloudFormation-Validate::W3010",
        # Added by the CDK itself on AWS::EC2::FlowLog (camelCase DestinationOptions).
        "CloudFormation-Validate::F3002",
        "CloudFormation-Validate::F3003",
    },
    "data-lake": {
        "AwsSolutions-S1",
        "NIST.800.53.R5-S3BucketLoggingEnabled",
        "NIST.800.53.R5-S3DefaultEncryptionKMS",
        "NIST.800.53.R5-S3BucketReplicationEnabled",
    },
    "streaming": {*_PROVIDER_FRAMEWORK, "AwsSolutions-KDF1", "AwsSolutions-SF2"},
    "warehouse": _PROVIDER_FRAMEWORK,
    # IAM4 there also covers the EKS cluster and node roles' AWS-managed policies.
    "compute": _PROVIDER_FRAMEWORK,
    "observability": set(),
    # With a model artifact (tests/stacks/test_serving.py): the execution role's wildcards.
    "serving": set(),
}
# Every wildcard resource acknowledged (AwsSolutions-IAM5), as patterns: anything else fails.
ALLOWED_WILDCARDS = [
    r"\*",  # actions without resource-level permissions (network interfaces, log delivery)
    r"<[A-Za-z0-9]+\.Arn>:\*",  # the Provider framework invoking a function's versions
    r"arn:<AWS::Partition>:kafka:<AWS::Region>:<AWS::AccountId>:group/kiln-[a-z]+/\*",
    r"arn:<AWS::Partition>:kafka:<AWS::Region>:<AWS::AccountId>:topic/kiln-[a-z]+/\*/[a-z.-]+",
    r"arn:aws:s3:::kiln-[a-z]+-raw-<AWS::AccountId>-<AWS::Region>/(events|errors)/[a-z.-]+/\*",
    r"arn:aws:s3:::kiln-[a-z]+-(raw|curated)-<AWS::AccountId>-<AWS::Region>/\*",
    r"arn:<AWS::Partition>:secretsmanager:<AWS::Region>:<AWS::AccountId>:secret:redshift!\*",
    r"arn:aws:s3:::kiln-[a-z]+-artifacts-<AWS::AccountId>-<AWS::Region>/(checkpoints|models)/\*",
    r"arn:(aws|<AWS::Partition>):logs:(us-east-1|<AWS::Region>):<AWS::AccountId>:log-group:"
    r"/aws/sagemaker/(TrainingJobs|Endpoints/kiln-[a-z]+-llm):\*",
    r"arn:aws:s3:::kiln-[a-z]+-capture-<AWS::AccountId>-<AWS::Region>/endpoints/kiln-[a-z]+-llm/\*",
]
# Every AWS-managed policy acknowledged (AwsSolutions-IAM4).
ALLOWED_MANAGED_POLICIES = {
    "service-role/AWSLambdaBasicExecutionRole",
    "service-role/AWSLambdaVPCAccessExecutionRole",
    "AmazonEKSClusterPolicy",
    "AmazonEKSWorkerNodePolicy",
    "AmazonEC2ContainerRegistryReadOnly",
    "AmazonEKS_CNI_Policy",
}


def findings(synthesis: Synthesis, severity: str) -> list[str]:
    report = synthesis.report or {"pluginReports": []}
    return [
        f"{plugin['pluginName']} {violation['ruleName']} at {construct['constructPath']}: "
        f"{violation['description'][:160]}"
        for plugin in report["pluginReports"]
        for violation in plugin["violations"]
        if violation.get("severity", "error") == severity
        for construct in violation["violatingConstructs"]
    ]


def test_synth_passes_the_policy_packs(synthesis: Synthesis) -> None:
    errors = findings(synthesis, "error")
    assert not errors, "unacknowledged findings:\n" + "\n".join(errors)
    assert synthesis.error is None, synthesis.error


def test_no_policy_warnings_either(synthesis: Synthesis) -> None:
    warnings = findings(synthesis, "warning")
    assert not warnings, "warnings:\n" + "\n".join(warnings)


def test_acknowledgements_are_the_reviewed_set_and_give_reasons(synthesis: Synthesis) -> None:
    for stack in synthesis.stacks:
        component = stack.stack_name.split("-", 2)[2]
        acknowledged = stack.acknowledgements
        rules = {a.rule.split("[")[0] for a in acknowledged}
        assert rules == EXPECTED_ACKNOWLEDGED_RULES[component], stack.stack_name
        for ack in acknowledged:
            assert len(ack.reason) >= 40, f"{stack.stack_name}/{ack.logical_id}: {ack}"


def test_acknowledged_managed_policies_are_the_reviewed_ones(synthesis: Synthesis) -> None:
    prefix = "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/"
    for stack in synthesis.stacks:
        for ack in stack.acknowledgements:
            if ack.rule.startswith("AwsSolutions-IAM4"):
                assert ack.rule.startswith(prefix), ack.rule
                assert ack.rule.removeprefix(prefix)[:-1] in ALLOWED_MANAGED_POLICIES, ack.rule


def test_acknowledged_wildcards_are_the_reviewed_ones(synthesis: Synthesis) -> None:
    for stack in synthesis.stacks:
        for ack in stack.acknowledgements:
            if not ack.rule.startswith("AwsSolutions-IAM5["):
                continue
            resource = ack.rule.removeprefix("AwsSolutions-IAM5[Resource::").removesuffix("]")
            assert any(re.fullmatch(p, resource) for p in ALLOWED_WILDCARDS), (
                f"{stack.stack_name}/{ack.logical_id}: {resource}"
            )


def test_acknowledgement_counts_per_stack(synthesis: Synthesis) -> None:
    """Prints the per-stack count (`pytest -s`) and checks the shape does not drift silently."""
    for stack in synthesis.stacks:
        counts = Counter(a.rule for a in stack.acknowledgements)
        print(f"{stack.stack_name}: {dict(sorted(counts.items()))}")
        if stack.stack_name.endswith("data-lake"):
            # Replication on all 5 buckets; the log bucket's own 3 exemptions once.
            assert counts["NIST.800.53.R5-S3BucketReplicationEnabled"] == 5
            assert counts["AwsSolutions-S1"] == 1


def test_a_new_finding_fails_synth(tmp_path: Path) -> None:
    """Non-compliant case: the same plugin setup rejects a bare bucket."""
    app = cdk.App(context=cdk_json_context(), outdir=str(tmp_path))
    stack = cdk.Stack(cdk.Stage(app, "probe"), "Probe")
    s3.Bucket(stack, "Bare")
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app), NIST80053R5Checks(app))
    with pytest.raises(RuntimeError, match="ValidationFailed") as caught:
        app.synth()
    assert "AwsSolutions-S1" in str(caught.value)
    assert "NIST.800.53.R5-S3BucketVersioningEnabled" in str(caught.value)
