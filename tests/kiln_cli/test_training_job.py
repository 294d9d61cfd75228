"""Training-run manifests: strict schema validation, torchrun wiring, GPU/EFA scheduling, errors."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import socket
from pathlib import Path
from typing import Any

import boto3
import jsonschema
import kubernetes_validate
import pytest
import yaml
from moto import mock_aws

from kiln.contract import TrainerEnv
from kiln.gpu_instances import GPU_INSTANCES, lookup
from kiln.memory_plan import PlanError
from kiln_cli.training_job import (
    EFA_RESOURCE,
    GPU_RESOURCE,
    TRAINER_RELEASE,
    TrainingJobError,
    TrainingJobSpec,
    add_arguments,
    memory_plan,
    plan_problem,
    planned_trainer_args,
    render,
    render_command,
    to_yaml,
)
from tests import crd_cel
from tests.kiln_cli.kube import (
    TRAINER_SCHEMAS,
    VERSIONS,
    FakeCluster,
    crd_validator,
    validate,
    validate_custom,
)

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/kiln-trainer:1.4.0"
BUCKET = "s3://kiln-dev-artifacts-123456789012-us-east-1"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """kubernetes-validate must judge from the schemas in its wheel, never from the network."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def make(**overrides: Any) -> TrainingJobSpec:
    """2 nodes x 4 GPUs on p4d.24xlarge (EFA with GPUDirect RDMA), unless overridden."""
    values: dict[str, Any] = {
        "name": "llama-pretrain",
        "image": IMAGE,
        "instance_type": "p4d.24xlarge",
        "nodes": 2,
        "gpus_per_node": 4,
        "checkpoint_path": f"{BUCKET}/checkpoints/llama-pretrain",
        "output_path": f"{BUCKET}/models/llama-pretrain",
        "trainer_args": ["--max-steps", "20000"],
    }
    values.update(overrides)
    return TrainingJobSpec(**values)


def by_kind(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["kind"]: m for m in manifests}


def pod_template(spec: TrainingJobSpec) -> dict[str, Any]:
    objects = by_kind(render(spec))
    if "Job" in objects:
        return dict(objects["Job"]["spec"]["template"])
    (node,) = objects["TrainingRuntime"]["spec"]["template"]["spec"]["replicatedJobs"]
    return dict(node["template"]["spec"]["template"])


def pod_spec(spec: TrainingJobSpec) -> dict[str, Any]:
    return dict(pod_template(spec)["spec"])


def container(spec: TrainingJobSpec) -> dict[str, Any]:
    return dict(pod_spec(spec)["containers"][0])


def env_of(spec: TrainingJobSpec) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(spec)["env"]}


SPECS = {
    "p4d-2x4-efa-rdma": make(nccl_debug="INFO", active_deadline_seconds=86400),
    "p5-4x8-efa": make(instance_type="p5.48xlarge", nodes=4, gpus_per_node=8),
    "g6e-3x8-efa-no-rdma": make(instance_type="g6e.48xlarge", nodes=3, gpus_per_node=8),
    "g5-2x4-one-efa": make(instance_type="g5.12xlarge", gpus_per_node=4, shm_size_gib=16),
    "g5-1x1-no-efa": make(instance_type="g5.xlarge", nodes=1, gpus_per_node=1),
    "g6-8x1-local-paths": make(
        instance_type="g6.2xlarge",
        nodes=8,
        gpus_per_node=1,
        checkpoint_path="/fsx/checkpoints",
        output_path="/fsx/models",
        env={"NCCL_DEBUG": "WARN", "AWS_REGION": "us-east-1"},
        namespace="research",
        service_account="research-trainer",
    ),
}


# --- schema validation ---------------------------------------------------------------------


def test_validation_uses_the_pinned_versions_and_shipped_schemas() -> None:
    shipped = kubernetes_validate.utils.all_versions()
    for version in VERSIONS:
        assert any(v.startswith(f"{version}.") or v == version for v in shipped), version


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_every_job_object_validates_strictly(spec: TrainingJobSpec) -> None:
    manifests = render(spec)
    assert [m["kind"] for m in manifests] == ["Service", "Job"]
    for manifest in manifests:
        validate(manifest)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_every_trainer_object_validates_against_the_pinned_crds(spec: TrainingJobSpec) -> None:
    manifests = render(dataclasses.replace(spec, operator="trainer"))
    assert [m["kind"] for m in manifests] == ["TrainingRuntime", "TrainJob"]
    for manifest in manifests:
        validate_custom(manifest)


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("TrainJob", ("spec", "trainer", "numNodez"), 2),  # unknown field
        ("TrainJob", ("spec", "trainer", "numNodes"), "2"),  # wrong type
        ("TrainJob", ("spec", "activeDeadlineSeconds"), 0),  # below the minimum
        ("TrainingRuntime", ("spec", "mlPolicy", "pytorch"), {}),  # the v1 operator's name
        ("TrainingRuntime", ("spec", "template", "spec", "network", "dns"), True),
        (
            "TrainingRuntime",
            ("spec", "template", "spec", "replicatedJobs", 0, "template", "spec", "parallelism"),
            "3",
        ),
    ],
)
def test_strict_validation_catches_a_broken_trainer_object(
    kind: str, path: tuple[Any, ...], value: Any
) -> None:
    obj = copy.deepcopy(by_kind(render(make(operator="trainer")))[kind])
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        crd_validator(kind).validate(obj)


