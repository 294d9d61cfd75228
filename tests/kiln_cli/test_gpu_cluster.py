"""`kiln train --on eks --apply` on a simulated cluster (Kueue queues it, admits it whole,
Karpenter launches nodes, the pods run) with GPU utilization from CloudWatch (moto), and the
GPU capacity `kiln status` shows."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from contextlib import redirect_stdout
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from moto import mock_aws

from kiln.contract import Component, Outputs
from kiln_cli.cli import main
from kiln_cli.operate import gpu_cluster, status, train
from tests.kiln_cli.support import (
    ACCOUNT,
    REGION,
    client,
    create_buckets,
    deploy_stacks,
    make_aws,
    put_object,
)

pytestmark = pytest.mark.usefixtures("stack_outputs")
START = datetime.now(UTC).replace(microsecond=0)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _true(kind: str, at: datetime, **extra: str) -> dict[str, str]:
    return {"type": kind, "status": "True", "lastTransitionTime": _iso(at), **extra}


class SimulatedCluster:
    """Answers kubectl as a cluster with Kueue and Karpenter would, one step per poll: the run
    waits behind another workload, is admitted, Karpenter launches and registers one node per
    pod, the pods run. `kubectl apply -f -` creates the run's objects."""

    def __init__(self, clock: list[datetime]) -> None:
        self.clock = clock
        self.step = 0
        self.job: dict[str, Any] | None = None
        self.calls: list[list[str]] = []

    # --- kubectl apply -f - (train.apply_manifests) ---
    def apply(self, argv: Sequence[str], text: str) -> int:
        assert list(argv) == ["kubectl", "apply", "-f", "-"]
        (self.job,) = [o for o in yaml.safe_load_all(text) if o["kind"] == "Job"]
        return 0

    # --- kubectl get ... -o json ---
    def run(self, argv: Sequence[str]) -> tuple[int, str, str]:
        self.calls.append(list(argv))
        args = list(argv)[2:]  # kubectl --request-timeout=...
        if args[:2] == ["get", "--raw"]:
            return 0, json.dumps(self.pending()), ""
        resource = args[1]
        items = {
            "workloads.kueue.x-k8s.io": self.workloads,
            "nodeclaims.karpenter.sh": self.claims,
            "pods": self.pods,
            "nodes": self.nodes,
            "clusterqueues.kueue.x-k8s.io": self.queues,
        }[resource]()
        return 0, json.dumps({"items": items}), ""

    def advance(self, seconds: float) -> None:
        self.step += 1
        self.clock[0] += timedelta(seconds=seconds)

    @property
    def spec(self) -> dict[str, Any]:
        assert self.job is not None
        return self.job["spec"]

    @property
    def namespace(self) -> str:
        assert self.job is not None
        return str(self.job["metadata"]["namespace"])

    @property
    def gpus_per_pod(self) -> int:
        container = self.spec["template"]["spec"]["containers"][0]
        return int(container["resources"]["requests"]["nvidia.com/gpu"])

    def workloads(self) -> list[dict[str, Any]]:
        if self.job is None:
            return []
        name = self.job["metadata"]["name"]
        conditions = []
        if self.step >= 2:
            conditions += [_true("QuotaReserved", self.clock[0]), _true("Admitted", self.clock[0])]
        if self.step >= 5:
            conditions.append(_true("PodsReady", self.clock[0]))
        pods = self.spec["parallelism"]
        queue = self.job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
        return [
            {
                "metadata": {
                    "name": f"job-{name}-1a2b3",
                    "namespace": self.namespace,
                    "ownerReferences": [{"kind": "Job", "name": name}],
                },
                "spec": {
                    "queueName": queue,
                    "podSets": [{"name": "main", "count": pods, "template": self.spec["template"]}],
                },
                "status": {
                    "conditions": conditions,
                    "admission": {
                        "clusterQueue": queue,
                        "podSetAssignments": [
                            {
                                "name": "main",
                                "flavors": {"nvidia.com/gpu": "gpu"},
                                "resourceUsage": {"nvidia.com/gpu": str(pods * self.gpus_per_pod)},
                                "count": pods,
                            }
                        ],
                    }
                    if self.step >= 2
                    else {},
                },
            }
        ]

    def pending(self) -> dict[str, Any]:
        if self.job is None or self.step >= 2:
            return {"items": []}
        name = f"job-{self.job['metadata']['name']}-1a2b3"
        # Step 0: another team's run is ahead of it; step 1: it is next.
        return {"items": [{"metadata": {"name": name}, "positionInLocalQueue": 1 - self.step}]}

    def claims(self) -> list[dict[str, Any]]:
        if self.job is None or self.step < 3:
            return []
        kind = self.spec["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
        result = []
        for index in range(self.spec["parallelism"]):
            conditions = [_true("Launched", self.clock[0])]
            if self.step >= 4:
                conditions += [
                    _true("Registered", self.clock[0]),
                    _true("Initialized", self.clock[0]),
                ]
            result.append(
                {
                    "metadata": {
                        "name": f"gpu-g5-{'xyz'[index]}7k2p",
                        "creationTimestamp": _iso(START + timedelta(minutes=2)),
                        "labels": {
                            "node.kubernetes.io/instance-type": kind,
                            "karpenter.sh/capacity-type": "spot",
                            "topology.kubernetes.io/zone": f"us-east-1{'abc'[index]}",
                        },
                    },
                    "status": {
                        "conditions": conditions,
                        "nodeName": f"ip-10-10-{index + 1}-17.ec2.internal",
                        "allocatable": {"nvidia.com/gpu": str(self.gpus_per_pod)},
                    },
                }
            )
        return result

    def pods(self) -> list[dict[str, Any]]:
        if self.job is None or self.step < 5:
            return []
        name = self.job["metadata"]["name"]
        return [
            {
                "metadata": {
                    "name": f"{name}-{index}-q8r4t",
                    "namespace": self.namespace,
                    "ownerReferences": [{"kind": "Job", "name": name}],
                },
                "spec": {
                    **self.spec["template"]["spec"],
                    "nodeName": f"ip-10-10-{index + 1}-17.ec2.internal",
                },
                "status": {"phase": "Running"},
            }
            for index in range(self.spec["parallelism"])
        ]

    def nodes(self) -> list[dict[str, Any]]:
        return [
            {
                "metadata": {"name": c["status"]["nodeName"]},
                "status": {"allocatable": {"nvidia.com/gpu": str(self.gpus_per_pod)}},
            }
            for c in self.claims()
            if self.step >= 4
        ]

    def queues(self) -> list[dict[str, Any]]:
        used = self.spec["parallelism"] * self.gpus_per_pod if self.job and self.step >= 2 else 0
        return [
            {
                "metadata": {"name": "research-gpu"},
                "status": {
                    "pendingWorkloads": 0 if self.step >= 2 else 1,
                    "flavorsUsage": [
                        {
                            "name": "gpu",
                            "resources": [{"name": "nvidia.com/gpu", "total": str(used)}],
                        }
                    ],
                },
            }
        ]


def _platform() -> None:
    deploy_stacks("dev", components=(Component.DATA_LAKE, Component.COMPUTE))
    create_buckets(env="dev")
    put_object(f"s3://kiln-dev-curated-{ACCOUNT}-{REGION}/train/shard-0.txt")


@mock_aws
def test_apply_follows_an_empty_gpu_pool_to_a_running_job() -> None:
    _platform()
    aws = make_aws()
    clock = [START]
    cluster = SimulatedCluster(clock)
    options = train.TrainOptions(on="eks", name="llama", instance_count=2)
    started = train.eks_manifests(aws, options, now=START, warn=lambda _: None)
    train.apply_manifests(aws, started, cluster.apply)
    namespace, queue = train.team_queue(aws.settings, None)
    cluster_name = aws.output(Outputs.CLUSTER_NAME)
    # Container Insights' per-pod GPU utilization for the run, while its pods run.
    client("cloudwatch").put_metric_data(
        Namespace="ContainerInsights",
        MetricData=[
            {
                "MetricName": "pod_gpu_utilization",
                "Dimensions": [
                    {"Name": "ClusterName", "Value": cluster_name},
                    {"Name": "Namespace", "Value": namespace},
                    {"Name": "PodName", "Value": started.job},
                ],
                "Timestamp": START + timedelta(minutes=minute),
                "Value": value,
                "Unit": "Percent",
            }
            for minute, value in ((6, 88.0), (7, 92.0))
        ],
    )
    lines: list[str] = []
    final = gpu_cluster.follow_run(
        gpu_cluster.RunWatch(
            gpu_cluster.Kubectl(cluster.run),
            namespace=namespace,
            queue=queue,
            job=started.job,
            started=START,
        ),
        aws=aws,
        cluster=cluster_name,
        emit=lines.append,
        clock=lambda: clock[0],
        sleep=lambda seconds: cluster.advance(90),
        until="running",
    )
    assert final == "running"
    print("\n".join(lines))  # the sequence the README and the report quote (pytest -s)
    events = [line.split(" ", 1)[1] for line in lines]
    assert events == [
        f"queued in {namespace}/{queue}: position 2 (1 ahead)",
        f"queued in {namespace}/{queue}: position 1 (next in line)",
        f"admitted by cluster queue {queue}: 2 GPUs reserved, all pods at once",
        "node claim gpu-g5-x7k2p: launched g5.2xlarge (spot) in us-east-1a",
        "node claim gpu-g5-y7k2p: launched g5.2xlarge (spot) in us-east-1b",
        "node ip-10-10-1-17.ec2.internal ready (g5.2xlarge, 1 GPUs)",
        "node ip-10-10-2-17.ec2.internal ready (g5.2xlarge, 1 GPUs)",
        f"pod {started.job}-0-q8r4t scheduled on ip-10-10-1-17.ec2.internal",
        f"pod {started.job}-1-q8r4t scheduled on ip-10-10-2-17.ec2.internal",
        "running: 2/2 pods",
        "GPU utilization (5 min average): 90%",
    ]
    # Each line carries the clock's time: one poll every 90 s of the simulation.
    assert lines[0].startswith(f"{START:%H:%M:%S} ")


@mock_aws
def test_a_run_with_no_metrics_yet_says_so_and_a_deadline_stops_following() -> None:
    _platform()
    aws = make_aws()
    clock = [START]
    cluster = SimulatedCluster(clock)
    started = train.eks_manifests(aws, train.TrainOptions(on="eks"), now=START, warn=lambda _: None)
    train.apply_manifests(aws, started, cluster.apply)
    namespace, queue = train.team_queue(aws.settings, None)
    watch = gpu_cluster.RunWatch(
        gpu_cluster.Kubectl(cluster.run),
        namespace=namespace,
        queue=queue,
        job=started.job,
        started=START,
    )
    with pytest.raises(gpu_cluster.OperateError, match="still queued after"):
        gpu_cluster.follow_run(
            watch,
            aws=aws,
            cluster="c",
            emit=lambda _: None,
            clock=lambda: clock[0],
            sleep=lambda _: clock.__setitem__(0, clock[0] + timedelta(hours=1)),
            timeout=3600,
        )


@mock_aws
def test_status_shows_gpu_capacity_in_use_and_queued() -> None:
    cluster = SimulatedCluster([START])
    _platform()
    aws = make_aws()
    started = train.eks_manifests(
        aws, train.TrainOptions(on="eks", instance_count=2), now=START, warn=lambda _: None
    )
    train.apply_manifests(aws, started, cluster.apply)
    queued = gpu_cluster.capacity(gpu_cluster.Kubectl(cluster.run))
    assert (queued.nodes, queued.in_use, queued.queued, queued.queued_workloads) == (0, 0, 2, 1)
    for _ in range(5):
        cluster.advance(60)
    running = gpu_cluster.capacity(gpu_cluster.Kubectl(cluster.run))
    assert (running.nodes, running.total, running.in_use, running.queued) == (2, 2, 2, 0)
    report = status.gather(aws, kube=gpu_cluster.Kubectl(cluster.run))
    shown = status.render(report)
    assert "GPU capacity (EKS: Karpenter nodes, Kueue queues)\n" in shown
    for row in (
        r"GPU nodes +2 \(2 GPUs\)",
        r"GPUs in use +2",
        r"GPUs queued +0 \(0 workloads waiting\)",
        r"queue research-gpu +2 GPUs admitted, 0 pending",
    ):
        assert re.search(rf"^  {row}$", shown, flags=re.MULTILINE), row


@mock_aws
def test_status_without_a_kubeconfig_still_succeeds() -> None:
    _platform()
    report = status.gather(
        make_aws(), kube=gpu_cluster.Kubectl(lambda argv: (1, "", "error: no configuration"))
    )
    assert report.problems == [] or all("GPU" not in p for p in report.problems)
    assert report.gpu[0][0] == "unavailable" and "no configuration" in report.gpu[0][1]


@mock_aws
def test_unknown_team_is_refused_with_the_configured_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _platform()
    argv = ["train", "--env", "dev", "--on", "eks", "--team", "infra"]
    with redirect_stdout(io.StringIO()):
        assert main(argv) == 2
    assert "--team 'infra' is not a team of dev; configured: research, product" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("owners", "expected"),
    [
        # kiln's own Job: its name.
        (
            [{"kind": "Job", "name": "kiln-dev-llama-20261202-094348"}],
            "kiln-dev-llama-20261202-094348",
        ),
        # --operator trainer: JobSet makes the Job <run>-node-0, which owns the pods.
        ([{"kind": "Job", "name": "llama-node-0"}], "llama-node-0"),
        # A Job named like a CronJob's (a Unix time in minutes) loses the suffix.
        ([{"kind": "Job", "name": "nightly-29416320"}], "nightly"),
        # No controller: the pod's own name.
        ([], "llama-0-q8r4t"),
    ],
)
def test_insights_pod_name_follows_the_agents_rule(
    owners: list[dict[str, str]], expected: str
) -> None:
    pod = {"metadata": {"name": "llama-0-q8r4t", "ownerReferences": owners}}
    assert gpu_cluster.insights_pod_name(pod) == expected
