"""The model registry: SageMaker model package groups, their key, and who may read and register."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Aws, RemovalPolicy, Stack, Validations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_sagemaker as sagemaker
from constructs import Construct

from platform_constructs.kms import PlatformKey
from platform_constructs.nag import wildcard_resource

# What another environment's account may do with the registry: read, never write. Approvals
# are made in the registry's own account (README, "Model registry").
READ_ACTIONS = (
    "sagemaker:DescribeModelPackageGroup",
    "sagemaker:DescribeModelPackage",
    "sagemaker:ListModelPackages",
)
# What another account needs to create a model from a version ("Deploy a Model Version from a
# Different Account", SageMaker Developer Guide: the group's policy grants CreateModel on the
# versions). Approvals stay in the registry's own account: no UpdateModelPackage.
DEPLOY_ACTIONS = ("sagemaker:CreateModel",)
# What a training run needs to register its version.
REGISTER_ACTIONS = ("sagemaker:CreateModelPackage", "sagemaker:DescribeModelPackageGroup")
# SageMaker encrypts a version's record with the registry key on the caller's behalf.
KEY_USE_ACTIONS = ("kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey", "kms:CreateGrant")


def group_arn(name: str, *, account: str = Aws.ACCOUNT_ID, region: str = Aws.REGION) -> str:
    return f"arn:{Aws.PARTITION}:sagemaker:{region}:{account}:model-package-group/{name}"


def versions_arn(name: str, *, account: str = Aws.ACCOUNT_ID, region: str = Aws.REGION) -> str:
    """Every version of a group: `.../model-package/<group>/*`."""
    return f"arn:{Aws.PARTITION}:sagemaker:{region}:{account}:model-package/{name}/*"


class ModelRegistry(Construct):
    """One SageMaker model package group per name, the KMS key that encrypts the versions'
    records, and the resource policies that let `reader_accounts` read them.

    AWS::SageMaker::ModelPackageGroup takes no KMS key (its properties are a name, a
    description, a resource policy and tags); the key applies per version, through
    CreateModelPackage's `SecurityConfig.KmsKeyId`, which training passes. Readers in other
    accounts get Describe/List on the groups and their versions and CreateModel on the
    versions (over TLS, and only from `organization_id` when given) and may decrypt with the
    key only through SageMaker.

    Exposes `key`, `groups` (name -> CfnModelPackageGroup), `register_policy` (attach it to
    the identities that register versions: `grant_register`).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        group_names: Sequence[str],
        key_alias: str,
        removal_policy: RemovalPolicy,
        reader_accounts: Sequence[str] = (),
        organization_id: str | None = None,
        description: str = "",
    ) -> None:
        super().__init__(scope, construct_id)
        via_sagemaker = f"sagemaker.{Stack.of(self).region}.amazonaws.com"
        self.key = PlatformKey(
            self,
            "RegistryKey",
            alias=key_alias,
            description=f"{description}: encrypts model package versions' records",
            removal_policy=removal_policy,
        ).key
        conditions: dict[str, dict[str, object]] = {"Bool": {"aws:SecureTransport": "true"}}
        if organization_id:
            conditions["StringEquals"] = {"aws:PrincipalOrgID": organization_id}
        readers = [iam.AccountPrincipal(account) for account in reader_accounts]
        if readers:
            self.key.add_to_resource_policy(
                iam.PolicyStatement(
                    sid="OtherEnvironmentsReadThroughSageMaker",
                    principals=readers,
                    actions=["kms:Decrypt", "kms:DescribeKey"],
                    resources=["*"],
                    conditions={
                        **conditions,
                        "StringEquals": {
                            **conditions.get("StringEquals", {}),
                            "kms:ViaService": via_sagemaker,
                        },
                    },
                )
            )
        self.groups: dict[str, sagemaker.CfnModelPackageGroup] = {}
        for name in group_names:
            policy = None
            if readers:
                policy = iam.PolicyDocument(
                    statements=[
                        iam.PolicyStatement(
                            sid="OtherEnvironmentsRead",
                            principals=readers,
                            actions=list(READ_ACTIONS),
                            resources=[group_arn(name), versions_arn(name)],
                            conditions=conditions,
                        ),
                        iam.PolicyStatement(
                            sid="OtherEnvironmentsCreateModels",
                            principals=readers,
                            actions=list(DEPLOY_ACTIONS),
                            resources=[versions_arn(name)],
                            conditions=conditions,
                        ),
                    ]
                ).to_json()
            group = sagemaker.CfnModelPackageGroup(
                self,
                "".join(part.title() for part in name.split("-")),
                model_package_group_name=name,
                model_package_group_description=f"{description}: versions of {name}",
                model_package_group_policy=policy,
            )
            group.apply_removal_policy(removal_policy)
            self.groups[name] = group
        self.register_policy = iam.ManagedPolicy(
            self,
            "RegisterPolicy",
            description=f"{description}: register model versions in the registry",
            statements=[
                iam.PolicyStatement(
                    actions=list(REGISTER_ACTIONS),
                    resources=[
                        arn for name in group_names for arn in (group_arn(name), versions_arn(name))
                    ],
                ),
                iam.PolicyStatement(
                    actions=list(KEY_USE_ACTIONS),
                    resources=[self.key.key_arn],
                    conditions={"StringEquals": {"kms:ViaService": via_sagemaker}},
                ),
            ],
        )
        Validations.of(self.register_policy).acknowledge(
            *[
                wildcard_resource(
                    self,
                    versions_arn(name),
                    "A version's ARN ends in the number SageMaker gives it when it is "
                    f"registered; the wildcard covers the versions of group {name} only.",
                )
                for name in group_names
            ]
        )

    def grant_register(self, *roles: iam.IRole) -> None:
        """Lets `roles` register versions (CreateModelPackage) and use the registry key."""
        for role in roles:
            self.register_policy.attach_to_role(role)


def read_policy(
    scope: Construct,
    construct_id: str,
    *,
    group_names: Sequence[str],
    account: str,
    description: str,
) -> iam.ManagedPolicy:
    """A managed policy reading the registry's groups in `account` (for deployers and the
    delivery pipeline of an environment: list, describe, pick the latest approved version)."""
    policy = iam.ManagedPolicy(
        scope,
        construct_id,
        description=f"{description}: read the model registry",
        statements=[
            iam.PolicyStatement(
                actions=list(READ_ACTIONS),
                resources=[
                    arn
                    for name in group_names
                    for arn in (
                        group_arn(name, account=account),
                        versions_arn(name, account=account),
                    )
                ],
            )
        ],
    )
    Validations.of(policy).acknowledge(
        *[
            wildcard_resource(
                scope,
                versions_arn(name, account=account),
                "Reading a model's versions: their ARNs end in numbers SageMaker gives "
                f"them; the wildcard covers the versions of group {name} only.",
            )
            for name in group_names
        ]
    )
    return policy
