"""The objects kiln installs in every cluster, validated against the Kubernetes schema of the
version the shipped configs pin."""

from __future__ import annotations

import kubernetes_validate
import pytest

from kiln.config import available_environments, load_settings
from platform_constructs import cluster_manifests as cm

VERSIONS = sorted({load_settings(e).compute.kubernetes_version for e in available_environments()})


def everything(efa: bool = True) -> list[dict]:
    return cm.cluster_manifests(
        namespace="training",
        service_account="trainer",
        nvidia_version="v0.17.4",
        efa_version="v0.5.6" if efa else None,
        region="us-east-1",
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_kubernetes(version: str) -> None:
    for manifest in everything():
        kubernetes_validate.validate(manifest, f"{version}.0", strict=True)


def test_apply_order_and_the_efa_plugin_only_when_asked() -> None:
    kinds = [(m["kind"], m["metadata"]["name"]) for m in everything()]
    assert kinds == [
        ("Namespace", "training"),
        ("ServiceAccount", "trainer"),
        ("DaemonSet", "nvidia-device-plugin"),
        ("DaemonSet", "aws-efa-k8s-device-plugin"),
    ]
    assert [m["metadata"]["name"] for m in everything(efa=False)][-1] == "nvidia-device-plugin"


def test_device_plugins_run_only_on_gpu_nodes_and_tolerate_the_taint() -> None:
    for plugin in everything()[2:]:
        pod = plugin["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"kiln.dev/node-pool": "gpu"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            pod["tolerations"]
        )
        assert pod["priorityClassName"] == "system-node-critical"


def test_images_are_pinned() -> None:
    nvidia, efa = everything()[2:]
    image = nvidia["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "nvcr.io/nvidia/k8s-device-plugin:v0.17.4"
    image = efa["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == (
        "602401143452.dkr.ecr.us-east-1.amazonaws.com/eks/aws-efa-k8s-device-plugin:v0.5.6"
    )


def test_nvidia_plugin_is_unprivileged() -> None:
    container = everything()[2]["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def test_training_namespace_enforces_baseline_pod_security() -> None:
    namespace = everything()[0]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "baseline"
