"""What the GPU cluster is doing for a training run, read with kubectl: its place in the Kueue
queue and its admission, the nodes Karpenter brings up for it, its pods, and its GPU utilization
from Container Insights; and for `kiln status`, GPU capacity in use and queued."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kiln.contract import (
    CONTAINER_INSIGHTS,
    GPU_JOB_DIMENSIONS,
    GPU_POOL_LABEL,
    POD_GPU_UTILIZATION,
    TRAINING_JOB_LABEL,
    cronjob_like_job_name,
)
from kiln_cli.operate.aws import Aws, OperateError

GPU = "nvidia.com/gpu"
VISIBILITY = "/apis/visibility.kueue.x-k8s.io/v1beta1"

Run = Callable[[Sequence[str]], tuple[int, str, str]]


def run_kubectl(argv: Sequence[str]) -> tuple[int, str, str]:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return 127, "", "kubectl is not on PATH"
    return done.returncode, done.stdout, done.stderr


class Kubectl:
    """`kubectl get ... -o json` and `kubectl get --raw`, parsed; `run` is swappable (tests
    give it a simulated cluster)."""

    def __init__(self, run: Run = run_kubectl) -> None:
        self.run = run

    def _json(self, argv: list[str]) -> Any:
        code, out, err = self.run(["kubectl", "--request-timeout=20s", *argv])
        if code != 0:
            last = (err.strip().splitlines() or [f"exit {code}"])[-1]
            raise OperateError(f"kubectl {' '.join(argv)} failed: {last}")
        return json.loads(out)

    def get(
        self, resource: str, *, namespace: str | None = None, selector: str | None = None
    ) -> list[dict[str, Any]]:
        argv = ["get", resource, "-o", "json"]
        argv += ["-n", namespace] if namespace else ["--all-namespaces"]
        if selector:
            argv += ["-l", selector]
        items: list[dict[str, Any]] = self._json(argv)["items"]
        return items

    def raw(self, path: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json(["get", "--raw", path])
        return result


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in obj.get("status", {}).get("conditions", []):
        if condition.get("type") == kind and condition.get("status") == "True":
            return dict(condition)
    return None


def _gpus(pod_spec: dict[str, Any]) -> int:
    return sum(
        int(c.get("resources", {}).get("requests", {}).get(GPU, 0))
        for c in pod_spec.get("containers", [])
    )


def workload_of(kube: Kubectl, namespace: str, job: str) -> dict[str, Any] | None:
    """Kueue's Workload for the run: the one its job object owns."""
    for workload in kube.get("workloads.kueue.x-k8s.io", namespace=namespace):
        owners = workload.get("metadata", {}).get("ownerReferences", [])
        if any(o.get("name") == job for o in owners):
            return workload
    return None


def queue_position(kube: Kubectl, namespace: str, queue: str, workload: str) -> int | None:
    """The workload's 0-based place among the LocalQueue's pending workloads (Kueue's
    visibility API), or None when it is not listed."""
    pending = kube.raw(f"{VISIBILITY}/namespaces/{namespace}/localqueues/{queue}/pendingworkloads")
    for item in pending.get("items", []):
        if item.get("metadata", {}).get("name") == workload:
            return int(item.get("positionInLocalQueue", 0))
    return None


def insights_pod_name(pod: dict[str, Any]) -> str:
    """The PodName Container Insights reports a pod's metrics under, by the add-on's agent's
    rule with enhanced observability on: a Job's pod gets the Job's name (the JobSet of
    `--operator trainer` makes one Job per replicated job, `<run>-node-0`), or the CronJob's
    where the Job's name ends like a CronJob's; a pod no controller owns keeps its own name."""
    for owner in pod.get("metadata", {}).get("ownerReferences", []):
        if owner.get("kind") == "Job" and owner.get("name"):
            name = str(owner["name"])
            return name.rsplit("-", 1)[0] if cronjob_like_job_name(name) else name
    return str(pod.get("metadata", {}).get("name", ""))


