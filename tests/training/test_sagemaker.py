"""The SageMaker contract, against a temporary /opt/ml tree (KILN_SAGEMAKER_ROOT points at it)."""

from __future__ import annotations

import dataclasses
import json
import sys
import tarfile
from pathlib import Path

import pytest

from modeling.artifact import MODEL_FILES, load_model_dir
from tests.training.support import TINY, parse_events, write_corpus
from training import sagemaker, train


def _tree(root: Path, hyperparameters: dict[str, str]) -> Path:
    config = root / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "e0"})
    )
    write_corpus(root / "input" / "data" / "train", files=8)
    write_corpus(root / "input" / "data" / "validation", files=2, seed=7)
    return root


def _hyperparameters(**extra: str) -> dict[str, str]:
    """TINY as SageMaker passes it: keys without dashes, values as strings, some JSON-quoted."""
    flags = dict(zip(TINY[0::2], TINY[1::2], strict=True))
    hps = {flag[2:].replace("-", "_"): value for flag, value in flags.items()}
    hps["model"] = '"tiny"'  # the SageMaker Python SDK JSON-encodes every value
    hps["sagemaker_region"] = '"us-east-1"'  # the SDK's own entries are not trainer flags
    return hps | extra


@pytest.fixture
def sm_root(tmp_path: Path, clean_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "opt-ml"
    monkeypatch.setenv(sagemaker.ROOT_ENV, str(root))
    monkeypatch.setenv("TRAINING_JOB_NAME", "kiln-sm-1")
    return root


def test_training_job_writes_the_model_layout_and_checkpoints(
    sm_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _tree(sm_root, _hyperparameters(max_steps="4"))
    assert sagemaker.detected()
    assert train.main(["train"]) == 0
    events = parse_events(capsys.readouterr().out)
    start = events[0]
    assert start["job"] == "kiln-sm-1"
    assert start["data"] == str(sm_root / "input" / "data" / "train")
    assert start["val_segments"] > 0  # from the validation channel
    model_dir = sm_root / "model"
    # SageMaker tars /opt/ml/model itself: the files must sit at its top, readable by anyone.
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(MODEL_FILES)
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in model_dir.iterdir())
    assert (sm_root / "checkpoints" / "latest.json").is_file()
    assert not (sm_root / "output" / "failure").exists()
    model, tok = load_model_dir(model_dir)
    assert model.config.hidden_size == 64 and tok.eos_id == 258
    # What the endpoint receives: the tarball SageMaker makes from the directory.
    with tarfile.open(sm_root / "model.tar.gz", "w:gz") as tar:
        for p in model_dir.iterdir():
            tar.add(p, arcname=p.name)
    with tarfile.open(sm_root / "model.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted(MODEL_FILES)


def test_sm_variables_take_precedence(
    sm_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree(sm_root, {"model": "small"})
    data = write_corpus(tmp_path / "elsewhere", files=3)
    monkeypatch.setenv("SM_HPS", json.dumps({"model": "tiny", "max_steps": 2}))
    monkeypatch.setenv("SM_CHANNELS", json.dumps(["training"]))
    monkeypatch.setenv("SM_CHANNEL_TRAINING", str(data))
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model-out"))
    env = sagemaker.load()
    assert env.hyperparameters == {"model": "tiny", "max_steps": 2}
    assert env.train_channel == data and env.val_channel is None
    assert env.model_dir == tmp_path / "model-out"
    assert sagemaker.hyperparameter_args(env.hyperparameters) == [
        "--model", "tiny", "--max-steps", "2",
    ]  # fmt: skip


def test_a_bad_hyperparameter_fails_the_job_with_a_reason(
    sm_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _tree(sm_root, _hyperparameters(max_steps="-3"))
    with pytest.raises(SystemExit) as exit_:
        train.main(["train"])
    assert exit_.value.code == 2
    assert "--max-steps: must be > 0" in capsys.readouterr().err
    assert "bad hyperparameters" in (sm_root / "output" / "failure").read_text()


def test_a_job_without_a_train_channel_fails_clearly(
    sm_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _tree(sm_root, _hyperparameters())
    for f in (sm_root / "input" / "data" / "train").iterdir():
        f.unlink()
    assert train.main(["train"]) == train.EXIT_BAD_INPUT
    reason = (sm_root / "output" / "failure").read_text()
    assert "no text files" in reason and "input/data/train" in reason


def test_multi_host_multi_gpu_jobs_relaunch_under_torchrun(tmp_path: Path) -> None:
    env = sagemaker.SageMakerEnv(
        root=tmp_path,
        hyperparameters={},
        channels={},
        model_dir=tmp_path / "model",
        output_data_dir=tmp_path / "output" / "data",
        checkpoint_dir=tmp_path / "checkpoints",
        hosts=["algo-1", "algo-2"],
        current_host="algo-2",
        job_name="j",
    )
    assert sagemaker.torchrun_command(env, gpus=8) == [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc_per_node=8", "--node_rank=1",
        "--master_addr=algo-1", f"--master_port={sagemaker.MASTER_PORT}",
        "-m", "training.train", "train",
    ]  # fmt: skip
    single = dataclasses.replace(env, hosts=["algo-1"], current_host="algo-1")
    assert sagemaker.torchrun_command(single, gpus=1) is None
    assert sagemaker.torchrun_command(single, gpus=0) is None


def test_not_detected_without_the_tree(tmp_path: Path, clean_env: dict[str, str]) -> None:
    assert not sagemaker.detected({sagemaker.ROOT_ENV: str(tmp_path / "none")})
    assert sagemaker.detected({"SM_MODEL_DIR": "/opt/ml/model"})
