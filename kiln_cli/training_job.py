"""Renders the Kubernetes objects of a multi-node torchrun training run on kiln's GPU nodes.

Without an operator (`operator="none"`) a run is an Indexed Job, one pod per node, plus a
headless Service that gives pod 0 a stable DNS name; torchrun's c10d rendezvous is hosted by
pod 0's agent on port 29400. With Kubeflow Trainer v2 installed (`operator="trainer"`,
validated against release `TRAINER_RELEASE`) it is a `TrainJob` (trainer.kubeflow.org/v1alpha1)
and the namespaced `TrainingRuntime` it references: the same pod template and Job failure
policy as the Indexed Job, inside the runtime's JobSet template, one runtime per run so that a
run's settings never change under another's. The Kubeflow training operator's `PyTorchJob`
(kubeflow.org/v1, `operator="kubeflow"`) is retired upstream and refused with a pointer here.

The trainer's contract: every pod runs `torchrun ... -m <module> <trainer args>` and finds

- `KILN_CHECKPOINT_DIR`: where checkpoints are written and resumed from (S3 URI or local path),
- `KILN_OUTPUT_DIR`: where the final `model.tar.gz` goes (S3 URI or local path),
- `KILN_JOB_NAME`: the run's name (tags metrics and checkpoints),

plus `FI_PROVIDER=efa` (and `FI_EFA_USE_DEVICE_RDMA=1` on GPUDirect RDMA types) when the pods
get EFA interfaces. Objects are plain dicts; `to_yaml` writes them as one multi-document YAML.
Remove an operator-less run with `kubectl delete job,service -l kiln.dev/training-job=<name>
-n <namespace>` (the Job's TTL removes the Job and its pods, not the Service), a Trainer run
with `kubectl delete trainjob,trainingruntime -l kiln.dev/training-job=<name> -n <namespace>`.

Labels and annotations reach the objects through two helpers only: `workload_metadata` (the
object a queue admits: the Job or the TrainJob) and `pod_metadata` (every pod template), fed by
the spec's `workload_labels` and `pod_annotations` (a Kueue queue name, Karpenter's
do-not-disrupt).
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal, TypeGuard, get_args

import yaml

from kiln.contract import GPU_POOL_LABEL, GPU_TAINT, TrainerEnv, cronjob_like_job_name
from kiln.gpu_instances import GpuInstance, UnknownInstanceTypeError, lookup
from kiln.memory_plan import (
    Plan,
    PlanError,
    ReadS3,
    advice,
    plan,
    resolve_shape,
    trainer_settings,
)

Operator = Literal["none", "trainer"]
# Operators kiln rendered once, and what to use instead.
RETIRED_OPERATORS = {
    "kubeflow": (
        "the Kubeflow training operator's PyTorchJob (kubeflow.org/v1) is retired in favour of "
        "Kubeflow Trainer v2; install Trainer {release} and use --operator trainer (TrainJob), "
        "or --operator none (Indexed Job, no operator needed)"
    ),
}
NcclDebug = Literal["VERSION", "WARN", "INFO", "TRACE"]

# The trainer reads these (`python -m training.train`).
CHECKPOINT_DIR_ENV = TrainerEnv.CHECKPOINT_DIR
OUTPUT_DIR_ENV = TrainerEnv.OUTPUT_DIR
JOB_NAME_ENV = TrainerEnv.JOB_NAME
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
# torchrun reads PET_<FLAG> as the default of --<flag>; Trainer v2 sets these five itself.
TORCHRUN_ENV = frozenset(
    {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
)
RESERVED_ENV = (
    frozenset({CHECKPOINT_DIR_ENV, OUTPUT_DIR_ENV, JOB_NAME_ENV, COMPLETION_INDEX_ENV})
    | TORCHRUN_ENV
)

# What the compute stack puts on the GPU node group (taint and labels).
GPU_TOLERATION = {**GPU_TAINT, "operator": "Equal"}
NODE_POOL_LABEL = GPU_POOL_LABEL
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
GPU_RESOURCE = "nvidia.com/gpu"
EFA_RESOURCE = "vpc.amazonaws.com/efa"
JOB_LABEL = "kiln.dev/training-job"

RENDEZVOUS_PORT = 29400
# EKS clusters always use this DNS domain; it cannot be changed there.
CLUSTER_DOMAIN = "cluster.local"
TRAINER_CONTAINER = "trainer"

# Kubeflow Trainer v2: the release whose CRDs the tests validate against (tests/kiln_cli/schemas).
TRAINER_RELEASE = "v2.3.0"
TRAINER_API_GROUP = "trainer.kubeflow.org"
TRAINER_API_VERSION = f"{TRAINER_API_GROUP}/v1alpha1"
# The trainer configures the container named `node` of the replicated job that carries this
# ancestor label: it sets its PET_* env, and its pods are `<run>-node-0-<index>.<run>`.
TRAINER_NODE = "node"
TRAINER_ANCESTOR_LABEL = (f"{TRAINER_API_GROUP}/trainjob-ancestor-step", "trainer")

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Service names are DNS-1035 labels (they start with a letter); the Job shares its name.
_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IMAGE_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# A label or annotation key: an optional DNS-subdomain prefix and a name of up to 63 characters.
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
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


def _operator_problem(value: object) -> str | None:
    if isinstance(value, str) and value in RETIRED_OPERATORS:
        return RETIRED_OPERATORS[value].format(release=TRAINER_RELEASE)
    return _choice(value, Operator)


def _key_problem(key: object) -> str | None:
    """Why `key` is not a Kubernetes label or annotation key, or None."""
    if not isinstance(key, str):
        return f"{key!r} is not a string"
    prefix, slash, name = key.rpartition("/")
    if slash and not (len(prefix) <= 253 and _DNS_SUBDOMAIN.fullmatch(prefix)):
        return f"{key!r}: the prefix {prefix!r} is not a DNS subdomain"
    if not _QUALIFIED_NAME.fullmatch(name):
        return (
            f"{key!r}: the name {name!r} must be 1-63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def _metadata_problem(values: Mapping[Any, object], *, labels: bool) -> str | None:
    problems = []
    for key, value in values.items():
        if (problem := _key_problem(key)) is not None:
            problems.append(problem)
        elif isinstance(key, str) and key.startswith("kiln.dev/"):
            problems.append(f"{key}: the kiln.dev/ prefix is kiln's own")
        elif not isinstance(value, str):
            problems.append(f"{key}: the value must be a string; got {value!r}")
        elif labels and not _LABEL_VALUE.fullmatch(value):
            problems.append(
                f"{key}: {value!r} is not a label value (at most 63 letters, digits, '-', '_' "
                "or '.', starting and ending with a letter or digit)"
            )
    return "; ".join(problems) or None


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
    # Labels for the object a queue admits (the Job, or the TrainJob), e.g. Kueue's queue name.
    workload_labels: Mapping[str, str] = field(default_factory=dict)
    # Annotations on every pod, e.g. Karpenter's `karpenter.sh/do-not-disrupt`.
    pod_annotations: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.trainer_args, str | bytes):
            raise TrainingJobError([("trainer_args", "give a list of arguments, not one string")])
        object.__setattr__(self, "trainer_args", tuple(self.trainer_args))
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        object.__setattr__(self, "workload_labels", MappingProxyType(dict(self.workload_labels)))
        object.__setattr__(self, "pod_annotations", MappingProxyType(dict(self.pod_annotations)))
        problems = [(arg, message) for arg, message in self._checks() if message is not None]
        if problems:
            raise TrainingJobError(problems)

    def _checks(self) -> list[tuple[str, str | None]]:
        """(argument, what is wrong or None) for every argument, in the order they are listed."""
        return [
            ("operator", _operator_problem(self.operator)),
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
            ("workload_labels", _metadata_problem(self.workload_labels, labels=True)),
            ("pod_annotations", _metadata_problem(self.pod_annotations, labels=False)),
        ]

    def _name_problem(self) -> str | None:
        name = self.name
        if not isinstance(name, str) or not _DNS_1035_LABEL.fullmatch(name):
            return (
                f"{name!r} is not a DNS-1035 label (lowercase letters, digits and '-', "
                "starting with a letter and ending with a letter or digit)"
            )
        # Pod hostnames are DNS labels too: `<name>-<index>`, or the JobSet's
        # `<name>-node-0-<index>` under the trainer.
        last = max(self.nodes - 1, 0) if _is_int(self.nodes) else 0
        suffix = f"-{TRAINER_NODE}-0-{last}" if self.operator == "trainer" else f"-{last}"
        room = _MAX_DNS_LABEL - len(suffix)
        if len(name) > room:
            return (
                f"{name!r} is {len(name)} characters; the pod hostname '{name}{suffix}' "
                f"must fit in 63, so use at most {room}"
            )
        if cronjob_like_job_name(name):
            return (
                f"{name!r} ends in '-' and 7 to 10 digits, which Container Insights takes "
                "for a CronJob's timestamp: the run's GPU metrics would be reported as "
                f"{name.rsplit('-', 1)[0]!r}; end the name with a letter or with at most "
                "6 digits"
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
        torchrun on pod 0 knows it hosts the store without waiting for DNS to list it. Under
        the trainer, pod 0 is the JobSet's `<run>-node-0-0` in the subdomain `<run>` (the host
        of the trainer's own PET_MASTER_ADDR, fully qualified).
        """
        if self.operator == "trainer":
            pod0, subdomain = f"{self.name}-{TRAINER_NODE}-0-0", self.name
        else:
            pod0, subdomain = f"{self.name}-0", self.service_name
        host = f"{pod0}.{subdomain}.{self.namespace}.svc.{CLUSTER_DOMAIN}"
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


