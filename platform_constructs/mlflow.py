"""A SageMaker managed MLflow tracking server whose artifact store is a prefix of a KMS-encrypted
bucket, with a service role that reaches that prefix only."""

from __future__ import annotations

from aws_cdk import Acknowledgment, Stack, Validations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sagemaker as sagemaker
from constructs import Construct

from platform_constructs.nag import wildcard_resource
from platform_constructs.sagemaker_execution import sagemaker_principal


class MlflowTrackingServer(Construct):
    """AWS::SageMaker::MlflowTrackingServer `name` storing artifacts under `prefix` of `bucket`
    (encrypted with `bucket_key`).

    CreateMlflowTrackingServer suggests AmazonS3FullAccess for the server's role; this role may
    only list the bucket below `prefix`, read and write objects under it, and use the key
    through S3. Automatic registration to the SageMaker Model Registry stays off: versions are
    registered by kiln's own training with their metrics (the registry's job).

    Exposes `server`, `role`, `policy`, `arn`, `artifact_store_uri`; `grant_logging(role)`
    lets a training identity log runs and artifacts to it.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        name: str,
        bucket: s3.IBucket,
        bucket_key: kms.IKey,
        prefix: str,
        size: str,
        mlflow_version: str,
        maintenance_window_start: str,
    ) -> None:
        super().__init__(scope, construct_id)
        if not prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r} must end with /")
        stack = Stack.of(self)
        self.bucket, self.bucket_key, self.prefix = bucket, bucket_key, prefix
        self.artifact_store_uri = f"s3://{bucket.bucket_name}/{prefix}"
        self.role = iam.Role(
            self,
            "ServiceRole",
            assumed_by=sagemaker_principal(stack.account, stack.region, stack.partition),
            description=f"{name}: MLflow tracking server's artifact store",
        )
        self.policy = iam.ManagedPolicy(
            self, "ArtifactStore", roles=[self.role], statements=self._store_statements()
        )
        self._acknowledge(self.policy)
        self.server = sagemaker.CfnMlflowTrackingServer(
            self,
            "Server",
            tracking_server_name=name,
            artifact_store_uri=self.artifact_store_uri,
            role_arn=self.role.role_arn,
            tracking_server_size=size,
            mlflow_version=mlflow_version,
            weekly_maintenance_window_start=maintenance_window_start,
            automatic_model_registration=False,
        )
        # The server checks its role's access to the store when it is created.
        self.server.node.add_dependency(self.policy)
        self.arn = self.server.attr_tracking_server_arn

    def _store_statements(self) -> list[iam.PolicyStatement]:
        stack = Stack.of(self)
        return [
            iam.PolicyStatement(
                actions=["s3:ListBucket"],
                resources=[self.bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": [f"{self.prefix}*"]}},
            ),
            iam.PolicyStatement(
                actions=["s3:GetBucketLocation"], resources=[self.bucket.bucket_arn]
            ),
            iam.PolicyStatement(
                actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                resources=[self.bucket.arn_for_objects(f"{self.prefix}*")],
            ),
            iam.PolicyStatement(
                actions=["kms:Decrypt", "kms:GenerateDataKey"],
                resources=[self.bucket_key.key_arn],
                conditions={"StringEquals": {"kms:ViaService": f"s3.{stack.region}.amazonaws.com"}},
            ),
        ]

    def _acknowledge(self, policy: iam.ManagedPolicy) -> None:
        Validations.of(policy).acknowledge(
            wildcard_resource(
                self,
                self.bucket.arn_for_objects(f"{self.prefix}*"),
                "MLflow writes run artifacts under keys it generates, below the tracking "
                "server's own prefix of the artifacts bucket.",
            )
        )

    def grant_logging(self, scope: Construct, roles: list[iam.IRole]) -> iam.ManagedPolicy:
        """A policy for `roles` (training identities): the MLflow API of this server only
        (`sagemaker-mlflow:*`, the data-plane actions MLflow's client calls, scoped to its ARN)
        and the artifact store's prefix, which MLflow's client writes to directly."""
        policy = iam.ManagedPolicy(
            scope,
            "MlflowLogging",
            roles=roles,
            statements=[
                iam.PolicyStatement(actions=["sagemaker-mlflow:*"], resources=[self.arn]),
                *self._store_statements(),
            ],
        )
        Validations.of(policy).acknowledge(
            iam_action_ack(),
            wildcard_resource(
                scope,
                self.bucket.arn_for_objects(f"{self.prefix}*"),
                "Training logs run artifacts (the model directory) under the tracking "
                "server's own prefix of the artifacts bucket.",
            ),
        )
        return policy


def iam_action_ack() -> Acknowledgment:
    """The acknowledgement of `sagemaker-mlflow:*` on one tracking server."""
    return Acknowledgment(
        id="AwsSolutions-IAM5[Action::sagemaker-mlflow:*]",
        reason="The MLflow client calls many data-plane actions (runs, metrics, params, tags, "
        "experiments, artifacts' locations) of the sagemaker-mlflow service; the statement "
        "names one tracking server's ARN.",
    )
