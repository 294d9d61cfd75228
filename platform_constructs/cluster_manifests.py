"""The Kubernetes objects kiln installs in every EKS cluster at deploy time, as plain dicts.

The NVIDIA device plugin (advertises `nvidia.com/gpu`), the AWS EFA device plugin where GPU
nodes have EFA (advertises `vpc.amazonaws.com/efa`), and the training namespace with the
trainer's service account (bound to its IAM role by EKS Pod Identity).
"""

from __future__ import annotations

from typing import Any

from kiln.contract import GPU_POOL_LABEL, GPU_TAINT

# The EKS add-on and device-plugin images live in AWS's regional ECR registry account.
EKS_ECR_ACCOUNT = "602401143452"

_PLUGIN_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _device_plugin(
    name: str,
    image: str,
    *,
    privileged: bool,
    extra_mounts: list[dict[str, Any]],
    extra_volumes: list[dict[str, Any]],
) -> dict[str, Any]:
    """A DaemonSet running one device plugin on every GPU node (and only there)."""
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "kiln"}
    security = {"privileged": True} if privileged else _PLUGIN_SECURITY
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": "kube-system", "labels": labels},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "priorityClassName": "system-node-critical",
                    "nodeSelector": {GPU_POOL_LABEL[0]: GPU_POOL_LABEL[1]},
                    "tolerations": [
                        {"key": GPU_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "CriticalAddonsOnly", "operator": "Exists"},
                    ],
                    "containers": [
                        {
                            "name": name,
                            "image": image,
                            "securityContext": security,
                            "resources": {
                                "requests": {"cpu": "10m", "memory": "20Mi"},
                                "limits": {"memory": "100Mi"},
                            },
                            "volumeMounts": [
                                {
                                    "name": "device-plugin",
                                    "mountPath": "/var/lib/kubelet/device-plugins",
                                },
                                *extra_mounts,
                            ],
                        }
                    ],
                    "volumes": [
                        {
                            "name": "device-plugin",
                            "hostPath": {"path": "/var/lib/kubelet/device-plugins"},
                        },
                        *extra_volumes,
                    ],
                },
            },
        },
    }


def nvidia_device_plugin(version: str) -> dict[str, Any]:
    """NVIDIA's device plugin at a pinned image tag (nvcr.io/nvidia/k8s-device-plugin)."""
    plugin = _device_plugin(
        "nvidia-device-plugin",
        f"nvcr.io/nvidia/k8s-device-plugin:{version}",
        privileged=False,
        extra_mounts=[],
        extra_volumes=[],
    )
    container = plugin["spec"]["template"]["spec"]["containers"][0]
    # A node whose driver is not ready yet retries instead of crash-looping the pod.
    container["env"] = [{"name": "FAIL_ON_INIT_ERROR", "value": "false"}]
    return plugin


def efa_device_plugin(version: str, region: str) -> dict[str, Any]:
    """The AWS EFA device plugin at a pinned tag, from the EKS ECR registry of `region`."""
    image = (
        f"{EKS_ECR_ACCOUNT}.dkr.ecr.{region}.amazonaws.com/eks/aws-efa-k8s-device-plugin:{version}"
    )
    # It reads the EFA devices under /dev/infiniband, which needs a privileged container.
    return _device_plugin(
        "aws-efa-k8s-device-plugin",
        image,
        privileged=True,
        extra_mounts=[{"name": "infiniband", "mountPath": "/dev/infiniband"}],
        extra_volumes=[{"name": "infiniband", "hostPath": {"path": "/dev/infiniband"}}],
    )


def training_namespace(namespace: str, service_account: str) -> list[dict[str, Any]]:
    """The namespace training runs in, and the service account its pods use."""
    labels = {
        "app.kubernetes.io/part-of": "kiln",
        # Pods here run the trainer's own image: enforce the baseline profile.
        "pod-security.kubernetes.io/enforce": "baseline",
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": namespace, "labels": labels},
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {
                "name": service_account,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/part-of": "kiln"},
            },
        },
    ]


def cluster_manifests(
    *,
    namespace: str,
    service_account: str,
    nvidia_version: str,
    efa_version: str | None,
    region: str,
) -> list[dict[str, Any]]:
    """Every object, in apply order; the EFA plugin only when `efa_version` is given."""
    manifests = [
        *training_namespace(namespace, service_account),
        nvidia_device_plugin(nvidia_version),
    ]
    if efa_version is not None:
        manifests.append(efa_device_plugin(efa_version, region))
    return manifests


# The Kubernetes group of the deploy-time applier's access entry, and its ClusterRole's name.
APPLIER_GROUP = "kiln:cluster-objects"
_APPLIER_VERBS = ["get", "create", "patch", "update", "delete"]


def applier_rbac() -> list[dict[str, Any]]:
    """The ClusterRole that lets the applier manage exactly the kinds it applies (and update
    this role and its binding, by name), and the binding of that role to `APPLIER_GROUP`."""
    rules = [
        {"apiGroups": [""], "resources": ["namespaces", "serviceaccounts", "configmaps"]},
        {"apiGroups": ["apps"], "resources": ["daemonsets", "deployments"]},
        {"apiGroups": ["scheduling.k8s.io"], "resources": ["priorityclasses"]},
        # GPU pools (Karpenter) and queues (Kueue): kiln's objects of their CRDs.
        {"apiGroups": ["karpenter.sh"], "resources": ["nodepools"]},
        {"apiGroups": ["karpenter.k8s.aws"], "resources": ["ec2nodeclasses"]},
        {
            "apiGroups": ["kueue.x-k8s.io"],
            "resources": ["resourceflavors", "clusterqueues", "localqueues"],
        },
    ]
    labels = {"app.kubernetes.io/part-of": "kiln"}
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": APPLIER_GROUP, "labels": labels},
            "rules": [
                *({**rule, "verbs": _APPLIER_VERBS} for rule in rules),
                {
                    "apiGroups": ["rbac.authorization.k8s.io"],
                    "resources": ["clusterroles", "clusterrolebindings"],
                    "resourceNames": [APPLIER_GROUP],
                    "verbs": ["get", "patch", "update"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": APPLIER_GROUP, "labels": labels},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": APPLIER_GROUP,
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": APPLIER_GROUP}
            ],
        },
    ]