def torchrun_command(spec: TrainingJobSpec) -> list[str]:
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
        f"--rdzv_endpoint={spec.rendezvous_endpoint}",
        f"--rdzv_id={spec.name}",
        # read_timeout also bounds the wait for pod 0's store: its 60 s default would fail the
        # other pods, and spend the Job's backoffLimit, whenever pod 0 starts late.
        f"--rdzv_conf=join_timeout={timeout},read_timeout={timeout}",
        f"--max_restarts={spec.max_restarts}",
        # On SIGTERM torchrun forwards the signal and SIGKILLs the workers after this long (30 s
        # by default): they get the pod's grace period, less a moment for torchrun to exit.
        f"--shutdown_timeout={max(spec.termination_grace_seconds - 5, 0)}",
        "-m",
        spec.module,
        *spec.trainer_args,
    ]


def _env(spec: TrainingJobSpec) -> list[dict[str, Any]]:
    env: dict[str, dict[str, Any]] = {}

    def put(name: str, value: str) -> None:
        env[name] = {"name": name, "value": value}

    # The Job controller sets this too; declared so the trainer and `$(...)` in arguments can
    # rely on it (the controller leaves a declared one alone). JobSet's Jobs are Indexed too.
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


def pod_metadata(spec: TrainingJobSpec) -> dict[str, Any]:
    """The metadata of every pod template: the run's labels (`kiln.dev/training-job` selects
    its pods) and the spec's pod annotations."""
    metadata: dict[str, Any] = {"labels": spec.labels}
    if spec.pod_annotations:
        metadata["annotations"] = dict(spec.pod_annotations)
    return metadata


