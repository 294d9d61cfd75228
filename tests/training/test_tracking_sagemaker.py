"""The trainer's tracker against a SageMaker managed MLflow tracking server given by its ARN,
as `kiln train` passes it ($MLFLOW_TRACKING_URI): the pinned `sagemaker-mlflow` plugin turns the
ARN into the server's regional URL and signs each request (SigV4, service `sagemaker-mlflow`).

The server here is a small MLflow REST server on loopback that records what the client asks
(the plugin's documented `SAGEMAKER_MLFLOW_CUSTOM_ENDPOINT` points the client at it). Each REST
call is named by MLflow's own service table, which is how IAM names the `sagemaker-mlflow:`
actions; the training roles' policy must grant every one, and nothing the run does not call.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from kiln.contract import MLFLOW_TRAINING_ACTIONS, TrainerEnv

pytest.importorskip("mlflow", reason="the tracking extra (mlflow-skinny) is not installed")
pytest.importorskip("sagemaker_mlflow", reason="the tracking extra's plugin is not installed")

ARN = "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/kiln-dev-mlflow"


class FakeMlflow:
    """What an MLflow tracking server answers to one run's client, and what it was asked."""

    def __init__(self, artifact_root: Path) -> None:
        self.artifact_root = artifact_root
        self.calls: list[tuple[str, str]] = []  # (method, path)
        self.headers: list[dict[str, str]] = []
        self.experiments: dict[str, str] = {}
        self.run: dict[str, Any] | None = None

    def answer(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Any:
        self.calls.append((method, path))
        if path.endswith("/experiments/get-by-name"):
            name = query["experiment_name"][0]
            if name not in self.experiments:
                return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": name}
            return 200, {"experiment": self._experiment(name)}
        if path.endswith("/experiments/get"):
            by_id = {i: n for n, i in self.experiments.items()}
            return 200, {"experiment": self._experiment(by_id[query["experiment_id"][0]])}
        if path.endswith("/experiments/create"):
            self.experiments[body["name"]] = str(len(self.experiments) + 1)
            return 200, {"experiment_id": self.experiments[body["name"]]}
        if path.endswith("/runs/create"):
            self.run = {
                "run_id": "r1",
                "run_uuid": "r1",
                "run_name": next(
                    (t["value"] for t in body.get("tags", []) if t["key"] == "mlflow.runName"),
                    "",
                ),
                "experiment_id": body["experiment_id"],
                "status": "RUNNING",
                "start_time": body.get("start_time", 0),
                "artifact_uri": (self.artifact_root / "r1").as_uri(),
                "lifecycle_stage": "active",
            }
            return 200, {"run": {"info": self.run, "data": {}}}
        if path.endswith("/runs/get"):
            return 200, {"run": {"info": self.run, "data": {}}}
        if path.endswith("/runs/update"):
            assert self.run is not None
            self.run["status"] = body["status"]
            return 200, {"run_info": self.run}
        if path.endswith(("/runs/log-batch", "/runs/set-tag")):
            return 200, {}
        return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"{method} {path}"}

    def _experiment(self, name: str) -> dict[str, Any]:
        return {
            "experiment_id": self.experiments[name],
            "name": name,
            "artifact_location": self.artifact_root.as_uri(),
            "lifecycle_stage": "active",
        }


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeMlflow]:
    fake = FakeMlflow(tmp_path / "artifacts")

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            fake.headers.append({k.lower(): v for k, v in self.headers.items()})
            status, answer = fake.answer(self.command, url.path, parse_qs(url.query), body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = _reply

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("SAGEMAKER_MLFLOW_CUSTOM_ENDPOINT", f"http://127.0.0.1:{httpd.server_port}")
    # The job's role credentials, as the SDK finds them on SageMaker or through Pod Identity.
    for name, value in {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SESSION_TOKEN": "token",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(TrainerEnv.TRACKING_URI, ARN)
    try:
        yield fake
    finally:
        httpd.shutdown()
        thread.join()


def _actions(calls: list[tuple[str, str]]) -> set[str]:
    """IAM's `sagemaker-mlflow:` action of each REST call: the name of MLflow's service method
    at that path (the Service Authorization Reference names the actions after them)."""
    from mlflow.protos.service_pb2 import MlflowService
    from mlflow.utils.rest_utils import _REST_API_PATH_PREFIX, extract_api_info_for_service

    table: dict[tuple[str, str], set[str]] = {}
    for message, (path, method) in extract_api_info_for_service(
        MlflowService, _REST_API_PATH_PREFIX
    ).items():
        table.setdefault((method, path), set()).add(message.__name__)
    names: set[str] = set()
    for method, path in calls:
        found = table.get((method, path))
        assert found, f"{method} {path} is not one of MLflow's REST calls"
        names |= found
    return {f"sagemaker-mlflow:{name}" for name in names}


def test_a_run_tracked_by_arn_signs_its_calls_and_needs_only_the_granted_actions(
    server: FakeMlflow, tmp_path: Path
) -> None:
    import mlflow

    from training.tracking import open_tracker

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    tracker = open_tracker(
        os.environ[TrainerEnv.TRACKING_URI],
        experiment="kiln",
        run_name="kiln-dev-train-20250501-120000",
        enabled=True,
    )
    assert tracker is not None
    tracker.log_hyperparameters({"lr": 0.002, "max_steps": 6, "model": "small"})
    tracker.event({"event": "start", "job": "j", "model": {"num_layers": 2}})
    tracker.event({"event": "train", "step": 1, "train_loss": 2.5, "lr": 0.002})
    tracker.event({"event": "val", "step": 1, "val_loss": 2.4, "val_perplexity": 11.0})
    tracker.event({"event": "model", "path": "s3://bucket/models/j/output/model/"})
    tracker.log_model(model)
    tracker.close("FINISHED")
    mlflow.set_tracking_uri(None)

    assert server.run is not None and server.run["status"] == "FINISHED"
    assert (tmp_path / "artifacts" / "r1" / "model" / "config.json").is_file()
    # Every request went to the server the ARN names, signed for sagemaker-mlflow.
    assert server.headers and all(
        h.get("x-mlflow-sm-tracking-server-arn") == ARN
        and "/us-east-1/sagemaker-mlflow/aws4_request" in h.get("authorization", "")
        for h in server.headers
    )
    called = _actions(server.calls)
    missing = called - set(MLFLOW_TRAINING_ACTIONS)
    assert not missing, f"the training roles' policy lacks {sorted(missing)}"
    # And nothing the run does not call: no deletes, no model registry, no UI.
    assert set(MLFLOW_TRAINING_ACTIONS) == called, sorted(set(MLFLOW_TRAINING_ACTIONS) ^ called)


def test_the_plugin_names_the_regional_endpoint_the_interface_endpoint_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without a custom endpoint the client calls https://<region>.experiments.sagemaker.aws,
    # the name that the `aws.sagemaker.<region>.experiments` interface endpoint's private DNS
    # answers inside the VPC.
    from sagemaker_mlflow.mlflow_sagemaker_helpers import SageMakerMLflowHostMetadataProvider

    monkeypatch.delenv("SAGEMAKER_MLFLOW_CUSTOM_ENDPOINT", raising=False)
    provider = SageMakerMLflowHostMetadataProvider()
    provider.set_arn(ARN)
    assert provider.construct_tracking_server_url() == "https://us-east-1.experiments.sagemaker.aws"
