"""The real entry point: the loss falls, torchrun matches one process, SIGTERM resumes exactly."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
import torch
from moto import mock_aws

from modeling.artifact import MODEL_FILES, load_model_dir
from tests.training.support import TINY, Run, parse_events, weights
from training import train


def test_loss_falls_and_the_model_is_written(
    corpus: Path, tmp_path: Path, run_trainer: Callable[..., Run]
) -> None:
    out = tmp_path / "out"
    args = [*TINY, "--data", str(corpus), "--max-steps", "40", "--lr", "3e-3"]
    run = run_trainer([*args, "--eval-every", "20", "--output-dir", str(out)])
    assert run.returncode == 0, run.stderr
    losses = run.losses()
    assert sorted(losses) == list(range(1, 41))
    assert sum(losses[s] for s in range(36, 41)) / 5 < 0.6 * sum(losses[s] for s in range(1, 6)) / 5
    vals = run.of("val")
    assert [v["step"] for v in vals] == [20, 40]
    assert float(vals[1]["val_loss"]) < float(vals[0]["val_loss"])  # type: ignore[arg-type]
    start = run.of("start")[0]
    assert start["kernels_compiled"] is True and start["precision"] == "fp32"
    assert float(run.of("train")[-1]["tokens_per_s"]) > 0  # type: ignore[arg-type]
    with tarfile.open(out / "model.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted(MODEL_FILES)
        assert all(m.mode == 0o644 for m in tar.getmembers())
    model, tok = load_model_dir(out / "model")
    assert model.config.num_layers == 2 and tok.vocab_size == 259


def test_two_process_torchrun_equals_one_process_with_the_same_global_batch(
    corpus: Path, tmp_path: Path, run_trainer: Callable[..., Run]
) -> None:
    # Both accumulate gradients, so the two processes also skip DDP's all-reduce (no_sync) on
    # all but the last micro-batch of a step.
    common = [*TINY, "--data", str(corpus), "--max-steps", "6", "--micro-batch-size", "2"]
    one = run_trainer([*common, "--grad-accum", "4", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "training.train",
    ]  # fmt: skip
    two = run_trainer(
        [*common, "--grad-accum", "2", "--output-dir", str(tmp_path / "two")], launcher=torchrun
    )
    assert two.returncode == 0, two.stderr
    assert two.of("start")[0]["world_size"] == 2
    assert len(two.of("model")) == 1  # rank 0 alone reports and writes
    for step, loss in one.losses().items():
        assert two.losses()[step] == pytest.approx(loss, rel=1e-5)
    a, b = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_sigterm_then_resume_follows_the_uninterrupted_run_exactly(
    corpus: Path, tmp_path: Path, run_trainer: Callable[..., Run], clean_env: dict[str, str]
) -> None:
    steps = 300  # long enough that the signal lands mid-run on a fast machine too
    args = [*TINY, "--data", str(corpus), "--max-steps", str(steps), "--eval-every", "100"]
    full = run_trainer([*args, "--output-dir", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr

    ck = tmp_path / "ck"
    resumable = [*args, "--checkpoint-dir", str(ck), "--output-dir", str(tmp_path / "resumed")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.train", *resumable],
        env=clean_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if '"event": "train"' in line and json.loads(line)["step"] >= 5:
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=60)
    first = Run(proc.returncode, parse_events("".join(lines) + rest), err)
    assert first.returncode == train.EXIT_SIGTERM, err
    stopped = int(first.of("stopped")[0]["step"])  # type: ignore[arg-type]
    assert 5 <= stopped < steps
    assert first.of("checkpoint")[-1]["step"] == stopped
    assert not first.of("model")

    second = run_trainer(resumable)
    assert second.returncode == 0, second.stderr
    assert second.of("resume")[0]["step"] == stopped
    assert min(second.losses()) == stopped + 1
    # Bit for bit: the same losses at every step, the same validation, the same weights.
    assert first.losses() | second.losses() == full.losses()
    assert [v["val_loss"] for v in second.of("val")] == [
        v["val_loss"]
        for v in full.of("val")
        if int(v["step"]) > stopped  # type: ignore[call-overload]
    ]
    a, b = weights(tmp_path / "full" / "model"), weights(tmp_path / "resumed" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_restarted_only_exports(
    corpus: Path, tmp_path: Path, clean_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*TINY, "--data", str(corpus), "--max-steps", "3", "--checkpoint-dir", str(tmp_path)]
    assert train.main(args) == 0
    capsys.readouterr()
    assert train.main(args) == 0
    again = parse_events(capsys.readouterr().out)
    assert not [e for e in again if e["event"] == "train"]
    assert [e["step"] for e in again if e["event"] == "model"] == [3]


def test_s3_data_checkpoints_and_output_through_moto(
    corpus: Path, clean_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        for bucket in ("curated", "artifacts"):
            s3.create_bucket(Bucket=bucket)
        for p in sorted(corpus.iterdir()):
            s3.put_object(Bucket="curated", Key=f"text/{p.name}", Body=p.read_bytes())
        code = train.main(
            [
                *TINY,
                "--data", "s3://curated/text/",
                "--max-steps", "4",
                "--checkpoint-every", "2",
                "--checkpoint-dir", "s3://artifacts/checkpoints/job-1",
                "--output-dir", "s3://artifacts/models/job-1",
            ]
        )  # fmt: skip
        assert code == 0
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="artifacts")["Contents"]}
    assert {
        "checkpoints/job-1/latest.json",
        "checkpoints/job-1/step-00000004/state.pt",
        "models/job-1/model.tar.gz",
    } <= keys
    events = parse_events(capsys.readouterr().out)
    assert events[0]["data"] == "s3://curated/text/"


def test_environment_variables_of_the_eks_job(
    corpus: Path,
    tmp_path: Path,
    clean_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KILN_CHECKPOINT_DIR", str(tmp_path / "ck"))
    monkeypatch.setenv("KILN_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("KILN_JOB_NAME", "llama-7")
    assert train.main([*TINY, "--data", str(corpus), "--max-steps", "2"]) == 0
    assert {e["job"] for e in parse_events(capsys.readouterr().out)} == {"llama-7"}
    assert (tmp_path / "ck" / "latest.json").is_file()
    assert (tmp_path / "out" / "model.tar.gz").is_file()
    kiln = json.loads((tmp_path / "out" / "model" / "kiln.json").read_text())
    assert kiln["training"]["job_name"] == "llama-7"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-steps", "0"], "--max-steps: must be > 0"),
        (["--lr", "fast"], "--lr: expected a float"),
        (["--model", "huge"], "invalid choice: 'huge'"),
        (["--num-heads", "5"], "multiple of num_kv_heads"),
        (["--seq-len", "4096"], "exceeds the model's max_seq_len"),
        (["--compile", "maybe"], "expected true or false"),
        (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
        (["--warmup-steps", "50", "--max-steps", "10"], "exceeds --max-steps"),
        (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], message: str, clean_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        train.main(["--model", "tiny", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no text files"),
    ],
)
def test_missing_or_empty_data_directory(
    tmp_path: Path,
    make: Callable[[Path], None],
    message: str,
    clean_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "data"
    make(root)
    started = time.monotonic()
    assert train.main([*TINY, "--data", str(root)]) == train.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and str(root) in err
    assert time.monotonic() - started < 10  # fails before building a model


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    lam = [train.lr_lambda(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert lam[:4] == [0.2, 0.4, 0.6, 0.8] and lam[4] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(lam[4:]))
    assert lam[20] == pytest.approx(0.1)


def test_a_run_fitted_to_its_minutes_plans_its_steps_and_ends_on_time(
    corpus: Path, tmp_path: Path, run_trainer: Callable[..., Run]
) -> None:
    """--fit-to-minutes: the first steps are timed, then the run is sized to the budget (steps,
    warm-up, five evaluations) and its progress is shown against that total."""
    minutes = 0.2
    args = [*TINY, "--data", str(corpus), "--max-steps", "1000000", "--lr", "3e-3"]
    args += ["--max-minutes", str(minutes), "--fit-to-minutes", "true", "--progress-every", "2"]
    started = time.monotonic()
    run = run_trainer([*args, "--output-dir", str(tmp_path / "out")])
    assert run.returncode == 0, run.stderr
    plans = run.of("plan")
    assert plans and plans[0]["step"] == 10  # 2 untimed steps, 8 timed
    first, last = plans[0], plans[-1]
    assert 10 < int(last["total_steps"]) < 1000000  # type: ignore[call-overload]
    assert first["warmup_steps"] == max(1, round(int(first["total_steps"]) * 0.05))  # type: ignore[call-overload]
    assert first["eval_every"] == int(first["total_steps"]) // 5  # type: ignore[call-overload]
    trains = run.of("train")
    final = trains[-1]
    # It ended by its schedule or by the clock, never far past the budget.
    assert int(final["step"]) <= int(last["total_steps"])  # type: ignore[call-overload]
    assert float(final["elapsed_s"]) <= minutes * 60 + 2  # type: ignore[arg-type]
    assert time.monotonic() - started < 60
    # The JSON metrics carry the total and the ETA; stderr has the same as a line for a person.
    after_plan = [e for e in trains if int(e["step"]) > 10]  # type: ignore[call-overload]
    assert all(e["total_steps"] is not None and e["eta_s"] is not None for e in after_plan)
    lines = [line for line in run.stderr.splitlines() if "INFO training: step " in line]
    assert len(lines) >= 3, run.stderr
    assert " tok/s | " in lines[-1] and "elapsed | ETA " in lines[-1]
    assert f"step {final['step']}/" in lines[-1]
    assert len(run.of("val")) >= 3


def test_fit_to_minutes_needs_minutes(run_trainer: Callable[..., Run]) -> None:
    run = run_trainer([*TINY, "--fit-to-minutes", "true"])
    assert run.returncode == 2
    assert "--fit-to-minutes needs --max-minutes" in run.stderr


def test_the_model_directory_goes_to_s3_uncompressed(
    corpus: Path, clean_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--model-format directory`: `<output>/model/` holds the model directory's files as they
    are, a prefix the serving stack deploys as uncompressed model data; no tarball is made."""
    from kiln_cli.operate.deploy import model_prefix_problems

    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="artifacts")
        code = train.main(
            [
                *TINY,
                "--data", str(corpus),
                "--max-steps", "2",
                "--output-dir", "s3://artifacts/models/job-2",
                "--model-format", "directory",
            ]
        )  # fmt: skip
        assert code == 0
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="artifacts")["Contents"]}
    names = sorted(k.removeprefix("models/job-2/model/") for k in keys)
    assert sorted(MODEL_FILES) == names and "models/job-2/model.tar.gz" not in keys
    assert model_prefix_problems(names) == []
    model = parse_events(capsys.readouterr().out)[-1]
    assert model["event"] == "model" and model["path"] == "s3://artifacts/models/job-2/model/"


