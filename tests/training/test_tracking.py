"""Experiment tracking: a run with a tracking URI logs its parameters, metrics and model to
MLflow (a local file store here); a run without one never imports mlflow."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.training.support import TINY, Run
from training.tracking import MAX_PARAM_CHARS, flatten

pytest.importorskip("mlflow", reason="the tracking extra (mlflow-skinny) is not installed")


def test_a_tracked_run_logs_parameters_metrics_and_the_model(
    corpus: Path,
    tmp_path: Path,
    run_trainer: Callable[..., Run],
    clean_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    uri = store.as_uri()
    # MLflow 3 keeps its file store only for those who opt in (its database stores need
    # SQLAlchemy, which mlflow-skinny does not bring).
    clean_env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this process reads the store too
    clean_env["MLFLOW_TRACKING_URI"] = uri
    clean_env["KILN_CODE_REVISION"] = "abc1234"
    args = [*TINY, "--data", str(corpus), "--max-steps", "6", "--eval-every", "3"]
    run = run_trainer([*args, "--output-dir", str(tmp_path / "out"), "--experiment", "fine-tune"])
    assert run.returncode == 0, run.stderr

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fine-tune")
    assert experiment is not None
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.status == "FINISHED" and logged.info.run_name == "kiln-local"
    params = logged.data.params
    assert params["seq_len"] == "32" and params["lr"] == "0.002" and params["max_steps"] == "6"
    assert params["run.model.num_layers"] == "2" and params["code_revision"] == "abc1234"
    assert params["run.tokens_per_step"] == str(run.of("start")[0]["tokens_per_step"])
    assert "tracking_uri" in params and "model_config" not in params
    history = client.get_metric_history(logged.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in history] == [run.losses()[s] for s in range(1, 7)]
    vals = client.get_metric_history(logged.info.run_id, "val_perplexity")
    assert [m.step for m in vals] == [3, 6]
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= artifacts
    assert logged.data.tags["kiln.model"].endswith("model.tar.gz")


def test_an_untracked_run_never_imports_mlflow(
    corpus: Path, tmp_path: Path, run_trainer: Callable[..., Run]
) -> None:
    probe = (
        "import sys\n"
        "from training.train import main\n"
        "code = main(sys.argv[1:])\n"
        "assert 'mlflow' not in sys.modules, 'mlflow was imported'\n"
        "sys.exit(code)\n"
    )
    args = [*TINY, "--data", str(corpus), "--max-steps", "2", "--output-dir", str(tmp_path / "o")]
    run = run_trainer(args, launcher=[sys.executable, "-c", probe])
    assert run.returncode == 0, run.stderr


def test_a_failed_run_is_marked_failed(
    tmp_path: Path,
    run_trainer: Callable[..., Run],
    clean_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    clean_env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this process reads the store too
    empty = tmp_path / "empty"
    empty.mkdir()
    run = run_trainer([*TINY, "--data", str(empty), "--tracking-uri", uri])
    assert run.returncode == 2
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kiln")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    # The data is read before the run starts in MLflow, or the run ends FAILED: never RUNNING.
    assert all(r.info.status == "FAILED" for r in runs)


def test_parameters_are_flattened_and_cut_at_mlflows_limit() -> None:
    flat = flatten({"model": {"hidden_size": 64, "rope": None}, "lora": None, "long": "x" * 7000})
    assert flat["model.hidden_size"] == "64"
    assert "model.rope" not in flat and "lora" not in flat
    assert len(flat["long"]) == MAX_PARAM_CHARS and flat["long"].endswith("...")
