"""`kiln deploy-model`: the artifact check, the CDK deploy (a fake runner), following the endpoint,
and the outcome: promoted, rolled back (naming the alarm) or failed.

moto has no UpdateEndpoint, no deployment details in DescribeEndpoint (LastDeploymentConfig,
PendingDeploymentSummary) and no DescribeAlarmHistory: those calls are checked with botocore's
Stubber, everything else runs against moto.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from kiln.config import load_settings
from kiln.contract import Component, Outputs
from kiln_cli.cli import main
from kiln_cli.operate import deploy
from kiln_cli.operate.aws import OperateError
from kiln_cli.operate.progress import Progress
from tests.kiln_cli.support import (
    ACCOUNT,
    ARTIFACT,
    NEW_ARTIFACT,
    REGION,
    FakeClock,
    create_buckets,
    create_endpoint,
    create_rollback_alarms,
    deploy_stacks,
    make_aws,
    outputs,
    put_object,
    update_outputs,
)

pytestmark = pytest.mark.usefixtures("stack_outputs")

STARTED = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
ENDPOINT = "kiln-dev-llm"
ALARMS = [
    "kiln-dev-observability-EndpointRollbackErrorRate1A2B3C-XYZ",
    "kiln-dev-observability-EndpointRollbackLatencyP99D4E5F6-UVW",
]
LATENCY_REASON = (
    "Threshold Crossed: 3 datapoints [2650000.0, 2710000.0, 2800000.0] were greater than the "
    "threshold (2000000.0)."
)


class Runner:
    """Stands in for `npx cdk deploy`: records the command and applies `effect`."""

    def __init__(self, code: int = 0, effect: Any = None) -> None:
        self.code, self.effect = code, effect
        self.calls: list[tuple[list[str], Path]] = []

    def __call__(self, argv: Sequence[str], cwd: Path) -> int:
        self.calls.append((list(argv), cwd))
        if self.effect:
            self.effect()
        return self.code


def _deploy(aws: Any, runner: Runner, artifact: str = NEW_ARTIFACT) -> tuple[deploy.Outcome, str]:
    clock, log = FakeClock(), io.StringIO()
    outcome = deploy.deploy_model(
        aws,
        artifact,
        runner=runner,
        progress=Progress(log, clock=clock, tty=False),
        interval=15,
        sleep=clock.sleep,
        now=lambda: STARTED,
    )
    return outcome, log.getvalue()


def _serving_platform() -> None:
    deploy_stacks(components=(Component.DATA_LAKE, Component.OBSERVABILITY, Component.SERVING))
    create_buckets()
    put_object(ARTIFACT)
    put_object(NEW_ARTIFACT)


def test_the_cdk_command_selects_the_serving_stack_only() -> None:
    settings = load_settings("staging")
    assert deploy.cdk_deploy_argv(settings, NEW_ARTIFACT) == [
        "npx", "cdk", "deploy", "staging/Serving", "--exclusively",
        "-c", "env=staging", "-c", f"modelArtifact={NEW_ARTIFACT}",
        "--require-approval", "never",
    ]  # fmt: skip
    other = deploy.cdk_deploy_argv(settings, NEW_ARTIFACT, Path("/forks/config"))
    assert other[-4:] == ["-c", "configDir=/forks/config", "--require-approval", "never"]


@mock_aws
def test_a_healthy_model_is_promoted() -> None:
    _serving_platform()
    create_endpoint(ENDPOINT, ARTIFACT, "v1")

    def cloudformation_updates_the_endpoint() -> None:
        create_endpoint(ENDPOINT, NEW_ARTIFACT, "v2")
        serving = outputs()[Component.SERVING]
        update_outputs(Component.SERVING, {**serving, Outputs.MODEL_ARTIFACT.key: NEW_ARTIFACT})

    runner = Runner(effect=cloudformation_updates_the_endpoint)
    outcome, log = _deploy(make_aws(), runner)
    assert (outcome.result, outcome.exit_code, outcome.serving) == ("promoted", 0, NEW_ARTIFACT)
    argv, cwd = runner.calls[0]
    assert argv[:4] == ["npx", "cdk", "deploy", "dev/Serving"]
    assert f"modelArtifact={NEW_ARTIFACT}" in argv and (cwd / "cdk.json").exists()
    assert f"deploying {NEW_ARTIFACT} to {ENDPOINT} (all at once, 10 min bake" in log
    assert "cdk deploy exited 0" in log and f"endpoint {ENDPOINT}: InService" in log
    text = deploy.render(outcome, "dev")
    assert text.startswith(f"promoted: {ENDPOINT} serves {NEW_ARTIFACT} (InService")
    assert f"set serving.model_artifact: {NEW_ARTIFACT} in config/dev.yaml" in text


@mock_aws
def test_the_model_already_served_is_left_alone() -> None:
    _serving_platform()
    create_endpoint(ENDPOINT, ARTIFACT, "v1")
    runner = Runner()
    outcome, _ = _deploy(make_aws(), runner, ARTIFACT)
    assert outcome.result == "unchanged" and outcome.exit_code == 0 and not runner.calls


def _history(alarm: str, reason: str) -> dict[str, Any]:
    return {
        "AlarmHistoryItems": [
            {
                "AlarmName": alarm,
                "AlarmType": "MetricAlarm",
                "Timestamp": STARTED + timedelta(minutes=7),
                "HistoryItemType": "StateUpdate",
                "HistorySummary": "Alarm updated from OK to ALARM",
                "HistoryData": json.dumps(
                    {
                        "version": "1.0",
                        "oldState": {"stateValue": "OK"},
                        "newState": {"stateValue": "ALARM", "stateReason": reason},
                    }
                ),
            }
        ]
    }


def _history_params(alarm: str) -> dict[str, Any]:
    return {
        "AlarmName": alarm,
        "HistoryItemType": "StateUpdate",
        "StartDate": STARTED,
        "ScanBy": "TimestampAscending",
    }


@mock_aws
def test_a_rollback_names_the_alarm_found_by_its_description() -> None:
    _serving_platform()
    create_endpoint(ENDPOINT, ARTIFACT, "v1")
    create_rollback_alarms(ENDPOINT)
    # The alarms' descriptions come from moto; their history is stubbed (moto lacks it).
    described = boto3.client("cloudwatch", region_name=REGION).describe_alarms(
        AlarmTypes=["MetricAlarm"]
    )
    cloudwatch = boto3.client("cloudwatch", region_name=REGION)
    stubber = Stubber(cloudwatch)
    stubber.add_response(
        "describe_alarms",
        {"MetricAlarms": described["MetricAlarms"]},
        {"AlarmTypes": ["MetricAlarm"]},
    )
    stubber.add_response(
        "describe_alarm_history", {"AlarmHistoryItems": []}, _history_params(ALARMS[0])
    )
    stubber.add_response(
        "describe_alarm_history", _history(ALARMS[1], LATENCY_REASON), _history_params(ALARMS[1])
    )
    with stubber:
        outcome, _ = _deploy(make_aws(clients={"cloudwatch": cloudwatch}), Runner(code=1))
    stubber.assert_no_pending_responses()
    assert (outcome.result, outcome.exit_code, outcome.serving) == ("rolled back", 3, ARTIFACT)
    assert [a.name for a in outcome.alarms] == [ALARMS[1]]
    lines = deploy.render(outcome, "dev").splitlines()
    assert lines[0].startswith(f"rolled back: {ENDPOINT} still serves {ARTIFACT} (InService")
    assert lines[1] == f"  alarm fired: {ALARMS[1]} at 12:07:00 UTC: {LATENCY_REASON}"


def _endpoint(status: str, config: str, modified: datetime, **extra: Any) -> dict[str, Any]:
    return {
        "EndpointName": ENDPOINT,
        "EndpointArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{ENDPOINT}",
        "EndpointConfigName": config,
        "EndpointStatus": status,
        "CreationTime": STARTED - timedelta(days=3),
        "LastModifiedTime": modified,
        "LastDeploymentConfig": {
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": name} for name in ALARMS]}
        },
        **extra,
    }


def _stub_serving(stubber: Stubber, config: str, model: str, artifact: str) -> None:
    stubber.add_response(
        "describe_endpoint_config",
        {
            "EndpointConfigName": config,
            "EndpointConfigArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint-config/{config}",
            "ProductionVariants": [
                {"VariantName": "AllTraffic", "ModelName": model, "InstanceType": "ml.g5.xlarge"}
            ],
            "CreationTime": STARTED,
        },
        {"EndpointConfigName": config},
    )
    stubber.add_response(
        "describe_model",
        {
            "ModelName": model,
            "ModelArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model/{model}",
            "PrimaryContainer": {"Image": "inference:1", "ModelDataUrl": artifact},
            "CreationTime": STARTED,
        },
        {"ModelName": model},
    )


@mock_aws
def test_a_rollback_follows_the_endpoint_and_reads_its_deployment_config() -> None:
    _serving_platform()
    earlier, later = STARTED - timedelta(days=1), STARTED + timedelta(minutes=9)
    sagemaker = boto3.client("sagemaker", region_name=REGION)
    cloudwatch = boto3.client("cloudwatch", region_name=REGION)
    sm, cw = Stubber(sagemaker), Stubber(cloudwatch)
    name = {"EndpointName": ENDPOINT}
    sm.add_response("describe_endpoint", _endpoint("InService", "cfg-v1", earlier), name)
    _stub_serving(sm, "cfg-v1", "model-v1", ARTIFACT)
    pending = {"PendingDeploymentSummary": {"EndpointConfigName": "cfg-v2"}}
    sm.add_response("describe_endpoint", _endpoint("Updating", "cfg-v1", later, **pending), name)
    sm.add_response("describe_endpoint", _endpoint("Updating", "cfg-v1", later, **pending), name)
    sm.add_response("describe_endpoint", _endpoint("RollingBack", "cfg-v1", later), name)
    reason = f"Deployment rolled back: alarm {ALARMS[0]} went into ALARM"
    sm.add_response(
        "describe_endpoint", _endpoint("InService", "cfg-v1", later, FailureReason=reason), name
    )
    _stub_serving(sm, "cfg-v1", "model-v1", ARTIFACT)
    cw.add_response(
        "describe_alarm_history",
        _history(ALARMS[0], "Threshold Crossed: 5XX error rate 12.5 > 1.0"),
        _history_params(ALARMS[0]),
    )
    cw.add_response("describe_alarm_history", {"AlarmHistoryItems": []}, _history_params(ALARMS[1]))
    aws = make_aws(clients={"sagemaker": sagemaker, "cloudwatch": cloudwatch})
    with sm, cw:
        outcome, log = _deploy(aws, Runner(code=1))
    sm.assert_no_pending_responses()
    cw.assert_no_pending_responses()
    assert outcome.result == "rolled back"
    assert log.splitlines()[-3:] == [
        f"[    0s] endpoint {ENDPOINT}: Updating (to cfg-v2)",
        f"[   30s] endpoint {ENDPOINT}: RollingBack",
        f"[   45s] endpoint {ENDPOINT}: InService ({reason})",
    ]
    text = deploy.render(outcome, "dev")
    assert f"alarm fired: {ALARMS[0]} at 12:07:00 UTC: Threshold Crossed" in text
    assert f"  endpoint: {reason}" in text


@mock_aws
def test_an_endpoint_that_fails_is_reported_failed() -> None:
    _serving_platform()
    sagemaker = boto3.client("sagemaker", region_name=REGION)
    sm = Stubber(sagemaker)
    name = {"EndpointName": ENDPOINT}
    sm.add_client_error(
        "describe_endpoint",
        "ValidationException",
        f"Could not find endpoint arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{ENDPOINT}.",
    )
    failure = "The primary container for production variant AllTraffic did not pass the ping check"
    sm.add_response(
        "describe_endpoint",
        _endpoint("Failed", "cfg-v1", STARTED, FailureReason=failure),
        name,
    )
    _stub_serving(sm, "cfg-v1", "model-v1", NEW_ARTIFACT)
    with sm:
        outcome, _ = _deploy(make_aws(clients={"sagemaker": sagemaker}), Runner(code=1))
    assert (outcome.result, outcome.exit_code, outcome.status) == ("failed", 1, "Failed")
    assert outcome.reasons[0] == f"endpoint: {failure}"
    assert deploy.render(outcome, "dev").startswith(f"failed: {ENDPOINT} is Failed")


@mock_aws
def test_a_deploy_that_fails_before_the_endpoint_changes() -> None:
    _serving_platform()
    create_endpoint(ENDPOINT, ARTIFACT, "v1")
    outcome, _ = _deploy(make_aws(), Runner(code=1))
    assert (outcome.result, outcome.exit_code) == ("failed", 1)
    assert "cdk deploy exited 1 before the endpoint changed" in outcome.reasons[0]


@mock_aws
def test_the_first_deploy_failing_leaves_no_endpoint() -> None:
    _serving_platform()
    outcome, _ = _deploy(make_aws(), Runner(code=1))
    assert outcome.result == "failed" and outcome.status == "absent"
    assert outcome.reasons == [
        f"cdk deploy exited 1 and there is no endpoint {ENDPOINT}: see its output above"
    ]


@mock_aws
@pytest.mark.parametrize(
    ("artifact", "code", "message"),
    [
        (
            NEW_ARTIFACT.replace("job-2", "job-9"),
            1,
            "artifact not found: there is no object s3://kiln-dev-artifacts-123456789012-us-east-1"
            "/models/job-9/output/model.tar.gz. Training writes s3://kiln-dev-artifacts-"
            "123456789012-us-east-1/models/<job>/output/model.tar.gz (SageMaker)",
        ),
        ("s3://no-such-bucket-kiln/m/model.tar.gz", 1, "bucket no-such-bucket-kiln does not exist"),
        ("s3://bucket/model.zip", 2, "is neither a .tar.gz archive nor a prefix"),
        ("s3://x/y.tar.gz", 2, "the bucket name 'x' has 1 character; S3 bucket names have"),
    ],
)
def test_a_missing_artifact_is_named(
    artifact: str, code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _serving_platform()
    assert main(["deploy-model", "--env", "dev", "--artifact", artifact]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@mock_aws
def test_deploy_needs_the_serving_stack(capsys: pytest.CaptureFixture[str]) -> None:
    deploy_stacks(components=(Component.DATA_LAKE,))
    create_buckets()
    put_object(NEW_ARTIFACT)
    assert main(["deploy-model", "--env", "dev", "--artifact", NEW_ARTIFACT]) == 1
    assert "stack kiln-dev-serving is not deployed" in capsys.readouterr().err


@mock_aws
def test_deploy_model_from_the_command_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _serving_platform()
    create_endpoint(ENDPOINT, ARTIFACT, "v1")
    runner = Runner(effect=lambda: create_endpoint(ENDPOINT, NEW_ARTIFACT, "v2"))
    monkeypatch.setattr(deploy, "run_cdk", runner)
    assert main(["deploy-model", "--env", "dev", "--artifact", NEW_ARTIFACT]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"promoted: {ENDPOINT} serves {NEW_ARTIFACT}")
    assert "cdk deploy exited 0" in captured.err


def test_run_cdk_runs_in_the_checkout_with_the_venv_first(tmp_path: Path) -> None:
    with pytest.raises(OperateError, match=r"has no cdk\.json"):
        deploy.run_cdk(["true"], tmp_path)
    (tmp_path / "cdk.json").write_text("{}")
    with pytest.raises(OperateError, match="is not installed: run `make install-infra`"):
        deploy.run_cdk(["kiln-no-such-program"], tmp_path)
    assert deploy.run_cdk(["sh", "-c", 'echo "$PATH" > path; exit 3'], tmp_path) == 3
    first = (tmp_path / "path").read_text().split(":")[0]
    assert first == str(Path(sys.executable).parent)


# -- uncompressed model directories (S3 prefixes) --------------------------------------------


@mock_aws
def test_an_uncompressed_model_prefix_is_listed_and_judged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _serving_platform()
    prefix = NEW_ARTIFACT.rsplit("/", 1)[0] + "/model/"
    aws = make_aws()
    with pytest.raises(OperateError, match="there are no objects under"):
        deploy.check_artifact(aws, prefix)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        put_object(prefix + name)
    deploy.check_artifact(aws, prefix)  # a model directory: no complaint
    put_object(prefix + "weights/")  # what an S3 console folder leaves behind
    assert main(["deploy-model", "--env", "dev", "--artifact", prefix]) == 2
    err = capsys.readouterr().err
    assert "cannot be served uncompressed" in err and "is a folder object" in err


def test_model_prefix_problems_follow_sagemakers_rules() -> None:
    good = ["config.json", "model-00001-of-00002.safetensors", "tok/tokenizer.json"]
    assert deploy.model_prefix_problems(good) == []
    problems = deploy.model_prefix_problems(
        ["weights", "weights/part1", "a/../b", "x" * 256, " /y", "sub/"]
    )
    assert any(
        "'weights' is both a file and the directory of 'weights/part1'" in p for p in problems
    )
    assert any("'a/../b' has a path part SageMaker refuses: '..'" in p for p in problems)
    assert any(p.startswith(f"'{'x' * 256}' has a path part") for p in problems)
    assert any("' /y' has a path part" in p for p in problems)
    assert any("'sub/' is a folder object" in p for p in problems)
    assert any("no config.json at the top" in p for p in problems)
