"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.config import available_environments
from kiln.contract import Component
from kiln_policy.assembly import SynthesizedStack

REPO = Path(__file__).resolve().parent.parent


def minimal_settings(**top_level: Any) -> dict[str, Any]:
    """A valid environment's settings with every required field and nothing optional."""
    settings: dict[str, Any] = {
        "name": "qa",
        "tier": "staging",
        "owner": "ml-platform",
        "region": "eu-west-1",
        "availability_zones": ["eu-west-1a", "eu-west-1b", "eu-west-1c"],
        "termination_protection": True,
        "removal_policy": "retain",
        "log_retention_days": 90,
        "network": {"vpc_cidr": "10.40.0.0/16", "nat_gateways": 2},
        "streaming": {
            "kafka_version": "3.8.x",
            "broker_instance_type": "kafka.m7g.large",
            "topics": [{"name": "prediction-events", "partitions": 6}],
        },
        "compute": {
            "kubernetes_version": "1.34",
            "system_nodes": {"min_size": 2, "desired_size": 2, "max_size": 3},
            "gpu_nodes": {
                "instance_types": ["g5.2xlarge"],
                "max_gpus": 2,
                "ami_release": "v20251110",
            },
            "addons": {
                "vpc-cni": "v1.20.4-eksbuild.1",
                "coredns": "v1.12.3-eksbuild.1",
                "kube-proxy": "v1.34.1-eksbuild.2",
                "eks-pod-identity-agent": "v1.3.9-eksbuild.3",
                "amazon-cloudwatch-observability": "v6.2.0-eksbuild.1",
            },
            "nvidia_device_plugin_version": "v0.17.4",
            "efa_device_plugin_version": "v0.5.6",
            "karpenter_version": "1.14.1",
            "kueue_version": "v0.19.2",
            "teams": [{"name": "ml", "gpu_quota": 2}],
        },
        "serving": {
            "instance_type": "ml.g5.xlarge",
            "initial_instance_count": 2,
            "autoscaling": {
                "min_instances": 2,
                "max_instances": 3,
                "target_invocations_per_instance": 50,
            },
        },
    }
    return {**settings, **top_level}


ENVIRONMENTS = available_environments()


@dataclass(frozen=True)
class Synthesis:
    """The result of synthesizing `-c env=all` once: stacks, plus the validation report."""

    outdir: Path
    stacks: list[SynthesizedStack]
    error: str | None
    report: dict[str, Any] | None

    def stack(self, environment: str, component: Component | str) -> SynthesizedStack:
        name = f"kiln-{environment}-{component}"
        matches = [s for s in self.stacks if s.stack_name == name]
        assert matches, f"no stack {name}; have {[s.stack_name for s in self.stacks]}"
        return matches[0]
