"""Acknowledgements for cdk-nag findings on resources the CDK itself generates.

kiln's own resources fix their findings or acknowledge them where they are defined; this
module holds the acknowledgements for code and roles that belong to the CDK (the
custom-resource Provider framework), each with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aws_cdk import Acknowledgment, Stack, Validations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import custom_resources as cr
from constructs import Construct, IConstruct

_MANAGED = "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/{}]"
_FRAMEWORK_FUNCTIONS = ("framework-onEvent", "framework-isComplete", "framework-onTimeout")


def _nag_text(value: Any) -> str:
    """A resolved CloudFormation value as cdk-nag writes it in a finding id."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((function, argument),) = value.items()
        if function == "Fn::Join":
            separator, parts = argument
            return str(separator).join(_nag_text(part) for part in parts)
        if function == "Ref":
            return f"<{argument}>"
        if function == "Fn::GetAtt":
            return f"<{argument[0]}.{argument[1]}>"
    return json.dumps(value, separators=(",", ":"))


def wildcard_resource(scope: IConstruct, resource: str, reason: str) -> Acknowledgment:
    """The acknowledgement of AwsSolutions-IAM5 for one wildcard `resource` of `scope`'s stack.

    `resource` may hold pseudo parameters and tokens of its own stack; a token of another
    stack turns into a cross-stack reference only at synth, so it cannot be named here.
    """
    text = _nag_text(Stack.of(scope).resolve(resource))
    return Acknowledgment(id=f"AwsSolutions-IAM5[Resource::{text}]", reason=reason)


UNSCOPED = "AwsSolutions-IAM5[Resource::*]"


@dataclass(frozen=True)
class UnscopedStatement:
    """A statement whose actions take no resource ARN (`Resource: *`), and why it is needed.

    cdk-nag acknowledges `Resource::*` per policy, not per statement: so each such statement
    gets a managed policy of its own (`unscoped_policies`), and an acknowledgement can never
    cover a second statement added beside it later.
    """

    name: str  # the policy's construct id, e.g. "NetworkInterfaces"
    statement: iam.PolicyStatement
    reason: str


def unscoped_policies(
    scope: Construct,
    roles: Sequence[iam.IRole],
    statements: Sequence[UnscopedStatement],
    *,
    prefix: str = "",
) -> dict[str, iam.ManagedPolicy]:
    """One customer-managed policy per unscoped statement, attached to `roles`, each with its
    own `Resource::*` acknowledgement; returned by name (construct ids `<prefix><name>Policy`)."""
    policies = {}
    for unscoped in statements:
        policy = iam.ManagedPolicy(
            scope,
            f"{prefix}{unscoped.name}Policy",
            roles=list(roles),
            statements=[unscoped.statement],
        )
        Validations.of(policy).acknowledge(Acknowledgment(id=UNSCOPED, reason=unscoped.reason))
        policies[unscoped.name] = policy
    return policies


def _arn_wildcard(function: IConstruct) -> str:
    """The IAM5 finding id for `<function ARN>:*` (invoking any version of a function)."""
    cfn = function.node.default_child
    logical_id = Stack.of(function).resolve(Stack.of(function).get_logical_id(cfn))  # type: ignore[arg-type]
    return f"AwsSolutions-IAM5[Resource::<{logical_id}.Arn>:*]"