def test_the_vendored_schemas_are_the_pinned_release() -> None:
    readme = (TRAINER_SCHEMAS.parent / "README.md").read_text()
    assert f"`kubeflow-trainer-{TRAINER_RELEASE}/`" in readme
    assert f"tag `{TRAINER_RELEASE}`" in readme
    kinds = {json.loads(p.read_text())["kind"] for p in TRAINER_SCHEMAS.glob("*.json")}
    assert kinds == {"TrainJob", "TrainingRuntime"}


@pytest.mark.parametrize("name", GPU_INSTANCES)
def test_every_catalog_type_renders_valid_objects(name: str) -> None:
    spec = make(instance_type=name, gpus_per_node=lookup(name).gpus)
    for manifest in render(spec):
        validate(manifest)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "template", "spec", "containers", 0, "resourcess"), {}),  # unknown field
        (("spec", "completions"), "2"),  # wrong type
        (("spec", "template", "spec", "volumes", 0, "emptyDir", "medium"), 5),
    ],
)
def test_strict_validation_catches_a_broken_job(path: tuple[Any, ...], value: Any) -> None:
    job = copy.deepcopy(by_kind(render(make()))["Job"])
    node = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)


# --- torchrun and rendezvous ---------------------------------------------------------------


def test_torchrun_command_line_of_an_indexed_job() -> None:
    assert container(make())["command"] == [
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=4",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=llama-pretrain-0.llama-pretrain.training.svc.cluster.local:29400",
        "--rdzv_id=llama-pretrain",
        "--rdzv_conf=join_timeout=1800,read_timeout=1800",
        "--max_restarts=3",
        "--shutdown_timeout=115",
        "-m",
        "training.train",
        "--max-steps",
        "20000",
    ]
    assert "args" not in container(make())


def test_torchrun_waits_the_pods_grace_period_for_a_sigterm_checkpoint() -> None:
    # torchrun SIGKILLs its workers 30 s after forwarding a SIGTERM unless told otherwise.
    assert "--shutdown_timeout=595" in container(make(termination_grace_seconds=600))["command"]
    assert "--shutdown_timeout=0" in container(make(termination_grace_seconds=3))["command"]


def test_headless_service_names_pod_zero_for_the_rendezvous() -> None:
    spec = make(namespace="research")
    service, job = render(spec)
    assert service["metadata"] == {**job["metadata"], "name": "llama-pretrain"}
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"] == [
        {"name": "c10d", "port": 29400, "targetPort": 29400, "protocol": "TCP"}
    ]
    template = job["spec"]["template"]
    selector = service["spec"]["selector"]
    assert selector.items() <= template["metadata"]["labels"].items()
    # Pod 0 is `<job>-0`; the subdomain puts it under the Service, whose name the endpoint uses.
    assert template["spec"]["subdomain"] == service["metadata"]["name"]
    endpoint = next(a for a in template["spec"]["containers"][0]["command"] if "rdzv_end" in a)
    assert (
        endpoint
        == "--rdzv_endpoint=llama-pretrain-0.llama-pretrain.research.svc.cluster.local:29400"
    )
    ports = template["spec"]["containers"][0]["ports"]
    assert ports == [{"name": "c10d", "containerPort": 29400, "protocol": "TCP"}]


def test_indexed_job_shape_and_failure_handling() -> None:
    job = by_kind(render(make(nodes=3, max_restarts=2)))["Job"]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == 3
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["backoffLimit"] == 6  # every pod of the group may fail once per restart
    assert job["podFailurePolicy"] == {
        "rules": [
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            }
        ]
    }
    assert job["podReplacementPolicy"] == "Failed"
    assert job["ttlSecondsAfterFinished"] == 3 * 24 * 3600
    assert "activeDeadlineSeconds" not in job
    assert (
        by_kind(render(make(active_deadline_seconds=7200)))["Job"]["spec"]["activeDeadlineSeconds"]
        == 7200
    )
    assert by_kind(render(make(max_restarts=0)))["Job"]["spec"]["backoffLimit"] == 0


