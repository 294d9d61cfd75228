"""Renders the Kubernetes objects of a multi-node torchrun training run on kiln's GPU nodes.

Without an operator (`operator="none"`) a run is an Indexed Job, one pod per node, plus a
headless Service that gives pod 0 a stable DNS name; torchrun's c10d rendezvous is hosted by
pod 0's agent on port 29400. With the Kubeflow training operator installed
(`operator="kubeflow"`) it is a `PyTorchJob` (kubeflow.org/v1) with Master and Worker replicas.

The trainer's contract: every pod runs `torchrun ... -m <module> <trainer args>` and finds

- `KILN_CHECKPOINT_DIR`: where checkpoints are written and resumed from (S3 URI or local path),
- `KILN_OUTPUT_DIR`: where the final `model.tar.gz` goes (S3 URI or local path),
- `KILN_JOB_NAME`: the run's name (tags metrics and checkpoints),

plus `FI_PROVIDER=efa` (and `FI_EFA_USE_DEVICE_RDMA=1` on GPUDirect RDMA types) when the pods
get EFA interfaces. Objects are plain dicts; `to_yaml` writes them as one multi-document YAML.
Remove an operator-less run with `kubectl delete job,service -l kiln.dev/training-job=<name>
-n <namespace>`: the Job's TTL removes the Job and its pods, not the Service.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeGuard, get_args

import yaml

from kiln.contract import (
    DO_NOT_DISRUPT,
    GPU_POOL_LABEL,
    GPU_TAINT,
    QUEUE_LABEL,
    TRAINING_JOB_LABEL,
    TrainerEnv,
)
from kiln.gpu_instances import GpuInstance, UnknownInstanceTypeError, lookup
from kiln.memory_plan import Plan, PlanError, advice, plan, resolve_shape, trainer_settings

Operator = Literal["none", "kubeflow"]
NcclDebug = Literal["VERSION", "WARN", "INFO", "TRACE"]

# The trainer reads these (`python -m training.train`).
CHECKPOINT_DIR_ENV = TrainerEnv.CHECKPOINT_DIR
OUTPUT_DIR_ENV = TrainerEnv.OUTPUT_DIR
JOB_NAME_ENV = TrainerEnv.JOB_NAME
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
RESERVED_ENV = frozenset({CHECKPOINT_DIR_ENV, OUTPUT_DIR_ENV, JOB_NAME_ENV, COMPLETION_INDEX_ENV})

# What the compute stack puts on the GPU node group (taint and labels).
GPU_TOLERATION = {**GPU_TAINT, "operator": "Equal"}
NODE_POOL_LABEL = GPU_POOL_LABEL
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
GPU_RESOURCE = "nvidia.com/gpu"
EFA_RESOURCE = "vpc.amazonaws.com/efa"
JOB_LABEL = TRAINING_JOB_LABEL

RENDEZVOUS_PORT = 29400
# EKS clusters always use this DNS domain; it cannot be changed there.
CLUSTER_DOMAIN = "cluster.local"
TRAINER_CONTAINER = "trainer"
# The training operator finds the container to configure, and its port, by these names.
KUBEFLOW_CONTAINER = "pytorch"
KUBEFLOW_PORT_NAME = "pytorchjob-port"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Service names are DNS-1035 labels (they start with a letter); the Job shares its name.
_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IMAGE_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_DNS_LABEL = 63


class TrainingJobError(ValueError):
    """Arguments that cannot make a training run; `problems` holds (argument, what to change)."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(f"{arg}: {message}" for arg, message in self.problems))


