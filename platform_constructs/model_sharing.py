"""Cross-account model serving: the registry home's model artifacts readable by the other
environments' SageMaker execution roles, and what those roles need to read them.

SageMaker creates a model from a model package of another account with the *caller's*
execution role: that role fetches the version's model data from the home's S3 bucket
(GetObject, and ListBucket for an uncompressed model's prefix), S3 decrypts it with the home's
lake key on the role's behalf (kms:Decrypt via S3), and the role pulls the version's image.
Cross-account access needs both sides: the resource policies in the home (bucket, key) name the
other accounts, and the identity policy of the role in the other account names the home's
resources (IAM User Guide, "Cross-account policy evaluation logic").

Everything here is added only when settings say the environments are in different accounts
(the home's `registry.reader_accounts`; the reader's `registry.account`).
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Aws, DefaultStackSynthesizer, RemovalPolicy, Stack, Validations
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from kiln.contract import MODELS_PREFIX
from platform_constructs.nag import wildcard_resource

# What SageMaker needs of the home's bucket to fetch a version's model data: an archive's
# object, or every object under an uncompressed model's prefix (listed first).
READ_OBJECT_ACTIONS = ("s3:GetObject",)
LIST_ACTIONS = ("s3:ListBucket",)
# S3 decrypts SSE-KMS objects with the caller's permissions; nothing else of the key.
KEY_READ_ACTIONS = ("kms:Decrypt", "kms:DescribeKey")
# What pulling an image needs on its repository ("Amazon ECR repository policy examples":
# cross-account pulls need BatchGetImage and GetDownloadUrlForLayer; BatchCheckLayerAvailability
# is read-only and used by clients before a pull).
IMAGE_PULL_ACTIONS = (
    "ecr:BatchGetImage",
    "ecr:GetDownloadUrlForLayer",
    "ecr:BatchCheckLayerAvailability",
)


def reader_role_pattern(account: str, project: str) -> str:
    """The roles of kiln's stacks in a reader account: CloudFormation names a role it names
    itself `<stack name>-<logical id>-<suffix>`, and kiln's stacks are `<project>-<env>-*`."""
    return f"arn:{Aws.PARTITION}:iam::{account}:role/{project}-*"


def reader_conditions(
    reader_accounts: Sequence[str], project: str, organization_id: str | None
) -> dict[str, dict[str, object]]:
    """TLS only, from roles of kiln's stacks in the reader accounts (and, when given, only
    from inside the AWS Organization)."""
    conditions: dict[str, dict[str, object]] = {
        "Bool": {"aws:SecureTransport": "true"},
        "ArnLike": {"aws:PrincipalArn": [reader_role_pattern(a, project) for a in reader_accounts]},
    }
    if organization_id:
        conditions["StringEquals"] = {"aws:PrincipalOrgID": organization_id}
    return conditions


