"""The Kubernetes objects that make GPU capacity follow the work, as plain dicts: Karpenter's
controller, node classes and node pools (GPU nodes from zero for pending pods, gone when empty),
and Kueue's flavors and queues (per-team GPU quotas, whole-or-nothing admission).

Karpenter's and Kueue's own CRDs and Kueue's controller come as vendored bundles at pinned
releases (`handlers/bundles`, written by `scripts/vendor_cluster_bundles.py`); everything here is
kiln's, rendered from the environment's settings. Values that only exist at deploy time (role
names, subnet ids, the cluster endpoint) are passed in, so they may be CDK tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kiln.contract import GPU_POOL_LABEL, GPU_TAINT
from kiln.gpu_instances import GPU_INSTANCES
from kiln.settings import Settings

KARPENTER_NAMESPACE = "karpenter"
KARPENTER_SERVICE_ACCOUNT = "karpenter"
KARPENTER_IMAGE = "public.ecr.aws/karpenter/controller"
KUEUE_NAMESPACE = "kueue-system"
GPU_RESOURCE = "nvidia.com/gpu"
# One ClusterQueue per team, all in one cohort: a team may borrow what the others leave idle.
COHORT = "kiln-gpu"
GPU_FLAVOR = "gpu"
# Kueue counts what a job requests; the pods also request CPU and memory, which the GPU node
# sizes bound, so quota is GPUs only and CPU/memory are covered generously (kiln_cli renders
# pods at most a node's share of each).
_UNBOUNDED_CPU = "100000"
_UNBOUNDED_MEMORY = "1000Ti"
# How long an admitted job's pods may take to be all Ready (node launch, image pull) before
# Kueue evicts it and requeues it: a p5 launch plus a 20 GB image pull fits in 30 minutes.
PODS_READY_TIMEOUT = "30m"

_LABELS = {"app.kubernetes.io/part-of": "kiln"}


def _meta(name: str, namespace: str | None = None, **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {**_LABELS, **labels}}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def pool_name(family: str) -> str:
    """The NodePool (and EC2NodeClass) of one instance family: `gpu-p4d`."""
    return f"gpu-{family}"


@dataclass(frozen=True)
class NodeNetwork:
    """Where GPU nodes go: deploy-time values from the stacks."""

    node_role: str  # the IAM role name Karpenter gives nodes (an instance profile is made)
    cluster_security_group: str
    private_subnets: Sequence[str]  # ids, every zone
    efa_subnet: str  # the one private subnet an EFA pool is pinned to
    placement_group: str | None = None  # name of the cluster placement group for EFA pools
    tags: Mapping[str, str] = field(default_factory=dict)


def node_class(settings: Settings, family: str, network: NodeNetwork) -> dict[str, Any]:
    """The EC2NodeClass of one GPU family: AL2023 (NVIDIA variant) at the pinned release, IMDSv2
    with one hop, an encrypted gp3 root volume, private subnets, the cluster security group,
    and where the family has EFA, one EFA interface on every network card in one zone's cluster
    placement group."""
    gpu = settings.compute.gpu_nodes
    efa = GPU_INSTANCES[settings.compute.gpu_families[family][0]].efa_interfaces
    spec: dict[str, Any] = {
        "role": network.node_role,
        "amiSelectorTerms": [{"alias": f"al2023@{gpu.ami_release}"}],
        "subnetSelectorTerms": [
            {"id": subnet} for subnet in ([network.efa_subnet] if efa else network.private_subnets)
        ],
        "securityGroupSelectorTerms": [{"id": network.cluster_security_group}],
        "associatePublicIPAddress": False,
        "metadataOptions": {
            "httpEndpoint": "enabled",
            "httpProtocolIPv6": "disabled",
            # One hop: pods cannot reach the node role's credentials (they use Pod Identity).
            "httpPutResponseHopLimit": 1,
            "httpTokens": "required",
        },
        "blockDeviceMappings": [
            {
                "deviceName": "/dev/xvda",
                "rootVolume": True,
                "ebs": {
                    "volumeSize": f"{gpu.root_volume_gib}Gi",
                    "volumeType": "gp3",
                    "encrypted": True,
                    "deleteOnTermination": True,
                },
            }
        ],
        "tags": dict(network.tags),
    }
    if efa:
        # Card 0 carries the primary interface (with EFA riding on it, as Karpenter adds EFA
        # where pods request vpc.amazonaws.com/efa); every further card gets an EFA-only one.
        spec["networkInterfaces"] = [
            {"networkCardIndex": 0, "deviceIndex": 0, "interfaceType": "interface"},
            *(
                {"networkCardIndex": card, "deviceIndex": 0, "interfaceType": "efa-only"}
                for card in range(1, efa)
            ),
        ]
        if network.placement_group is not None:
            spec["placementGroupSelector"] = {"name": network.placement_group}
    if gpu.capacity_reservations:
        spec["capacityReservationSelectorTerms"] = [
            {"id": r.id} if r.id else {"tags": dict(r.tags)} for r in gpu.capacity_reservations
        ]
    return {
        "apiVersion": "karpenter.k8s.aws/v1",
        "kind": "EC2NodeClass",
        "metadata": _meta(pool_name(family)),
        "spec": spec,
    }


def capacity_types(settings: Settings) -> list[str]:
    """What a GPU pool may launch, most preferred first: reserved capacity where the
    environment lists reservations, then spot (never in prod) or on-demand."""
    gpu = settings.compute.gpu_nodes
    kinds = ["reserved"] if gpu.capacity_reservations else []
    if gpu.capacity == "spot" and not settings.is_prod:
        return [*kinds, "spot", "on-demand"]
    return [*kinds, "on-demand"]


def node_pool(settings: Settings, family: str) -> dict[str, Any]:
    """The NodePool of one GPU family: only the listed sizes, the GPU taint and label kiln's
    jobs tolerate and select, a limit on its GPUs, empty nodes removed after
    `empty_node_minutes`, and a disruption budget that never takes nodes for consolidation or
    drift while pods run there (training pods also carry `karpenter.sh/do-not-disrupt`)."""
    gpu = settings.compute.gpu_nodes
    types = settings.compute.gpu_families[family]
    return {
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodePool",
        "metadata": _meta(pool_name(family)),
        "spec": {
            "template": {
                "metadata": {"labels": {GPU_POOL_LABEL[0]: GPU_POOL_LABEL[1]}},
                "spec": {
                    "nodeClassRef": {
                        "group": "karpenter.k8s.aws",
                        "kind": "EC2NodeClass",
                        "name": pool_name(family),
                    },
                    "taints": [dict(GPU_TAINT)],
                    "requirements": [
                        {
                            "key": "node.kubernetes.io/instance-type",
                            "operator": "In",
                            "values": list(types),
                        },
                        {
                            "key": "karpenter.sh/capacity-type",
                            "operator": "In",
                            "values": capacity_types(settings),
                        },
                        {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]},
                    ],
                    # A training run can last days; nodes are replaced by drift (a new AMI
                    # release in config), not by age.
                    "expireAfter": "Never",
                    # Pods get this long to checkpoint on a drain (a spot notice is 2 minutes).
                    "terminationGracePeriod": "2h",
                },
            },
            # Kueue admits within team quotas; this is the hard ceiling on spend.
            "limits": {GPU_RESOURCE: str(gpu.max_gpus)},
            "disruption": {
                "consolidationPolicy": "WhenEmpty",
                "consolidateAfter": f"{gpu.empty_node_minutes}m",
                "budgets": [
                    # Empty nodes may all go at once; nodes that drifted only one at a time.
                    {"nodes": "100%", "reasons": ["Empty"]},
                    {"nodes": "1", "reasons": ["Drifted"]},
                ],
            },
        },
    }


def karpenter_controller(
    *,
    version: str,
    cluster_name: str,
    cluster_endpoint: str,
    interruption_queue: str,
) -> list[dict[str, Any]]:
    """Karpenter's controller in its own namespace, on the system nodes: service account (its
    AWS role comes through EKS Pod Identity), the RBAC its Helm chart grants at this release,
    two replicas with leader election and a PodDisruptionBudget."""
    ns = KARPENTER_NAMESPACE
    name = "karpenter"
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/instance": name}
    read = ["get", "list", "watch"]
    core_rules = [
        {
            "apiGroups": ["karpenter.sh"],
            "resources": [
                "nodepools",
                "nodepools/status",
                "nodeclaims",
                "nodeclaims/status",
                "nodeoverlays",
                "nodeoverlays/status",
            ],
            "verbs": read,
        },
        {
            "apiGroups": ["autoscaling.x-k8s.io"],
            "resources": ["capacitybuffers", "capacitybuffers/status"],
            "verbs": read,
        },
        {
            "apiGroups": [""],
            "resources": [
                "podtemplates",
                "pods",
                "nodes",
                "persistentvolumes",
                "persistentvolumeclaims",
                "replicationcontrollers",
                "namespaces",
                "events",
            ],
            "verbs": read,
        },
        {
            "apiGroups": ["storage.k8s.io"],
            "resources": ["storageclasses", "csinodes", "volumeattachments"],
            "verbs": read,
        },
        {
            "apiGroups": ["apps"],
            "resources": ["daemonsets", "deployments", "replicasets", "statefulsets"],
            "verbs": read,
        },
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": read},
        {
            "apiGroups": ["karpenter.sh"],
            "resources": ["nodeclaims", "nodeclaims/status"],
            "verbs": ["create", "delete", "update", "patch"],
        },
        {
            "apiGroups": ["karpenter.sh"],
            "resources": ["nodepools", "nodepools/status", "nodeoverlays/status"],
            "verbs": ["update", "patch"],
        },
        {
            "apiGroups": ["autoscaling.x-k8s.io"],
            "resources": ["capacitybuffers/status"],
            "verbs": ["update", "patch"],
        },
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch", "delete", "update"]},
        {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]},
    ]
    aws_rules = [
        {"apiGroups": ["karpenter.k8s.aws"], "resources": ["ec2nodeclasses"], "verbs": read},
        {
            "apiGroups": ["karpenter.k8s.aws"],
            "resources": ["ec2nodeclasses", "ec2nodeclasses/status"],
            "verbs": ["patch", "update"],
        },
    ]
    subject = [{"kind": "ServiceAccount", "name": KARPENTER_SERVICE_ACCOUNT, "namespace": ns}]

    def binding(kind: str, role: str, namespace: str | None = None) -> dict[str, Any]:
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": f"{kind}Binding",
            "metadata": _meta(role, namespace),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
            "subjects": subject,
        }

    env = {
        "KUBERNETES_MIN_VERSION": "1.19.0-0",
        "KARPENTER_SERVICE": name,
        "LOG_LEVEL": "info",
        "METRICS_PORT": "8080",
        "HEALTH_PROBE_PORT": "8081",
        "BATCH_MAX_DURATION": "10s",
        "BATCH_IDLE_DURATION": "1s",
        "CLUSTER_NAME": cluster_name,
        "CLUSTER_ENDPOINT": cluster_endpoint,
        "INTERRUPTION_QUEUE": interruption_queue,
        # Capacity reservations (ODCRs, Capacity Blocks) need this gate.
        "FEATURE_GATES": "ReservedCapacity=true,SpotToSpotConsolidation=false,NodeRepair=true",
    }
    container = {
        "name": "controller",
        "image": f"{KARPENTER_IMAGE}:{version}",
        "imagePullPolicy": "IfNotPresent",
        "env": [
            *({"name": k, "value": v} for k, v in env.items()),
            {
                "name": "SYSTEM_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
            {
                "name": "MEMORY_LIMIT",
                "valueFrom": {
                    "resourceFieldRef": {
                        "containerName": "controller",
                        "divisor": "0",
                        "resource": "limits.memory",
                    }
                },
            },
        ],
        "ports": [
            {"name": "http-metrics", "containerPort": 8080, "protocol": "TCP"},
            {"name": "http", "containerPort": 8081, "protocol": "TCP"},
        ],
        "livenessProbe": {
            "initialDelaySeconds": 30,
            "timeoutSeconds": 30,
            "httpGet": {"path": "/healthz", "port": "http"},
        },
        "readinessProbe": {
            "initialDelaySeconds": 5,
            "timeoutSeconds": 30,
            "httpGet": {"path": "/readyz", "port": "http"},
        },
        "resources": {
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"memory": "1Gi"},
        },
        "securityContext": {
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(ns)},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(KARPENTER_SERVICE_ACCOUNT, ns),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta(f"{name}-core"),
            "rules": core_rules,
        },
        binding("ClusterRole", f"{name}-core"),
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta(name),
            "rules": aws_rules,
        },
        binding("ClusterRole", name),
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(name, ns),
            "rules": [
                {
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "verbs": ["get", "watch"],
                },
                {
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "verbs": ["patch", "update"],
                    "resourceNames": ["karpenter-leader-election"],
                },
                {
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "verbs": ["create"],
                },
            ],
        },
        binding("Role", name, ns),
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(f"{name}-dns", "kube-system"),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["services"],
                    "resourceNames": ["kube-dns"],
                    "verbs": ["get"],
                }
            ],
        },
        binding("Role", f"{name}-dns", "kube-system"),
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(name, ns),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(name, ns),
            "spec": {
                "replicas": 2,
                "revisionHistoryLimit": 10,
                "strategy": {"rollingUpdate": {"maxUnavailable": 1}},
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": {**labels, **_LABELS}},
                    "spec": {
                        "serviceAccountName": KARPENTER_SERVICE_ACCOUNT,
                        "priorityClassName": "system-cluster-critical",
                        "securityContext": {
                            "fsGroup": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        # Never on the nodes it manages: the system node group runs it.
                        "nodeSelector": {"kubernetes.io/os": "linux"},
                        "affinity": {
                            "nodeAffinity": {
                                "requiredDuringSchedulingIgnoredDuringExecution": {
                                    "nodeSelectorTerms": [
                                        {
                                            "matchExpressions": [
                                                {
                                                    "key": "karpenter.sh/nodepool",
                                                    "operator": "DoesNotExist",
                                                }
                                            ]
                                        }
                                    ]
                                }
                            },
                            "podAntiAffinity": {
                                "requiredDuringSchedulingIgnoredDuringExecution": [
                                    {
                                        "topologyKey": "kubernetes.io/hostname",
                                        "labelSelector": {"matchLabels": labels},
                                    }
                                ]
                            },
                        },
                        "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}],
                        "containers": [container],
                    },
                },
            },
        },
    ]


def kueue_configuration() -> dict[str, Any]:
    """Kueue's controller configuration (the `kueue-manager-config` ConfigMap's document):
    the release's defaults plus waitForPodsReady, which makes admission all-or-nothing: an
    admitted job whose pods are not all Ready in time is evicted and requeued, so a 2-node job
    never holds one node while the other cannot come up."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "health": {"healthProbeBindAddress": ":8081"},
        "metrics": {"bindAddress": ":8443"},
        "webhook": {"port": 9443},
        "leaderElection": {"leaderElect": True, "resourceName": "c1f6bfd2.kueue.x-k8s.io"},
        "controller": {
            "groupKindConcurrency": {
                "Job.batch": 5,
                "Pod": 5,
                "Workload.kueue.x-k8s.io": 10,
                "LocalQueue.kueue.x-k8s.io": 5,
                "Cohort.kueue.x-k8s.io": 1,
                "ClusterQueue.kueue.x-k8s.io": 5,
                "ResourceFlavor.kueue.x-k8s.io": 1,
            }
        },
        "clientConnection": {"qps": 300, "burst": 500},
        "waitForPodsReady": {
            "timeout": PODS_READY_TIMEOUT,
            # Admit the next job only once the admitted one's pods are all Ready: two big jobs
            # admitted together could each get half their nodes and deadlock.
            "blockAdmission": True,
            "requeuingStrategy": {
                "timestamp": "Eviction",
                "backoffBaseSeconds": 60,
                "backoffMaxSeconds": 3600,
            },
        },
        "integrations": {
            "frameworks": [
                "batch/job",
                "jobset.x-k8s.io/jobset",
                "kubeflow.org/pytorchjob",
                "trainer.kubeflow.org/trainjob",
            ]
        },
    }