def acknowledge_provider_framework(
    provider: cr.Provider, handlers: list[lambda_.IFunction]
) -> None:
    """Acknowledges, on the CDK's Provider framework functions, roles and state machine, the
    findings its generated code and roles cannot avoid; `handlers` are our functions it calls."""
    invoke_handlers = [
        Acknowledgment(
            id=_arn_wildcard(handler),
            reason="CDK Provider framework: invokes our handler function by ARN including "
            "its versions (`<arn>:*`), nothing else.",
        )
        for handler in handlers
    ]
    for name in _FRAMEWORK_FUNCTIONS:
        function = provider.node.try_find_child(name)
        if function is None:
            continue
        Validations.of(function).acknowledge(
            Acknowledgment(
                id=_MANAGED.format("AWSLambdaBasicExecutionRole"),
                reason="CDK Provider framework function: the CDK attaches this managed policy "
                "(write its own logs) to the role it generates.",
            ),
            Acknowledgment(
                id=_MANAGED.format("AWSLambdaVPCAccessExecutionRole"),
                reason="CDK Provider framework function placed in our VPC: the CDK attaches "
                "this managed policy (its network interfaces) to the role it generates.",
            ),
            Acknowledgment(
                id="NIST.800.53.R5-IAMNoInlinePolicy",
                reason="CDK Provider framework: the CDK writes the invoke grant for our "
                "handler as the generated role's inline default policy.",
            ),
            Acknowledgment(
                id="NIST.800.53.R5-LambdaConcurrency",
                reason="CDK Provider framework function: not configurable; it runs only "
                "during CloudFormation deployments of this stack.",
            ),
            Acknowledgment(
                id="NIST.800.53.R5-LambdaDLQ",
                reason="CDK Provider framework function: invoked by CloudFormation or Step "
                "Functions, which report failures; there is no async event to keep.",
            ),
            *invoke_handlers,
        )
    waiter = provider.node.try_find_child("waiter-state-machine")
    if waiter is not None:
        framework = [provider.node.find_child(n) for n in _FRAMEWORK_FUNCTIONS[1:]]
        Validations.of(waiter).acknowledge(
            Acknowledgment(
                id="AwsSolutions-IAM5[Resource::*]",
                reason="CDK Provider framework waiter: Step Functions' log delivery actions "
                "(logs:CreateLogDelivery, PutResourcePolicy, ...) that its ALL-level logging "
                "needs do not support resource-level permissions.",
            ),
            Acknowledgment(
                id="AwsSolutions-SF2",
                reason="CDK Provider framework waiter: X-Ray tracing is not configurable; it "
                "only polls our is_complete handler during deployments.",
            ),
            Acknowledgment(
                id="NIST.800.53.R5-IAMNoInlinePolicy",
                reason="CDK Provider framework waiter: the CDK writes the invoke grants for "
                "its functions as the generated role's inline default policy.",
            ),
            *[
                Acknowledgment(
                    id=_arn_wildcard(function),
                    reason="CDK Provider framework waiter: invokes its own framework "
                    "function by ARN including its versions (`<arn>:*`).",
                )
                for function in framework
            ],
        )


def acknowledge_generated_policies(scope: IConstruct, owner: str) -> int:
    """Acknowledges, on every inline policy the CDK generated under `scope` (a CDK Pipelines
    pipeline, after `build_pipeline()`), each of its wildcards and its being inline.

    The CDK writes these grants (artifact bucket and key, CodeBuild logs and reports, the
    bootstrap roles) with its own wildcards; `owner` names the generator in the reasons.
    Returns how many policies it covered, so callers can check it found them.
    """
    covered = 0
    for construct in scope.node.find_all():
        if not isinstance(construct, iam.Policy):
            continue
        stack = Stack.of(construct)
        document = stack.resolve(construct.document)
        acks = {
            "NIST.800.53.R5-IAMNoInlinePolicy": f"{owner}: the CDK writes this generated "
            "role's grants as its inline default policy.",
        }
        for statement in document.get("Statement", []):
            actions = statement.get("Action", [])
            resources = statement.get("Resource", [])
            for action in [actions] if isinstance(actions, str) else actions:
                if "*" in action:
                    acks[f"AwsSolutions-IAM5[Action::{action}]"] = (
                        f"{owner}: CDK-generated grant ({action}) on the pipeline's own "
                        "artifact bucket, key and build resources."
                    )
            for resource in [resources] if not isinstance(resources, list) else resources:
                text = _nag_text(resource)
                if "*" in text:
                    acks[f"AwsSolutions-IAM5[Resource::{text}]"] = (
                        f"{owner}: CDK-generated grant scoped to the pipeline's artifacts, "
                        "build logs and reports, and the CDK bootstrap roles."
                    )
        Validations.of(construct).acknowledge(
            *[Acknowledgment(id=rule, reason=reason) for rule, reason in acks.items()]
        )
        covered += 1
    return covered
