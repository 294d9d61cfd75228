"""Redshift warehouses, Serverless or provisioned, with one posture and one face for callers.

Both sit in the isolated subnets, are not publicly accessible, route through the VPC
(enhanced VPC routing), encrypt with a customer-managed key, keep the admin password in
Secrets Manager (created and rotated by Redshift: it never appears in a template), require
TLS, and export connection, user and user-activity logs. Callers use the common attributes:
`security_group`, `database`, `data_api_properties` (what the Data API handler needs to reach
the warehouse as its admin), `data_api_statements` (the IAM that takes).
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Acknowledgment, Aws, RemovalPolicy
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_redshift as redshift
from aws_cdk import aws_redshiftserverless as serverless
from constructs import Construct

from platform_constructs.nag import UnscopedStatement

AUDIT_LOGS = ["connectionlog", "userlog", "useractivitylog"]
# Not 5439: the default port is the first one scanned (AwsSolutions-RS4).
PORT = 5440


def _security_group(
    scope: Construct, vpc: ec2.IVpc, client_cidr: str, name: str
) -> ec2.SecurityGroup:
    group = ec2.SecurityGroup(
        scope,
        "SecurityGroup",
        vpc=vpc,
        description=f"Redshift {name}: SQL from the VPC; isolated subnets bound its egress",
        # Isolated subnets have no route out: egress reaches the VPC (MSK) and the S3 gateway
        # endpoint only, which is what COPY and streaming ingestion need.
        allow_all_outbound=True,
    )
    group.add_ingress_rule(ec2.Peer.ipv4(client_cidr), ec2.Port.tcp(PORT), "SQL clients in the VPC")
    return group


def secrets_manager_decrypt(key: kms.IKey) -> iam.PolicyStatement:
    """kms:Decrypt on the warehouse key, only as Secrets Manager uses it for the admin secret."""
    return iam.PolicyStatement(
        actions=["kms:Decrypt"],
        resources=[key.key_arn],
        conditions={
            "StringEquals": {"kms:ViaService": f"secretsmanager.{Aws.REGION}.amazonaws.com"}
        },
    )


# The Data API calls that act on a statement id: they take no resource ARN, and the Redshift
# Management Guide ("Authorizing access to the Amazon Redshift Data API") limits them to the
# statements the caller itself started with the redshift-data:statement-owner-iam-userid key.
DATA_API_OWN_STATEMENTS = UnscopedStatement(
    "OwnStatements",
    iam.PolicyStatement(
        actions=[
            "redshift-data:DescribeStatement",
            "redshift-data:GetStatementResult",
            "redshift-data:CancelStatement",
        ],
        resources=["*"],
        conditions={"StringEquals": {"redshift-data:statement-owner-iam-userid": "${aws:userid}"}},
    ),
    "The Data API's DescribeStatement, GetStatementResult and CancelStatement take a "
    "statement id, not a resource ARN; the statement-owner condition limits them to the "
    "statements this handler started.",
)


class ServerlessWarehouse(Construct):
    """A Redshift Serverless namespace and workgroup. Exposes `namespace`, `workgroup`."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        name: str,
        vpc: ec2.IVpc,
        client_cidr: str,
        database: str,
        admin_username: str,
        key: kms.IKey,
        roles: Sequence[iam.IRole],
        base_capacity: int,
        max_capacity: int,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)
        self.database = database
        self.security_group = _security_group(self, vpc, client_cidr, name)
        self.namespace = serverless.CfnNamespace(
            self,
            "Namespace",
            namespace_name=name,
            db_name=database,
            admin_username=admin_username,
            manage_admin_password=True,
            admin_password_secret_kms_key_id=key.key_arn,
            kms_key_id=key.key_arn,
            iam_roles=[r.role_arn for r in roles],
            default_iam_role_arn=roles[0].role_arn if roles else None,
            log_exports=AUDIT_LOGS,
        )
        self.namespace.apply_removal_policy(removal_policy)
        self.workgroup = serverless.CfnWorkgroup(
            self,
            "Workgroup",
            workgroup_name=name,
            namespace_name=self.namespace.namespace_name,
            base_capacity=base_capacity,
            max_capacity=max_capacity,
            enhanced_vpc_routing=True,
            publicly_accessible=False,
            port=PORT,
            subnet_ids=vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED).subnet_ids,
            security_group_ids=[self.security_group.security_group_id],
            config_parameters=[
                serverless.CfnWorkgroup.ConfigParameterProperty(
                    parameter_key="require_ssl", parameter_value="true"
                ),
                serverless.CfnWorkgroup.ConfigParameterProperty(
                    parameter_key="enable_user_activity_logging", parameter_value="true"
                ),
            ],
        )
        self.workgroup.add_resource_dependency(self.namespace)
        # CloudFormation does not return the managed admin secret's ARN (aws-cdk#29930), so
        # the handler asks GetNamespace for it at deploy time. Redshift names it
        # `redshift!<namespace>-<admin user>`, and Secrets Manager appends `-` and six random
        # characters: the pattern matches this namespace's admin secret and no other.
        managed = (
            f"arn:{Aws.PARTITION}:secretsmanager:{Aws.REGION}:{Aws.ACCOUNT_ID}:secret:"
            f"redshift!{name}-{admin_username}-??????"
        )
        self.data_api_properties = {
            "WorkgroupName": self.workgroup.workgroup_name,
            "NamespaceName": self.namespace.namespace_name,
            "Database": database,
        }
        self.data_api_statements = [
            iam.PolicyStatement(
                actions=["redshift-data:ExecuteStatement"],
                resources=[self.workgroup.attr_workgroup_workgroup_arn],
            ),
            iam.PolicyStatement(
                actions=["redshift-serverless:GetNamespace"],
                resources=[self.namespace.attr_namespace_namespace_arn],
            ),
            # The Data API reads this namespace's admin secret with the caller's credentials;
            # the secret is encrypted with the warehouse key, usable only through Secrets Manager.
            iam.PolicyStatement(actions=["secretsmanager:GetSecretValue"], resources=[managed]),
            secrets_manager_decrypt(key),
        ]
        self.data_api_acknowledgements: list[Acknowledgment] = []