def gpu_utilization(
    aws: Aws, cluster: str, namespace: str, pod_names: Sequence[str], now: datetime
) -> float | None:
    """The run's average GPU utilization (%) over the last 5 minutes, from Container Insights'
    pod_gpu_utilization under (ClusterName, Namespace, PodName) for each of the run's PodNames
    (`insights_pod_name`; kiln.contract, GPU metrics of a training job), or None."""
    answer = aws.call(
        "cloudwatch",
        "get_metric_data",
        MetricDataQueries=[
            {
                "Id": f"util{index}",
                "MetricStat": {
                    "Metric": {
                        "Namespace": CONTAINER_INSIGHTS,
                        "MetricName": POD_GPU_UTILIZATION,
                        "Dimensions": [
                            {"Name": name, "Value": value}
                            for name, value in zip(
                                GPU_JOB_DIMENSIONS, (cluster, namespace, pod_name), strict=True
                            )
                        ],
                    },
                    "Period": 60,
                    "Stat": "Average",
                },
            }
            for index, pod_name in enumerate(sorted(set(pod_names)))
        ],
        StartTime=now - timedelta(minutes=5),
        EndTime=now,
    )
    values = [v for r in answer.get("MetricDataResults", []) for v in r.get("Values", [])]
    return sum(values) / len(values) if values else None


@dataclass
class RunWatch:
    """Turns successive looks at the cluster into the lines a person follows: each event once."""

    kube: Kubectl
    namespace: str
    queue: str
    job: str
    started: datetime
    seen: set[str] = field(default_factory=set)
    position: int | None = -1
    # The PodNames Container Insights reports the run's running pods under.
    series: list[str] = field(default_factory=list)

    def _once(self, key: str, line: str) -> Iterator[str]:
        if key not in self.seen:
            self.seen.add(key)
            yield line

    def look(self) -> tuple[list[str], str]:
        """(new event lines, state): state is queued, admitted, running, succeeded or failed."""
        lines: list[str] = []
        workload = workload_of(self.kube, self.namespace, self.job)
        if workload is None:
            return list(self._once("created", "submitted; waiting for Kueue to queue it")), "queued"
        name = workload["metadata"]["name"]
        if _condition(workload, "Finished"):
            finished = _condition(workload, "Finished") or {}
            ok = (
                finished.get("reason") in ("Succeeded", "JobFinished")
                and "fail" not in str(finished.get("message", "")).lower()
            )
            state = "succeeded" if ok else "failed"
            lines += self._once("finished", f"{state}: {finished.get('message', '')}".rstrip(": "))
            return lines, state
        evicted = _condition(workload, "Evicted")
        if evicted:
            lines += self._once(
                f"evicted-{evicted.get('lastTransitionTime')}",
                f"evicted and requeued: {evicted.get('message', evicted.get('reason'))}",
            )
        admitted = _condition(workload, "Admitted")
        if not admitted:
            position = queue_position(self.kube, self.namespace, self.queue, name)
            if position != self.position:
                self.position = position
                where = f"{self.namespace}/{self.queue}"
                if position is None:
                    lines.append(f"queued in {where}; waiting for quota")
                else:
                    ahead = f"{position} ahead" if position else "next in line"
                    lines.append(f"queued in {where}: position {position + 1} ({ahead})")
            return lines, "queued"
        admission = workload.get("status", {}).get("admission", {})
        gpus = sum(
            int(p.get("resourceUsage", {}).get(GPU, 0))
            for p in admission.get("podSetAssignments", [])
        )
        lines += self._once(
            "admitted",
            f"admitted by cluster queue {admission.get('clusterQueue', '?')}: {gpus} GPUs "
            "reserved, all pods at once",
        )
        lines += self._nodes()
        pods = self.kube.get(
            "pods", namespace=self.namespace, selector=f"{TRAINING_JOB_LABEL}={self.job}"
        )
        running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
        self.series = sorted({insights_pod_name(p) for p in running})
        for pod in pods:
            node = pod.get("spec", {}).get("nodeName")
            if node:
                lines += self._once(
                    f"bound-{pod['metadata']['name']}",
                    f"pod {pod['metadata']['name']} scheduled on {node}",
                )
        if pods and len(running) == len(pods):
            lines += self._once("running", f"running: {len(running)}/{len(pods)} pods")
            return lines, "running"
        return lines, "admitted"

    def _nodes(self) -> Iterator[str]:
        """Karpenter's NodeClaims made since the run started, as they launch and register."""
        for claim in self.kube.get("nodeclaims.karpenter.sh"):
            meta = claim.get("metadata", {})
            created = datetime.fromisoformat(meta.get("creationTimestamp", "1970-01-01T00:00:00Z"))
            if created < self.started:
                continue
            labels = meta.get("labels", {})
            kind = labels.get("node.kubernetes.io/instance-type", "?")
            capacity = labels.get("karpenter.sh/capacity-type", "?")
            zone = labels.get("topology.kubernetes.io/zone", "?")
            if _condition(claim, "Launched"):
                yield from self._once(
                    f"launched-{meta['name']}",
                    f"node claim {meta['name']}: launched {kind} ({capacity}) in {zone}",
                )
            if _condition(claim, "Initialized"):
                node = claim.get("status", {}).get("nodeName", "?")
                gpus = claim.get("status", {}).get("allocatable", {}).get(GPU, "?")
                yield from self._once(
                    f"ready-{meta['name']}", f"node {node} ready ({kind}, {gpus} GPUs)"
                )


