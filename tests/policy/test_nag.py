"""The cdk-nag gate: zero unacknowledged findings, and every acknowledgement has a reason."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

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
        # The deploy-time lookup of the S3 prefix list's id (issue 17).
        *_PROVIDER_FRAMEWORK,
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
    # Karpenter's interruption queue: SSE-SQS (not KMS) and no dead-letter queue (issue 18).
    "compute": {*_PROVIDER_FRAMEWORK, "AwsSolutions-SQS3", "NIST.800.53.R5-SQSQueueEncrypted"},
    "observability": set(),
    # Registry versions' ARNs end in the number SageMaker gives them.
    "models": {"AwsSolutions-IAM5"},
    # With a model artifact (tests/stacks/test_serving.py): the execution role's wildcards.
    "serving": set(),
}
# Every wildcard resource acknowledged (AwsSolutions-IAM5), as patterns: anything else fails.
# A bare `*` is not among them: it is judged per statement (test_unscoped_statements_...).
ALLOWED_WILDCARDS = [
    r"<[A-Za-z0-9]+\.Arn>:\*",  # the Provider framework invoking a function's versions
    # The cluster-objects applier's own access entry (EKS appends an id).
    r"arn:aws:eks:us-east-1:<AWS::AccountId>:access-entry/<EksCluster[A-Z0-9]+>/role/"
    r"<AWS::AccountId>/<ClusterObjectsRole[A-Z0-9]+>/\*",
    r"arn:<AWS::Partition>:kafka:<AWS::Region>:<AWS::AccountId>:group/kiln-[a-z]+/\*",
    r"arn:<AWS::Partition>:kafka:<AWS::Region>:<AWS::AccountId>:topic/kiln-[a-z]+/\*/[a-z.-]+",
    r"arn:aws:s3:::kiln-[a-z]+-raw-<AWS::AccountId>-<AWS::Region>/(events|errors)/[a-z.-]+/\*",
    r"arn:aws:s3:::kiln-[a-z]+-(raw|curated)-<AWS::AccountId>-<AWS::Region>/\*",
    r"arn:aws:s3:::kiln-[a-z]+-artifacts-<AWS::AccountId>-<AWS::Region>/(checkpoints|models)/\*",
    r"arn:(aws|<AWS::Partition>):logs:(us-east-1|<AWS::Region>):<AWS::AccountId>:log-group:"
    r"/aws/sagemaker/(TrainingJobs|Endpoints/kiln-[a-z]+-llm):\*",
    r"arn:aws:s3:::kiln-[a-z]+-capture-<AWS::AccountId>-<AWS::Region>/endpoints/kiln-[a-z]+-llm/\*",
    # An uncompressed model: the objects under its own prefix (serving.model_artifact).
    r"arn:<AWS::Partition>:s3:::[a-z0-9][a-z0-9.-]+/([^/*]+/)+\*",
    # Karpenter's controller: what it launches, tags and deletes (tag-conditioned to this
    # cluster), the shared images, subnets and groups it launches from, the AMI parameters.
    r"arn:aws:ec2:us-east-1:\*:(fleet|instance|volume|network-interface|launch-template|"
    r"spot-instances-request|security-group|subnet|capacity-reservation|placement-group)/\*",
    r"arn:aws:ec2:us-east-1::(image|snapshot)/\*",
    r"arn:aws:iam::<AWS::AccountId>:instance-profile/\*",
    r"arn:aws:ssm:us-east-1::parameter/aws/service/\*",
    # The versions of one registry group (their ARNs end in a number SageMaker gives).
    r"arn:<AWS::Partition>:sagemaker:<AWS::Region>:<AWS::AccountId>:model-package/kiln-[a-z0-9-]+/\*",
]
# The actions a `Resource: *` statement may hold: the Service Authorization Reference lists no
# resource type for them. Each such statement sits in a policy of its own, so that one
# acknowledgement covers one statement (issue 17); `conditions` are required where given.
UNSCOPED_ACTIONS: dict[str, dict[str, object]] = {
    "ecr:GetAuthorizationToken": {},
    "cloudwatch:PutMetricData": {"StringEquals": "cloudwatch:namespace"},
    "ec2:CreateNetworkInterface": {},
    "ec2:CreateNetworkInterfacePermission": {},
    "ec2:DeleteNetworkInterface": {},
    "ec2:DeleteNetworkInterfacePermission": {},
    "ec2:DescribeNetworkInterfaces": {},
    "ec2:DescribeVpcs": {},
    "ec2:DescribeDhcpOptions": {},
    "ec2:DescribeSubnets": {},
    "ec2:DescribeSecurityGroups": {},
    "ec2:AssignPrivateIpAddresses": {},
    "ec2:UnassignPrivateIpAddresses": {},
    "ec2:DescribeManagedPrefixLists": {},
    "redshift-data:DescribeStatement": {"StringEquals": "redshift-data:statement-owner-iam-userid"},
    "redshift-data:GetStatementResult": {
        "StringEquals": "redshift-data:statement-owner-iam-userid"
    },
    "redshift-data:CancelStatement": {"StringEquals": "redshift-data:statement-owner-iam-userid"},
    # Step Functions' log delivery, in the CDK Provider framework's waiter role.
    "logs:CreateLogDelivery": {},
    "logs:GetLogDelivery": {},
    "logs:UpdateLogDelivery": {},
    "logs:DeleteLogDelivery": {},
    "logs:ListLogDeliveries": {},
    "logs:PutResourcePolicy": {},
    "logs:DescribeResourcePolicies": {},
    "logs:DescribeLogGroups": {},
    # Karpenter's discovery (instance types, offerings, AMIs, reservations), in its region.
    **{
        action: {"StringEquals": "aws:RequestedRegion"}
        for action in (
            "ec2:DescribeCapacityReservations",
            "ec2:DescribeImages",
            "ec2:DescribeInstances",
            "ec2:DescribeInstanceStatus",
            "ec2:DescribeInstanceTypeOfferings",
            "ec2:DescribeInstanceTypes",
            "ec2:DescribeLaunchTemplates",
            "ec2:DescribePlacementGroups",
            "ec2:DescribeSpotPriceHistory",
        )
    },
    "pricing:GetProducts": {},
    "iam:ListInstanceProfiles": {},
}
# The CDK Provider framework's waiter role: the CDK writes Step Functions' log grants on `*`
# in its generated default policy; they are allowed there and nowhere else.
CDK_GENERATED_UNSCOPED = {
    "ProviderwaiterstatemachineRoleDefaultPolicy": {"logs:CreateLogStream", "logs:PutLogEvents"}
}
# Every AWS-managed policy acknowledged (AwsSolutions-IAM4).
ALLOWED_MANAGED_POLICIES = {
    "service-role/AWSLambdaBasicExecutionRole",
    "service-role/AWSLambdaVPCAccessExecutionRole",
    "AmazonEKSClusterPolicy",
    "AmazonEKSWorkerNodePolicy",
    "AmazonEC2ContainerRegistryReadOnly",
    "AmazonEKS_CNI_Policy",
    # Karpenter's GPU nodes (the pull-only successor of ...ReadOnly) and the CloudWatch agent.
    "AmazonEC2ContainerRegistryPullOnly",
    "CloudWatchAgentServerPolicy",
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


def _documents(resource: dict[str, Any]) -> list[dict[str, Any]]:
    props = resource.get("Properties", {})
    if "PolicyDocument" in props:
        return [props["PolicyDocument"]]
    return [p["PolicyDocument"] for p in props.get("Policies", [])]


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def unscoped_statement_problems(resource: dict[str, Any], logical_id: str = "") -> list[str]:
    """Why a policy acknowledged for `Resource::*` does not hold exactly one `*` statement of
    actions that take no resource ARN, with their required conditions."""
    generated = {
        action
        for fragment, actions in CDK_GENERATED_UNSCOPED.items()
        if fragment in logical_id
        for action in actions
    }
    problems = []
    for document in _documents(resource):
        unscoped = [s for s in document["Statement"] if "*" in _as_list(s.get("Resource"))]
        if len(unscoped) != 1:
            problems.append(f"{len(unscoped)} statements with Resource * under one acknowledgement")
        for statement in unscoped:
            for action in _as_list(statement["Action"]):
                if action in generated:
                    continue
                if action not in UNSCOPED_ACTIONS:
                    problems.append(f"{action} on * (it takes a resource ARN, or is unreviewed)")
                    continue
                for operator, key in UNSCOPED_ACTIONS[action].items():
                    if key not in statement.get("Condition", {}).get(operator, {}):
                        problems.append(f"{action} on * without its {operator} {key} condition")
    return problems


def test_unscoped_statements_are_acknowledged_one_by_one(synthesis: Synthesis) -> None:
    """`AwsSolutions-IAM5[Resource::*]` covers a whole policy: every acknowledged policy holds
    exactly one `*` statement, of actions that take no resource ARN (issue 17, item 7)."""
    for stack in synthesis.stacks:
        for ack in stack.acknowledgements:
            if ack.rule != "AwsSolutions-IAM5[Resource::*]":
                continue
            resource = stack.resources[ack.logical_id]
            problems = unscoped_statement_problems(resource, ack.logical_id)
            assert not problems, f"{stack.stack_name}/{ack.logical_id}: {problems}"


def test_a_second_unscoped_statement_under_one_acknowledgement_fails() -> None:
    """Non-compliant cases of the per-statement rule."""
    one = {"Action": "ecr:GetAuthorizationToken", "Resource": "*", "Effect": "Allow"}
    two = {"Action": ["redshift-data:DescribeStatement"], "Resource": "*", "Effect": "Allow"}
    policy = {"Type": "AWS::IAM::ManagedPolicy", "Properties": {"PolicyDocument": {}}}
    policy["Properties"]["PolicyDocument"] = {"Statement": [one]}
    assert unscoped_statement_problems(policy) == []
    policy["Properties"]["PolicyDocument"] = {"Statement": [one, two]}
    assert unscoped_statement_problems(policy) == [
        "2 statements with Resource * under one acknowledgement",
        "redshift-data:DescribeStatement on * without its StringEquals "
        "redshift-data:statement-owner-iam-userid condition",
    ]
    scoped_action = {"Action": "s3:GetObject", "Resource": "*", "Effect": "Allow"}
    policy["Properties"]["PolicyDocument"] = {"Statement": [scoped_action]}
    assert unscoped_statement_problems(policy) == [
        "s3:GetObject on * (it takes a resource ARN, or is unreviewed)"
    ]


def test_acknowledged_wildcards_are_the_reviewed_ones(synthesis: Synthesis) -> None:
    for stack in synthesis.stacks:
        for ack in stack.acknowledgements:
            if not ack.rule.startswith("AwsSolutions-IAM5["):
                continue
            resource = ack.rule.removeprefix("AwsSolutions-IAM5[Resource::").removesuffix("]")
            if resource == "*":
                continue  # judged per statement above
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
