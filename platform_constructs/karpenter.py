"""The AWS side of Karpenter on an `aws_eks_v2` cluster: the node role and its access entry,
the controller's role (EKS Pod Identity) with the scoped policy Karpenter documents, the
interruption queue with its EventBridge rules, and a cluster placement group for EFA pools."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Acknowledgment, Duration, Stack, Validations
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_eks as eks_l1
from aws_cdk import aws_eks_v2 as eks
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from platform_constructs.eks import pod_identity_principal
from platform_constructs.gpu_capacity import KARPENTER_NAMESPACE, KARPENTER_SERVICE_ACCOUNT
from platform_constructs.nag import UnscopedStatement, unscoped_policies, wildcard_resource

_NODE_POLICIES = ("AmazonEKSWorkerNodePolicy", "AmazonEC2ContainerRegistryPullOnly")
# What Karpenter reads to pick instance types, zones, AMIs and reservations.
DISCOVERY_ACTIONS = (
    "ec2:DescribeCapacityReservations",
    "ec2:DescribeImages",
    "ec2:DescribeInstances",
    "ec2:DescribeInstanceStatus",
    "ec2:DescribeInstanceTypeOfferings",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeLaunchTemplates",
    "ec2:DescribePlacementGroups",
    "ec2:DescribeSecurityGroups",
    "ec2:DescribeSpotPriceHistory",
    "ec2:DescribeSubnets",
)
# EC2 and AWS Health events Karpenter acts on before an instance goes (EventBridge patterns
# from Karpenter's "Getting started" CloudFormation, the same at every 1.x release).
_INTERRUPTION_EVENTS = {
    "ScheduledChange": ("aws.health", "AWS Health Event"),
    "SpotInterruption": ("aws.ec2", "EC2 Spot Instance Interruption Warning"),
    "Rebalance": ("aws.ec2", "EC2 Instance Rebalance Recommendation"),
    "InstanceStateChange": ("aws.ec2", "EC2 Instance State-change Notification"),
}


class KarpenterAws(Construct):
    """Exposes `node_role`, `node_access`, `controller_role`, `controller_policy`,
    `interruption_queue`, `rules`, `placement_group` (None without EFA), `pod_identity`."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        cluster: eks.Cluster,
        cluster_name: str,
        efa: bool,
        description: str,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        partition, region, account = stack.partition, stack.region, stack.account
        self.node_role = iam.Role(
            self,
            "NodeRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            managed_policies=[
                iam.ManagedPolicy.from_aws_managed_policy_name(p) for p in _NODE_POLICIES
            ],
            description=f"{description}: GPU nodes Karpenter launches (kubelet, image pulls)",
        )
        Validations.of(self.node_role).acknowledge(
            *[
                Acknowledgment(
                    id=f"AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/{p}]",
                    reason="EKS worker nodes need these AWS-managed policies (kubelet, image "
                    "pulls); AWS maintains them with EKS. The CNI and pods get their own roles "
                    "through Pod Identity.",
                )
                for p in _NODE_POLICIES
            ]
        )
        # Nodes join through an access entry of type EC2_LINUX (no aws-auth ConfigMap).
        self.node_access = eks_l1.CfnAccessEntry(
            self,
            "NodeAccess",
            cluster_name=cluster.cluster_name,
            principal_arn=self.node_role.role_arn,
            type="EC2_LINUX",
        )
        self.interruption_queue = sqs.Queue(
            self,
            "InterruptionQueue",
            retention_period=Duration.minutes(5),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
        )
        Validations.of(self.interruption_queue).acknowledge(
            Acknowledgment(
                id="AwsSolutions-SQS3",
                reason="Karpenter's interruption notices are worth minutes; one it cannot "
                "read in time is stale, so there is nothing to dead-letter.",
            ),
            Acknowledgment(
                id="NIST.800.53.R5-SQSQueueEncrypted",
                reason="SQS-managed server-side encryption (SSE-SQS), as Karpenter documents; "
                "EventBridge delivers to it without a key policy.",
            ),
        )
        self.rules = {
            name: events.Rule(
                self,
                f"{name}Rule",
                description=f"{description}: {detail} to Karpenter",
                event_pattern=events.EventPattern(source=[source], detail_type=[detail]),
                targets=[targets.SqsQueue(self.interruption_queue)],
            )
            for name, (source, detail) in _INTERRUPTION_EVENTS.items()
        }
        self.placement_group: ec2.CfnPlacementGroup | None = None
        if efa:
            self.placement_group = ec2.CfnPlacementGroup(self, "GpuPlacement", strategy="cluster")
        self.controller_role = iam.Role(
            self,
            "ControllerRole",
            assumed_by=pod_identity_principal(
                account=account,
                cluster_arn=cluster.cluster_arn,
                namespace=KARPENTER_NAMESPACE,
                service_account=KARPENTER_SERVICE_ACCOUNT,
            ),
            description=f"{description}: the Karpenter controller (Pod Identity)",
        )
        ec2_arn = f"arn:{partition}:ec2:{region}"
        owned = {f"aws:ResourceTag/kubernetes.io/cluster/{cluster_name}": "owned"}
        request_owned = {
            f"aws:RequestTag/kubernetes.io/cluster/{cluster_name}": "owned",
            "aws:RequestTag/eks:eks-cluster-name": cluster_name,
        }
        launched = [
            f"{ec2_arn}:*:{kind}/*"
            for kind in (
                "fleet",
                "instance",
                "volume",
                "network-interface",
                "launch-template",
                "spot-instances-request",
            )
        ]
        profiles = f"arn:{partition}:iam::{account}:instance-profile/*"
        region_tag = {"aws:RequestTag/topology.kubernetes.io/region": region}
        statements = [
            iam.PolicyStatement(
                sid="LaunchFromSharedResources",
                actions=["ec2:RunInstances", "ec2:CreateFleet"],
                resources=[
                    f"arn:{partition}:ec2:{region}::image/*",
                    f"arn:{partition}:ec2:{region}::snapshot/*",
                    *(
                        f"{ec2_arn}:*:{kind}/*"
                        for kind in (
                            "security-group",
                            "subnet",
                            "capacity-reservation",
                            "placement-group",
                        )
                    ),
                ],
            ),
            iam.PolicyStatement(
                sid="LaunchFromOwnTemplates",
                actions=["ec2:RunInstances", "ec2:CreateFleet"],
                resources=[f"{ec2_arn}:*:launch-template/*"],
                conditions={
                    "StringEquals": owned,
                    "StringLike": {"aws:ResourceTag/karpenter.sh/nodepool": "*"},
                },
            ),
            iam.PolicyStatement(
                sid="LaunchTaggedAsOwned",
                actions=["ec2:RunInstances", "ec2:CreateFleet", "ec2:CreateLaunchTemplate"],
                resources=launched,
                conditions={
                    "StringEquals": request_owned,
                    "StringLike": {"aws:RequestTag/karpenter.sh/nodepool": "*"},
                },
            ),
            iam.PolicyStatement(
                sid="TagWhatItLaunches",
                actions=["ec2:CreateTags"],
                resources=launched,
                conditions={
                    "StringEquals": {
                        **request_owned,
                        "ec2:CreateAction": ["RunInstances", "CreateFleet", "CreateLaunchTemplate"],
                    },
                    "StringLike": {"aws:RequestTag/karpenter.sh/nodepool": "*"},
                },
            ),
            iam.PolicyStatement(
                sid="TagOwnInstances",
                actions=["ec2:CreateTags"],
                resources=[f"{ec2_arn}:*:instance/*"],
                conditions={
                    "StringEquals": owned,
                    "StringLike": {"aws:ResourceTag/karpenter.sh/nodepool": "*"},
                    "StringEqualsIfExists": {"aws:RequestTag/eks:eks-cluster-name": cluster_name},
                    "ForAllValues:StringEquals": {
                        "aws:TagKeys": ["eks:eks-cluster-name", "karpenter.sh/nodeclaim", "Name"]
                    },
                },
            ),
            iam.PolicyStatement(
                sid="DeleteOwn",
                actions=["ec2:TerminateInstances", "ec2:DeleteLaunchTemplate"],
                resources=[f"{ec2_arn}:*:instance/*", f"{ec2_arn}:*:launch-template/*"],
                conditions={
                    "StringEquals": owned,
                    "StringLike": {"aws:ResourceTag/karpenter.sh/nodepool": "*"},
                },
            ),
            iam.PolicyStatement(
                sid="PassNodeRole",
                actions=["iam:PassRole"],
                resources=[self.node_role.role_arn],
                conditions={"StringEquals": {"iam:PassedToService": ["ec2.amazonaws.com"]}},
            ),
            iam.PolicyStatement(
                sid="CreateOwnInstanceProfiles",
                actions=["iam:CreateInstanceProfile"],
                resources=[profiles],
                conditions={
                    "StringEquals": {**request_owned, **region_tag},
                    "StringLike": {"aws:RequestTag/karpenter.k8s.aws/ec2nodeclass": "*"},
                },
            ),
            iam.PolicyStatement(
                sid="TagOwnInstanceProfiles",
                actions=["iam:TagInstanceProfile"],
                resources=[profiles],
                conditions={
                    "StringEquals": {
                        **owned,
                        "aws:ResourceTag/topology.kubernetes.io/region": region,
                        **request_owned,
                        **region_tag,
                    },
                    "StringLike": {
                        "aws:ResourceTag/karpenter.k8s.aws/ec2nodeclass": "*",
                        "aws:RequestTag/karpenter.k8s.aws/ec2nodeclass": "*",
                    },
                },
            ),
            iam.PolicyStatement(
                sid="ManageOwnInstanceProfiles",
                actions=[
                    "iam:AddRoleToInstanceProfile",
                    "iam:RemoveRoleFromInstanceProfile",
                    "iam:DeleteInstanceProfile",
                ],
                resources=[profiles],
                conditions={
                    "StringEquals": {
                        **owned,
                        "aws:ResourceTag/topology.kubernetes.io/region": region,
                    },
                    "StringLike": {"aws:ResourceTag/karpenter.k8s.aws/ec2nodeclass": "*"},
                },
            ),
            iam.PolicyStatement(
                sid="ReadInstanceProfiles",
                actions=["iam:GetInstanceProfile"],
                resources=[profiles],
            ),
            iam.PolicyStatement(
                sid="FindApiServer",
                actions=["eks:DescribeCluster"],
                resources=[cluster.cluster_arn],
            ),
            iam.PolicyStatement(
                sid="ReadInterruptions",
                actions=["sqs:DeleteMessage", "sqs:GetQueueUrl", "sqs:ReceiveMessage"],
                resources=[self.interruption_queue.queue_arn],
            ),
            iam.PolicyStatement(
                sid="ReadAmiParameters",
                actions=["ssm:GetParameter"],
                resources=[f"arn:{partition}:ssm:{region}::parameter/aws/service/*"],
            ),
        ]
        self.controller_policy = iam.ManagedPolicy(
            self, "ControllerPolicy", roles=[self.controller_role], statements=statements
        )
        wildcard_reason = (
            "Karpenter launches, tags and deletes instances, volumes, interfaces, fleets and "
            "launch templates it names at run time; every action is limited by tag conditions "
            "to resources owned by this cluster (Karpenter's documented policy)."
        )
        wildcards = sorted(
            {
                str(resource)
                for statement in statements
                for resource in statement.resources
                if "*" in str(resource)
            }
        )
        Validations.of(self.controller_policy).acknowledge(
            *[wildcard_resource(self, arn, wildcard_reason) for arn in wildcards]
        )
        self.unscoped = unscoped_policies(
            self,
            [self.controller_role],
            [
                UnscopedStatement(
                    "Discovery",
                    iam.PolicyStatement(
                        actions=list(DISCOVERY_ACTIONS),
                        resources=["*"],
                        conditions={"StringEquals": {"aws:RequestedRegion": region}},
                    ),
                    "EC2 Describe* calls support no resource-level permissions; limited to "
                    "this region.",
                ),
                UnscopedStatement(
                    "Pricing",
                    iam.PolicyStatement(
                        actions=["pricing:GetProducts", "iam:ListInstanceProfiles"],
                        resources=["*"],
                    ),
                    "The Price List API's GetProducts (served from a few regions only) and "
                    "iam:ListInstanceProfiles support no resource-level permissions.",
                ),
            ],
            prefix="Karpenter",
        )
        self.pod_identity = eks.CfnPodIdentityAssociation(
            self,
            "ControllerPodIdentity",
            cluster_name=cluster.cluster_name,
            namespace=KARPENTER_NAMESPACE,
            service_account=KARPENTER_SERVICE_ACCOUNT,
            role_arn=self.controller_role.role_arn,
        )


def private_subnet_ids(vpc: ec2.IVpc) -> list[str]:
    return [
        s.subnet_id
        for s in vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS).subnets
    ]


def efa_subnet(vpc: ec2.IVpc, zone: str | None) -> str:
    """The private subnet an EFA pool is pinned to (a cluster placement group is one zone)."""
    subnets: Sequence[ec2.ISubnet] = vpc.select_subnets(
        subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS
    ).subnets
    pinned = [s for s in subnets if zone in (None, s.availability_zone)][:1]
    if not pinned:
        raise ValueError(f"no private subnet in zone {zone} for the EFA node pool")
    return pinned[0].subnet_id
