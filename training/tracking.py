"""Experiment tracking, optional: the run's parameters, metrics and model go to MLflow when a
tracking URI is given (`--tracking-uri`, or `$MLFLOW_TRACKING_URI`).

`mlflow` is imported only then: a run without a tracking URI never loads it (it takes seconds
to import and is not needed to train). The URI is anything MLflow takes: a local file store
(`file:///path/mlruns`, which MLflow 3 accepts only with `MLFLOW_ALLOW_FILE_STORE=true`), a
tracking server's URL, or a SageMaker managed MLflow tracking server's ARN (the
`sagemaker-mlflow` plugin signs the requests with the job's own credentials).

What is logged: the run's flags as parameters under their own names (`lr`, `seq_len`,
`max_steps`, ...); from the events the run reports (`training.metrics`), `start` as `run.`
parameters (the model's shape, the data, the strategy, nested keys joined with dots) with the
code revision where `$KILN_CODE_REVISION` gives it, `train` and `val` as metrics at their
step (`train_loss`, `lr`, `grad_norm`, `tokens_per_s`, `tokens`, `val_loss`,
`val_perplexity`); the exported model directory as the run's `model` artifacts; and how the
run ended as its status.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from kiln.contract import TrainerEnv
from training.state import TrainError

log = logging.getLogger(__name__)

TRACKING_URI_ENV = TrainerEnv.TRACKING_URI
EXPERIMENT_ENV = TrainerEnv.EXPERIMENT
DEFAULT_EXPERIMENT = "kiln"
# Where the code revision comes from when the run has one (set by CI or the image build).
REVISION_ENV = "KILN_CODE_REVISION"
# MLflow's limit on a parameter value (longer ones are cut, with a mark).
MAX_PARAM_CHARS = 6000
# Numbers a `train`/`val` event carries that are metrics; the rest of the event is context.
METRIC_FIELDS = (
    "train_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tokens",
    "val_loss",
    "val_perplexity",
)


class Tracker(Protocol):
    """Where the run's events go besides stdout."""

    def event(self, record: Mapping[str, Any]) -> None: ...

    def log_hyperparameters(self, values: Mapping[str, Any]) -> None: ...

    def log_model(self, directory: Path) -> None: ...

    def close(self, status: str) -> None: ...


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"model": {"hidden_size": 64}}` -> `{"model.hidden_size": "64"}`; None is left out,
    lists and other values become their text (cut at MLflow's limit)."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif value is not None:
            text = str(value)
            flat[name] = (
                text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
            )
    return flat


class MlflowTracker:
    """One MLflow run for one training run (rank 0 only)."""

    def __init__(self, uri: str, *, experiment: str, run_name: str, log_model: bool = True) -> None:
        try:
            import mlflow  # here, not at the top: only a tracked run loads it
        except ImportError as err:
            raise TrainError(
                f"--tracking-uri {uri} asks for MLflow, which is not installed: "
                "pip install '.[tracking]' (mlflow-skinny and the SageMaker plugin)"
            ) from err

        self._mlflow = mlflow
        self.uri, self.should_log_model = uri, log_model
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_name)
        self.run_id = self.run.info.run_id
        log.info("tracking the run in MLflow: %s (run %s)", uri, self.run_id)

    def event(self, record: Mapping[str, Any]) -> None:
        kind = record.get("event")
        if kind == "start":
            run = {k: v for k, v in record.items() if k not in ("event", "job")}
            params = flatten(run, "run.")
            revision = os.environ.get(REVISION_ENV)
            if revision:
                params["code_revision"] = revision
            self._mlflow.log_params(params)
        elif kind in ("train", "val"):
            metrics = {
                k: float(record[k]) for k in METRIC_FIELDS if isinstance(record.get(k), int | float)
            }
            self._mlflow.log_metrics(metrics, step=int(record.get("step", 0)))
        elif kind in ("resume", "stopped"):
            self._mlflow.set_tag(
                f"kiln.{kind}", str(record.get("checkpoint") or record.get("reason"))
            )
        elif kind == "model":
            self._mlflow.set_tag("kiln.model", str(record.get("path")))

    def log_hyperparameters(self, values: Mapping[str, Any]) -> None:
        """The run's flags as parameters under their own names (`lr`, `seq_len`, ...)."""
        simple = {k: v for k, v in values.items() if isinstance(v, str | int | float | bool)}
        self._mlflow.log_params(flatten(simple))

    def log_model(self, directory: Path) -> None:
        """The exported Hugging Face model directory, as the run's `model` artifacts."""
        if self.should_log_model:
            self._mlflow.log_artifacts(str(directory), artifact_path="model")

    def close(self, status: str) -> None:
        self._mlflow.end_run(status=status)


def open_tracker(
    uri: str | None,
    *,
    experiment: str | None,
    run_name: str,
    enabled: bool,
    log_model: bool = True,
) -> Tracker | None:
    """An MLflow tracker when `uri` is set and this rank reports (`enabled`), else None."""
    if not uri or not enabled:
        return None
    return MlflowTracker(
        uri, experiment=experiment or DEFAULT_EXPERIMENT, run_name=run_name, log_model=log_model
    )
