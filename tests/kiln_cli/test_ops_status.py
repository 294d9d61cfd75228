"""`kiln status` against moto: stacks, the endpoint and its rollback alarms, training jobs."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from kiln.contract import Component
from kiln_cli.cli import main
from kiln_cli.operate import status
from tests.kiln_cli.support import (
    ARTIFACT,
    REGION,
    client,
    create_endpoint,
    create_rollback_alarms,
    deploy_stacks,
    make_aws,
)

pytestmark = pytest.mark.usefixtures("stack_outputs")


def _create_jobs(names: list[str]) -> None:
    sagemaker = client("sagemaker")
    for name in names:
        sagemaker.create_training_job(
            TrainingJobName=name,
            AlgorithmSpecification={"TrainingImage": "trainer:1", "TrainingInputMode": "File"},
            RoleArn="arn:aws:iam::123456789012:role/training",
            OutputDataConfig={"S3OutputPath": "s3://bucket/models"},
            ResourceConfig={
                "InstanceType": "ml.g5.2xlarge",
                "InstanceCount": 1,
                "VolumeSizeInGB": 100,
            },
            StoppingCondition={"MaxRuntimeInSeconds": 3600},
        )


@mock_aws
def test_status_shows_stacks_endpoint_alarms_and_jobs(capsys: pytest.CaptureFixture[str]) -> None:
    deploy_stacks(
        components=(
            Component.NETWORK,
            Component.DATA_LAKE,
            Component.COMPUTE,
            Component.OBSERVABILITY,
            Component.SERVING,
        )
    )
    create_endpoint("kiln-dev-llm", ARTIFACT, "v1")
    create_rollback_alarms("kiln-dev-llm")
    _create_jobs([f"kiln-dev-train-2025010{i}-000000" for i in range(1, 8)] + ["kiln-prod-x-1"])

    assert main(["status", "--env", "dev", "--jobs", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kiln dev: region us-east-1, account 123456789012\n")
    lines = out.splitlines()
    assert any(line.split()[:2] == ["kiln-dev-network", "CREATE_COMPLETE"] for line in lines)
    assert any(line.split() == ["kiln-dev-streaming", "not", "deployed"] for line in lines)
    assert "endpoint kiln-dev-llm" in lines
    assert any(line.split()[:2] == ["status", "InService"] for line in lines)
    assert f"  model            {ARTIFACT}" in lines
    assert "  config           kiln-dev-llm-config-v1 (model kiln-dev-llm-model-v1)" in lines
    assert "  instances        AllTraffic: 1 x ml.g4dn.xlarge" in lines
    assert any(line.startswith("  last deployment  succeeded (CREATE_COMPLETE") for line in lines)
    at = next(i for i, line in enumerate(lines) if line.startswith("  rollback alarms"))
    assert lines[at : at + 2] == [
        "  rollback alarms  OK    kiln-dev-observability-EndpointRollbackErrorRate1A2B3C-XYZ",
        "                   OK    kiln-dev-observability-EndpointRollbackLatencyP99D4E5F6-UVW",
    ]
    assert "Firehose" not in out
    after = lines[lines.index("training jobs (SageMaker, latest first, names kiln-dev-*)") + 1 :]
    jobs = after[: after.index("")] if "" in after else after  # the GPU section may follow
    assert len(jobs) == 3 and all(job.split()[1] == "Completed" for job in jobs)
    assert "kiln-prod" not in out


@mock_aws
def test_status_before_serving_and_before_a_model(capsys: pytest.CaptureFixture[str]) -> None:
    deploy_stacks(components=(Component.NETWORK,))
    assert main(["status", "--env", "dev"]) == 0
    out = capsys.readouterr().out
    assert "  status           serving stack not deployed" in out
    assert "training jobs (SageMaker, latest first, names kiln-dev-*)\n  none\n" in out

    deploy_stacks(components=(Component.SERVING,))
    report = status.gather(make_aws())
    assert dict(report.endpoint)["status"].startswith("no endpoint yet (deploy a model: kiln")


@mock_aws
def test_a_section_it_cannot_read_is_named_and_fails_the_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    deploy_stacks(components=(Component.SERVING,))
    # Stubber: moto grants every call, so the denial is stubbed.
    sagemaker = boto3.client("sagemaker", region_name=REGION)
    stubber = Stubber(sagemaker)
    stubber.add_client_error("describe_endpoint", "AccessDeniedException", "no", 400)
    stubber.add_response(
        "list_training_jobs",
        {"TrainingJobSummaries": []},
        {
            "NameContains": "kiln-dev-",
            "SortBy": "CreationTime",
            "SortOrder": "Descending",
            "MaxResults": 100,
        },
    )
    with stubber:
        report = status.gather(make_aws(clients={"sagemaker": sagemaker}))
    assert report.problems == [
        "endpoint: access denied: your identity may not call sagemaker:DescribeEndpoint: no. "
        "Add sagemaker:DescribeEndpoint to your role's policy, or use a role that has it."
    ]
    text = status.render(report)
    assert text.endswith(f"could not read:\n  {report.problems[0]}\n")
    stubber.assert_no_pending_responses()


def test_deployment_state_in_words() -> None:
    assert status.deployment_state({"StackStatus": "UPDATE_COMPLETE"}).startswith("succeeded")
    rolled = status.deployment_state(
        {"StackStatus": "UPDATE_ROLLBACK_COMPLETE", "StackStatusReason": "Endpoint failed"}
    )
    assert (
        rolled.startswith("rolled back (UPDATE_ROLLBACK_COMPLETE") and "Endpoint failed" in rolled
    )
    assert status.deployment_state({"StackStatus": "UPDATE_IN_PROGRESS"}).startswith("in progress")


def test_a_rolled_back_stack_shows_its_reason() -> None:
    from datetime import UTC, datetime

    report = status.Report("dev", "us-east-1", "123456789012")
    at = datetime(2025, 5, 1, tzinfo=UTC)
    report.stacks = [
        status.StackRow("kiln-dev-serving", "UPDATE_ROLLBACK_COMPLETE", at, "Endpoint failed"),
        status.StackRow("kiln-dev-network", "UPDATE_COMPLETE", at, "ignored"),
    ]
    text = status.render(report)
    assert "UPDATE_ROLLBACK_COMPLETE  2025-05-01 00:00 UTC  Endpoint failed" in text
    assert "ignored" not in text