class ProvisionedWarehouse(Construct):
    """A provisioned Redshift cluster (RA3). Exposes `cluster`, `subnet_group`,
    `parameter_group`."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        name: str,
        vpc: ec2.IVpc,
        client_cidr: str,
        database: str,
        admin_username: str,
        key: kms.IKey,
        roles: Sequence[iam.IRole],
        node_type: str,
        nodes: int,
        snapshot_retention_days: int,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)
        self.database = database
        self.security_group = _security_group(self, vpc, client_cidr, name)
        self.subnet_group = redshift.CfnClusterSubnetGroup(
            self,
            "Subnets",
            description=f"Redshift {name}: isolated subnets",
            subnet_ids=vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED).subnet_ids,
        )
        self.parameter_group = redshift.CfnClusterParameterGroup(
            self,
            "Parameters",
            description=f"Redshift {name}: TLS only, user activity logged",
            parameter_group_family="redshift-2.0",
            parameters=[
                redshift.CfnClusterParameterGroup.ParameterProperty(
                    parameter_name="require_ssl", parameter_value="true"
                ),
                redshift.CfnClusterParameterGroup.ParameterProperty(
                    parameter_name="enable_user_activity_logging", parameter_value="true"
                ),
            ],
        )
        self.cluster = redshift.CfnCluster(
            self,
            "Cluster",
            cluster_identifier=name,
            cluster_type="multi-node" if nodes > 1 else "single-node",
            node_type=node_type,
            number_of_nodes=nodes if nodes > 1 else None,
            db_name=database,
            master_username=admin_username,
            manage_master_password=True,
            master_password_secret_kms_key_id=key.key_arn,
            encrypted=True,
            kms_key_id=key.key_arn,
            publicly_accessible=False,
            enhanced_vpc_routing=True,
            port=PORT,
            automated_snapshot_retention_period=snapshot_retention_days,
            allow_version_upgrade=True,
            preferred_maintenance_window="sun:04:00-sun:04:30",
            iam_roles=[r.role_arn for r in roles],
            cluster_subnet_group_name=self.subnet_group.ref,
            cluster_parameter_group_name=self.parameter_group.ref,
            vpc_security_group_ids=[self.security_group.security_group_id],
            logging_properties=redshift.CfnCluster.LoggingPropertiesProperty(
                log_destination_type="cloudwatch", log_exports=AUDIT_LOGS
            ),
        )
        # RETAIN keeps the cluster; where the environment allows destroy, take a final snapshot.
        self.cluster.apply_removal_policy(
            RemovalPolicy.RETAIN
            if removal_policy == RemovalPolicy.RETAIN
            else RemovalPolicy.SNAPSHOT
        )
        self.data_api_properties = {
            "ClusterIdentifier": self.cluster.ref,
            "SecretArn": self.cluster.attr_master_password_secret_arn,
            "Database": database,
        }
        self.data_api_statements = [
            iam.PolicyStatement(
                actions=["redshift-data:ExecuteStatement"],
                resources=[
                    f"arn:{Aws.PARTITION}:redshift:{Aws.REGION}:{Aws.ACCOUNT_ID}:"
                    f"cluster:{self.cluster.ref}"
                ],
            ),
            iam.PolicyStatement(
                actions=["secretsmanager:GetSecretValue"],
                resources=[self.cluster.attr_master_password_secret_arn],
            ),
            secrets_manager_decrypt(key),
        ]
        self.data_api_acknowledgements: list[Acknowledgment] = []


Warehouse = ServerlessWarehouse | ProvisionedWarehouse