def test_trainjob_references_its_runtime_and_sets_nodes_and_processes() -> None:
    runtime, job = render(make(operator="trainer", nodes=4, active_deadline_seconds=600))
    assert job["apiVersion"] == runtime["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert (job["kind"], runtime["kind"]) == ("TrainJob", "TrainingRuntime")
    assert job["metadata"] == runtime["metadata"]
    assert job["metadata"]["name"] == "llama-pretrain"
    assert job["metadata"]["namespace"] == "training"
    assert job["spec"] == {
        # A namespaced runtime: it must live in the TrainJob's namespace, and needs no
        # cluster-wide rights to apply.
        "runtimeRef": {
            "apiGroup": "trainer.kubeflow.org",
            "kind": "TrainingRuntime",
            "name": "llama-pretrain",
        },
        # Without `trainer` the operator injects no PET_* env at all.
        "trainer": {"numNodes": 4, "numProcPerNode": 4},
        "activeDeadlineSeconds": 600,
    }
    assert "activeDeadlineSeconds" not in render(make(operator="trainer"))[1]["spec"]


def test_trainer_runtime_is_a_jobset_of_one_indexed_job_like_the_plain_one() -> None:
    spec = make(operator="trainer", nodes=3, max_restarts=2)
    runtime, _ = render(spec)
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 3, "torch": {}}
    assert runtime["spec"]["template"]["metadata"] == {"labels": runtime["metadata"]["labels"]}
    jobset = runtime["spec"]["template"]["spec"]
    assert jobset["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    assert jobset["failurePolicy"] == {"maxRestarts": 0}
    assert jobset["ttlSecondsAfterFinished"] == 3 * 24 * 3600
    (node,) = jobset["replicatedJobs"]
    assert node["name"] == "node"
    # The operator finds the trainer's Job by this label and its container by the name `node`.
    assert node["template"]["metadata"] == {
        "labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    }
    assert "replicas" not in node  # the operator sets it to 1
    plain = by_kind(render(dataclasses.replace(spec, operator="none")))["Job"]["spec"]
    job = node["template"]["spec"]
    # The same Job and pod as without an operator, less what JobSet and the TrainJob own.
    expected = {k: v for k, v in plain.items() if k not in ("ttlSecondsAfterFinished",)}
    expected["template"] = copy.deepcopy(expected["template"])
    del expected["template"]["spec"]["subdomain"]
    expected["template"]["spec"]["containers"][0]["name"] = "node"
    command = expected["template"]["spec"]["containers"][0]["command"]
    command[4] = (
        "--rdzv_endpoint=llama-pretrain-node-0-0.llama-pretrain.training.svc.cluster.local:29400"
    )
    assert job == expected
    (container,) = job["template"]["spec"]["containers"]
    assert container["command"][4] == command[4]
    assert {e["name"] for e in container["env"]}.isdisjoint(
        {"PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR"}
    )


def test_the_retired_kubeflow_operator_is_refused_with_what_to_use() -> None:
    with pytest.raises(TrainingJobError) as err:
        make(operator="kubeflow")
    ((arg, message),) = err.value.problems
    assert arg == "operator"
    assert "PyTorchJob (kubeflow.org/v1) is retired" in message
    assert f"install Trainer {TRAINER_RELEASE} and use --operator trainer" in message


@pytest.mark.parametrize("operator", ["none", "trainer"])
def test_workload_labels_and_pod_annotations_each_go_where_they_belong(operator: str) -> None:
    queue = {"kueue.x-k8s.io/queue-name": "gpu-training"}
    keep = {"karpenter.sh/do-not-disrupt": "true"}
    spec = make(operator=operator, workload_labels=queue, pod_annotations=keep)
    manifests = render(spec)
    workload = manifests[1]  # the Job, or the TrainJob: what a queue admits
    assert workload["metadata"]["labels"] == {**queue, **spec.labels}
    for other in manifests[:1]:
        assert other["metadata"]["labels"] == spec.labels
    template = pod_template(spec)
    assert template["metadata"] == {"labels": spec.labels, "annotations": keep}
    assert "annotations" not in pod_template(make(operator=operator))["metadata"]
    for manifest in manifests:
        (validate if operator == "none" else validate_custom)(manifest)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"workload_labels": {"kueue.x-k8s.io/queue-name": "a b"}}, "is not a label value"),
        ({"workload_labels": {"Bad_Prefix/x": "a"}}, "'Bad_Prefix' is not a DNS subdomain"),
        ({"workload_labels": {"kiln.dev/training-job": "x"}}, "the kiln.dev/ prefix is kiln's"),
        ({"pod_annotations": {"-x": "a"}}, "the name '-x' must be 1-63 letters"),
        ({"pod_annotations": {"karpenter.sh/do-not-disrupt": True}}, "must be a string"),
    ],
)
def test_bad_labels_and_annotations_are_named(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(TrainingJobError) as err:
        make(**overrides)
    ((arg, found),) = err.value.problems
    assert arg == next(iter(overrides)) and message in found


# --- scheduling, resources, EFA, shm, env --------------------------------------------------


@pytest.mark.parametrize("operator", ["none", "trainer"])
def test_pods_tolerate_the_gpu_taint_and_select_the_gpu_pool(operator: str) -> None:
    pod = pod_spec(make(operator=operator))
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    ]
    assert pod["nodeSelector"] == {
        "kiln.dev/node-pool": "gpu",
        "node.kubernetes.io/instance-type": "p4d.24xlarge",
    }
    assert pod["serviceAccountName"] == "trainer"
    assert pod["terminationGracePeriodSeconds"] == 120
    assert container(make(operator=operator))["image"] == IMAGE