def kueue_config_map() -> dict[str, Any]:
    """The ConfigMap that replaces the release bundle's own (same name and namespace)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "kueue-manager-config",
            "namespace": KUEUE_NAMESPACE,
            "labels": {"app.kubernetes.io/name": "kueue", "control-plane": "controller-manager"},
        },
        # Kueue reads YAML; JSON is YAML.
        "data": {"controller_manager_config.yaml": json.dumps(kueue_configuration(), indent=2)},
    }


def queue_name(team: str) -> str:
    """A team's ClusterQueue and LocalQueue name."""
    return f"{team}-gpu"


def kueue_objects(settings: Settings) -> list[dict[str, Any]]:
    """The GPU ResourceFlavor (nodes of kiln's GPU pools), one ClusterQueue per team with its
    GPU quota in a shared cohort (borrowing idle quota, never more than `max_gpus` in all),
    and each team's namespace with its LocalQueue."""
    compute = settings.compute
    flavor = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ResourceFlavor",
        "metadata": _meta(GPU_FLAVOR),
        "spec": {
            "nodeLabels": {GPU_POOL_LABEL[0]: GPU_POOL_LABEL[1]},
            "nodeTaints": [dict(GPU_TAINT)],
        },
    }
    objects: list[dict[str, Any]] = [flavor]
    for team in compute.teams:
        namespace = compute.team_namespace(team.name)
        objects.append(
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "ClusterQueue",
                "metadata": _meta(queue_name(team.name), team=team.name),
                "spec": {
                    "cohortName": COHORT,
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": namespace}
                    },
                    # Jobs start in the order they were queued: a big job is not overtaken
                    # forever by small ones that happen to fit.
                    "queueingStrategy": "StrictFIFO",
                    "resourceGroups": [
                        {
                            "coveredResources": ["cpu", "memory", GPU_RESOURCE],
                            "flavors": [
                                {
                                    "name": GPU_FLAVOR,
                                    "resources": [
                                        {"name": "cpu", "nominalQuota": _UNBOUNDED_CPU},
                                        {"name": "memory", "nominalQuota": _UNBOUNDED_MEMORY},
                                        {
                                            "name": GPU_RESOURCE,
                                            "nominalQuota": team.gpu_quota,
                                            # Borrow up to the pools' ceiling from the cohort.
                                            "borrowingLimit": max(
                                                compute.gpu_nodes.max_gpus - team.gpu_quota, 0
                                            ),
                                        },
                                    ],
                                }
                            ],
                        }
                    ],
                    # A team's own quota comes back when it needs it: borrowed GPUs are
                    # reclaimed from the lender's point of view, lower priority first.
                    "preemption": {
                        "reclaimWithinCohort": "Any",
                        "withinClusterQueue": "Never",
                    },
                },
            }
        )
        objects.append(
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "LocalQueue",
                "metadata": _meta(queue_name(team.name), namespace, team=team.name),
                "spec": {"clusterQueue": queue_name(team.name)},
            }
        )
    return objects


def team_namespaces(settings: Settings) -> list[dict[str, Any]]:
    """Each team's namespace (baseline pod security) and its trainer service account."""
    compute = settings.compute
    objects = []
    for team in compute.teams:
        namespace = compute.team_namespace(team.name)
        objects += [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": namespace,
                    "labels": {
                        **_LABELS,
                        "kiln.dev/team": team.name,
                        "pod-security.kubernetes.io/enforce": "baseline",
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": _meta(compute.trainer_service_account, namespace),
            },
        ]
    return objects


def gpu_pools(settings: Settings, network: NodeNetwork) -> list[dict[str, Any]]:
    """Every family's EC2NodeClass and NodePool, node class first."""
    objects = []
    for family in settings.compute.gpu_families:
        objects += [node_class(settings, family, network), node_pool(settings, family)]
    return objects