def _is_int(value: object) -> TypeGuard[int]:
    """An int that is not a bool (True would otherwise pass as 1 node)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _path_problem(value: object) -> str | None:
    """Why `value` is neither `s3://bucket[/prefix]` nor an absolute path, or None."""
    if not isinstance(value, str) or not value:
        return "give an S3 URI (s3://bucket/prefix) or an absolute path"
    if re.match(r"(?i)s3[an]?://", value):
        if not value.startswith("s3://"):
            return f"{value!r}: write S3 URIs as s3://bucket/prefix"
        bucket = value[len("s3://") :].split("/", 1)[0]
        if not _BUCKET.fullmatch(bucket) or ".." in bucket or _is_ip(bucket):
            return (
                f"{value!r}: {bucket!r} is not an S3 bucket name (3-63 lowercase letters, "
                "digits, '.' and '-', starting and ending with a letter or digit)"
            )
        return None
    if "://" in value:
        return f"{value!r}: only s3:// URIs and absolute paths are supported"
    if not value.startswith("/"):
        return f"{value!r} is neither an S3 URI (s3://bucket/prefix) nor an absolute path"
    return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _image_problem(image: object) -> str | None:
    if not isinstance(image, str) or not image or any(c.isspace() for c in image):
        example = "123456789012.dkr.ecr.us-east-1.amazonaws.com/kiln-trainer:1.4.0"
        return f"give an image reference such as {example}"
    # Every node must run the same code: a moving tag could differ between pods of one run.
    if "@" in image:
        if _DIGEST.fullmatch(image.split("@", 1)[1]):
            return None
        return f"{image!r}: the digest is not sha256:<64 hex>"
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"{image!r} has no tag; pin a version tag or a digest (@sha256:...)"
    tag = last.rsplit(":", 1)[1]
    if tag == "latest":
        return f"{image!r}: ':latest' moves; pin a version tag or a digest (@sha256:...)"
    if not _IMAGE_TAG.fullmatch(tag):
        return f"{image!r}: {tag!r} is not a valid image tag"
    return None


def _whole_problem(value: object, low: int, optional: bool = False) -> str | None:
    if optional and value is None:
        return None
    if _is_int(value) and value >= low:
        return None
    unset = ", or unset" if optional else ""
    return f"must be a whole number of at least {low}{unset}; got {value!r}"


def _choice(value: object, choices: Any, optional: bool = False) -> str | None:
    allowed: tuple[str, ...] = get_args(choices)
    if value in allowed or (optional and value is None):
        return None
    return f"{value!r} is not one of: {', '.join(allowed)}"


def _dns_label_problem(value: object) -> str | None:
    if isinstance(value, str) and len(value) <= _MAX_DNS_LABEL and _DNS_LABEL.fullmatch(value):
        return None
    return (
        f"{value!r} is not a DNS-1123 label (lowercase letters, digits and '-', starting "
        "and ending with a letter or digit, at most 63 characters)"
    )


def _module_problem(value: object) -> str | None:
    if isinstance(value, str) and _MODULE.fullmatch(value):
        return None
    return f"{value!r} is not a Python module path like training.train"


def _args_problem(values: Sequence[object]) -> str | None:
    if all(isinstance(v, str) for v in values):
        return None
    return f"every argument must be a string; got {list(values)!r}"


def _env_problem(env: Mapping[Any, object]) -> str | None:
    problems = []
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            problems.append(
                f"{key!r} is not an environment variable name (letters, digits and '_', "
                "not starting with a digit)"
            )
        elif key in RESERVED_ENV:
            problems.append(f"{key} is set by kiln (reserved: {', '.join(sorted(RESERVED_ENV))})")
        elif not isinstance(value, str):
            problems.append(f"{key}: the value must be a string; got {value!r}")
    return "; ".join(problems) or None


@dataclass(frozen=True, kw_only=True)
class TrainingJobSpec:
    """One multi-node training run, validated on creation (TrainingJobError lists every problem).

    `gpus_per_node` must divide the instance type's GPU count, so that the pods of a run pack
    whole nodes without stranding GPUs; on an EFA type, a multi-node run must also give each
    pod a whole number of EFA interfaces. `shm_size_gib` defaults to a quarter of the pod's
    memory, at most 64 GiB: /dev/shm is memory-backed and counts against the pod's memory.
    """

    name: str
    image: str
    instance_type: str
    nodes: int
    gpus_per_node: int
    checkpoint_path: str
    output_path: str
    namespace: str = "training"
    service_account: str = "trainer"
    module: str = "training.train"
    trainer_args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    shm_size_gib: int | None = None
    # Worker-group restarts torchrun makes in place (re-rendezvous, resume from checkpoint).
    max_restarts: int = 3
    # Pods of a run can start minutes apart (node scale-up, a large image pull): how long they
    # wait for pod 0's store and for each other before torchrun gives up (and the pod fails).
    rendezvous_timeout_seconds: int = 1800
    # SIGTERM gives the trainer this long to write a checkpoint (a spot notice is 120 s).
    termination_grace_seconds: int = 120
    active_deadline_seconds: int | None = None
    # Keeps a finished run's pods (and their logs) three days for inspection.
    ttl_seconds_after_finished: int = 3 * 24 * 3600
    nccl_debug: NcclDebug | None = None
    operator: Operator = "none"
    # The Kueue LocalQueue (in `namespace`) the run waits in; None: no queue (a cluster
    # without Kueue).
    queue: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.trainer_args, str | bytes):
            raise TrainingJobError([("trainer_args", "give a list of arguments, not one string")])
        object.__setattr__(self, "trainer_args", tuple(self.trainer_args))
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        problems = [(arg, message) for arg, message in self._checks() if message is not None]
        if problems:
            raise TrainingJobError(problems)

    def _checks(self) -> list[tuple[str, str | None]]:
        """(argument, what is wrong or None) for every argument, in the order they are listed."""
        return [
            ("operator", _choice(self.operator, Operator)),
            ("name", self._name_problem()),
            ("namespace", _dns_label_problem(self.namespace)),
            ("image", _image_problem(self.image)),
            ("nodes", _whole_problem(self.nodes, 1)),
            *self._instance_problems(),
            ("checkpoint_path", _path_problem(self.checkpoint_path)),
            ("output_path", _path_problem(self.output_path)),
            ("service_account", _dns_label_problem(self.service_account)),
            ("module", _module_problem(self.module)),
            ("trainer_args", _args_problem(self.trainer_args)),
            ("env", _env_problem(self.env)),
            ("max_restarts", _whole_problem(self.max_restarts, 0)),
            ("rendezvous_timeout_seconds", _whole_problem(self.rendezvous_timeout_seconds, 60)),
            ("termination_grace_seconds", _whole_problem(self.termination_grace_seconds, 0)),
            ("active_deadline_seconds", _whole_problem(self.active_deadline_seconds, 1, True)),
            ("ttl_seconds_after_finished", _whole_problem(self.ttl_seconds_after_finished, 0)),
            ("nccl_debug", _choice(self.nccl_debug, NcclDebug, optional=True)),
            ("queue", None if self.queue is None else _dns_label_problem(self.queue)),
        ]

    def _name_problem(self) -> str | None:
        name = self.name
        if not isinstance(name, str) or not _DNS_1035_LABEL.fullmatch(name):
            return (
                f"{name!r} is not a DNS-1035 label (lowercase letters, digits and '-', "
                "starting with a letter and ending with a letter or digit)"
            )
        # Pod hostnames are DNS labels too: `<name>-<index>`, or `<name>-worker-<index>`.
        last = max(self.nodes - 1, 0) if _is_int(self.nodes) else 0
        suffix = f"-worker-{max(last - 1, 0)}" if self.operator == "kubeflow" else f"-{last}"
        room = _MAX_DNS_LABEL - len(suffix)
        if len(name) > room:
            return (
                f"{name!r} is {len(name)} characters; the pod hostname '{name}{suffix}' "
                f"must fit in 63, so use at most {room}"
            )
        return None

    def _instance_problems(self) -> list[tuple[str, str | None]]:
        try:
            instance = lookup(self.instance_type)
        except UnknownInstanceTypeError as err:
            return [("instance_type", str(err))]
        gpus, have = self.gpus_per_node, instance.gpus
        allowed = ", ".join(map(str, _divisors(have)))
        if not _is_int(gpus) or gpus < 1:
            return [("gpus_per_node", f"must be at least 1; got {gpus!r}; allowed: {allowed}")]
        if gpus > have:
            message = f"{gpus} is more than {instance.name} has ({have}); allowed: {allowed}"
            return [("gpus_per_node", message)]
        if have % gpus:
            # The GPUs left over on each node could not hold another pod of this run.
            message = (
                f"{gpus} does not divide {instance.name}'s {have} GPUs, so some would sit "
                f"idle; allowed: {allowed}"
            )
            return [("gpus_per_node", message)]
        efa = instance.efa_interfaces
        if self._multi_node and (efa * gpus) % have:
            whole = ", ".join(str(d) for d in _divisors(have) if (efa * d) % have == 0)
            interfaces = f"{efa} EFA interface{'s' if efa > 1 else ''}"
            message = (
                f"{gpus} on {instance.name} ({have} GPUs sharing {interfaces}) leaves "
                f"each pod a fraction of an interface; a multi-node run needs whole ones: "
                f"allowed: {whole}"
            )
            return [("gpus_per_node", message)]
        memory, shm = self.pod_memory_gib, self.shm_size_gib
        if shm is not None and (not _is_int(shm) or not 1 <= shm <= memory // 2):
            message = (
                f"{shm!r} is outside 1..{memory // 2}: /dev/shm is memory and counts "
                f"against the pod's {memory} GiB"
            )
            return [("shm_size_gib", message)]
        return []

    @property
    def _multi_node(self) -> bool:
        return _is_int(self.nodes) and self.nodes > 1

    @property
    def instance(self) -> GpuInstance:
        """The catalog entry of `instance_type`."""
        return lookup(self.instance_type)

    @property
    def efa_per_pod(self) -> int:
        """EFA interfaces each pod requests: its share of the node's, and none on a single node
        (no traffic leaves the node, and the interfaces stay free for other pods)."""
        instance = self.instance
        if not self._multi_node:
            return 0
        return instance.efa_interfaces * self.gpus_per_node // instance.gpus

    @property
    def pod_cpu_millis(self) -> int:
        """The pod's share of the node's vCPUs after 1 vCPU + 5% for kubelet and DaemonSets."""
        instance = self.instance
        return (instance.vcpus * 950 - 1000) * self.gpus_per_node // instance.gpus

    @property
    def pod_memory_gib(self) -> int:
        """The pod's share of the node's memory after 2 GiB + 10% for the system and DaemonSets.

        The kernel, the NVIDIA driver, kubelet's reservation and eviction threshold, and the
        VPC CNI, kube-proxy, Pod Identity and device-plugin pods all live in that headroom.
        """
        instance = self.instance
        return (instance.memory_gib * 9 - 20) * self.gpus_per_node // (10 * instance.gpus)

    @property
    def shm_gib(self) -> int:
        """The size of /dev/shm: as given, or a quarter of the pod's memory up to 64 GiB."""
        if self.shm_size_gib is not None:
            return self.shm_size_gib
        return max(1, min(64, self.pod_memory_gib // 4))

    @property
    def service_name(self) -> str:
        """The headless Service (and pod subdomain) of an operator-less run: the run's name."""
        return self.name

    @property
    def rendezvous_endpoint(self) -> str:
        """Pod 0's fully qualified name and the c10d port.

        The full name matches the first name kubelet writes for pod 0 in its /etc/hosts, so
        torchrun on pod 0 knows it hosts the store without waiting for DNS to list it.
        """
        host = f"{self.name}-0.{self.service_name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"
        return f"{host}:{RENDEZVOUS_PORT}"

    @property
    def labels(self) -> dict[str, str]:
        """Labels on every object of the run; `kiln.dev/training-job` selects its pods."""
        return {
            "app.kubernetes.io/name": "kiln-trainer",
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/part-of": "kiln",
            JOB_LABEL: self.name,
        }


def pod_metadata(spec: TrainingJobSpec) -> dict[str, Any]:
    """The metadata of every pod template of a run, whatever object carries it (the one place
    it is written): the run's labels, its queue, and `karpenter.sh/do-not-disrupt`, so
    Karpenter never consolidates or drifts a node away under a running step."""
    return {
        "labels": workload_labels(spec),
        "annotations": {DO_NOT_DISRUPT: "true"},
    }


def workload_labels(spec: TrainingJobSpec) -> dict[str, str]:
    """Labels of the objects Kueue admits (and their pods): the run's, plus its LocalQueue."""
    labels = dict(spec.labels)
    if spec.queue is not None:
        labels[QUEUE_LABEL] = spec.queue
    return labels


def torchrun_command(spec: TrainingJobSpec, *, rendezvous_endpoint: str) -> list[str]:
    """The container's command line: torchrun with c10d rendezvous, then the trainer module.

    No `--node_rank`: c10d assigns node ranks in rendezvous order and torchrun ignores (and
    warns about) the flag for every backend but `static`.
    """
    timeout = spec.rendezvous_timeout_seconds
    return [
        "torchrun",
        f"--nnodes={spec.nodes}",
        f"--nproc_per_node={spec.gpus_per_node}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={rendezvous_endpoint}",
        f"--rdzv_id={spec.name}",
        # read_timeout also bounds the wait for pod 0's store: its 60 s default would fail the
        # other pods, and spend the Job's backoffLimit, whenever pod 0 starts late.
        f"--rdzv_conf=join_timeout={timeout},read_timeout={timeout}",
        f"--max_restarts={spec.max_restarts}",
        "-m",
        spec.module,
        *spec.trainer_args,
    ]


def _env(spec: TrainingJobSpec, *, indexed: bool) -> list[dict[str, Any]]:
    env: dict[str, dict[str, Any]] = {}

    def put(name: str, value: str) -> None:
        env[name] = {"name": name, "value": value}

    if indexed:
        # The Job controller sets this too; declared so the trainer and `$(...)` in arguments
        # can rely on it (the controller leaves a declared one alone).
        index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        env[COMPLETION_INDEX_ENV] = {
            "name": COMPLETION_INDEX_ENV,
            "valueFrom": {"fieldRef": {"fieldPath": index}},
        }
    put(JOB_NAME_ENV, spec.name)
    put(CHECKPOINT_DIR_ENV, spec.checkpoint_path)
    put(OUTPUT_DIR_ENV, spec.output_path)
    put("PYTHONUNBUFFERED", "1")  # log lines reach `kubectl logs` as they are written
    if spec.efa_per_pod:
        put("FI_PROVIDER", "efa")
        if spec.instance.gpudirect_rdma:
            put("FI_EFA_USE_DEVICE_RDMA", "1")
    if spec.nccl_debug is not None:
        put("NCCL_DEBUG", spec.nccl_debug)
    for name, value in spec.env.items():  # the caller's values win over kiln's defaults
        put(name, value)
    return list(env.values())


def _resources(spec: TrainingJobSpec) -> dict[str, Any]:
    gpus = str(spec.gpus_per_node)
    memory = f"{spec.pod_memory_gib}Gi"
    requests = {"cpu": f"{spec.pod_cpu_millis}m", "memory": memory, GPU_RESOURCE: gpus}
    # Memory limit = request: the OOM killer picks this pod, not a neighbour. No CPU limit:
    # throttled data loaders would starve the GPUs, and the request already reserves the share.
    limits = {"memory": memory, GPU_RESOURCE: gpus}
    if spec.efa_per_pod:
        requests[EFA_RESOURCE] = limits[EFA_RESOURCE] = str(spec.efa_per_pod)
    return {"requests": requests, "limits": limits}


def _pod_template(
    spec: TrainingJobSpec, *, container: str, port_name: str, endpoint: str, indexed: bool
) -> dict[str, Any]:
    # Indexed Job pods are named `<job>-<index>`; the subdomain makes them `<job>-<index>.<svc>`.
    # The training operator sets the restart policy and hostnames of its own pods.
    pod: dict[str, Any] = (
        {"restartPolicy": "Never", "subdomain": spec.service_name} if indexed else {}
    )
    pod |= {
        "serviceAccountName": spec.service_account,
        "terminationGracePeriodSeconds": spec.termination_grace_seconds,
        "enableServiceLinks": False,
        "nodeSelector": {
            NODE_POOL_LABEL[0]: NODE_POOL_LABEL[1],
            INSTANCE_TYPE_LABEL: spec.instance_type,
        },
        "tolerations": [dict(GPU_TOLERATION)],
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": container,
                "image": spec.image,
                "imagePullPolicy": "IfNotPresent",
                "command": torchrun_command(spec, rendezvous_endpoint=endpoint),
                "env": _env(spec, indexed=indexed),
                "ports": [{"name": port_name, "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}],
                "resources": _resources(spec),
                "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        # Docker's 64 MiB /dev/shm is too small for NCCL and DataLoader worker queues.
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{spec.shm_gib}Gi"}}
        ],
    }
    return {"metadata": pod_metadata(spec), "spec": pod}


def _metadata(spec: TrainingJobSpec, name: str, *, workload: bool = True) -> dict[str, Any]:
    labels = workload_labels(spec) if workload else dict(spec.labels)
    return {"name": name, "namespace": spec.namespace, "labels": labels}


def headless_service(spec: TrainingJobSpec) -> dict[str, Any]:
    """The Service that publishes `<job>-<index>.<service>` for every pod of the run."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, spec.service_name, workload=False),
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_LABEL: spec.name},
            # Names resolve as soon as pods have addresses: rendezvous starts before readiness.
            "publishNotReadyAddresses": True,
            "ports": [
                {
                    "name": "c10d",
                    "port": RENDEZVOUS_PORT,
                    "targetPort": RENDEZVOUS_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def indexed_job(spec: TrainingJobSpec) -> dict[str, Any]:
    """The Indexed Job: one pod per node, index 0 hosting the rendezvous."""
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.nodes,
        "parallelism": spec.nodes,
        # A whole-group failure fails every pod once, so each restart may cost `nodes` failures.
        "backoffLimit": spec.max_restarts * spec.nodes,
        "podFailurePolicy": {
            "rules": [
                # Evictions, preemptions, node drains and spot reclaims are not the run's fault:
                # the replacement pod resumes from the last checkpoint.
                {
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
            ]
        },
        # A replacement starts only after the old pod is gone: two pods with one hostname would
        # confuse the rendezvous, and the old one may still be writing its checkpoint.
        "podReplacementPolicy": "Failed",
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
        "template": _pod_template(
            spec,
            container=TRAINER_CONTAINER,
            port_name="c10d",
            endpoint=spec.rendezvous_endpoint,
            indexed=True,
        ),
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(spec, spec.name),
        "spec": job_spec,
    }


def pytorch_job(spec: TrainingJobSpec) -> dict[str, Any]:
    """The Kubeflow PyTorchJob: Master is node 0, Workers the rest.

    The operator creates a Service per replica and sets MASTER_ADDR/MASTER_PORT to the master's;
    the master's hostname is that address, so its torchrun hosts the c10d store.
    """
    template = _pod_template(
        spec,
        container=KUBEFLOW_CONTAINER,
        port_name=KUBEFLOW_PORT_NAME,
        endpoint="$(MASTER_ADDR):$(MASTER_PORT)",
        indexed=False,
    )
    # OnFailure: a failed container restarts in place and a lost pod is recreated, each counted
    # against runPolicy.backoffLimit, sized by the same rule as the Job's backoffLimit.
    replicas: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}
    }
    if spec.nodes > 1:
        replicas["Worker"] = {
            "replicas": spec.nodes - 1,
            "restartPolicy": "OnFailure",
            "template": template,
        }
    run_policy: dict[str, Any] = {
        # Pods still running when the job ends (a hung worker) are deleted.
        "cleanPodPolicy": "Running",
        "backoffLimit": spec.max_restarts * spec.nodes,
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
    }
    if spec.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(spec, spec.name),
        "spec": {"runPolicy": run_policy, "pytorchReplicaSpecs": replicas},
    }


def render(spec: TrainingJobSpec) -> list[dict[str, Any]]:
    """Every object of the run, in apply order (the Service before the pods that need it)."""
    if spec.operator == "kubeflow":
        return [pytorch_job(spec)]
    return [headless_service(spec), indexed_job(spec)]


def to_yaml(manifests: Sequence[Mapping[str, Any]]) -> str:
    """The objects as one multi-document YAML stream, keys in the order they were built."""
    return yaml.safe_dump_all(
        [dict(m) for m in manifests], sort_keys=False, default_flow_style=False
    )


# --- the memory plan ---------------------------------------------------------------------

# The trainer's own presets (`--model`); other shapes are for the plan alone.
TRAINER_PRESETS = ("tiny", "small", "base", "1b")


def memory_plan(
    model: str | None, instance_type: str, world: int, trainer_args: Sequence[str]
) -> Plan:
    """The run's memory plan: the model (a shape name or a local directory; default what the
    trainer arguments name, else the trainer's default preset) at the trainer's micro-batch,
    sequence length, strategy, checkpointing and adapters."""
    settings = trainer_settings(list(trainer_args))
    name = model or settings.pop("model") or "small"
    settings.pop("model", None)
    return plan(resolve_shape(name), lookup(instance_type), world=world, **settings)


def model_trainer_args(model: str | None, trainer_args: Sequence[str]) -> list[str]:
    """`--model` for the trainer when a trainer preset or an S3 model directory was given and
    the trainer arguments name no model themselves."""
    args = list(trainer_args)
    if model is None or any(a.split("=")[0] in ("--model", "--init-from") for a in args):
        return args
    if model in TRAINER_PRESETS:
        return ["--model", model, *args]
    if model.startswith("s3://"):
        return ["--init-from", model, *args]
    return args


def plan_problem(p: Plan, gpus_per_node: int) -> str | None:
    """Why the run is refused (None when it fits)."""
    if p.fits:
        return None
    gib = 1 << 30
    return (
        f"{p.shape.name} needs {p.total / gib:.1f} GiB per GPU with {p.strategy} on "
        f"{p.world} x {p.instance.gpu_model}, which have {p.capacity / gib:.1f} GiB usable: "
        f"{advice(p, gpus_per_node=gpus_per_node)}"
    )


# --- command line --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `kiln training-job`; trainer arguments follow `--`."""
    required = parser.add_argument_group("required")
    required.add_argument("--name", required=True, help="run name; also the Job and Service name")
    required.add_argument("--image", required=True, help="trainer image, with a tag or digest")
    required.add_argument("--instance-type", required=True, help="GPU node type, e.g. p4d.24xlarge")
    required.add_argument("--nodes", type=int, required=True, help="number of nodes (pods)")
    required.add_argument("--checkpoint-path", required=True, help="S3 URI or absolute path")
    required.add_argument("--output-path", required=True, help="S3 URI or absolute path")
    parser.add_argument(
        "--gpus-per-node", type=int, help="GPUs per pod (default: every GPU of the instance type)"
    )
    parser.add_argument("--namespace", default="training", help="default: %(default)s")
    parser.add_argument("--service-account", default="trainer", help="default: %(default)s")
    parser.add_argument("--module", default="training.train", help="default: %(default)s")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment variable for the trainer (repeatable)",
    )
    parser.add_argument(
        "--shm-size-gib", type=int, help="default: a quarter of the pod's memory, at most 64"
    )
    parser.add_argument("--max-restarts", type=int, default=3, help="default: %(default)s")
    parser.add_argument(
        "--rendezvous-timeout-seconds", type=int, default=1800, help="default: %(default)s"
    )
    parser.add_argument(
        "--termination-grace-seconds", type=int, default=120, help="default: %(default)s"
    )
    parser.add_argument("--active-deadline-seconds", type=int, help="default: no deadline")
    parser.add_argument(
        "--ttl-seconds-after-finished", type=int, default=3 * 24 * 3600, help="default: %(default)s"
    )
    parser.add_argument("--nccl-debug", choices=get_args(NcclDebug), help="default: unset")
    parser.add_argument(
        "--queue",
        help="Kueue LocalQueue in --namespace the run waits in (default: none, no Kueue)",
    )
    parser.add_argument(
        "--operator",
        choices=get_args(Operator),
        default="none",
        help="none: Indexed Job + headless Service; kubeflow: PyTorchJob (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        help="model for the memory plan: a shape (tiny, small, base, 1b, llama-3-8b, "
        "llama-3-70b, ...) or a local Hugging Face directory; a trainer preset or an s3:// "
        "directory is also passed to the trainer (default: what the trainer arguments name)",
    )
    parser.add_argument(
        "trainer_args",
        nargs="*",
        metavar="TRAINER_ARG",
        help="arguments for the trainer module, after --",
    )


def _flag(arg: str) -> str:
    return "TRAINER_ARG" if arg == "trainer_args" else "--" + arg.replace("_", "-")


def render_command(args: argparse.Namespace) -> int:
    """Prints the run's objects as YAML; bad arguments print what to change and return 2."""
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"kiln training-job: --env: {item!r} is not NAME=VALUE", file=sys.stderr)
            return 2
        env[name] = value
    gpus = args.gpus_per_node
    if gpus is None:
        try:
            gpus = lookup(args.instance_type).gpus
        except UnknownInstanceTypeError:
            gpus = 1  # the spec reports the unknown type
    try:
        spec = TrainingJobSpec(
            name=args.name,
            image=args.image,
            instance_type=args.instance_type,
            nodes=args.nodes,
            gpus_per_node=gpus,
            checkpoint_path=args.checkpoint_path,
            output_path=args.output_path,
            namespace=args.namespace,
            service_account=args.service_account,
            module=args.module,
            trainer_args=model_trainer_args(args.model, args.trainer_args),
            env=env,
            shm_size_gib=args.shm_size_gib,
            max_restarts=args.max_restarts,
            rendezvous_timeout_seconds=args.rendezvous_timeout_seconds,
            termination_grace_seconds=args.termination_grace_seconds,
            active_deadline_seconds=args.active_deadline_seconds,
            ttl_seconds_after_finished=args.ttl_seconds_after_finished,
            nccl_debug=args.nccl_debug,
            operator=args.operator,
            queue=args.queue,
        )
    except TrainingJobError as err:
        for arg, message in err.problems:
            print(f"kiln training-job: {_flag(arg)}: {message}", file=sys.stderr)
        return 2
    try:
        p = memory_plan(
            args.model, spec.instance_type, spec.nodes * spec.gpus_per_node, spec.trainer_args
        )
    except (PlanError, ValueError) as err:
        print(f"kiln training-job: --model: {err}", file=sys.stderr)
        return 2
    sys.stderr.write(p.render())
    if (problem := plan_problem(p, spec.gpus_per_node)) is not None:
        print(f"kiln training-job: refused: {problem}", file=sys.stderr)
        return 2
    sys.stdout.write(to_yaml(render(spec)))
    return 0