def test_resources_take_the_pods_share_of_the_node_less_headroom() -> None:
    # p4d.24xlarge: 96 vCPUs, 1152 GiB, 8 GPUs; a pod with 4 GPUs gets half of what is left.
    resources = container(make())["resources"]
    assert resources["requests"] == {
        "cpu": "45100m",  # (96 - 1 - 5%) / 2
        "memory": "517Gi",  # (1152 - 2 - 10%) / 2, rounded down
        GPU_RESOURCE: "4",
        EFA_RESOURCE: "2",
    }
    assert resources["limits"] == {"memory": "517Gi", GPU_RESOURCE: "4", EFA_RESOURCE: "2"}
    small = container(make(instance_type="g5.xlarge", nodes=1, gpus_per_node=1))["resources"]
    assert small["requests"] == {"cpu": "2800m", "memory": "12Gi", GPU_RESOURCE: "1"}


@pytest.mark.parametrize("name", GPU_INSTANCES)
def test_efa_is_requested_exactly_when_the_type_has_it(name: str) -> None:
    instance = lookup(name)
    spec = make(instance_type=name, gpus_per_node=instance.gpus)
    resources = container(spec)["resources"]
    env = env_of(spec)
    if instance.efa_interfaces:
        assert resources["requests"][EFA_RESOURCE] == str(instance.efa_interfaces)
        assert resources["limits"][EFA_RESOURCE] == str(instance.efa_interfaces)
        assert env["FI_PROVIDER"] == "efa"
    else:
        assert EFA_RESOURCE not in resources["requests"]
        assert EFA_RESOURCE not in resources["limits"]
        assert "FI_PROVIDER" not in env
    assert ("FI_EFA_USE_DEVICE_RDMA" in env) == instance.gpudirect_rdma
    if instance.gpudirect_rdma:
        assert env["FI_EFA_USE_DEVICE_RDMA"] == "1"


def test_efa_is_split_between_pods_and_left_alone_on_one_node() -> None:
    assert container(make(gpus_per_node=2))["resources"]["limits"][EFA_RESOURCE] == "1"
    p5 = make(instance_type="p5.48xlarge", gpus_per_node=4)
    assert container(p5)["resources"]["limits"][EFA_RESOURCE] == "16"
    # No traffic leaves a single node: no interfaces taken, no EFA variables.
    single = make(nodes=1, gpus_per_node=1)
    assert EFA_RESOURCE not in container(single)["resources"]["limits"]
    assert "FI_PROVIDER" not in env_of(single)


def test_shm_is_a_memory_backed_empty_dir_on_dev_shm() -> None:
    pod = pod_spec(make())
    assert pod["volumes"] == [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}
    ]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    small = pod_spec(make(instance_type="g5.xlarge", nodes=1, gpus_per_node=1))
    assert small["volumes"][0]["emptyDir"]["sizeLimit"] == "3Gi"  # a quarter of 12 GiB
    explicit = pod_spec(make(shm_size_gib=100))
    assert explicit["volumes"][0]["emptyDir"]["sizeLimit"] == "100Gi"


def test_env_carries_the_trainer_contract() -> None:
    env = env_of(make(nccl_debug="INFO"))
    assert env[TrainerEnv.CHECKPOINT_DIR] == f"{BUCKET}/checkpoints/llama-pretrain"
    assert env[TrainerEnv.OUTPUT_DIR] == f"{BUCKET}/models/llama-pretrain"
    assert env[TrainerEnv.JOB_NAME] == "llama-pretrain"
    assert env["JOB_COMPLETION_INDEX"] == {
        "fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        }
    }
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["NCCL_DEBUG"] == "INFO"
    assert "NCCL_DEBUG" not in env_of(make())


def test_callers_env_is_added_and_overrides_kiln_defaults_once() -> None:
    spec = make(nccl_debug="INFO", env={"NCCL_DEBUG": "WARN", "AWS_REGION": "eu-west-1"})
    names = [e["name"] for e in container(spec)["env"]]
    assert len(names) == len(set(names))
    assert env_of(spec)["NCCL_DEBUG"] == "WARN"
    assert env_of(spec)["AWS_REGION"] == "eu-west-1"


def test_pods_run_without_privileges() -> None:
    pod = pod_spec(make())
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["enableServiceLinks"] is False


