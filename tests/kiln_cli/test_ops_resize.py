"""`kiln change-instance-type`: the two-step SageMaker requires to change the instance type of
an autoscaled variant ("Update endpoints that use auto scaling",
https://docs.aws.amazon.com/sagemaker/latest/dg/endpoint-scaling-update.html): deregister,
update, register. Application Auto Scaling and SageMaker run on moto; the CDK deploy is a fake
runner that refuses, as UpdateEndpoint would, while the variant is still a scalable target.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from kiln.config import load_settings
from kiln.contract import ENDPOINT_SCALABLE_DIMENSION, Component, endpoint_scaling_resource_id
from kiln_cli.operate import resize
from kiln_cli.operate.aws import Aws, OperateError
from kiln_cli.operate.progress import Progress
from tests.kiln_cli.support import (
    ARTIFACT,
    REGION,
    FakeClock,
    create_buckets,
    create_endpoint,
    deploy_stacks,
    put_object,
)

pytestmark = pytest.mark.usefixtures("stack_outputs")

ENDPOINT = "kiln-dev-llm"
RESOURCE = endpoint_scaling_resource_id(ENDPOINT)
# moto validates instance types against an older list; the environment asks for this one.
WANTED = "ml.g4dn.2xlarge"


def scaling_client() -> Any:
    return boto3.client("application-autoscaling", region_name=REGION)


def where() -> dict[str, str]:
    return {
        "ServiceNamespace": "sagemaker",
        "ResourceId": RESOURCE,
        "ScalableDimension": ENDPOINT_SCALABLE_DIMENSION,
    }


def register_autoscaling() -> None:
    """What the serving stack's ScalableTarget and policies create."""
    client = scaling_client()
    client.register_scalable_target(MinCapacity=1, MaxCapacity=2, **where())
    client.put_scaling_policy(
        PolicyName="kiln-dev-serving-InvocationsPerInstance",
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": 50.0,
            "PredefinedMetricSpecification": {
                "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
            },
            "ScaleInCooldown": 600,
            "ScaleOutCooldown": 60,
        },
        **where(),
    )
    client.put_scheduled_action(
        ScheduledActionName="EveningScaleDown",
        Schedule="cron(0 19 ? * MON-FRI *)",
        ScalableTargetAction={"MinCapacity": 1, "MaxCapacity": 1},
        **where(),
    )


class CloudFormation:
    """Stands in for `npx cdk deploy`: UpdateEndpoint fails while the variant is a scalable
    target (SageMaker's rule for an instance-type change); otherwise the endpoint moves to
    `instance_type`."""

    def __init__(self, instance_type: str = WANTED) -> None:
        self.instance_type = instance_type
        self.calls: list[list[str]] = []
        self.targets_seen: list[int] = []

    def __call__(self, argv: Sequence[str], cwd: Path) -> int:
        self.calls.append(list(argv))
        targets = scaling_client().describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[RESOURCE]
        )["ScalableTargets"]
        self.targets_seen.append(len(targets))
        if targets:
            return 1  # "Update endpoints that use auto scaling": the update fails
        create_endpoint(ENDPOINT, ARTIFACT, "v2", instance_type=self.instance_type)
        return 0


def aws_wanting(instance_type: str = WANTED) -> Aws:
    settings = load_settings("dev")
    serving = settings.serving.model_copy(update={"instance_type": instance_type})
    return Aws(settings.model_copy(update={"serving": serving}))


def run(aws: Aws, runner: CloudFormation) -> tuple[resize.ResizeOutcome, str]:
    clock, log = FakeClock(), io.StringIO()
    outcome = resize.change_instance_type(
        aws,
        runner=runner,
        progress=Progress(log, clock=clock, tty=False),
        interval=15,
        sleep=clock.sleep,
    )
    return outcome, log.getvalue()


def platform() -> None:
    deploy_stacks(components=(Component.DATA_LAKE, Component.OBSERVABILITY, Component.SERVING))
    create_buckets()
    put_object(ARTIFACT)
    create_endpoint(ENDPOINT, ARTIFACT, "v1")  # ml.g4dn.xlarge
    register_autoscaling()


@mock_aws
def test_deregisters_updates_and_registers_the_same_autoscaling_again() -> None:
    platform()
    before = resize.read_scaling(aws_wanting(), ENDPOINT)
    runner = CloudFormation()
    outcome, log = run(aws_wanting(), runner)
    assert (outcome.result, outcome.was, outcome.now) == ("resized", "ml.g4dn.xlarge", WANTED)
    # The deploy ran with no scalable target, and the artifact the endpoint already served.
    assert runner.targets_seen == [0]
    assert f"modelArtifact={ARTIFACT}" in runner.calls[0]
    assert runner.calls[0][3:5] == ["dev/Serving", "--exclusively"]
    after = resize.read_scaling(aws_wanting(), ENDPOINT)
    assert after.target is not None and before.target is not None
    assert (after.target["MinCapacity"], after.target["MaxCapacity"]) == (1, 2)
    assert [p["PolicyName"] for p in after.policies] == [p["PolicyName"] for p in before.policies]
    assert (
        after.policies[0]["TargetTrackingScalingPolicyConfiguration"]
        == before.policies[0]["TargetTrackingScalingPolicyConfiguration"]
    )
    assert [a["Schedule"] for a in after.scheduled] == ["cron(0 19 ? * MON-FRI *)"]
    assert "step 1/3: deregister autoscaling (1 policies, 1 scheduled actions)" in log
    assert "step 3/3: register autoscaling again" in log
    assert resize.render(outcome) == (
        f"resized: {ENDPOINT} runs {WANTED} (was ml.g4dn.xlarge)\n  autoscaling registered again\n"
    )


@mock_aws
def test_without_the_first_step_sagemaker_would_refuse() -> None:
    """The fake deploy enforces SageMaker's rule: with autoscaling left registered it fails."""
    platform()
    assert CloudFormation()(["npx", "cdk", "deploy"], Path(".")) == 1


@mock_aws
def test_a_failed_update_still_registers_autoscaling_again() -> None:
    platform()

    class Refused(CloudFormation):
        def __call__(self, argv: Sequence[str], cwd: Path) -> int:
            self.calls.append(list(argv))
            return 1  # the endpoint stays on its old type

    outcome, _ = run(aws_wanting(), Refused())
    assert (outcome.result, outcome.now, outcome.exit_code) == ("rolled back", "ml.g4dn.xlarge", 3)
    assert resize.read_scaling(aws_wanting(), ENDPOINT).target is not None
    assert "cdk deploy exited 1" in resize.render(outcome)


@mock_aws
def test_same_type_changes_nothing() -> None:
    platform()
    runner = CloudFormation()
    outcome, _ = run(aws_wanting("ml.g4dn.xlarge"), runner)
    assert outcome.result == "unchanged" and runner.calls == []
    assert resize.read_scaling(aws_wanting(), ENDPOINT).target is not None


@mock_aws
def test_no_endpoint_is_a_clear_error() -> None:
    deploy_stacks(components=(Component.DATA_LAKE, Component.OBSERVABILITY, Component.SERVING))
    with pytest.raises(OperateError, match="there is no endpoint kiln-dev-llm to resize"):
        run(aws_wanting(), CloudFormation())


def test_the_command_is_documented_in_the_cli() -> None:
    from kiln_cli.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["change-instance-type", "--env", "dev"])
    assert args.handler.__name__ == "cmd_change_instance_type"
