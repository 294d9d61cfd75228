"""`kiln train`: the SageMaker CreateTrainingJob request (sent to moto) and the EKS objects."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from moto import mock_aws

from kiln.contract import CHECKPOINTS_PREFIX, MODELS_PREFIX, Component, Outputs, TrainerEnv
from kiln_cli.cli import main
from kiln_cli.operate import train
from kiln_cli.operate.aws import OperateError
from tests.kiln_cli.kube import FakeCluster
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

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)
CURATED = f"kiln-dev-curated-{ACCOUNT}-{REGION}"
ARTIFACTS = f"kiln-dev-artifacts-{ACCOUNT}-{REGION}"


def _platform(env: str = "dev") -> dict[str, str]:
    """The data lake and compute stacks, the buckets and a dataset; the compute outputs."""
    deployed = deploy_stacks(env, components=(Component.DATA_LAKE, Component.COMPUTE))
    create_buckets(env=env)
    put_object(f"s3://kiln-{env}-curated-{ACCOUNT}-{REGION}/train/shard-0.txt")
    return deployed[Component.COMPUTE]


def test_metric_definitions_match_the_trainers_readme() -> None:
    table = (REPO / "training" / "README.md").read_text().split("## Metrics", 1)[1]
    rows = re.findall(r"^\| (\w+:\w+) \| `(.+)` \|$", table, flags=re.MULTILINE)
    assert [(m["Name"], m["Regex"]) for m in train.METRIC_DEFINITIONS] == rows
    line = '{"event": "train", "step": 10, "train_loss": 2.5e-01, "tokens_per_s": 1234.5}'
    found = {m["Name"]: re.search(m["Regex"], line) for m in train.METRIC_DEFINITIONS}
    assert found["train:loss"] and found["train:loss"].group(1) == "2.5e-01"
    assert found["train:tokens_per_s"] and found["train:tokens_per_s"].group(1) == "1234.5"


def test_trainer_arguments_become_hyperparameters() -> None:
    args = ["--max-steps", "100", "--model=tiny", "--lr", "-1e-3", "--compile", "true"]
    assert train.hyperparameters(args) == {
        "max_steps": "100",
        "model": "tiny",
        "lr": "-1e-3",
        "compile": "true",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tiny"], "give trainer flags as --flag value pairs"),
        (["--compile"], "--compile needs a value"),
        (["--data", "s3://x/"], "--data is set by kiln train"),
        (["--output-dir=/tmp"], "--output-dir is set by kiln train"),
    ],
)
def test_bad_trainer_arguments_are_refused(args: list[str], message: str) -> None:
    with pytest.raises(OperateError, match=message) as caught:
        train.hyperparameters(args)
    assert caught.value.exit_code == 2


def test_job_names_carry_environment_and_time() -> None:
    settings = make_aws().settings
    assert train.job_name(settings, "llama", NOW) == "kiln-dev-llama-20250501-120000"
    with pytest.raises(OperateError, match="at most 25 lowercase letters"):
        train.job_name(settings, "x" * 26, NOW)
    with pytest.raises(OperateError):
        train.job_name(settings, "Llama", NOW)


def test_curated_locations() -> None:
    assert train.curated_uri("cur", "train") == "s3://cur/train/"
    assert train.curated_uri("cur", "s3://cur/a/b/") == "s3://cur/a/b/"
    with pytest.raises(OperateError, match="training reads only the curated zone"):
        train.curated_uri("cur", "s3://raw/a/")


@mock_aws
def test_sagemaker_job_from_stack_outputs_with_spot_in_dev() -> None:
    compute = _platform()
    sent: list[dict[str, Any]] = []
    aws = make_aws()
    aws.client("sagemaker").meta.events.register(
        "provide-client-params.sagemaker.CreateTrainingJob",
        lambda params, **_: sent.append(dict(params)),
    )
    options = train.TrainOptions(
        on="sagemaker",
        name="llama",
        val_data="val/",
        trainer_args=("--max-steps", "200"),
    )
    put_object(f"s3://{CURATED}/val/v.txt")
    started = train.start_sagemaker(aws, options, now=NOW)
    job = "kiln-dev-llama-20250501-120000"
    assert started.job == job
    assert started.artifact == f"s3://{ARTIFACTS}/models/{job}/output/model.tar.gz"
    request = sent[0]
    assert request == started.request
    image = compute[Outputs.TRAINING_IMAGE_URI.key]
    assert image.startswith(
        f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/cdk-hnb659fds-container-assets-"
        f"{ACCOUNT}-{REGION}:"
    )
    assert request["AlgorithmSpecification"]["TrainingImage"] == image
    assert request["AlgorithmSpecification"]["MetricDefinitions"][0]["Name"] == "train:loss"
    assert request["RoleArn"] == compute[Outputs.SAGEMAKER_TRAINING_ROLE_ARN.key]
    assert request["HyperParameters"] == {"max_steps": "200"}
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["train", "validation"]
    assert request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == (
        f"s3://{CURATED}/train/"
    )
    assert request["OutputDataConfig"] == {"S3OutputPath": f"s3://{ARTIFACTS}/models"}
    assert request["CheckpointConfig"] == {
        "S3Uri": f"s3://{ARTIFACTS}/checkpoints/{job}/",
        "LocalPath": "/opt/ml/checkpoints",
    }
    assert request["ResourceConfig"] == {
        "InstanceType": "ml.g5.2xlarge",
        "InstanceCount": 1,
        "VolumeSizeInGB": 100,
    }
    subnets = compute[Outputs.TRAINING_SUBNET_IDS.key].split(",")
    assert len(subnets) == 3
    assert request["VpcConfig"] == {
        "SecurityGroupIds": [compute[Outputs.TRAINING_SECURITY_GROUP_ID.key]],
        "Subnets": subnets,
    }
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {
        "MaxRuntimeInSeconds": 86400,
        "MaxWaitTimeInSeconds": 172800,
    }
    stored = client("sagemaker").describe_training_job(TrainingJobName=job)
    assert stored["CheckpointConfig"]["S3Uri"] == f"s3://{ARTIFACTS}/checkpoints/{job}/"
    assert stored["VpcConfig"]["Subnets"] == subnets
    assert stored["EnableManagedSpotTraining"] is True


@mock_aws
def test_prod_trains_on_demand_and_refuses_spot() -> None:
    _platform("prod")
    aws = make_aws("prod")
    started = train.start_sagemaker(aws, train.TrainOptions(on="sagemaker"), now=NOW, dry_run=True)
    assert started.request is not None
    assert started.request["EnableManagedSpotTraining"] is False
    assert "MaxWaitTimeInSeconds" not in started.request["StoppingCondition"]
    assert not client("sagemaker").list_training_jobs()["TrainingJobSummaries"]  # dry run
    with pytest.raises(OperateError, match="spot training is not allowed in prod"):
        train.start_sagemaker(aws, train.TrainOptions(on="sagemaker", capacity="spot"), now=NOW)


@mock_aws
def test_an_empty_dataset_prefix_is_refused_before_the_job() -> None:
    _platform()
    with pytest.raises(OperateError, match=f"no objects under s3://{CURATED}/nothing/"):
        train.start_sagemaker(make_aws(), train.TrainOptions(on="sagemaker", data="nothing"))
    assert not client("sagemaker").list_training_jobs()["TrainingJobSummaries"]


@mock_aws
def test_train_without_the_compute_stack_says_which_stack(
    capsys: pytest.CaptureFixture[str],
) -> None:
    deploy_stacks(components=(Component.DATA_LAKE,))
    assert main(["train", "--env", "dev", "--on", "sagemaker"]) == 1
    err = capsys.readouterr().err
    assert "kiln train: stack kiln-dev-compute is not deployed" in err


@mock_aws
def test_train_on_sagemaker_and_wait(capsys: pytest.CaptureFixture[str]) -> None:
    _platform()
    code = main(["train", "--env", "dev", "--on", "sagemaker", "--wait", "--", "--max-steps", "5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("started SageMaker training job kiln-dev-train-")
    assert "  capacity     managed spot\n" in out
    assert "completed: model s3://" in out  # moto's jobs complete at once
    assert "deploy it: kiln deploy-model --env dev --artifact s3://" in out


@mock_aws
def test_dry_run_prints_the_request(capsys: pytest.CaptureFixture[str]) -> None:
    _platform()
    assert main(["train", "--env", "dev", "--on", "sagemaker", "--dry-run"]) == 0
    request = json.loads(capsys.readouterr().out)
    assert request["TrainingJobName"].startswith("kiln-dev-train-")


@mock_aws
def test_eks_objects_use_settings_and_stack_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    compute = _platform()
    argv = ["train", "--env", "dev", "--on", "eks", "--name", "llama", "--", "--max-steps", "9"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    service, job = list(yaml.safe_load_all(captured.out))
    assert service["kind"] == "Service" and job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    assert job["metadata"]["namespace"] == "training-research"  # the first team
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research-gpu"
    assert job["spec"]["template"]["metadata"]["annotations"] == {
        "karpenter.sh/do-not-disrupt": "true"
    }
    assert pod["serviceAccountName"] == "trainer"
    container = pod["containers"][0]
    assert container["image"] == compute[Outputs.TRAINING_IMAGE_URI.key]
    command = container["command"] + container.get("args", [])
    data = f"s3://{CURATED}/train/"
    # The memory plan's strategy is pinned (the default small preset: a replica fits).
    assert command[-8:] == [
        "-m", "training.train", "--data", data, "--max-steps", "9", "--strategy", "ddp",
    ]  # fmt: skip
    env = {e["name"]: e.get("value") for e in container["env"]}
    name = job["metadata"]["name"]
    assert env[TrainerEnv.CHECKPOINT_DIR] == f"s3://{ARTIFACTS}/{CHECKPOINTS_PREFIX}{name}/"
    assert env[TrainerEnv.OUTPUT_DIR] == f"s3://{ARTIFACTS}/{MODELS_PREFIX}{name}/"
    assert "pipe it to kubectl apply -f -" in captured.err


@mock_aws
def test_eks_apply_runs_kubectl_or_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    _platform()
    aws = make_aws()
    started = train.eks_manifests(aws, train.TrainOptions(on="eks"), now=NOW)
    applied: list[tuple[list[str], str]] = []

    def kubectl(argv: Any, text: str) -> int:
        applied.append((list(argv), text))
        return 0

    train.apply_manifests(aws, started, kubectl)
    assert applied == [(["kubectl", "apply", "-f", "-"], started.manifests)]
    with pytest.raises(OperateError, match=r"kubectl apply failed \(exit 1\).*--name kiln-dev"):
        train.apply_manifests(aws, started, lambda argv, text: 1)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(OperateError, match="kubectl is not on PATH"):
        train.apply_manifests(aws, started)


@mock_aws
def test_eks_refuses_sagemaker_only_options(capsys: pytest.CaptureFixture[str]) -> None:
    _platform()
    assert main(["train", "--env", "dev", "--on", "eks", "--capacity", "spot"]) == 2
    assert "--capacity applies to --on sagemaker" in capsys.readouterr().err
    assert main(["train", "--env", "dev", "--on", "sagemaker", "--apply"]) == 2


LLAMA_3_8B_CONFIG = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}


def _fake_kubectl(monkeypatch: pytest.MonkeyPatch, cluster: FakeCluster) -> None:
    monkeypatch.setattr(train.shutil, "which", lambda name: f"/usr/local/bin/{name}")
    monkeypatch.setattr(train, "run_with_input", cluster)


@mock_aws
def test_eks_trainer_run_is_planned_from_s3_and_applied_with_the_plans_flags(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _platform()
    model = f"s3://{ARTIFACTS}/{MODELS_PREFIX}llama-8b/"
    put_object(f"{model}config.json", json.dumps(LLAMA_3_8B_CONFIG).encode())
    cluster = FakeCluster()
    _fake_kubectl(monkeypatch, cluster)
    argv = [
        "train", "--env", "dev", "--on", "eks", "--name", "llama", "--operator", "trainer",
        "--instance-type", "p5.48xlarge", "--instance-count", "2", "--model", model, "--apply",
        "--follow-hours", "0",
        "--", "--micro-batch-size", "1", "--seq-len", "4096", "--activation-checkpointing", "true",
    ]  # fmt: skip
    assert main(argv) == 0, cluster.errors
    out, err = capsys.readouterr()
    # The plan is printed before anything is applied, from the config.json in S3.
    assert f"memory plan: {model} on 16 x H100 80 GiB (p5.48xlarge)" in err
    assert "strategy        fsdp + activation checkpointing" in err
    assert "applied training run kiln-dev-llama-" in out
    assert "objects      TrainingRuntime, TrainJob" in out
    assert (
        "remove it: kubectl delete trainjob,trainingruntime -n training-research -l kiln.dev/"
        in out
    )
    assert cluster.kinds() == ["TrainingRuntime", "TrainJob"]
    runtime = next(o for (k, _, _), o in cluster.objects.items() if k == "TrainingRuntime")
    job = next(o for (k, _, _), o in cluster.objects.items() if k == "TrainJob")
    assert job["spec"]["trainer"] == {"numNodes": 2, "numProcPerNode": 8}
    assert job["spec"]["activeDeadlineSeconds"] == 24 * 3600
    assert job["metadata"]["namespace"] == "training-research"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research-gpu"
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    command = node["template"]["spec"]["template"]["spec"]["containers"][0]["command"]
    trainer = command[command.index("training.train") + 1 :]
    # The model goes to the trainer, and the planned strategy with it.
    assert trainer == [
        "--init-from", model, "--data", f"s3://{CURATED}/train/", "--micro-batch-size", "1",
        "--seq-len", "4096", "--activation-checkpointing", "true", "--strategy", "fsdp",
    ]  # fmt: skip


@mock_aws
def test_eks_refuses_an_impossible_run_with_the_numbers_before_applying(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _platform()
    cluster = FakeCluster()
    _fake_kubectl(monkeypatch, cluster)
    argv = [
        "train", "--env", "dev", "--on", "eks", "--instance-type", "p4d.24xlarge",
        "--model", "llama-3-70b", "--apply", "--", "--micro-batch-size", "1", "--seq-len", "4096",
    ]  # fmt: skip
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert cluster.calls == [] and "applied" not in out
    assert "memory plan: llama-3-70b on 8 x A100 40 GiB (p4d.24xlarge)" in err
    assert "total           235.97 GiB of    36.00 GiB: does NOT fit" in err
    assert (
        "refused, nothing applied: llama-3-70b needs 236.0 GiB per GPU with fsdp on 8 x A100, "
        "which have 36.0 GiB usable: try --activation-checkpointing true, or 14 nodes" in err
    )


@mock_aws
def test_eks_names_a_missing_s3_model_before_applying(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _platform()
    cluster = FakeCluster()
    _fake_kubectl(monkeypatch, cluster)
    model = f"s3://{ARTIFACTS}/{MODELS_PREFIX}nothing-here"
    argv = ["train", "--env", "dev", "--on", "eks", "--model", model, "--apply"]
    assert main(argv) == 2
    assert cluster.calls == []
    assert (
        f"--model: {model}/config.json does not exist: --model must name a Hugging Face model "
        "directory" in capsys.readouterr().err
    )


@mock_aws
def test_eks_default_objects_apply_and_a_cluster_without_the_trainer_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _platform()
    cluster = FakeCluster(installed=())
    _fake_kubectl(monkeypatch, cluster)
    follow = ["--follow-hours", "0"]  # following a run: tests/kiln_cli/test_gpu_cluster.py
    assert main(["train", "--env", "dev", "--on", "eks", "--apply", *follow]) == 0
    assert cluster.kinds() == ["Service", "Job"]
    out = capsys.readouterr().out
    assert "remove it: kubectl delete job,service -n training-research -l" in out
    trainer = ["train", "--env", "dev", "--on", "eks", "--operator", "trainer", "--apply"]
    assert main([*trainer, *follow]) == 1
    assert cluster.errors == [
        'no matches for kind "TrainingRuntime" in "trainer.kubeflow.org/v1alpha1"'
    ]
    assert "kubectl apply failed (exit 1)" in capsys.readouterr().err


@mock_aws
def test_the_retired_operator_and_operator_on_sagemaker_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _platform()
    assert main(["train", "--env", "dev", "--on", "eks", "--operator", "kubeflow"]) == 2
    err = capsys.readouterr().err
    assert "--operator kubeflow: the Kubeflow training operator's PyTorchJob" in err
    assert "use --operator trainer" in err
    assert main(["train", "--env", "dev", "--on", "sagemaker", "--operator", "trainer"]) == 2
    assert "--operator applies to --on eks" in capsys.readouterr().err


TRACKING_ARN = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:mlflow-tracking-server/kiln-dev-mlflow"


def _tracked_aws(env: str = "dev") -> Any:
    """An environment with `experiment_tracking.enabled` whose compute stack has the server."""
    deploy_stacks(
        env,
        components=(Component.DATA_LAKE, Component.COMPUTE),
        extra={Component.COMPUTE: {Outputs.TRACKING_SERVER_ARN.key: TRACKING_ARN}},
    )
    create_buckets(env=env)
    put_object(f"s3://kiln-{env}-curated-{ACCOUNT}-{REGION}/train/shard-0.txt")
    aws = make_aws(env)
    tracking = aws.settings.experiment_tracking.model_copy(update={"enabled": True})
    aws.settings = aws.settings.model_copy(update={"experiment_tracking": tracking})
    return aws


def _sent(aws: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    aws.client("sagemaker").meta.events.register(
        "provide-client-params.sagemaker.CreateTrainingJob",
        lambda params, **_: sent.append(dict(params)),
    )
    return sent


@mock_aws
def test_a_sagemaker_run_gets_the_tracking_server_as_its_tracking_uri() -> None:
    aws = _tracked_aws()
    sent = _sent(aws)
    started = train.start_sagemaker(
        aws, train.TrainOptions(on="sagemaker", register=False), now=NOW
    )
    (request,) = sent
    assert request["Environment"] == {TrainerEnv.TRACKING_URI: TRACKING_ARN}
    assert ("tracking", TRACKING_ARN) in started.summary


@mock_aws
def test_an_eks_run_gets_the_tracking_server_as_its_tracking_uri() -> None:
    aws = _tracked_aws()
    started = train.eks_manifests(aws, train.TrainOptions(on="eks", register=False), now=NOW)
    assert started.manifests is not None
    job = next(m for m in yaml.safe_load_all(started.manifests) if m["kind"] == "Job")
    env = {
        e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env[TrainerEnv.TRACKING_URI] == TRACKING_ARN


@mock_aws
def test_without_experiment_tracking_no_tracking_uri_is_set() -> None:
    _platform()
    aws = make_aws()
    started = train.start_sagemaker(
        aws, train.TrainOptions(on="sagemaker", register=False), now=NOW, dry_run=True
    )
    assert started.request is not None and "Environment" not in started.request
    assert ("tracking", "-") in started.summary


@mock_aws
def test_tracking_enabled_but_the_stack_without_the_server_says_to_redeploy() -> None:
    _platform()
    aws = make_aws()
    tracking = aws.settings.experiment_tracking.model_copy(update={"enabled": True})
    aws.settings = aws.settings.model_copy(update={"experiment_tracking": tracking})
    with pytest.raises(OperateError, match="has no output TrackingServerArn"):
        train.start_sagemaker(aws, train.TrainOptions(on="sagemaker", register=False), now=NOW)
    assert not client("sagemaker").list_training_jobs()["TrainingJobSummaries"]


@mock_aws
def test_a_directory_model_on_sagemaker_is_written_uncompressed_and_registered_as_a_prefix() -> (
    None
):
    _platform()
    deploy_stacks(components=(Component.MODELS, Component.SERVING))
    aws = make_aws()
    sent = _sent(aws)
    options = train.TrainOptions(on="sagemaker", trainer_args=("--model-format", "directory"))
    started = train.start_sagemaker(aws, options, now=NOW)
    (request,) = sent
    job = "kiln-dev-train-20250501-120000"
    # CreateTrainingJob's OutputDataConfig.CompressionType: GZIP (default) | NONE.
    assert request["OutputDataConfig"] == {
        "S3OutputPath": f"s3://{ARTIFACTS}/models",
        "CompressionType": "NONE",
    }
    prefix = f"s3://{ARTIFACTS}/models/{job}/output/model/"
    assert started.artifact == prefix
    # The version the run registers names the prefix: ModelDataSource S3Prefix, uncompressed.
    assert request["Environment"][TrainerEnv.MODEL_ARTIFACT] == prefix
    assert request["HyperParameters"] == {"model_format": "directory"}
    stored = client("sagemaker").describe_training_job(TrainingJobName=job)
    assert stored["OutputDataConfig"]["S3OutputPath"] == f"s3://{ARTIFACTS}/models"


@mock_aws
def test_a_tarball_model_on_sagemaker_keeps_the_default_compression() -> None:
    _platform()
    started = train.start_sagemaker(
        make_aws(),
        train.TrainOptions(on="sagemaker", trainer_args=("--model-format=tarball",)),
        now=NOW,
        dry_run=True,
    )
    assert started.request is not None
    assert "CompressionType" not in started.request["OutputDataConfig"]
    assert started.artifact.endswith("/output/model.tar.gz")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("both", "SageMaker writes the model either as model.tar.gz or uncompressed"),
        ("zip", "--model-format 'zip': use one of tarball, directory, both"),
    ],
)
@mock_aws
def test_model_formats_sagemaker_cannot_write_are_refused_before_the_job(
    value: str, message: str
) -> None:
    _platform()
    options = train.TrainOptions(on="sagemaker", trainer_args=("--model-format", value))
    with pytest.raises(OperateError, match=message):
        train.start_sagemaker(make_aws(), options, now=NOW)
    assert not client("sagemaker").list_training_jobs()["TrainingJobSummaries"]


@mock_aws
def test_a_directory_model_on_eks_is_named_by_its_prefix() -> None:
    _platform()
    options = train.TrainOptions(
        on="eks", register=False, trainer_args=("--model-format", "directory")
    )
    started = train.eks_manifests(make_aws(), options, now=NOW)
    assert started.artifact == f"s3://{ARTIFACTS}/models/kiln-dev-train-20250501-120000/model/"
    assert ("model", started.artifact) in started.summary


@mock_aws
def test_a_local_run_reads_and_writes_the_lake_registers_and_tracks() -> None:
    aws = _tracked_aws()
    deploy_stacks(components=(Component.MODELS, Component.SERVING))
    started = train.local_run(
        aws, train.TrainOptions(on="local", trainer_args=("--max-steps", "3")), now=NOW
    )
    job = "kiln-dev-train-20250501-120000"
    assert started.command is not None and started.environment is not None
    assert started.command[1:] == [
        "-m", "training.train", "--data", f"s3://{CURATED}/train/", "--max-steps", "3",
    ]  # fmt: skip
    env = started.environment
    assert env[TrainerEnv.TRACKING_URI] == TRACKING_ARN
    assert env[TrainerEnv.JOB_NAME] == job
    assert env[TrainerEnv.CHECKPOINT_DIR] == f"s3://{ARTIFACTS}/{CHECKPOINTS_PREFIX}{job}/"
    assert env[TrainerEnv.OUTPUT_DIR] == f"s3://{ARTIFACTS}/{MODELS_PREFIX}{job}/"
    assert env[TrainerEnv.MODEL_PACKAGE_GROUP] == "kiln-llm"
    assert TrainerEnv.MODEL_ARTIFACT not in env  # the trainer registers what it uploaded
    assert started.artifact == f"s3://{ARTIFACTS}/{MODELS_PREFIX}{job}/model.tar.gz"


@mock_aws
def test_local_refuses_what_only_the_clusters_take() -> None:
    _platform()
    for options, flag in (
        (train.TrainOptions(on="local", instance_count=2), "--instance-count"),
        (train.TrainOptions(on="local", capacity="spot"), "--capacity"),
        (train.TrainOptions(on="local", operator="trainer"), "--operator"),
    ):
        with pytest.raises(OperateError, match=f"{flag} applies to --on sagemaker or eks"):
            train.local_run(make_aws(), options, now=NOW)


@mock_aws
def test_kiln_train_on_local_runs_the_trainer_with_the_runs_variables(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kiln_cli import cli

    _platform()
    argv = ["train", "--env", "dev", "--on", "local", "--no-register", "--", "--max-steps", "2"]
    assert main([*argv[:5], "--dry-run", *argv[5:]]) == 0
    line = capsys.readouterr().out
    assert f"{TrainerEnv.OUTPUT_DIR}=s3://{ARTIFACTS}/{MODELS_PREFIX}kiln-dev-train-" in line
    assert line.rstrip().endswith(f"-m training.train --data s3://{CURATED}/train/ --max-steps 2")

    # The real launch, with the trainer swapped for a probe that records what it was given.
    seen = tmp_path / "seen.json"
    probe = (
        "import json, os, sys; json.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, "
        f"open({str(seen)!r}, 'w'))"
    )
    real_run = subprocess.run

    def launch(command: list[str], **kwargs: Any) -> Any:
        assert command[1:3] == ["-m", "training.train"]
        return real_run([command[0], "-c", probe, *command[3:]], **kwargs)

    monkeypatch.setattr(cli.subprocess, "run", launch)
    monkeypatch.setattr(cli.local, "missing_workload_packages", list)  # the probe needs none
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("training kiln-dev-train-") and "completed: model s3://" in out
    recorded = json.loads(seen.read_text())
    assert recorded["argv"] == ["--data", f"s3://{CURATED}/train/", "--max-steps", "2"]
    assert recorded["env"][TrainerEnv.CHECKPOINT_DIR].startswith(f"s3://{ARTIFACTS}/checkpoints/")
    assert TrainerEnv.TRACKING_URI not in recorded["env"]  # no experiment tracking in dev