def test_spec_is_frozen_and_keeps_copies() -> None:
    env = {"A": "1"}
    args = ["--x"]
    spec = make(env=env, trainer_args=args)
    env["A"], args[0] = "2", "--y"
    assert spec.env["A"] == "1" and spec.trainer_args == ("--x",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.nodes = 3  # type: ignore[misc]


def test_to_yaml_is_one_multi_document_stream() -> None:
    manifests = render(make())
    text = to_yaml(manifests)
    assert text.startswith("apiVersion: v1\nkind: Service\n")
    assert text.count("\n---\n") == 1
    assert list(yaml.safe_load_all(text)) == manifests


# --- bad arguments -------------------------------------------------------------------------

LONG = "a" * 62

BAD = [
    ({"nodes": 0}, "nodes", "must be a whole number of at least 1; got 0"),
    ({"nodes": -2}, "nodes", "at least 1; got -2"),
    ({"nodes": True}, "nodes", "got True"),
    ({"nodes": "2"}, "nodes", "got '2'"),
    (
        {"instance_type": "g5.12xlarge", "gpus_per_node": 8},
        "gpus_per_node",
        "8 is more than g5.12xlarge has (4); allowed: 1, 2, 4",
    ),
    ({"gpus_per_node": 0}, "gpus_per_node", "must be at least 1; got 0; allowed: 1, 2, 4, 8"),
    (
        {"instance_type": "g5.48xlarge", "gpus_per_node": 3},
        "gpus_per_node",
        "3 does not divide g5.48xlarge's 8 GPUs, so some would sit idle; allowed: 1, 2, 4, 8",
    ),
    (
        {"gpus_per_node": 1},
        "gpus_per_node",
        "1 on p4d.24xlarge (8 GPUs sharing 4 EFA interfaces) leaves each pod a fraction of an "
        "interface; a multi-node run needs whole ones: allowed: 2, 4, 8",
    ),
    (
        {"instance_type": "g5.12xlarge", "gpus_per_node": 2},
        "gpus_per_node",
        "(4 GPUs sharing 1 EFA interface) leaves each pod a fraction of an interface; a "
        "multi-node run needs whole ones: allowed: 4",
    ),
    (
        {"instance_type": "m7i.large"},
        "instance_type",
        "'m7i.large' is not a GPU instance type kiln supports on EKS; supported: g5.xlarge,",
    ),
    ({"name": "Llama"}, "name", "'Llama' is not a DNS-1035 label"),
    ({"name": "1llama"}, "name", "starting with a letter"),
    ({"name": "llama_7b"}, "name", "'llama_7b' is not a DNS-1035 label"),
    ({"name": "llama-"}, "name", "ending with a letter or digit"),
    (
        {"name": LONG},
        "name",
        f"is 62 characters; the pod hostname '{LONG}-1' must fit in 63, so use at most 61",
    ),
    (
        {"name": LONG[:55], "operator": "trainer", "nodes": 3},
        "name",
        f"the pod hostname '{LONG[:55]}-node-0-2' must fit in 63, so use at most 54",
    ),
    ({"name": "nightly-29416320"}, "name", "Container Insights takes for a CronJob's timestamp"),
    ({"namespace": "Training"}, "namespace", "'Training' is not a DNS-1123 label"),
    ({"namespace": "x" * 64}, "namespace", "at most 63 characters"),
    ({"service_account": "trainer!"}, "service_account", "'trainer!' is not a DNS-1123 label"),
    ({"checkpoint_path": "s3://"}, "checkpoint_path", "'' is not an S3 bucket name"),
    ({"checkpoint_path": "s3://My-Bucket/x"}, "checkpoint_path", "'My-Bucket' is not an S3"),
    ({"checkpoint_path": "s3://a..b/x"}, "checkpoint_path", "'a..b' is not an S3 bucket name"),
    ({"checkpoint_path": "s3://10.0.0.1/x"}, "checkpoint_path", "'10.0.0.1' is not an S3"),
    ({"checkpoint_path": "s3://ab/x"}, "checkpoint_path", "'ab' is not an S3 bucket name"),
    ({"output_path": "s3a://bucket/x"}, "output_path", "write S3 URIs as s3://bucket/prefix"),
    ({"output_path": "S3://bucket/x"}, "output_path", "write S3 URIs as s3://bucket/prefix"),
    ({"output_path": "gs://bucket/x"}, "output_path", "only s3:// URIs and absolute paths"),
    (
        {"output_path": "models/out"},
        "output_path",
        "'models/out' is neither an S3 URI (s3://bucket/prefix) nor an absolute path",
    ),
    ({"output_path": ""}, "output_path", "give an S3 URI (s3://bucket/prefix) or an absolute"),
    ({"image": "kiln-trainer"}, "image", "'kiln-trainer' has no tag; pin a version tag"),
    ({"image": "localhost:5000/trainer"}, "image", "has no tag"),
    ({"image": "trainer:latest"}, "image", "':latest' moves; pin a version tag or a digest"),
    ({"image": "trainer@sha256:abc"}, "image", "the digest is not sha256:<64 hex>"),
    ({"image": "trainer:1.0 --x"}, "image", "give an image reference such as"),
    ({"module": "training/train.py"}, "module", "is not a Python module path"),
    ({"trainer_args": ["--steps", 3]}, "trainer_args", "every argument must be a string"),
    ({"env": {"KILN_OUTPUT_DIR": "/x"}}, "env", "KILN_OUTPUT_DIR is set by kiln (reserved: "),
    ({"env": {"JOB_COMPLETION_INDEX": "0"}}, "env", "JOB_COMPLETION_INDEX is set by kiln"),
    ({"env": {"PET_MASTER_ADDR": "x"}}, "env", "PET_MASTER_ADDR is set by kiln"),
    ({"env": {"1BAD": "x"}}, "env", "'1BAD' is not an environment variable name"),
    ({"env": {"STEPS": 3}}, "env", "STEPS: the value must be a string; got 3"),
    ({"shm_size_gib": 0}, "shm_size_gib", "0 is outside 1..258: /dev/shm is memory"),
    ({"shm_size_gib": 300}, "shm_size_gib", "counts against the pod's 517 GiB"),
    ({"max_restarts": -1}, "max_restarts", "at least 0; got -1"),
    ({"rendezvous_timeout_seconds": 5}, "rendezvous_timeout_seconds", "at least 60; got 5"),
    ({"termination_grace_seconds": -1}, "termination_grace_seconds", "at least 0"),
    ({"active_deadline_seconds": 0}, "active_deadline_seconds", "at least 1, or unset; got 0"),
    ({"ttl_seconds_after_finished": -5}, "ttl_seconds_after_finished", "at least 0; got -5"),
    ({"nccl_debug": "LOUD"}, "nccl_debug", "'LOUD' is not one of: VERSION, WARN, INFO, TRACE"),
    ({"operator": "volcano"}, "operator", "'volcano' is not one of: none, trainer"),
]


@pytest.mark.parametrize(
    ("overrides", "arg", "message"), BAD, ids=[f"{a}:{next(iter(o.values()))!r}" for o, a, _ in BAD]
)
def test_bad_argument_is_named_with_what_is_allowed(
    overrides: dict[str, Any], arg: str, message: str
) -> None:
    with pytest.raises(TrainingJobError) as err:
        make(**overrides)
    assert len(err.value.problems) == 1, err.value.problems
    (found_arg, found_message), *_ = err.value.problems
    assert found_arg == arg
    assert message in found_message
    assert str(err.value) == f"{found_arg}: {found_message}"


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(TrainingJobError) as err:
        make(nodes=0, name="Bad", output_path="out", image="x:latest")
    assert [arg for arg, _ in err.value.problems] == ["name", "image", "nodes", "output_path"]
    assert str(err.value).splitlines()[0].startswith("name: 'Bad' is not a DNS-1035 label")


def test_trainer_args_as_one_string_is_refused() -> None:
    with pytest.raises(TrainingJobError, match="give a list of arguments, not one string"):
        make(trainer_args="--max-steps 10")


def test_allowed_edge_cases() -> None:
    make(name="a" * 61)  # `<name>-1` is exactly 63 characters
    make(instance_type="g5.12xlarge", nodes=1, gpus_per_node=2)  # one node: EFA not needed
    make(image="trainer@sha256:" + "0" * 64)
    make(image="localhost:5000/trainer:2024.06.01")
    make(checkpoint_path="s3://my.bucket-1", output_path="/")
    make(shm_size_gib=258, max_restarts=0, ttl_seconds_after_finished=0)


# --- command line --------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kiln training-job")
    add_arguments(parser)
    return parser.parse_args(argv)


REQUIRED = [
    "--name", "llama-pretrain", "--image", IMAGE, "--instance-type", "p4d.24xlarge",
    "--checkpoint-path", f"{BUCKET}/checkpoints/llama-pretrain",
    "--output-path", f"{BUCKET}/models/llama-pretrain",
]  # fmt: skip


def test_command_prints_the_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*REQUIRED, "--nodes", "2", "--gpus-per-node", "4", "--env", "A=b=c"]
    assert render_command(parse([*argv, "--", "--max-steps", "20000"])) == 0
    out = capsys.readouterr()
    assert out.err.startswith("memory plan: small on 8 x A100 40 GiB (p4d.24xlarge)")
    # The plan's strategy is pinned for the trainer, whose own auto counts no activations.
    planned = ["--max-steps", "20000", "--strategy", "ddp"]
    assert list(yaml.safe_load_all(out.out)) == render(make(env={"A": "b=c"}, trainer_args=planned))


