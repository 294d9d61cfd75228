"""A SageMaker managed MLflow tracking server whose artifact store is a prefix of a KMS-encrypted
bucket, with a service role that reaches that prefix only, and the private way to it from a VPC."""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import Aws, Stack, Validations
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sagemaker as sagemaker
from constructs import Construct

from kiln.contract import MLFLOW_TRAINING_ACTIONS
from platform_constructs.nag import wildcard_resource
from platform_constructs.sagemaker_execution import sagemaker_principal

# Whoever holds the server's endpoint may call the MLflow API of this server only (the SageMaker
# guide's endpoint policy for MLflow names the tracking server's ARN).
MLFLOW_API = "sagemaker-mlflow:*"


class MlflowTrackingServer(Construct):
    """AWS::SageMaker::MlflowTrackingServer `name` storing artifacts under `prefix` of `bucket`
    (encrypted with `bucket_key`).

    CreateMlflowTrackingServer suggests AmazonS3FullAccess for the server's role; this role may
    only list the bucket below `prefix`, read and write objects under it, and use the key
    through S3. Automatic registration to the SageMaker Model Registry stays off: versions are
    registered by kiln's own training with their metrics (the registry's job).

    Exposes `server`, `role`, `policy`, `arn`, `artifact_store_uri`; `add_private_endpoint`
    makes it reachable from a VPC's workloads without the internet (`endpoint`,
    `endpoint_security_group`); `grant_logging(role)` lets a training identity log runs and
    artifacts to it.
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
        self.endpoint: ec2.InterfaceVpcEndpoint | None = None
        self.endpoint_security_group: ec2.SecurityGroup | None = None

    def add_private_endpoint(
        self,
        *,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        clients: Mapping[str, ec2.ISecurityGroup],
    ) -> ec2.InterfaceVpcEndpoint:
        """The interface endpoint of SageMaker MLflow (`aws.sagemaker.<region>.experiments`)
        in `subnets`, with private DNS: the `sagemaker-mlflow` client calls
        `https://<region>.experiments.sagemaker.aws`, which then resolves to the endpoint inside
        the VPC. Its own security group admits HTTPS from the `clients` groups only (the
        training workloads; the SageMaker guide asks for HTTPS allowed on the endpoint's
        group), and its policy lets this account's principals call this server only.

        Created in this construct's stack (not the VPC's), beside the groups it admits."""
        if self.endpoint is not None:
            raise ValueError("the tracking server already has its private endpoint")
        group = ec2.SecurityGroup(
            self,
            "EndpointSecurityGroup",
            vpc=vpc,
            allow_all_outbound=False,
            description="SageMaker MLflow interface endpoint: HTTPS from training only",
        )
        for name, client in clients.items():
            group.add_ingress_rule(client, ec2.Port.tcp(443), f"HTTPS from {name}")
        endpoint = ec2.InterfaceVpcEndpoint(
            self,
            "Endpoint",
            vpc=vpc,
            service=ec2.InterfaceVpcEndpointAwsService.SAGEMAKER_EXPERIMENTS,
            private_dns_enabled=True,
            open=False,
            security_groups=[group],
            subnets=subnets,
        )
        endpoint.add_to_policy(
            iam.PolicyStatement(
                principals=[iam.AnyPrincipal()],
                actions=[MLFLOW_API],
                resources=[self.arn],
                conditions={"StringEquals": {"aws:PrincipalAccount": Aws.ACCOUNT_ID}},
            )
        )
        self.endpoint, self.endpoint_security_group = endpoint, group
        return endpoint

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
        """A policy for `roles` (training identities): the MLflow calls a training run makes
        (`kiln.contract.MLFLOW_TRAINING_ACTIONS`: no deletes, no model registry, no UI) on this
        server only and, once it has its private endpoint, only through that endpoint
        (`aws:SourceVpce`, which the SageMaker guide documents for MLflow), so the roles'
        credentials log nothing from outside the VPC; and the artifact store's prefix, which
        MLflow's client writes to directly. Call it after `add_private_endpoint`.

        Not granted: sagemaker:CreatePresignedMlflowTrackingServerUrl, which opens the MLflow
        UI in a browser; the client signs its own requests (SigV4) and never calls it."""
        api = iam.PolicyStatement(actions=list(MLFLOW_TRAINING_ACTIONS), resources=[self.arn])
        if self.endpoint is not None:
            api.add_condition("StringEquals", {"aws:SourceVpce": self.endpoint.vpc_endpoint_id})
        policy = iam.ManagedPolicy(
            scope, "MlflowLogging", roles=roles, statements=[api, *self._store_statements()]
        )
        Validations.of(policy).acknowledge(
            wildcard_resource(
                scope,
                self.bucket.arn_for_objects(f"{self.prefix}*"),
                "Training logs run artifacts (the model directory) under the tracking "
                "server's own prefix of the artifacts bucket.",
            ),
        )
        return policy
