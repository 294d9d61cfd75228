"""An EKS cluster for GPU training: private control plane, system and GPU managed node groups."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from aws_cdk import Acknowledgment, CfnResource, RemovalPolicy, Stack, Validations
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_eks_v2 as eks
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from constructs import Construct

from kiln import contract

GPU_TAINT = eks.TaintSpec(
    effect=eks.TaintEffect.NO_SCHEDULE,
    key=contract.GPU_TAINT["key"],
    value=contract.GPU_TAINT["value"],
)
GPU_POOL_LABELS = dict([contract.GPU_POOL_LABEL])
SYSTEM_POOL_LABELS = dict([contract.SYSTEM_POOL_LABEL])
CONTROL_PLANE_LOGS = [
    eks.ClusterLoggingTypes.API,
    eks.ClusterLoggingTypes.AUDIT,
    eks.ClusterLoggingTypes.AUTHENTICATOR,
    eks.ClusterLoggingTypes.CONTROLLER_MANAGER,
    eks.ClusterLoggingTypes.SCHEDULER,
]
# EKS worker nodes need these AWS-managed policies; AWS keeps them current with EKS. The VPC
# CNI's own policy is not among them: the CNI gets it through its own Pod Identity role, so
# no other pod on a node can use it (EKS User Guide, "Configure the Amazon VPC CNI plugin to
# use EKS Pod Identity").
_NODE_POLICIES = (
    "AmazonEKSWorkerNodePolicy",
    "AmazonEC2ContainerRegistryReadOnly",
)
_CNI_POLICY = "AmazonEKS_CNI_Policy"
CNI_SERVICE_ACCOUNT = ("kube-system", "aws-node")
# The CloudWatch Observability add-on's agent (Container Insights, DCGM GPU metrics) and the
# AWS-managed policy its documentation names for it.
CLOUDWATCH_ADDON = "amazon-cloudwatch-observability"
CLOUDWATCH_SERVICE_ACCOUNT = ("amazon-cloudwatch", "cloudwatch-agent")
_CLOUDWATCH_POLICY = "CloudWatchAgentServerPolicy"
# The log groups Container Insights writes (`/aws/containerinsights/<cluster>/<kind>`); made
# here, before the add-on, so they are KMS-encrypted and expire instead of being created by the
# agent without either.
CONTAINER_INSIGHTS_LOGS = ("application", "dataplane", "host", "performance")
# The NVIDIA driver's kernel message for a GPU error ("NVRM: Xid (PCI:...): 79, ...").
XID_PATTERN = "NVRM: Xid"
XID_NAMESPACE = "kiln/GPU"
XID_METRIC = "XidErrors"
# What carries XID errors to CloudWatch: the add-on's Fluent Bit, whose `host-log.conf` reads
# the node's journal (systemd input, `Path /var/log/journal`, tag `host.dmesg` with
# `Systemd_Filter _TRANSPORT=kernel`, so AL2023's journald works) and ships each entry to
# `/aws/containerinsights/<cluster>/host` as JSON. Its filters fix the field names: `aws`
# (imds_version v2) adds `ec2_instance_id` (and `az`); `modify` renames MESSAGE to `message`,
# _HOSTNAME to `host`, SYSLOG_IDENTIFIER to `ident`, SYSLOG_PID to `pid` and drops every other
# key with an upper-case letter. Source: aws-observability/helm-charts, tag
# amazon-cloudwatch-observability-6.2.0, charts/amazon-cloudwatch-observability/values.yaml
# (containerLogs.fluentBit.config.extraFiles."host-log.conf"; journald since PR #247). The
# add-on's DCGM exporter carries no XID field (its metricsConfig in the same chart lists no
# DCGM_FI_DEV_XID_ERRORS), so the journal is the only path. Its DaemonSets tolerate every
# taint (the chart's root `tolerations: [{operator: Exists}]`), so they run on GPU nodes, and
# the DCGM exporter's node affinity lists every type in kiln.gpu_instances (checked by hand
# against chart 6.2.0; re-check when either grows). A kernel line also matches the
# `host.messages` input (PRIORITY 0-6, facility 0 not excluded), so each XID line arrives
# twice: the metric counts log lines, two per XID message; the alarm fires on the first. Not
# checked on a live node: that AL2023 keeps its journal in /var/log/journal (persistent).
HOST_LOG_MESSAGE_FIELD = "$.message"
HOST_LOG_INSTANCE_FIELD = "$.ec2_instance_id"
# The add-on release whose host-log.conf the two fields were read from; a test stops a version
# bump until someone re-reads that file for the new release.
HOST_LOG_VERIFIED_ADDON = "v6.2.0"


@dataclass(frozen=True)
class NodePool:
    """A managed node group's shape."""

    instance_types: Sequence[str]
    min_size: int
    desired_size: int
    max_size: int
    root_volume_gib: int
    spot: bool = False
    # EFA interfaces per node (0: none); with EFA the pool sits in one zone in a cluster
    # placement group, as NCCL over EFA wants.
    efa_interfaces: int = 0
    # The zone an EFA pool is pinned to (None: the VPC's first private subnet's zone).
    zone: str | None = None


