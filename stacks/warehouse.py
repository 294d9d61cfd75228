"""The warehouse stack: Redshift (Serverless or provisioned), its role, and streaming ingestion."""

from __future__ import annotations

from aws_cdk import CfnOutput, Validations
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

from kiln import naming
from kiln.contract import Component, Outputs
from kiln.settings import Settings
from platform_constructs import streaming_sql
from platform_constructs.deploy_time_action import DeployTimeAction
from platform_constructs.kms import PlatformKey
from platform_constructs.logs import retention_days
from platform_constructs.msk import MskCluster
from platform_constructs.nag import wildcard_resource
from platform_constructs.warehouse import (
    DATA_API_OWN_STATEMENTS,
    ProvisionedWarehouse,
    ServerlessWarehouse,
    Warehouse,
)
from stacks.base import KilnStack, removal_policy
from stacks.data_lake import lake_bucket


class WarehouseStack(KilnStack):
    """Composes the warehouse key, its IAM role, the warehouse, and the deploy-time SQL that
    sets up streaming ingestion from MSK.

    Attributes: `key`, `role`, `warehouse`, `ingestion` (DeployTimeAction).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        vpc: ec2.IVpc,
        log_key: kms.IKey,
        lake_key: kms.IKey,
        msk: MskCluster,
        s3_prefix_list_id: str | None = None,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            settings=settings,
            component=Component.WAREHOUSE,
            description=f"kiln {settings.name}: Redshift warehouse and streaming ingestion",
        )
        config = settings.warehouse
        policy = removal_policy(settings)
        topics = [t.name for t in settings.streaming.topics]
        self.key = PlatformKey(
            self,
            "WarehouseKey",
            alias=naming.kms_alias(settings, "warehouse"),
            description=f"kiln {settings.name}: encrypts the warehouse and its admin secret",
            removal_policy=policy,
        ).key
        readable_buckets = [lake_bucket(self, settings, zone) for zone in ("raw", "curated")]
        objects = [b.arn_for_objects("*") for b in readable_buckets]
        # The warehouse's one role: read the raw and curated zones, decrypt them, read MSK.
        self.role = iam.Role(
            self,
            "WarehouseRole",
            # Only on behalf of this account's warehouses (confused-deputy prevention).
            assumed_by=iam.CompositePrincipal(
                iam.ServicePrincipal("redshift.amazonaws.com"),
                iam.ServicePrincipal("redshift-serverless.amazonaws.com"),
            ).with_conditions({"StringEquals": {"aws:SourceAccount": self.account}}),
            description=f"kiln {settings.name}: Redshift COPY from the lake, MSK ingestion",
        )
        self.role_policy = iam.ManagedPolicy(
            self,
            "WarehouseRolePolicy",
            roles=[self.role],
            statements=[
                iam.PolicyStatement(
                    actions=["s3:GetBucketLocation", "s3:ListBucket"],
                    resources=[b.bucket_arn for b in readable_buckets],
                ),
                iam.PolicyStatement(actions=["s3:GetObject"], resources=objects),
                iam.PolicyStatement(
                    actions=["kms:Decrypt"],
                    resources=[lake_key.key_arn],
                    conditions={
                        "StringEquals": {"kms:ViaService": f"s3.{self.region}.amazonaws.com"}
                    },
                ),
                *msk.read_statements(topics),
            ],
        )
        Validations.of(self.role_policy).acknowledge(
            *[
                wildcard_resource(
                    self,
                    arn,
                    "The warehouse loads (COPY) and queries any object of the raw "
                    "and curated zones: reading the whole zone is its job. Read only.",
                )
                for arn in objects
            ],
            *msk.wildcard_acknowledgements(self, topics, "Redshift streaming ingestion"),
        )
        name = naming.prefix(settings)
        self.warehouse: Warehouse
        if config.kind == "serverless":
            self.warehouse = ServerlessWarehouse(
                self,
                "Serverless",
                name=name,
                vpc=vpc,
                client_cidr=settings.network.vpc_cidr,
                database=config.database,
                admin_username=config.admin_username,
                key=self.key,
                roles=[self.role],
                base_capacity=config.serverless.base_capacity,
                max_capacity=config.serverless.max_capacity,
                removal_policy=policy,
            )
        else:
            self.warehouse = ProvisionedWarehouse(
                self,
                "Provisioned",
                name=name,
                vpc=vpc,
                client_cidr=settings.network.vpc_cidr,
                database=config.database,
                admin_username=config.admin_username,
                key=self.key,
                roles=[self.role],
                node_type=config.provisioned.node_type,
                nodes=config.provisioned.nodes,
                snapshot_retention_days=config.snapshot_retention_days,
                removal_policy=policy,
            )
        statements = streaming_sql.streaming_ingestion(
            iam_role_arn=self.role.role_arn, cluster_arn=msk.arn, topics=topics
        )
        self.ingestion = DeployTimeAction(
            self,
            "StreamingIngestion",
            module="redshift_sql",
            resource_type="Custom::RedshiftStreamingIngestion",
            description=f"kiln {settings.name}: Redshift streaming ingestion SQL",
            properties={
                **self.warehouse.data_api_properties,
                "Statements": [s.as_property() for s in statements],
            },
            acknowledgements=self.warehouse.data_api_acknowledgements,
            statements=self.warehouse.data_api_statements,
            unscoped=[DATA_API_OWN_STATEMENTS],
            vpc_cidr=settings.network.vpc_cidr,
            s3_prefix_list_id=s3_prefix_list_id,
            vpc=vpc,
            log_key=log_key,
            log_retention=retention_days(settings.log_retention_days),
            removal_policy=policy,
        )
        # The role must be attached to the warehouse before the external schema names it.
        self.ingestion.resource.node.add_dependency(self.role_policy)
        CfnOutput(self, Outputs.WAREHOUSE_KIND.key, value=config.kind)
        CfnOutput(self, Outputs.DATABASE.key, value=config.database)
        CfnOutput(self, Outputs.WAREHOUSE_ROLE_ARN.key, value=self.role.role_arn)
