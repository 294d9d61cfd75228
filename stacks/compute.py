"""The compute stack: EKS with GPU nodes, its deploy-time objects, and the trainer's identity."""

from __future__ import annotations

import json

from aws_cdk import CfnOutput, Stack, Validations
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_eks as eks_l1
from aws_cdk import aws_eks_v2 as eks
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

from kiln import naming
from kiln.contract import (
    CHECKPOINTS_PREFIX,
    MLFLOW_PREFIX,
    MODELS_PREFIX,
    SAGEMAKER_TRAINING_JOBS,
    Component,
    Outputs,
)
from kiln.gpu_instances import GPU_INSTANCES
from kiln.settings import Settings
from platform_constructs import cluster_manifests, gpu_capacity
from platform_constructs.deploy_time_action import DeployTimeAction
from platform_constructs.eks import GpuCluster, NodePool, pod_identity_principal
from platform_constructs.handlers.kubernetes_apply import bundle_reference
from platform_constructs.karpenter import KarpenterAws, efa_subnet, private_subnet_ids
from platform_constructs.kms import PlatformKey
from platform_constructs.logs import retention_days
from platform_constructs.mlflow import MlflowTrackingServer
from platform_constructs.nag import unscoped_policies, wildcard_resource
from platform_constructs.network import https_egress
from platform_constructs.sagemaker_execution import execution_statements, sagemaker_principal
from stacks.base import REPO, KilnStack, image_context, removal_policy
from stacks.data_lake import lake_bucket