def follow_run(
    watch: RunWatch,
    *,
    aws: Aws,
    cluster: str,
    emit: Callable[[str], None],
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    sleep: Callable[[float], None],
    interval: float = 30.0,
    timeout: float = 24 * 3600,
    until: str = "succeeded",
) -> str:
    """Prints each event as it happens (with the time), and the run's GPU utilization every
    few minutes while it runs; returns the last state. `until="running"` stops once the pods
    run."""
    deadline = clock() + timedelta(seconds=timeout)
    last_util: datetime | None = None
    while True:
        now = clock()
        lines, state = watch.look()
        for line in lines:
            emit(f"{now:%H:%M:%S} {line}")
        if state == "running" and (last_util is None or now - last_util >= timedelta(minutes=5)):
            util = gpu_utilization(aws, cluster, watch.namespace, watch.series or [watch.job], now)
            last_util = now
            shown = "no samples yet" if util is None else f"{util:.0f}%"
            emit(f"{now:%H:%M:%S} GPU utilization (5 min average): {shown}")
        if state in ("succeeded", "failed") or (until == "running" and state == "running"):
            return state
        if now >= deadline:
            raise OperateError(f"{watch.job} still {state} after {timeout / 3600:.1f} h")
        sleep(interval)


@dataclass(frozen=True)
class GpuCapacity:
    """GPUs on the GPU nodes, held by pods, and asked for by workloads still queued."""

    nodes: int
    total: int
    in_use: int
    queued: int
    queued_workloads: int
    per_queue: list[tuple[str, int, int]]  # (cluster queue, GPUs admitted, workloads pending)

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("GPU nodes", f"{self.nodes} ({self.total} GPUs)"),
            ("GPUs in use", str(self.in_use)),
            ("GPUs queued", f"{self.queued} ({self.queued_workloads} workloads waiting)"),
            *(
                (f"queue {name}", f"{admitted} GPUs admitted, {pending} pending")
                for name, admitted, pending in self.per_queue
            ),
        ]


def capacity(kube: Kubectl) -> GpuCapacity:
    nodes = kube.get("nodes", selector=f"{GPU_POOL_LABEL[0]}={GPU_POOL_LABEL[1]}")
    names = {n["metadata"]["name"] for n in nodes}
    total = sum(int(n.get("status", {}).get("allocatable", {}).get(GPU, 0)) for n in nodes)
    in_use = sum(
        _gpus(p.get("spec", {}))
        for p in kube.get("pods")
        if p.get("spec", {}).get("nodeName") in names
        and p.get("status", {}).get("phase") in ("Running", "Pending")
    )
    queued = waiting = 0
    for workload in kube.get("workloads.kueue.x-k8s.io"):
        if _condition(workload, "QuotaReserved") or _condition(workload, "Finished"):
            continue
        waiting += 1
        for pod_set in workload.get("spec", {}).get("podSets", []):
            queued += int(pod_set.get("count", 1)) * _gpus(
                pod_set.get("template", {}).get("spec", {})
            )
    per_queue = []
    for queue in kube.get("clusterqueues.kueue.x-k8s.io"):
        status = queue.get("status", {})
        admitted = sum(
            int(r.get("total", 0))
            for f in status.get("flavorsUsage", [])
            for r in f.get("resources", [])
            if r.get("name") == GPU
        )
        per_queue.append(
            (queue["metadata"]["name"], admitted, int(status.get("pendingWorkloads", 0)))
        )
    return GpuCapacity(len(nodes), total, in_use, queued, waiting, per_queue)