def _acknowledge_managed_policies(role: iam.IRole, policies: Sequence[str], reason: str) -> None:
    Validations.of(role).acknowledge(
        *[
            Acknowledgment(
                id=f"AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/{name}]",
                reason=reason,
            )
            for name in policies
        ]
    )


def pod_identity_principal(
    *, account: str, cluster_arn: str, namespace: str | Sequence[str], service_account: str
) -> iam.IPrincipal:
    """EKS Pod Identity, for one service account of one cluster only. The agent passes the
    cluster ARN, namespace and service account as session tags (EKS User Guide, "Define
    permissions for EKS Pod Identities to assume roles based on tags"), which the trust
    policy requires, with aws:SourceAccount and aws:SourceArn (the cluster)."""
    return iam.SessionTagsPrincipal(
        iam.ServicePrincipal("pods.eks.amazonaws.com").with_conditions(
            {
                "StringEquals": {
                    "aws:SourceAccount": account,
                    "aws:RequestTag/kubernetes-namespace": (
                        namespace if isinstance(namespace, str) else list(namespace)
                    ),
                    "aws:RequestTag/kubernetes-service-account": service_account,
                    "aws:RequestTag/eks-cluster-arn": cluster_arn,
                },
                "ArnEquals": {"aws:SourceArn": cluster_arn},
            }
        )
    )