class ComputeStack(KilnStack):
    """Composes the cluster key, the GPU cluster, the in-cluster objects (device plugins,
    training namespace and service account) and the trainer's Pod Identity role.

    Attributes: `key`, `gpu_cluster`, `manifests` (DeployTimeAction), `trainer_role`,
    `training_image` (built from training/Dockerfile on deploy, pushed to the CDK's ECR).
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
        s3_prefix_list_id: str | None = None,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            settings=settings,
            component=Component.COMPUTE,
            description=f"kiln {settings.name}: EKS cluster with GPU nodes for training",
        )
        compute = settings.compute
        policy = removal_policy(settings)
        retention = retention_days(settings.log_retention_days)
        efa = any(GPU_INSTANCES[t].efa_interfaces for t in compute.gpu_nodes.instance_types)
        self.key = PlatformKey(
            self,
            "ClusterKey",
            alias=naming.kms_alias(settings, "eks"),
            description=f"kiln {settings.name}: encrypts Kubernetes secrets",
            removal_policy=policy,
        ).key
        gpu = compute.gpu_nodes
        system = compute.system_nodes
        self.gpu_cluster = GpuCluster(
            self,
            "Eks",
            name=naming.prefix(settings),
            vpc=vpc,
            kubernetes_version=compute.kubernetes_version,
            public_endpoint_cidrs=compute.public_endpoint_cidrs,
            secrets_key=self.key,
            log_key=log_key,
            log_retention=retention,
            removal_policy=policy,
            system_pool=NodePool(
                instance_types=[system.instance_type],
                min_size=system.min_size,
                desired_size=system.desired_size,
                max_size=system.max_size,
                root_volume_gib=50,
            ),
            # GPU nodes come from Karpenter (below), not a managed node group.
            addons={str(name): version for name, version in compute.addons.items()},
            nodegroup_names=(naming.nodegroup_name(settings, "system"), None),
            admin_principal_arns=compute.admin_principal_arns,
        )
        cluster = self.gpu_cluster.cluster
        cluster_name = naming.prefix(settings)
        self.karpenter = KarpenterAws(
            self,
            "Karpenter",
            cluster=cluster,
            cluster_name=cluster_name,
            efa=efa,
            description=f"kiln {settings.name}",
        )
        self.training_image = ecr_assets.DockerImageAsset(
            self,
            "TrainingImage",
            directory=str(REPO),
            file="training/Dockerfile",
            platform=ecr_assets.Platform.LINUX_AMD64,
            # The trainer registers its finished runs (kiln/registry.py: standard library only).
            **image_context(["kernels", "modeling", "training", "kiln/registry.py"]),
        )
        self.trainer_role = self._trainer_identity(settings, cluster, lake_key)
        self.sagemaker_training_role, self.training_security_group = self._sagemaker_training(
            settings, vpc, s3_prefix_list_id
        )
        # Experiment tracking, when asked for: a managed MLflow server both training
        # identities may log to.
        self.tracking: MlflowTrackingServer | None = None
        tracking = settings.experiment_tracking
        if tracking.enabled:
            self.tracking = MlflowTrackingServer(
                self,
                "Tracking",
                name=naming.tracking_server_name(settings),
                # Its own reference: the trainer's identity already holds one by this id.
                bucket=lake_bucket(Construct(self, "TrackingStore"), settings, "artifacts"),
                bucket_key=lake_key,
                prefix=MLFLOW_PREFIX,
                size=tracking.size,
                mlflow_version=tracking.mlflow_version,
                maintenance_window_start=tracking.weekly_maintenance_window_start,
            )
            if settings.network.interface_endpoints:
                # Training reaches AWS through interface endpoints, not the NAT (its egress is
                # HTTPS to the VPC and S3 only): MLflow gets one too, open to training alone.
                self.tracking.add_private_endpoint(
                    vpc=vpc,
                    subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
                    clients={
                        "SageMaker training": self.training_security_group,
                        # EKS pods share their node's interfaces: Karpenter's GPU nodes carry
                        # the cluster security group.
                        "EKS training pods": ec2.SecurityGroup.from_security_group_id(
                            self, "ClusterSecurityGroup", cluster.cluster_security_group_id
                        ),
                    },
                )
            self.tracking.grant_logging(self, [self.trainer_role, self.sagemaker_training_role])
            CfnOutput(self, Outputs.TRACKING_SERVER_ARN.key, value=self.tracking.arn)
        applier_role = iam.Role(
            self,
            "ClusterObjectsRole",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"kiln {settings.name}: device plugins and training namespace: "
            "deploy-time handler",
        )
        # EKS names an access entry's ARN .../access-entry/<cluster>/role/<account>/<role>/<id>.
        own_entry = (
            f"arn:{self.partition}:eks:{self.region}:{self.account}:access-entry/"
            f"{cluster.cluster_name}/role/{self.account}/{applier_role.role_name}/*"
        )
        admin_policy = (
            f"arn:{self.partition}:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"
        )
        manifests = cluster_manifests.cluster_manifests(
            namespace=compute.training_namespace,
            service_account=compute.trainer_service_account,
            nvidia_version=compute.nvidia_device_plugin_version,
            efa_version=compute.efa_device_plugin_version if efa else None,
            region=Stack.of(self).region,
        )
        karpenter = self.karpenter
        network = gpu_capacity.NodeNetwork(
            node_role=karpenter.node_role.role_name,
            cluster_security_group=cluster.cluster_security_group_id,
            private_subnets=private_subnet_ids(vpc),
            efa_subnet=efa_subnet(vpc, gpu.efa_zone),
            placement_group=karpenter.placement_group.ref if karpenter.placement_group else None,
            tags={"project": settings.project, "environment": settings.name},
        )
        manifests += [
            *gpu_capacity.team_namespaces(settings),
            *gpu_capacity.gpu_pools(settings, network),
            gpu_capacity.kueue_config_map(),
            *gpu_capacity.kueue_objects(settings),
        ]
        privileged = gpu_capacity.karpenter_controller(
            version=compute.karpenter_version,
            cluster_name=cluster_name,
            cluster_endpoint=cluster.cluster_endpoint,
            interruption_queue=karpenter.interruption_queue.queue_name,
        )
        bundles = [
            bundle_reference(f"karpenter-{compute.karpenter_version}.json"),
            bundle_reference(f"kueue-{compute.kueue_version}.json"),
        ]
        self.manifests = DeployTimeAction(
            self,
            "ClusterObjects",
            module="kubernetes_apply",
            resource_type="Custom::KubernetesObjects",
            description=f"kiln {settings.name}: device plugins and training namespace",
            properties={
                "ClusterName": cluster.cluster_name,
                "Manifests": json.dumps(manifests),
                "Privileged": json.dumps(privileged),
                "Bundles": json.dumps(bundles),
                "Rbac": json.dumps(cluster_manifests.applier_rbac()),
                "PrincipalArn": applier_role.role_arn,
            },
            role=applier_role,
            extra_files=["bundles", *(f"bundles/{b['file']}" for b in bundles)],
            statements=[
                iam.PolicyStatement(
                    actions=["eks:DescribeCluster"], resources=[cluster.cluster_arn]
                ),
                # A moment of cluster-admin to bootstrap its own RBAC: that one policy, on
                # its own access entry only (the handler disassociates it again at once).
                iam.PolicyStatement(
                    actions=["eks:AssociateAccessPolicy"],
                    resources=[own_entry],
                    conditions={
                        "StringEquals": {
                            "eks:policyArn": admin_policy,
                            "eks:accessScope": "cluster",
                        }
                    },
                ),
                iam.PolicyStatement(
                    actions=["eks:DisassociateAccessPolicy"],
                    resources=[own_entry],
                    conditions={"StringEquals": {"eks:policyArn": admin_policy}},
                ),
            ],
            acknowledgements=[
                wildcard_resource(
                    self,
                    own_entry,
                    "The applier's own access entry; EKS appends a generated id to "
                    "its ARN. Only AmazonEKSClusterAdminPolicy, only while it bootstraps RBAC.",
                )
            ],
            vpc=vpc,
            vpc_cidr=settings.network.vpc_cidr,
            s3_prefix_list_id=s3_prefix_list_id,
            log_key=log_key,
            log_retention=retention,
            removal_policy=policy,
        )
        # The handler's Kubernetes identity: a group bound (by the handler, see
        # cluster_manifests.applier_rbac) to exactly the kinds it applies; no access policy.
        self.applier_access = eks_l1.CfnAccessEntry(
            self,
            "ClusterObjectsApplierAccess",
            cluster_name=cluster.cluster_name,
            principal_arn=applier_role.role_arn,
            kubernetes_groups=[cluster_manifests.APPLIER_GROUP],
            type="STANDARD",
        )
        self.manifests.resource.node.add_dependency(self.applier_access)
        cluster.cluster_security_group.add_ingress_rule(
            self.manifests.security_group, ec2.Port.tcp(443), "Deploy-time object applier"
        )
        self.manifests.resource.node.add_dependency(self.gpu_cluster.system_nodes)
        # Karpenter must find its role and queue, and nodes their access entry, before the
        # controller starts; the add-ons' pods run once the objects' priority classes exist.
        self.manifests.resource.node.add_dependency(
            karpenter.pod_identity, karpenter.node_access, karpenter.controller_policy
        )
        CfnOutput(self, Outputs.CLUSTER_NAME.key, value=cluster.cluster_name)
        CfnOutput(self, Outputs.TRAINING_NAMESPACE.key, value=compute.training_namespace)
        CfnOutput(self, Outputs.TRAINER_SERVICE_ACCOUNT.key, value=compute.trainer_service_account)
        CfnOutput(self, Outputs.TRAINER_ROLE_ARN.key, value=self.trainer_role.role_arn)
        CfnOutput(self, Outputs.TRAINING_IMAGE_URI.key, value=self.training_image.image_uri)

    def _trainer_identity(
        self, settings: Settings, cluster: eks.Cluster, lake_key: kms.IKey
    ) -> iam.Role:
        """The role the trainer's pods get through EKS Pod Identity: read the curated zone,
        read and write the artifacts bucket's checkpoint and model prefixes, use the lake key;
        nothing else."""
        compute = settings.compute
        role = iam.Role(
            self,
            "TrainerRole",
            assumed_by=pod_identity_principal(
                account=self.account,
                cluster_arn=cluster.cluster_arn,
                namespace=[compute.training_namespace, *compute.team_namespaces],
                service_account=compute.trainer_service_account,
            ),
            description=f"kiln {settings.name}: training pods (Pod Identity)",
        )
        curated = lake_bucket(self, settings, "curated")
        artifacts = lake_bucket(self, settings, "artifacts")
        writable = [artifacts.arn_for_objects(f"{p}*") for p in (CHECKPOINTS_PREFIX, MODELS_PREFIX)]
        # One policy, two identities: pods on EKS and SageMaker training jobs read and write
        # the same lake paths.
        policy = iam.ManagedPolicy(
            self,
            "TrainerPolicy",
            roles=[role],
            statements=[
                iam.PolicyStatement(
                    actions=["s3:ListBucket", "s3:GetBucketLocation"],
                    resources=[curated.bucket_arn],
                ),
                iam.PolicyStatement(
                    actions=["s3:GetObject"], resources=[curated.arn_for_objects("*")]
                ),
                iam.PolicyStatement(
                    actions=["s3:ListBucket"],
                    resources=[artifacts.bucket_arn],
                    conditions={
                        "StringLike": {"s3:prefix": [f"{CHECKPOINTS_PREFIX}*", f"{MODELS_PREFIX}*"]}
                    },
                ),
                iam.PolicyStatement(
                    actions=[
                        "s3:GetObject",
                        "s3:PutObject",
                        "s3:DeleteObject",
                        "s3:AbortMultipartUpload",
                    ],
                    resources=writable,
                ),
                iam.PolicyStatement(
                    actions=["kms:Decrypt", "kms:GenerateDataKey"],
                    resources=[lake_key.key_arn],
                    conditions={
                        "StringEquals": {"kms:ViaService": f"s3.{self.region}.amazonaws.com"}
                    },
                ),
            ],
        )
        Validations.of(policy).acknowledge(
            wildcard_resource(
                self,
                curated.arn_for_objects("*"),
                "Training reads any object of the curated zone (its datasets).",
            ),
            *[
                wildcard_resource(
                    self,
                    arn,
                    "Training writes checkpoints and the model "
                    "artifact under its own prefixes of the artifacts bucket.",
                )
                for arn in writable
            ],
        )
        # One association per namespace training runs in (the shared one and each team's).
        eks.CfnPodIdentityAssociation(
            self,
            "TrainerPodIdentity",
            cluster_name=cluster.cluster_name,
            namespace=compute.training_namespace,
            service_account=compute.trainer_service_account,
            role_arn=role.role_arn,
        )
        for team in compute.teams:
            eks.CfnPodIdentityAssociation(
                self,
                f"TrainerPodIdentity{team.name.title().replace('-', '')}",
                cluster_name=cluster.cluster_name,
                namespace=compute.team_namespace(team.name),
                service_account=compute.trainer_service_account,
                role_arn=role.role_arn,
            )
        self.trainer_policy = policy
        return role

    def _sagemaker_training(
        self, settings: Settings, vpc: ec2.IVpc, s3_prefix_list_id: str | None
    ) -> tuple[iam.Role, ec2.SecurityGroup]:
        """The execution role and network of SageMaker training jobs (`kiln train --on
        sagemaker`): the trainer's lake access plus what SageMaker needs to run the image."""
        role = iam.Role(
            self,
            "SageMakerTrainingRole",
            assumed_by=sagemaker_principal(self.account, self.region, self.partition),
            description=f"kiln {settings.name}: SageMaker training jobs",
        )
        self.trainer_policy.attach_to_role(role)
        group = ec2.SecurityGroup(
            self,
            "TrainingSecurityGroup",
            vpc=vpc,
            allow_all_outbound=False,
            description=f"kiln {settings.name}: SageMaker training (HTTPS out, hosts together)",
        )
        https_egress(
            group,
            vpc_cidr=settings.network.vpc_cidr,
            s3_prefix_list_id=s3_prefix_list_id,
            what="SageMaker training",
        )
        # Distributed training: the job's hosts talk to each other (rendezvous, NCCL).
        group.add_ingress_rule(group, ec2.Port.all_tcp(), "Training hosts among themselves")
        group.add_egress_rule(group, ec2.Port.all_tcp(), "Training hosts among themselves")
        logs_arn = SAGEMAKER_TRAINING_JOBS.log_streams_arn(
            partition=self.partition, region=self.region, account=self.account
        )
        statements = execution_statements(
            SAGEMAKER_TRAINING_JOBS, repository=self.training_image.repository, logs_arn=logs_arn
        )
        runtime = iam.ManagedPolicy(
            self,
            "SageMakerTrainingPolicy",
            roles=[role],
            statements=[statements.pull_image, statements.write_logs],
        )
        self.sagemaker_training_unscoped = unscoped_policies(
            self, [role], statements.unscoped, prefix="SageMakerTraining"
        )
        Validations.of(runtime).acknowledge(
            wildcard_resource(
                self,
                logs_arn,
                "The log streams of SageMaker training jobs, "
                "which SageMaker names per job and host.",
            ),
        )
        CfnOutput(self, Outputs.SAGEMAKER_TRAINING_ROLE_ARN.key, value=role.role_arn)
        CfnOutput(self, Outputs.TRAINING_SECURITY_GROUP_ID.key, value=group.security_group_id)
        CfnOutput(
            self,
            Outputs.TRAINING_SUBNET_IDS.key,
            value=",".join(
                vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS).subnet_ids
            ),
        )
        return role, group