def object_metadata(spec: TrainingJobSpec, name: str) -> dict[str, Any]:
    """The metadata of an object of the run that no queue admits (the Service, the runtime)."""
    return {"name": name, "namespace": spec.namespace, "labels": spec.labels}


def workload_metadata(spec: TrainingJobSpec) -> dict[str, Any]:
    """The metadata of the object a queue admits (the Job, or the TrainJob): the run's labels
    and the spec's workload labels (Kueue reads its queue name there)."""
    metadata = object_metadata(spec, spec.name)
    metadata["labels"] = {**spec.workload_labels, **spec.labels}
    return metadata


def _pod_template(spec: TrainingJobSpec, *, subdomain: str | None) -> dict[str, Any]:
    # Indexed Job pods are named `<job>-<index>`; the subdomain makes them `<job>-<index>.<svc>`.
    # JobSet sets the subdomain of its own pods. Never: a failed pod is replaced (counted by the
    # Job's backoffLimit) rather than restarted in place, so the podFailurePolicy sees it.
    pod: dict[str, Any] = {"restartPolicy": "Never"}
    if subdomain is not None:
        pod["subdomain"] = subdomain
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
                # The trainer configures the container of this name only.
                "name": TRAINER_NODE if spec.operator == "trainer" else TRAINER_CONTAINER,
                "image": spec.image,
                "imagePullPolicy": "IfNotPresent",
                "command": torchrun_command(spec),
                "env": _env(spec),
                "ports": [{"name": "c10d", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}],
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


def _indexed_job_spec(spec: TrainingJobSpec, *, subdomain: str | None) -> dict[str, Any]:
    """What the Indexed Job and the trainer's JobSet Job share: one pod per node, index 0
    hosting the rendezvous, and the failure policy."""
    return {
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
        "template": _pod_template(spec, subdomain=subdomain),
    }


