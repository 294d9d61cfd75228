"""The serving stack: image always; the guarded endpoint once a model artifact is given."""

from __future__ import annotations

import json
import re
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
# Prod serves registry versions only (guardrail prod-serves-approved-packages).
PACKAGE = "arn:aws:sagemaker:us-east-1:123456789012:model-package/kiln-llm/7"


@pytest.fixture(scope="module", params=["dev", "prod"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, SynthesizedStack, Path]:
    """`-c env=<env> -c modelArtifact=...` (prod: with `-c modelPackage=...`), synthesized with
    the policy gates."""
    env = str(request.param)
    out = tmp_path_factory.mktemp(f"served-{env}")
    context = {"env": env, "modelArtifact": ARTIFACT.format(env=env)}
    if env == "prod":
        context["modelPackage"] = PACKAGE
    build_app(context, outdir=str(out)).synth()
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
    routing: dict[str, object] = {
        "Type": serving.deployment.traffic.upper(),
        "WaitIntervalInSeconds": serving.deployment.wait_minutes * 60,
    }
    if serving.deployment.traffic != "all_at_once":
        step = "CanarySize" if serving.deployment.traffic == "canary" else "LinearStepSize"
        routing[step] = {"Type": "CAPACITY_PERCENT", "Value": serving.deployment.step_percent}
    template.has_resource_properties(
        "AWS::SageMaker::Endpoint",
        {
            "EndpointName": f"kiln-{env}-llm",
            "RetainAllVariantProperties": True,
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
    # Prod's model is the registry version (its image and artifact come with it).
    source = (
        {"ModelPackageName": PACKAGE}
        if env == "prod"
        else {"Image": Match.any_value(), "ModelDataUrl": ARTIFACT.format(env=env)}
    )
    template.has_resource_properties(
        "AWS::SageMaker::Model",
        {
            "PrimaryContainer": {
                **source,
                "Environment": Match.object_like(
                    {
                        ServerEnv.MODEL_VERSION: "kiln-llm/7" if env == "prod" else "v7",
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


def test_new_model_versions_keep_the_scaled_instance_count(
    served: tuple[str, SynthesizedStack, Path],
) -> None:
    """UpdateEndpoint: "To retain the variant properties of an endpoint when updating it, set
    RetainAllVariantProperties to true" (instance count, weight); without it every rollout
    deploys InitialInstanceCount whatever autoscaling reached
    (https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_UpdateEndpoint.html).
    Data capture is excluded from what is retained, so it follows the new config."""
    _, stack, _ = served
    (endpoint,) = stack.resources_of_type("AWS::SageMaker::Endpoint").values()
    props = endpoint["Properties"]
    assert props["RetainAllVariantProperties"] is True
    assert props["ExcludeRetainedVariantProperties"] == [
        {"VariantPropertyType": "DataCaptureConfig"}
    ]


def test_rollback_alarms_are_named_not_imported(
    served: tuple[str, SynthesizedStack, Path], tmp_path: Path
) -> None:
    """The endpoint names its rollback alarms by the names the observability stack gives them
    (derived from the endpoint's name), not through a cross-stack reference resolved once."""
    env, stack, out = served
    (endpoint,) = stack.resources_of_type("AWS::SageMaker::Endpoint").values()
    alarms = endpoint["Properties"]["DeploymentConfig"]["AutoRollbackConfiguration"]["Alarms"]
    names = sorted(a["AlarmName"] for a in alarms)
    assert names == [f"kiln-{env}-llm-rollback-5xx-rate", f"kiln-{env}-llm-rollback-p99-latency"]
    observability = next(
        s for s in read_assembly(out) if s.stack_name == f"kiln-{env}-observability"
    )
    declared = sorted(
        a["Properties"].get("AlarmName", "")
        for a in observability.resources_of_type("AWS::CloudWatch::Alarm").values()
        if "rollback" in str(a["Properties"].get("AlarmName", ""))
    )
    assert declared == names


def test_serving_deployed_alone_imports_only_what_the_platform_already_exports(
    served: tuple[str, SynthesizedStack, Path], synthesis: Synthesis
) -> None:
    """`kiln deploy-model` deploys the serving stack alone (`--exclusively`) against producer
    stacks deployed without a model: every export it imports must already be one that those
    stacks, as synthesized without a model, export."""
    env, stack, _ = served
    imports = set(re.findall(r'"Fn::ImportValue": "([^"]+)"', json.dumps(stack.template)))
    exported = {
        output["Export"]["Name"]
        for producer in synthesis.stacks
        if producer.environment == env
        for output in producer.template.get("Outputs", {}).values()
        if isinstance(output.get("Export", {}).get("Name"), str)
    }
    assert imports and imports <= exported, sorted(imports - exported)


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