class GpuCluster(Construct):
    """EKS (`aws_eks_v2`, no kubectl provider) with:

    - the Kubernetes version pinned, secrets encrypted with `secrets_key`, all control-plane
      log types in a KMS-encrypted, retained log group, access entries (no aws-auth ConfigMap),
      a private endpoint (plus a public one restricted to `public_endpoint_cidrs` when given);
    - managed add-ons at pinned versions;
    - a small on-demand system node group and a GPU node group (`AL2023_x86_64_NVIDIA`,
      tainted `nvidia.com/gpu=true:NoSchedule`, labelled `kiln.dev/node-pool=gpu`), both on
      launch templates that require IMDSv2 and encrypt the root volume; EFA interfaces and a
      cluster placement group where the GPU type has EFA.

    Exposes `cluster`, `log_group`, `system_nodes`, `gpu_nodes`, `gpu_launch_template`,
    `placement_group` (or None), `addons`.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        name: str,
        vpc: ec2.IVpc,
        kubernetes_version: str,
        public_endpoint_cidrs: Sequence[str],
        secrets_key: kms.IKey,
        log_key: kms.IKey,
        log_retention: logs.RetentionDays,
        removal_policy: RemovalPolicy,
        system_pool: NodePool,
        gpu_pool: NodePool | None = None,
        nodegroup_names: tuple[str, str | None] | None = None,
        addons: Mapping[str, str],
        admin_principal_arns: Sequence[str] = (),
    ) -> None:
        super().__init__(scope, construct_id)
        # EKS writes control-plane logs to this exact name; made here so it is encrypted,
        # has a retention and follows the removal policy instead of living forever.
        self.log_group = logs.LogGroup(
            self,
            "ControlPlaneLogs",
            log_group_name=f"/aws/eks/{name}/cluster",
            encryption_key=log_key,
            retention=log_retention,
            removal_policy=removal_policy,
        )
        endpoint = (
            eks.EndpointAccess.PUBLIC_AND_PRIVATE.only_from(*public_endpoint_cidrs)
            if public_endpoint_cidrs
            else eks.EndpointAccess.PRIVATE
        )
        private_subnets = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)
        self.cluster = eks.Cluster(
            self,
            "Cluster",
            cluster_name=name,
            version=eks.KubernetesVersion.of(kubernetes_version),
            vpc=vpc,
            vpc_subnets=[private_subnets],
            endpoint_access=endpoint,
            secrets_encryption_key=secrets_key,
            cluster_logging=CONTROL_PLANE_LOGS,
            # Nodes come from the groups below, not EKS Auto Mode or default capacity.
            default_capacity=0,
            default_capacity_type=eks.DefaultCapacityType.NODEGROUP,
            # Admins are listed explicitly; the deploying role gets no standing access.
            bootstrap_cluster_creator_admin_permissions=False,
            # Networking, DNS and proxy come only as the pinned managed add-ons below.
            bootstrap_self_managed_addons=False,
            removal_policy=removal_policy,
        )
        self.cluster.node.add_dependency(self.log_group)
        _acknowledge_managed_policies(
            self.cluster.role,
            ["AmazonEKSClusterPolicy"],
            "The EKS cluster role needs AmazonEKSClusterPolicy; AWS maintains it with EKS.",
        )
        for index, principal in enumerate(admin_principal_arns):
            self.cluster.grant_access(
                f"Admin{index}",
                principal,
                [
                    eks.AccessPolicy.from_access_policy_name(
                        "AmazonEKSClusterAdminPolicy", access_scope_type=eks.AccessScopeType.CLUSTER
                    )
                ],
            )
        stack = Stack.of(self)
        self.cni_role = iam.Role(
            self,
            "CniRole",
            assumed_by=pod_identity_principal(
                account=stack.account,
                cluster_arn=self.cluster.cluster_arn,
                namespace=CNI_SERVICE_ACCOUNT[0],
                service_account=CNI_SERVICE_ACCOUNT[1],
            ),
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name(_CNI_POLICY)],
            description=f"{name}: the VPC CNI (aws-node), through Pod Identity",
        )
        _acknowledge_managed_policies(
            self.cni_role,
            [_CNI_POLICY],
            "The VPC CNI needs AmazonEKS_CNI_Policy (network interfaces and addresses for "
            "pods); AWS maintains it with the CNI. Only the aws-node service account gets it.",
        )
        self.addons = {
            addon_name: eks.Addon(
                self,
                "".join(p.title() for p in addon_name.split("-")),
                # jsii's Cluster implements ICluster; its Python typing does not say so.
                cluster=cast(eks.ICluster, self.cluster),
                addon_name=addon_name,
                addon_version=version,
                # EKS would otherwise keep a field an operator changed by hand.
                preserve_on_delete=False,
            )
            for addon_name, version in addons.items()
        }
        if "vpc-cni" in self.addons:
            cfn_addon = cast(CfnResource, self.addons["vpc-cni"].node.default_child)
            cfn_addon.add_property_override(
                "PodIdentityAssociations",
                [{"RoleArn": self.cni_role.role_arn, "ServiceAccount": CNI_SERVICE_ACCOUNT[1]}],
            )
            # The CNI's credentials come from the Pod Identity agent.
            if "eks-pod-identity-agent" in self.addons:
                self.addons["vpc-cni"].node.add_dependency(self.addons["eks-pod-identity-agent"])
        self.cloudwatch_role: iam.Role | None = None
        if CLOUDWATCH_ADDON in self.addons:
            self.cloudwatch_role = iam.Role(
                self,
                "CloudWatchAgentRole",
                assumed_by=pod_identity_principal(
                    account=stack.account,
                    cluster_arn=self.cluster.cluster_arn,
                    namespace=CLOUDWATCH_SERVICE_ACCOUNT[0],
                    service_account=CLOUDWATCH_SERVICE_ACCOUNT[1],
                ),
                managed_policies=[
                    iam.ManagedPolicy.from_aws_managed_policy_name(_CLOUDWATCH_POLICY)
                ],
                description=f"{name}: the CloudWatch agent (Container Insights, GPU metrics)",
            )
            _acknowledge_managed_policies(
                self.cloudwatch_role,
                [_CLOUDWATCH_POLICY],
                "The CloudWatch agent needs CloudWatchAgentServerPolicy (put metrics and log "
                "events, describe its EC2 host); AWS maintains it with the agent and the "
                "add-on's documentation names it. Only the agent's service account gets it.",
            )
            self.insights_logs = {
                kind: logs.LogGroup(
                    self,
                    f"ContainerInsights{kind.title()}",
                    log_group_name=f"/aws/containerinsights/{name}/{kind}",
                    encryption_key=log_key,
                    retention=log_retention,
                    removal_policy=removal_policy,
                )
                for kind in CONTAINER_INSIGHTS_LOGS
            }
            for group in self.insights_logs.values():
                self.addons[CLOUDWATCH_ADDON].node.add_dependency(group)
            # XID errors from the host (kernel) log, see HOST_LOG_MESSAGE_FIELD: per node for
            # the dashboard, and one series for the alarm (an alarm names its dimensions).
            self.xid_filters = [
                logs.MetricFilter(
                    self,
                    f"XidErrors{suffix}",
                    log_group=self.insights_logs["host"],
                    filter_pattern=logs.FilterPattern.string_value(
                        HOST_LOG_MESSAGE_FIELD, "=", f"*{XID_PATTERN}*"
                    ),
                    metric_namespace=XID_NAMESPACE,
                    metric_name=XID_METRIC,
                    metric_value="1",
                    dimensions=dimensions,
                    unit=cloudwatch.Unit.COUNT,
                )
                for suffix, dimensions in (
                    ("PerNode", {"InstanceId": HOST_LOG_INSTANCE_FIELD}),
                    ("", None),
                )
            ]
            cfn_cw = cast(CfnResource, self.addons[CLOUDWATCH_ADDON].node.default_child)
            cfn_cw.add_property_override(
                "PodIdentityAssociations",
                [
                    {
                        "RoleArn": self.cloudwatch_role.role_arn,
                        "ServiceAccount": CLOUDWATCH_SERVICE_ACCOUNT[1],
                    }
                ],
            )
            if "eks-pod-identity-agent" in self.addons:
                self.addons[CLOUDWATCH_ADDON].node.add_dependency(
                    self.addons["eks-pod-identity-agent"]
                )
        self.placement_group: ec2.CfnPlacementGroup | None = None
        if gpu_pool is not None and gpu_pool.efa_interfaces:
            self.placement_group = ec2.CfnPlacementGroup(self, "GpuPlacement", strategy="cluster")
        system_name, gpu_name = nodegroup_names or (None, None)
        self.system_nodes = self._node_group(
            "SystemNodes",
            system_pool,
            vpc=vpc,
            labels=SYSTEM_POOL_LABELS,
            taints=[],
            ami_type=eks.NodegroupAmiType.AL2023_X86_64_STANDARD,
            name=system_name,
        )[0]
        # Without `gpu_pool`, GPU nodes come from elsewhere (kiln: Karpenter, see karpenter.py).
        self.gpu_nodes: eks.Nodegroup | None = None
        self.gpu_launch_template: ec2.CfnLaunchTemplate | None = None
        if gpu_pool is not None:
            self.gpu_nodes, self.gpu_launch_template = self._node_group(
                "GpuNodes",
                gpu_pool,
                vpc=vpc,
                labels=GPU_POOL_LABELS,
                taints=[GPU_TAINT],
                ami_type=eks.NodegroupAmiType.AL2023_X86_64_NVIDIA,
                name=gpu_name,
            )
        # Nodes join only once pod networking exists; CoreDNS needs a node to run on.
        for nodegroup in (self.system_nodes, self.gpu_nodes):
            if nodegroup is None:
                continue
            for addon_name in ("vpc-cni", "kube-proxy", "eks-pod-identity-agent"):
                if addon_name in self.addons:
                    nodegroup.node.add_dependency(self.addons[addon_name])
        # These run as pods: CoreDNS and the CloudWatch agent's operator need a node.
        for addon_name in ("coredns", CLOUDWATCH_ADDON):
            if addon_name in self.addons:
                self.addons[addon_name].node.add_dependency(self.system_nodes)

    def _launch_template(self, construct_id: str, pool: NodePool) -> ec2.CfnLaunchTemplate:
        data = ec2.CfnLaunchTemplate.LaunchTemplateDataProperty(
            metadata_options=ec2.CfnLaunchTemplate.MetadataOptionsProperty(
                http_tokens="required",  # IMDSv2 only
                # One hop: pods (a hop further away) cannot reach node credentials; they get
                # their own through EKS Pod Identity.
                http_put_response_hop_limit=1,
                http_endpoint="enabled",
            ),
            block_device_mappings=[
                ec2.CfnLaunchTemplate.BlockDeviceMappingProperty(
                    device_name="/dev/xvda",
                    ebs=ec2.CfnLaunchTemplate.EbsProperty(
                        volume_size=pool.root_volume_gib,
                        volume_type="gp3",
                        encrypted=True,
                        delete_on_termination=True,
                    ),
                )
            ],
            network_interfaces=[
                # The first card carries the primary interface; EFA traffic needs the
                # cluster security group, which admits all traffic among its members.
                ec2.CfnLaunchTemplate.NetworkInterfaceProperty(
                    network_card_index=card,
                    device_index=0 if card == 0 else 1,
                    interface_type="efa",
                    groups=[self.cluster.cluster_security_group_id],
                    delete_on_termination=True,
                )
                for card in range(pool.efa_interfaces)
            ]
            or None,
            placement=ec2.CfnLaunchTemplate.PlacementProperty(group_name=self.placement_group.ref)
            if pool.efa_interfaces and self.placement_group
            else None,
        )
        return ec2.CfnLaunchTemplate(self, construct_id, launch_template_data=data)

    def _node_group(
        self,
        construct_id: str,
        pool: NodePool,
        *,
        vpc: ec2.IVpc,
        labels: Mapping[str, str],
        taints: Sequence[eks.TaintSpec],
        ami_type: eks.NodegroupAmiType,
        name: str | None,
    ) -> tuple[eks.Nodegroup, ec2.CfnLaunchTemplate]:
        template = self._launch_template(f"{construct_id}Template", pool)
        subnets = vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS).subnets
        # EFA nodes share one zone (a cluster placement group cannot span zones).
        if pool.efa_interfaces:
            pinned = [s for s in subnets if pool.zone in (None, s.availability_zone)][:1]
            if not pinned:
                raise ValueError(f"no private subnet in zone {pool.zone} for the EFA node pool")
            subnets = pinned
        selection = ec2.SubnetSelection(subnets=subnets)
        group = self.cluster.add_nodegroup_capacity(
            construct_id,
            nodegroup_name=name,
            instance_types=[ec2.InstanceType(t) for t in pool.instance_types],
            ami_type=ami_type,
            capacity_type=eks.CapacityType.SPOT if pool.spot else eks.CapacityType.ON_DEMAND,
            min_size=pool.min_size,
            desired_size=pool.desired_size,
            max_size=pool.max_size,
            labels=dict(labels),
            taints=list(taints),
            subnets=selection,
            launch_template_spec=eks.LaunchTemplateSpec(
                id=template.ref, version=template.attr_latest_version_number
            ),
        )
        # The CDK gives each group's role the CNI policy too; the CNI has its own role. The
        # role is kept (not replaced by one of ours): a node group's NodeRole cannot change
        # without replacing the group, which its fixed name forbids.
        cfn_role = cast(CfnResource, group.role.node.default_child)
        cfn_role.add_property_override(
            "ManagedPolicyArns",
            [
                {"Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}, f":iam::aws:policy/{p}"]]}
                for p in _NODE_POLICIES
            ],
        )
        _acknowledge_managed_policies(
            group.role,
            _NODE_POLICIES,
            "EKS worker nodes need these AWS-managed policies (kubelet, image pulls); AWS "
            "maintains them with EKS. The CNI and pods get their own roles through Pod "
            "Identity.",
        )
        _acknowledge_managed_policies(
            group.role,
            [_CNI_POLICY],
            "Not in the deployed template: the ManagedPolicyArns override above leaves it out "
            "(the CNI has its own Pod Identity role); cdk-nag reads the CDK's list for this "
            "generated role from before the override.",
        )
        return group, template
