"""The serving stack: image always; the guarded endpoint once a model artifact is given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aws_cdk.assertions import Match, Template
from cfnlint.api import ManualArgs, lint

from app import build_app
from kiln.config import load_settings
from kiln.contract import ServerEnv
from kiln_policy.assembly import SynthesizedStack, read_assembly
from kiln_policy.guardrails import check
from tests.support import ENVIRONMENTS, Synthesis

ARTIFACT = "s3://kiln-{env}-artifacts-123456789012-us-east-1/models/v7/model.tar.gz"


@pytest.fixture(scope="module", params=["dev", "prod"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, SynthesizedStack, Path]:
    """`-c env=<env> -c modelArtifact=...`, synthesized with the policy gates."""
    env = str(request.param)
    out = tmp_path_factory.mktemp(f"served-{env}")
    build_app({"env": env, "modelArtifact": ARTIFACT.format(env=env)}, outdir=str(out)).synth()
    stacks = {s.stack_name: s for s in read_assembly(out)}
    return env, stacks[f"kiln-{env}-serving"], out


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_without_a_model_only_the_image_and_name(synthesis: Synthesis, env: str) -> None:
    stack = synthesis.stack(env, "serving")
    assert not stack.resources_of_type("AWS::SageMaker::Endpoint", "AWS::SageMaker::Model")
    template = Template.from_json(stack.template)
    template.has_output("EndpointName", {"Value": f"kiln-{env}-llm"})
    assets = json.loads(
        (synthesis.outdir / f"assembly-{env}" / f"{stack.artifact_id}.assets.json").read_text()
    )["dockerImages"]
    (image,) = assets.values()
    assert image["source"]["dockerFile"] == "inference/Dockerfile"
    assert image["source"]["platform"] == "linux/amd64"
    context = synthesis.outdir / f"assembly-{env}" / image["source"]["directory"]
    assert sorted(p.name for p in context.iterdir()) == [
        "inference",
        "kernels",
        "kiln",
        "kiln_events",
        "modeling",
    ]
    # Of the platform core, the server gets the contract only (no settings, no pydantic models).
    assert sorted(p.name for p in (context / "kiln").iterdir()) == ["__init__.py", "contract.py"]


def test_endpoint_follows_config(served: tuple[str, SynthesizedStack, Path]) -> None:
    env, stack, _ = served
    serving = load_settings(env).serving
    template = Template.from_json(stack.template)
    routing = {
        "Type": serving.deployment.traffic.upper(),
        "WaitIntervalInSeconds": serving.deployment.wait_minutes * 60,
        ("CanarySize" if serving.deployment.traffic == "canary" else "LinearStepSize"): {
            "Type": "CAPACITY_PERCENT",
            "Value": serving.deployment.step_percent,
        },
    }
    template.has_resource_properties(
        "AWS::SageMaker::Endpoint",
        {
            "EndpointName": f"kiln-{env}-llm",
            "DeploymentConfig": {
                "BlueGreenUpdatePolicy": Match.object_like(
                    {"TrafficRoutingConfiguration": routing}
                ),
                "AutoRollbackConfiguration": {
                    "Alarms": [{"AlarmName": Match.any_value()}, {"AlarmName": Match.any_value()}]
                },
            },
        },
    )
    template.has_resource_properties(
        "AWS::SageMaker::EndpointConfig",
        {
            "ProductionVariants": [
                Match.object_like(
                    {
                        "InstanceType": serving.instance_type,
                        "InitialInstanceCount": serving.initial_instance_count,
                    }
                )
            ],
        },
    )
    template.has_resource_properties(
        "AWS::SageMaker::Model",
        {
            "PrimaryContainer": {
                "Image": Match.any_value(),
                "ModelDataUrl": ARTIFACT.format(env=env),
                "Environment": Match.object_like(
                    {
                        ServerEnv.MODEL_VERSION: "v7",
                        ServerEnv.ENDPOINT_NAME: f"kiln-{env}-llm",
                        ServerEnv.EVENTS_TOPIC: "prediction-events",
                        ServerEnv.ALLOW_RAW_TEXT: "false",
                        ServerEnv.EVENTS_CLUSTER_ARN: Match.any_value(),
                        ServerEnv.EVENTS_REGION: "us-east-1",
                    }
                ),
            }
        },
    )


def test_execution_role_may_publish_events_to_its_topic_only(
    served: tuple[str, SynthesizedStack, Path],
) -> None:
    env, stack, _ = served
    text = json.dumps(stack.resources_of_type("AWS::IAM::ManagedPolicy"))
    assert "kafka-cluster:WriteData" in text and f"topic/kiln-{env}/*/prediction-events" in text
    assert "kafka-cluster:ReadData" not in text


def test_guardrails_and_cfn_lint(served: tuple[str, SynthesizedStack, Path]) -> None:
    env, stack, _ = served
    assert [str(v) for v in check(stack, load_settings(env))] == []
    matches = lint(json.dumps(stack.template), config=ManualArgs(regions=["us-east-1"]))
    assert not [m for m in matches if m.rule.id.startswith("E")]


def test_acknowledgements_are_reviewed(served: tuple[str, SynthesizedStack, Path]) -> None:
    import re

    from tests.policy.test_nag import ALLOWED_WILDCARDS

    _, stack, _ = served
    rules = {a.rule for a in stack.acknowledgements}
    # IAM5 for its wildcards; NIST's KMS rule because ml.g5 has local storage (issue 17).
    assert {r.split("[")[0] for r in rules} == {
        "AwsSolutions-IAM5",
        "NIST.800.53.R5-SageMakerEndpointConfigurationKMSKeyConfigured",
    }
    for rule in rules:
        if not rule.startswith("AwsSolutions-IAM5") or rule.endswith("[Resource::*]"):
            continue  # `*` is judged per statement in tests/policy/test_nag.py
        resource = rule.removeprefix("AwsSolutions-IAM5[Resource::").removesuffix("]")
        assert any(re.fullmatch(p, resource) for p in ALLOWED_WILDCARDS), resource


def test_server_limits_come_from_config(served: tuple[str, SynthesizedStack, Path]) -> None:
    """Issue 17, item 9: the token cap from settings, and a drain that leaves the event flush
    time inside SageMaker's 30 s between SIGTERM and SIGKILL."""
    from kiln.contract import SERVER_DRAIN_SECONDS

    env, stack, _ = served
    (model,) = stack.resources_of_type("AWS::SageMaker::Model").values()
    environment = model["Properties"]["PrimaryContainer"]["Environment"]
    assert environment[ServerEnv.MAX_NEW_TOKENS] == str(load_settings(env).serving.max_new_tokens)
    assert environment[ServerEnv.GRACEFUL_TIMEOUT_S] == str(SERVER_DRAIN_SECONDS)