def headless_service(spec: TrainingJobSpec) -> dict[str, Any]:
    """The Service that publishes `<job>-<index>.<service>` for every pod of the run."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(spec, spec.service_name),
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
    job_spec = _indexed_job_spec(spec, subdomain=spec.service_name)
    job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": workload_metadata(spec),
        "spec": job_spec,
    }


def training_runtime(spec: TrainingJobSpec) -> dict[str, Any]:
    """The run's TrainingRuntime: a torch ML policy and a JobSet of one Indexed Job.

    The trainer makes the JobSet `<run>` from it, scales the Job to the TrainJob's numNodes and
    adds PET_* env (node count, rank, master address) to the `node` container; the torchrun
    command line names everything itself, so those only fill in what it leaves out.
    """
    node_job = {
        "name": TRAINER_NODE,
        "template": {
            "metadata": {"labels": dict([TRAINER_ANCESTOR_LABEL])},
            "spec": _indexed_job_spec(spec, subdomain=None),
        },
    }
    jobset_spec = {
        # Pods get `<run>-node-0-<index>.<run>` names in a headless Service, resolvable before
        # they are ready, as the Indexed Job's Service does.
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        # The Job's backoffLimit handles restarts; a failed Job fails the run.
        "failurePolicy": {"maxRestarts": 0},
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
        "replicatedJobs": [node_job],
    }
    return {
        "apiVersion": TRAINER_API_VERSION,
        "kind": "TrainingRuntime",
        "metadata": object_metadata(spec, spec.name),
        "spec": {
            "mlPolicy": {"numNodes": spec.nodes, "torch": {}},
            "template": {"metadata": {"labels": spec.labels}, "spec": jobset_spec},
        },
    }


def train_job(spec: TrainingJobSpec) -> dict[str, Any]:
    """The TrainJob: the run's runtime, its node and process counts, its deadline."""
    job_spec: dict[str, Any] = {
        "runtimeRef": {
            "apiGroup": TRAINER_API_GROUP,
            "kind": "TrainingRuntime",
            "name": spec.name,
        },
        "trainer": {"numNodes": spec.nodes, "numProcPerNode": spec.gpus_per_node},
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": TRAINER_API_VERSION,
        "kind": "TrainJob",
        "metadata": workload_metadata(spec),
        "spec": job_spec,
    }


def render(spec: TrainingJobSpec) -> list[dict[str, Any]]:
    """Every object of the run, in apply order (what an object names before the object)."""
    if spec.operator == "trainer":
        return [training_runtime(spec), train_job(spec)]
    return [headless_service(spec), indexed_job(spec)]


def to_yaml(manifests: Sequence[Mapping[str, Any]]) -> str:
    """The objects as one multi-document YAML stream, keys in the order they were built."""
    return yaml.safe_dump_all(
        [dict(m) for m in manifests], sort_keys=False, default_flow_style=False
    )


# --- the memory plan ---------------------------------------------------------------------

# The trainer's own presets (`--model`); other shapes are for the plan alone.
TRAINER_PRESETS = ("tiny", "small", "base", "1b")


def read_s3(uri: str, client: Any = None) -> bytes:
    """The bytes of an S3 object, with the default AWS credentials unless a client is given;
    PlanError says what to change when it cannot be read."""
    # Imported here: rendering needs no AWS SDK unless a model lives in S3.
    import boto3  # type: ignore[import-untyped]
    from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        s3 = client if client is not None else boto3.client("s3")
        body: bytes = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        raise PlanError(s3_problem(uri, code, str(err))) from None
    except BotoCoreError as err:
        raise PlanError(
            f"cannot read {uri}: {err}; set AWS credentials and a region (AWS_PROFILE, "
            "AWS_REGION), or give --model a shape name such as llama-3-8b"
        ) from None
    return body


def s3_problem(uri: str, code: str, message: str) -> str:
    """What to change when reading a model's `uri` failed with S3 error `code`."""
    if code in ("NoSuchKey", "404", "NotFound"):
        return f"{uri} does not exist: --model must name a Hugging Face model directory"
    if code == "NoSuchBucket":
        return f"{uri}: the bucket does not exist"
    if code in ("AccessDenied", "403", "Forbidden"):
        return f"{uri}: your identity may not read it (s3:GetObject, and kms:Decrypt if SSE-KMS)"
    return f"cannot read {uri}: {message}"