class SharedModelArtifacts(Construct):
    """Lets `reader_accounts` read the registry's model data: the artifacts `bucket`'s
    `models/` prefix (objects, and a listing limited to the prefix), and the lake `key` only as
    S3 uses it for that bucket (`kms:ViaService`, and the encryption context of the bucket:
    with S3 Bucket Keys, S3 passes the bucket's ARN, so the key's other buckets stay closed).
    Read-only, over TLS, from roles of kiln's stacks in those accounts. `bucket_name` is the
    bucket's name as the template knows it before the bucket exists. Exposes
    `bucket_statements` and `key_statement`."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        bucket: s3.Bucket,
        bucket_name: str,
        key: kms.IKey,
        reader_accounts: Sequence[str],
        project: str,
        organization_id: str | None = None,
        prefix: str = MODELS_PREFIX,
    ) -> None:
        super().__init__(scope, construct_id)
        if not reader_accounts:
            raise ValueError("SharedModelArtifacts needs at least one reader account")
        readers = [iam.AccountPrincipal(account) for account in reader_accounts]
        conditions = reader_conditions(reader_accounts, project, organization_id)
        self.bucket_statements = [
            iam.PolicyStatement(
                sid="OtherEnvironmentsReadModels",
                principals=readers,
                actions=list(READ_OBJECT_ACTIONS),
                resources=[bucket.arn_for_objects(f"{prefix}*")],
                conditions=conditions,
            ),
            iam.PolicyStatement(
                sid="OtherEnvironmentsListModels",
                principals=readers,
                actions=list(LIST_ACTIONS),
                resources=[bucket.bucket_arn],
                conditions={
                    **conditions,
                    "StringLike": {"s3:prefix": [f"{prefix}*"]},
                },
            ),
        ]
        for statement in self.bucket_statements:
            bucket.add_to_resource_policy(statement)
        region = Stack.of(self).region
        self.key_statement = iam.PolicyStatement(
            sid="OtherEnvironmentsDecryptModelsThroughS3",
            principals=readers,
            actions=list(KEY_READ_ACTIONS),
            resources=["*"],  # in a key policy, "*" is this key
            conditions={
                **conditions,
                "StringEquals": {
                    **conditions.get("StringEquals", {}),
                    "kms:ViaService": f"s3.{region}.amazonaws.com",
                    # By name, not the bucket's attribute: the bucket already refers to the
                    # key, and the key policy referring back would be a cycle.
                    "kms:EncryptionContext:aws:s3:arn": f"arn:{Aws.PARTITION}:s3:::{bucket_name}",
                },
            },
        )
        key.add_to_resource_policy(self.key_statement)


# What the CDK's image publishing role does to publish an image asset (the bootstrap template
# grants these on its own container assets repository; this repository grants them itself).
PUBLISH_ACTIONS = (
    "ecr:PutImage",
    "ecr:InitiateLayerUpload",
    "ecr:UploadLayerPart",
    "ecr:CompleteLayerUpload",
    "ecr:BatchCheckLayerAvailability",
    "ecr:DescribeRepositories",
    "ecr:DescribeImages",
    "ecr:BatchGetImage",
    "ecr:GetDownloadUrlForLayer",
)


def model_image_repository_name(project: str) -> str:
    """The registry home's repository of the images its versions name, e.g. `kiln-model-images`
    (one per account and region: only the registry's home creates it, and the readers derive
    the same name)."""
    return f"{project}-model-images"


def image_publishing_role_arn(scope: Construct) -> str:
    """The CDK bootstrap's image publishing role of this stack's account and region."""
    qualifier = (
        scope.node.try_get_context("@aws-cdk/core:bootstrapQualifier")
        or DefaultStackSynthesizer.DEFAULT_QUALIFIER
    )
    return (
        f"arn:{Aws.PARTITION}:iam::{Aws.ACCOUNT_ID}:role/"
        f"cdk-{qualifier}-image-publishing-role-{Aws.ACCOUNT_ID}-{Aws.REGION}"
    )


class ModelImageRepository(Construct):
    """The registry home's repository for kiln's inference image when other environments in
    other accounts serve its versions. The CDK bootstrap's container assets repository cannot
    be given a statement by an app (its policy is the bootstrap stack's), so the home's serving
    stack publishes its image here instead (`DefaultStackSynthesizer(image_assets_repository_
    name=...)`), and this repository's policy lets the CDK's image publishing role push (same
    account: a resource policy suffices) and the readers' roles pull (BatchGetImage,
    GetDownloadUrlForLayer, BatchCheckLayerAvailability), over TLS, from kiln's roles in those
    accounts (and the Organization, when given). Tags are immutable (an asset's tag is its
    content hash) and images are scanned on push; the repository is retained, as the
    registry's versions keep naming its images. Exposes `repository`."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        repository_name: str,
        reader_accounts: Sequence[str],
        project: str,
        organization_id: str | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        if not reader_accounts:
            raise ValueError("ModelImageRepository needs at least one reader account")
        self.repository = ecr.Repository(
            self,
            "Repository",
            repository_name=repository_name,
            image_tag_mutability=ecr.TagMutability.IMMUTABLE,
            image_scan_on_push=True,
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.repository.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CdkImagePublishing",
                principals=[iam.ArnPrincipal(image_publishing_role_arn(self))],
                actions=list(PUBLISH_ACTIONS),
            )
        )
        self.repository.add_to_resource_policy(
            iam.PolicyStatement(
                sid="OtherEnvironmentsPull",
                principals=[iam.AccountPrincipal(account) for account in reader_accounts],
                actions=list(IMAGE_PULL_ACTIONS),
                conditions=reader_conditions(reader_accounts, project, organization_id),
            )
        )


def home_key_pattern(home_account: str) -> str:
    """Any key of the home account: the reader cannot know the home lake key's id at synth
    (it is generated there); the conditions of `cross_account_model_statements` narrow it."""
    return f"arn:{Aws.PARTITION}:kms:{Aws.REGION}:{home_account}:key/*"


def cross_account_model_statements(
    scope: Construct,
    *,
    home_account: str,
    artifact: str,
    image_repository_arn: str | None,
    policy: iam.ManagedPolicy,
) -> list[iam.PolicyStatement]:
    """The identity side for an execution role in a reader account: decrypt with the home's
    lake key only as S3 uses it for the artifact's bucket, and (kiln's engine) pull the home's
    image repository. The artifact's own objects are granted by `model_read_statements`.
    Acknowledges the key wildcard on `policy`, with its reason."""
    bucket = artifact.removeprefix("s3://").split("/", 1)[0]
    key_arn = home_key_pattern(home_account)
    statements = [
        iam.PolicyStatement(
            sid="HomeLakeKeyThroughS3",
            actions=["kms:Decrypt"],
            resources=[key_arn],
            conditions={
                "StringEquals": {
                    "kms:ViaService": f"s3.{Aws.REGION}.amazonaws.com",
                    "kms:EncryptionContext:aws:s3:arn": f"arn:{Aws.PARTITION}:s3:::{bucket}",
                }
            },
        )
    ]
    if image_repository_arn is not None:
        statements.append(
            iam.PolicyStatement(
                sid="HomeImageRepository",
                actions=list(IMAGE_PULL_ACTIONS),
                resources=[image_repository_arn],
            )
        )
    Validations.of(policy).acknowledge(
        wildcard_resource(
            scope,
            key_arn,
            "The registry home's lake key is generated in the home account, so its id is not "
            "known here; decrypting is limited to S3 acting for the model's own bucket "
            f"({bucket}, kms:ViaService and the bucket's encryption context).",
        )
    )
    return statements
