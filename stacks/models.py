"""The models stack: the model registry (package groups, their key) that training registers in
and that deploys and the delivery pipeline read."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Aws, CfnOutput, RemovalPolicy, Stack, Validations
from aws_cdk import aws_iam as iam
from constructs import Construct

from kiln import naming
from kiln.contract import Component, Outputs, model_package_group
from kiln.settings import Settings
from platform_constructs.model_sharing import (
    ModelImageRepository,
    home_key_pattern,
    model_image_repository_name,
)
from platform_constructs.nag import wildcard_resource
from platform_constructs.registry import ModelRegistry, group_arn, read_policy
from stacks.base import KilnStack


def registry_account(settings: Settings) -> str:
    """The account holding the environment's registry: its own, or `registry.account`."""
    return settings.registry.account or Aws.ACCOUNT_ID


class ModelsStack(KilnStack):
    """In the registry's home environment: one model package group per `registry.models`
    name, the registry key, and registration rights for `trainer_roles`. In every environment:
    a managed policy that reads the registry (for deployers and the pipeline), and outputs
    naming the groups. Where other environments read the registry from other accounts, the
    home also holds the repository its serving stack publishes kiln's image to, which they may
    pull (`images`). Attributes: `registry` (ModelRegistry, or None off the home),
    `images` (ModelImageRepository, or None), `read_policy`, `group_arns`."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        trainer_roles: Sequence[iam.IRole] = (),
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            settings=settings,
            component=Component.MODELS,
            description=f"kiln {settings.name}: model registry (package groups, approvals)",
        )
        registry = settings.registry
        names = [model_package_group(settings.project, m) for m in registry.models]
        account = registry_account(settings)
        self.registry: ModelRegistry | None = None
        if registry.home:
            self.registry = ModelRegistry(
                self,
                "Registry",
                group_names=names,
                key_alias=naming.kms_alias(settings, "registry"),
                # Every environment's approvals live here: removing the home's stack must
                # not take the registry (or the key to its records) with it.
                removal_policy=RemovalPolicy.RETAIN,
                reader_accounts=registry.reader_accounts,
                organization_id=registry.organization_id,
                description=f"kiln {settings.name}",
            )
            self.registry.grant_register(*trainer_roles)
            CfnOutput(self, Outputs.REGISTRY_KEY_ARN.key, value=self.registry.key.key_arn)
        self.images: ModelImageRepository | None = None
        if registry.home and registry.reader_accounts:
            self.images = ModelImageRepository(
                self,
                "ModelImages",
                repository_name=model_image_repository_name(settings.project),
                reader_accounts=registry.reader_accounts,
                project=settings.project,
                organization_id=registry.organization_id,
            )
        self.read_policy = read_policy(
            self,
            "RegistryReadPolicy",
            group_names=names,
            account=account,
            description=f"kiln {settings.name}",
        )
        if self.registry is not None:
            # The groups exist before a policy names them (and before a deploy reads them).
            for group in self.registry.groups.values():
                self.read_policy.node.add_dependency(group)
        home = registry.account
        if home and home != settings.account:
            # Versions' records are encrypted with the home's registry key, which SageMaker
            # uses for the caller: across accounts the caller's own policy must allow it too
            # (the home's key policy allows this account, through SageMaker only).
            key = home_key_pattern(home)
            self.read_policy.add_statements(
                iam.PolicyStatement(
                    sid="HomeRegistryKeyThroughSageMaker",
                    actions=["kms:Decrypt", "kms:DescribeKey"],
                    resources=[key],
                    conditions={
                        "StringEquals": {
                            "kms:ViaService": f"sagemaker.{Stack.of(self).region}.amazonaws.com"
                        }
                    },
                )
            )
            Validations.of(self.read_policy).acknowledge(
                wildcard_resource(
                    self,
                    key,
                    "The registry key is generated in the registry's home account, so its id "
                    "is not known here; it decrypts versions' records only through SageMaker "
                    "(kms:ViaService), and the home's key policy admits this account.",
                )
            )
        self.group_arns = [group_arn(name, account=account) for name in names]
        CfnOutput(self, Outputs.MODEL_PACKAGE_GROUPS.key, value=",".join(self.group_arns))
        CfnOutput(self, Outputs.REGISTRY_ACCOUNT.key, value=account)