def test_command_defaults_to_every_gpu_and_renders_the_trainer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert render_command(parse([*REQUIRED, "--nodes", "2", "--operator", "trainer"])) == 0
    runtime, job = yaml.safe_load_all(capsys.readouterr().out)
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert (
        "--nproc_per_node=8"
        in node["template"]["spec"]["template"]["spec"]["containers"][0]["command"]
    )
    assert job["spec"]["trainer"] == {"numNodes": 2, "numProcPerNode": 8}


def test_command_refuses_the_retired_operator(capsys: pytest.CaptureFixture[str]) -> None:
    assert render_command(parse([*REQUIRED, "--nodes", "2", "--operator", "kubeflow"])) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("kiln training-job: --operator: the Kubeflow training operator's")


def test_command_reports_bad_arguments_by_flag(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*REQUIRED, "--nodes", "0", "--gpus-per-node", "16"]
    assert render_command(parse(argv)) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines() == [
        "kiln training-job: --nodes: must be a whole number of at least 1; got 0",
        "kiln training-job: --gpus-per-node: 16 is more than p4d.24xlarge has (8); "
        "allowed: 1, 2, 4, 8",
    ]


def test_command_reports_an_unknown_type_and_a_bad_env(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [*REQUIRED, "--nodes", "1"]
    argv[argv.index("p4d.24xlarge")] = "p3.16xlarge"
    assert render_command(parse(argv)) == 2
    assert "--instance-type: 'p3.16xlarge' is not a GPU instance type" in capsys.readouterr().err
    assert render_command(parse([*REQUIRED, "--nodes", "1", "--env", "NOVALUE"])) == 2
    assert "--env: 'NOVALUE' is not NAME=VALUE" in capsys.readouterr().err


def test_no_torch_or_boto3_import() -> None:
    import subprocess
    import sys

    code = (
        "import sys, kiln_cli.training_job, kiln.gpu_instances; "
        "assert not {'torch', 'boto3', 'aws_cdk'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_the_memory_plan_is_printed_and_an_impossible_run_refused_before_any_yaml(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [*REQUIRED, "--nodes", "1", "--model", "llama-3-70b"]
    assert render_command(parse([*argv, "--", "--micro-batch-size", "1", "--seq-len", "4096"])) == 2
    out = capsys.readouterr()
    assert out.out == ""  # nothing to apply
    assert "llama-3-70b on 8 x A100 40 GiB" in out.err and "does NOT fit" in out.err
    assert "refused: llama-3-70b needs 236.0 GiB per GPU with fsdp on 8 x A100" in out.err
    assert "nodes with activation checkpointing" in out.err
    # The 8B model fits once each block's activations are recomputed; the flag goes through.
    argv = [*REQUIRED, "--nodes", "1", "--model", "llama-3-8b"]
    trainer = ["--micro-batch-size", "1", "--seq-len", "4096", "--activation-checkpointing", "true"]
    assert render_command(parse([*argv, "--", *trainer])) == 0
    out = capsys.readouterr()
    assert "strategy        fsdp + activation checkpointing" in out.err
    assert "26.00 GiB of    36.00 GiB: fits" in out.err
    # A trainer preset is handed to the trainer too.
    assert render_command(parse([*REQUIRED, "--nodes", "1", "--model", "base"])) == 0
    assert "--model\n        - base" in capsys.readouterr().out


LLAMA_3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([], ["--strategy", "fsdp"]),
        (["--strategy", "auto"], ["--strategy", "fsdp"]),
        (["--strategy=auto", "--lr", "1e-4"], ["--strategy=fsdp", "--lr", "1e-4"]),
        (["--strategy", "ddp"], ["--strategy", "ddp"]),  # the caller's choice stands
        (["--strategy=ddp"], ["--strategy=ddp"]),
    ],
)
def test_the_plans_strategy_replaces_auto(given: list[str], expected: list[str]) -> None:
    p = memory_plan("llama-3-8b", "p5.48xlarge", 8, ["--micro-batch-size", "1"])
    assert p.strategy == "fsdp"
    assert planned_trainer_args(p, given) == expected