def test_a_finished_run_registers_a_version_pending_approval(
    corpus: Path,
    clean_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With a model package group named, the run's end registers its S3 artifact with the
    run's metrics and hyperparameters (kiln/registry.py); without one, nothing is called."""
    monkeypatch.setenv("KILN_INFERENCE_IMAGE", "123456789012.dkr.ecr.us-east-1.amazonaws.com/s:1")
    monkeypatch.setenv("KILN_CODE_REVISION", "feedface")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="artifacts")
        sagemaker = boto3.client("sagemaker", region_name="us-east-1")
        sagemaker.create_model_package_group(ModelPackageGroupName="kiln-llm")
        common = [*TINY, "--data", str(corpus), "--max-steps", "3", "--lr", "3e-3"]
        out = ["--output-dir", "s3://artifacts/models/job-1", "--job-name", "job-1"]
        assert train.main([*common, *out, "--model-package-group", "kiln-llm"]) == 0
        (summary,) = sagemaker.list_model_packages(ModelPackageGroupName="kiln-llm")[
            "ModelPackageSummaryList"
        ]
        described = sagemaker.describe_model_package(ModelPackageName=summary["ModelPackageArn"])
        # A local artifact cannot be registered: the run says so and fails.
        local = train.main([*common, "--model-package-group", "kiln-llm"])
    events = parse_events(capsys.readouterr().out)
    (registered,) = [e for e in events if e["event"] == "registered"]
    assert registered["model_package"] == summary["ModelPackageArn"]
    assert described["ModelApprovalStatus"] == "PendingManualApproval"
    (container,) = described["InferenceSpecification"]["Containers"]
    assert container["ModelDataUrl"] == "s3://artifacts/models/job-1/model.tar.gz"
    # Beside kiln's server, the pinned LMI container of the region, over the same model data.
    (extra,) = described["AdditionalInferenceSpecifications"]
    assert extra["Name"] == "lmi"
    assert extra["Containers"] == [
        {
            "Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/djl-inference:"
            "0.36.0-lmi20.0.0-cu128-v1.0",
            "ModelDataUrl": container["ModelDataUrl"],
        }
    ]
    metadata = described["CustomerMetadataProperties"]
    val = next(e for e in events if e["event"] == "val")
    assert float(metadata["val_loss"]) == pytest.approx(float(val["val_loss"]), rel=1e-5)
    assert metadata["steps"] == "3" and metadata["code_revision"] == "feedface"
    assert metadata["hp.lr"] == "0.003" and metadata["hp.max_steps"] == "3"
    assert local == 2
