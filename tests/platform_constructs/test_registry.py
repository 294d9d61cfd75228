"""The model registry construct: its groups, key, reader policies and registration rights."""

from __future__ import annotations

import json

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk.assertions import Match, Template

from app import cdk_json_context
from platform_constructs.registry import READ_ACTIONS, ModelRegistry

READERS = ["222222222222", "333333333333"]


def registry(**props: object) -> tuple[ModelRegistry, Template]:
    app = cdk.App(context=cdk_json_context())
    stack = cdk.Stack(app, "Probe", env=cdk.Environment(region="eu-west-1"))
    role = iam.Role(stack, "Trainer", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"))
    made = ModelRegistry(
        stack,
        "Registry",
        group_names=["kiln-llm", "kiln-coder"],
        key_alias="alias/kiln/dev/registry",
        removal_policy=cdk.RemovalPolicy.RETAIN,
        description="kiln dev",
        **props,  # type: ignore[arg-type]
    )
    made.grant_register(role)
    return made, Template.from_stack(stack)


def test_one_retained_group_per_name_without_a_policy_when_nobody_else_reads() -> None:
    made, template = registry()
    groups = template.find_resources("AWS::SageMaker::ModelPackageGroup")
    assert sorted(g["Properties"]["ModelPackageGroupName"] for g in groups.values()) == [
        "kiln-coder",
        "kiln-llm",
    ]
    assert all(g["DeletionPolicy"] == "Retain" for g in groups.values())
    assert not any("ModelPackageGroupPolicy" in g["Properties"] for g in groups.values())
    assert set(made.groups) == {"kiln-llm", "kiln-coder"}
    # No statement for other accounts on the key either.
    (key,) = template.find_resources("AWS::KMS::Key").values()
    assert "OtherEnvironments" not in json.dumps(key)


def test_other_accounts_read_over_tls_from_the_organization_only() -> None:
    _, template = registry(reader_accounts=READERS, organization_id="o-abcdefghij")
    groups = template.find_resources("AWS::SageMaker::ModelPackageGroup")
    for group in groups.values():
        statement, deploy = group["Properties"]["ModelPackageGroupPolicy"]["Statement"]
        # CreateModel on the versions: "Deploy a Model Version from a Different Account".
        assert deploy["Action"] == "sagemaker:CreateModel"
        assert deploy["Condition"] == statement["Condition"]
        assert "model-package-group/" not in json.dumps(deploy["Resource"])
        assert sorted(statement["Action"]) == sorted(READ_ACTIONS)
        assert not any("Create" in a or "Update" in a for a in statement["Action"])
        principals = json.dumps(statement["Principal"])
        assert all(account in principals for account in READERS)
        assert statement["Condition"] == {
            "Bool": {"aws:SecureTransport": "true"},
            "StringEquals": {"aws:PrincipalOrgID": "o-abcdefghij"},
        }
        name = group["Properties"]["ModelPackageGroupName"]
        resources = json.dumps(statement["Resource"])
        assert f"model-package-group/{name}" in resources and f"model-package/{name}/*" in resources
    # The key decrypts versions' records for them only through SageMaker.
    template.has_resource_properties(
        "AWS::KMS::Key",
        {
            "KeyPolicy": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "Sid": "OtherEnvironmentsReadThroughSageMaker",
                                "Action": ["kms:Decrypt", "kms:DescribeKey"],
                                "Condition": Match.object_like(
                                    {
                                        "StringEquals": {
                                            "aws:PrincipalOrgID": "o-abcdefghij",
                                            "kms:ViaService": "sagemaker.eu-west-1.amazonaws.com",
                                        }
                                    }
                                ),
                            }
                        )
                    ]
                )
            }
        },
    )


def test_registering_roles_may_create_versions_and_use_the_key_through_sagemaker() -> None:
    _, template = registry()
    (policy,) = template.find_resources("AWS::IAM::ManagedPolicy").values()
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    create, key = statements
    assert "sagemaker:CreateModelPackage" in create["Action"]
    assert not any(a.startswith("sagemaker:Update") for a in create["Action"])  # no approving
    assert key["Condition"] == {
        "StringEquals": {"kms:ViaService": "sagemaker.eu-west-1.amazonaws.com"}
    }
    assert len(policy["Properties"]["Roles"]) == 1