@mock_aws
def test_an_s3_model_directory_is_planned_and_handed_to_the_trainer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="team-models")
    s3.put_object(
        Bucket="team-models", Key="llama-8b/config.json", Body=json.dumps(LLAMA_3_8B_CONFIG)
    )
    argv = [*REQUIRED, "--nodes", "2", "--model", "s3://team-models/llama-8b/"]
    trainer = ["--micro-batch-size", "1", "--seq-len", "4096"]
    assert render_command(parse([*argv, "--", *trainer])) == 0
    out = capsys.readouterr()
    assert out.err.startswith("memory plan: s3://team-models/llama-8b/ on 16 x A100 40 GiB")
    assert "parameters          8.03 B (8.030 B trained)" in out.err
    assert "strategy        fsdp\n" in out.err
    _, job = yaml.safe_load_all(out.out)
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("training.train") + 1 :] == [
        "--init-from", "s3://team-models/llama-8b/", *trainer, "--strategy", "fsdp",
    ]  # fmt: skip
    # What cannot be read is named, and nothing is rendered.
    for model, message in [
        (
            "s3://team-models/none",
            "s3://team-models/none/config.json does not exist: --model must name a Hugging "
            "Face model directory",
        ),
        ("s3://no-such-bucket/m", "s3://no-such-bucket/m/config.json: the bucket does not exist"),
    ]:
        assert render_command(parse([*REQUIRED, "--nodes", "1", "--model", model])) == 2
        out = capsys.readouterr()
        assert out.out == ""
        assert out.err == f"kiln training-job: --model: {message}\n"
    s3.put_object(Bucket="team-models", Key="broken/config.json", Body=b"{not json")
    broken = [*REQUIRED, "--nodes", "1", "--model", "s3://team-models/broken"]
    assert render_command(parse(broken)) == 2
    assert "s3://team-models/broken/config.json is not JSON" in capsys.readouterr().err


def test_reading_s3_without_credentials_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(PlanError, match="set AWS credentials and a region"):
        memory_plan("s3://team-models/llama-8b", "p5.48xlarge", 8, [])


def test_a_local_hugging_face_directory_is_planned_and_left_to_the_operator(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_8B_CONFIG))
    argv = [*REQUIRED, "--nodes", "1", "--model", str(tmp_path), "--operator", "trainer"]
    assert render_command(parse([*argv, "--", "--micro-batch-size", "1"])) == 0
    out = capsys.readouterr()
    assert out.err.startswith(f"memory plan: {tmp_path} on 8 x A100 40 GiB")
    # The pods cannot see this machine's directory: the trainer is not told to load it.
    assert str(tmp_path) not in out.out and "--init-from" not in out.out
    (tmp_path / "config.json").write_text('["a list"]')
    assert render_command(parse(argv)) == 2
    assert f"{tmp_path}/config.json holds list, not a JSON object" in capsys.readouterr().err