def memory_plan(
    model: str | None,
    instance_type: str,
    world: int,
    trainer_args: Sequence[str],
    *,
    read_s3: ReadS3 = read_s3,
) -> Plan:
    """The run's memory plan: the model (a shape name, a local directory or an s3:// one;
    default what the trainer arguments name, else the trainer's default preset) at the
    trainer's micro-batch, sequence length, strategy, checkpointing and adapters."""
    settings = trainer_settings(list(trainer_args))
    name = model or settings.pop("model") or "small"
    settings.pop("model", None)
    shape = resolve_shape(name, read_s3=read_s3)
    return plan(shape, lookup(instance_type), world=world, **settings)


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


def planned_trainer_args(p: Plan, trainer_args: Sequence[str]) -> list[str]:
    """The trainer arguments with the plan's strategy in place of `auto` (or of no
    `--strategy`): the trainer's own auto counts no activations, so it could pick DDP where
    the plan found that only FSDP fits."""
    args = list(trainer_args)
    for i, arg in enumerate(args):
        if arg == "--strategy" and i + 1 < len(args):
            if args[i + 1] == "auto":
                args[i + 1] = p.strategy
            return args
        if arg.startswith("--strategy="):
            if arg == "--strategy=auto":
                args[i] = f"--strategy={p.strategy}"
            return args
    return [*args, "--strategy", p.strategy]


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


def add_operator_argument(parser: Any, *, prefix: str = "") -> None:
    """`--operator`, shared by `kiln training-job` and `kiln train --on eks`."""
    parser.add_argument(
        "--operator",
        choices=(*get_args(Operator), *RETIRED_OPERATORS),
        help=f"{prefix}none: Indexed Job + headless Service, no operator needed; trainer: "
        f"Kubeflow Trainer {TRAINER_RELEASE} TrainJob + TrainingRuntime; kubeflow (PyTorchJob) "
        "is retired and refused (default: none)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `kiln training-job`; trainer arguments follow `--`."""
    required = parser.add_argument_group("required")
    required.add_argument("--name", required=True, help="run name; also the Job and Service name")
    required.add_argument("--image", required=True, help="trainer image, with a tag or digest")
    required.add_argument("--instance-type", required=True, help="GPU node type, e.g. p4d.24xlarge")
    required.add_argument("--nodes", type=int, required=True, help="number of nodes (pods)")
    required.add_argument(
        "--checkpoint-path", required=True, help="where checkpoints go: S3 URI or absolute path"
    )
    required.add_argument(
        "--output-path", required=True, help="where the model goes: S3 URI or absolute path"
    )
    parser.add_argument(
        "--gpus-per-node", type=int, help="GPUs per pod (default: every GPU of the instance type)"
    )
    parser.add_argument(
        "--namespace", default="training", help="Kubernetes namespace (default: %(default)s)"
    )
    parser.add_argument(
        "--service-account",
        default="trainer",
        help="the pods' service account, bound to the trainer's IAM role (default: %(default)s)",
    )
    parser.add_argument(
        "--module",
        default="training.train",
        help="Python module torchrun starts in each pod (default: %(default)s)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment variable for the trainer (repeatable; default: none)",
    )
    parser.add_argument(
        "--shm-size-gib",
        type=int,
        help="size of the memory-backed /dev/shm (default: a quarter of the pod's memory, "
        "at most 64)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="times torchrun restarts the workers after a failure (default: %(default)s)",
    )
    parser.add_argument(
        "--rendezvous-timeout-seconds",
        type=int,
        default=1800,
        help="how long the pods wait for each other to start (default: %(default)s)",
    )
    parser.add_argument(
        "--termination-grace-seconds",
        type=int,
        default=120,
        help="time a stopped pod gets to write its checkpoint (default: %(default)s)",
    )
    parser.add_argument(
        "--active-deadline-seconds",
        type=int,
        help="the Job's wall-time limit (default: no deadline)",
    )
    parser.add_argument(
        "--ttl-seconds-after-finished",
        type=int,
        default=3 * 24 * 3600,
        help="a finished Job is deleted after this (default: %(default)s, three days)",
    )
    parser.add_argument(
        "--nccl-debug",
        choices=get_args(NcclDebug),
        help="NCCL_DEBUG level for the pods (default: unset)",
    )
    add_operator_argument(parser)
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
        help="arguments for the trainer module, after -- (default: none)",
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
            operator=args.operator or "none",
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
    spec = replace(spec, trainer_args=planned_trainer_args(p, spec.trainer_args))
    sys.stdout.write(to_yaml(render(spec)))
    return 0