def test_the_documented_refusal_is_what_the_tool_prints() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "kiln-cli.md").read_text()
    command = "$ kiln train --env dev --on eks --instance-type p5.48xlarge --model llama-3-70b"
    rest, *block = docs.split(command, 1)[1].split("```", 1)[0].splitlines()
    assert rest == " --apply -- --micro-batch-size 1 --seq-len 4096"
    p = memory_plan(
        "llama-3-70b", "p5.48xlarge", 8, ["--micro-batch-size", "1", "--seq-len", "4096"]
    )
    problem = plan_problem(p, 8)
    expected = f"kiln train: {p.render()}kiln train: refused, nothing applied: {problem}"
    assert block == expected.splitlines()


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_the_crds_cel_rules_run_on_kilns_trainer_objects(spec: TrainingJobSpec) -> None:
    """The Trainer CRDs' CEL rules are evaluated (tests/crd_cel.py; a new release's rules are
    evaluated automatically, tests/test_crd_cel.py fails on one that cannot be) and hold."""
    runtime, job = render(dataclasses.replace(spec, operator="trainer"))
    assert set(validate_custom(job)) == {
        "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        "size(self.metadata.name) <= 63",
        # managedBy is not set: the CRD's default is, before the rules run.
        "self in ['trainer.kubeflow.org/trainjob-controller', 'kueue.x-k8s.io/multikueue']",
    }
    assert set(validate_custom(runtime)) == {
        "[has(self.torch), has(self.mpi), has(self.jax), has(self.xgboost),has(self.flux)]"
        ".filter(x, x).size() <= 1",
        "!(has(self.startupPolicy) && self.startupPolicy.startupPolicyOrder == 'InOrder' && "
        "self.replicatedJobs.exists(x, has(x.dependsOn)))",
    }


URI_MESSAGE = "storageUri may be empty, or it must be a valid URI (scheme://...)"


@pytest.mark.parametrize(
    ("kind", "path", "value", "where", "message"),
    [
        (
            "TrainJob",
            ("metadata", "name"),
            "Llama-Pretrain",
            "<root>",
            "metadata.name must match RFC 1035 DNS label format",
        ),
        (
            "TrainJob",
            ("metadata", "name"),
            "l" * 64,
            "<root>",
            "metadata.name must be no more than 63 characters",
        ),
        (
            "TrainJob",
            ("spec", "managedBy"),
            "example.com/controller",
            "spec.managedBy",
            "ManagedBy must be trainer.kubeflow.org/trainjob-controller or "
            "kueue.x-k8s.io/multikueue",
        ),
        (
            "TrainJob",
            ("spec", "initializer"),
            {"model": {"storageUri": "team-models/llama-8b"}},
            "spec.initializer.model.storageUri",
            URI_MESSAGE,
        ),
        (
            "TrainingRuntime",
            ("spec", "mlPolicy", "mpi"),
            {},
            "spec.mlPolicy",
            "Only one of the policy can be configured",
        ),
        (
            "TrainingRuntime",
            ("spec", "mlPolicy", "torch", "envInjection"),
            {"targets": [{"jobName": "node", "containerNames": ["node"]}]},
            "spec.mlPolicy.torch.envInjection.targets[0].containerNames",
            "containerNames must not include the main node container",
        ),
        (
            "TrainingRuntime",
            ("spec", "template", "spec", "startupPolicy"),
            {"startupPolicyOrder": "InOrder"},
            "spec.template.spec",
            "StartupPolicy and DependsOn APIs are mutually exclusive",
        ),
    ],
)
def test_a_trainer_object_breaking_a_cel_rule_is_refused_with_its_message(
    kind: str, path: tuple[Any, ...], value: Any, where: str, message: str
) -> None:
    """The evaluation is real: each change passes jsonschema and fails only its CEL rule."""
    obj = copy.deepcopy(by_kind(render(make(operator="trainer")))[kind])
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    if kind == "TrainingRuntime" and path[-1] == "startupPolicy":
        # DependsOn on a second replicated job makes InOrder startup contradictory.
        jobs = obj["spec"]["template"]["spec"]["replicatedJobs"]
        jobs.append({**copy.deepcopy(jobs[0]), "name": "second"})
        jobs[1]["dependsOn"] = [{"name": jobs[0]["name"], "status": "Ready"}]
    crd_validator(kind).validate(obj)
    with pytest.raises(crd_cel.CELValidationError) as err:
        validate_custom(obj)
    (failure,) = err.value.failures
    assert failure.startswith(f"{where}: Invalid value: {message}"), failure
    # A cluster with the Trainer installed refuses it the same way.
    cluster = FakeCluster(objects={("TrainingRuntime", "training", "llama-pretrain"): {}})
    assert cluster(["kubectl", "apply", "-f", "-"], yaml.safe_dump(obj)) == 1
    assert cluster.errors == [f"{kind}: {err.value}"]
