"""The serving stack: image always; the guarded endpoint once a model artifact is given."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Match, Template
from cfnlint.api import ManualArgs, lint

from app import build_app
from kiln.config import load_settings, with_serving_engine
from kiln.contract import ServerEnv
from kiln_policy.assembly import SynthesizedStack, read_assembly
from kiln_policy.guardrails import check
from tests.support import ENVIRONMENTS, Synthesis

ARTIFACT = "s3://kiln-{env}-artifacts-123456789012-us-east-1/models/v7/model.tar.gz"
# An uncompressed model directory: the S3 prefix SageMaker copies to /opt/ml/model.
PREFIX = "s3://kiln-{env}-artifacts-123456789012-us-east-1/models/v7/model/"
# (environment, engine, model data): every environment with each engine and each data form
# at least once; kiln's engine on an archive is what the shipped configs deploy.
SERVED = [
    ("dev", "kiln", ARTIFACT),
    ("prod", "kiln", ARTIFACT),
    ("staging", "kiln", PREFIX),
    ("dev", "lmi", PREFIX),
    ("staging", "lmi", ARTIFACT),
    ("prod", "lmi", PREFIX),
]
# Prod serves registry versions only (guardrail prod-serves-approved-packages).
PACKAGE = "arn:aws:sagemaker:us-east-1:123456789012:model-package/kiln-llm/7"


@pytest.fixture(
    scope="module",
    params=SERVED,
    ids=[f"{e}-{g}-{'prefix' if a == PREFIX else 'archive'}" for e, g, a in SERVED],
)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, SynthesizedStack, Path]:
    """`-c env=<env> -c modelArtifact=... -c servingEngine=...` (prod: with
    `-c modelPackage=...`), synthesized with the policy gates (a finding fails the synth)."""
    env, engine, artifact = request.param
    out = tmp_path_factory.mktemp(f"served-{env}-{engine}")
    context = {"env": env, "modelArtifact": artifact.format(env=env), "servingEngine": engine}
    if env == "prod":
        context["modelPackage"] = PACKAGE
        if engine == "lmi":
            # The version's `lmi` specification (what `kiln deploy-model` passes).
            context["inferenceSpecification"] = "lmi"
    build_app(context, outdir=str(out)).synth()
    stacks = {s.stack_name: s for s in read_assembly(out)}
    return env, stacks[f"kiln-{env}-serving"], out


def _container(stack: SynthesizedStack) -> dict[str, Any]:
    (model,) = stack.resources_of_type("AWS::SageMaker::Model").values()
    container: dict[str, Any] = model["Properties"]["PrimaryContainer"]
    return container


def _engine(stack: SynthesizedStack) -> str:
    # A registry version (prod) names no image of its own: LMI's variables tell the engine.
    container = _container(stack)
    lmi = "djl-inference" in json.dumps(container.get("Image")) or "HF_MODEL_ID" in container.get(
        "Environment", {}
    )
    return "lmi" if lmi else "kiln"


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
    if _engine(stack) == "lmi":
        return  # the LMI container's own variables: test_lmi_container_follows_config
    container = _container(stack)
    data = {"ModelDataUrl": ARTIFACT.format(env=env)}
    if "ModelDataSource" in container:
        data = {"ModelDataSource": Match.any_value()}
    # Prod's model is the registry version (its image and artifact come with it).
    source = (
        {"ModelPackageName": PACKAGE} if env == "prod" else {"Image": Match.any_value(), **data}
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
    if _engine(stack) == "lmi":  # LMI publishes no events: no Kafka access, no Kafka egress
        assert "kafka" not in text
        assert "9098" not in json.dumps(stack.resources_of_type("AWS::EC2::SecurityGroup"))
        return
    assert "kafka-cluster:WriteData" in text and f"topic/kiln-{env}/*/prediction-events" in text
    assert "kafka-cluster:ReadData" not in text


def test_guardrails_and_cfn_lint(served: tuple[str, SynthesizedStack, Path]) -> None:
    env, stack, _ = served
    # Judged by the settings it was synthesized with (`-c servingEngine`).
    settings = with_serving_engine(load_settings(env), _engine(stack))
    assert [str(v) for v in check(stack, settings)] == []
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
    if _engine(stack) == "lmi":
        pytest.skip("kiln's server limits; LMI's are in test_lmi_container_follows_config")
    (model,) = stack.resources_of_type("AWS::SageMaker::Model").values()
    environment = model["Properties"]["PrimaryContainer"]["Environment"]
    assert environment[ServerEnv.MAX_NEW_TOKENS] == str(load_settings(env).serving.max_new_tokens)
    assert environment[ServerEnv.GRACEFUL_TIMEOUT_S] == str(SERVER_DRAIN_SECONDS)


def test_lmi_container_follows_config(served: tuple[str, SynthesizedStack, Path]) -> None:
    """`serving.engine: lmi`: the pinned LMI image of the region, vLLM in async mode over
    /opt/ml/model, tensor parallel over every GPU of the instance type, the model loading
    timeout equal to SageMaker's startup health check timeout, and none of kiln's variables."""
    from kiln import instances, lmi

    env, stack, _ = served
    if _engine(stack) != "lmi":
        pytest.skip("kiln's engine")
    serving = load_settings(env).serving
    container = _container(stack)
    # Prod's registry version names its own image (the package's `lmi` specification);
    # elsewhere the template does.
    assert container.get("Image", lmi.image_uri("us-east-1")) == lmi.image_uri("us-east-1")
    assert ("Image" in container) != ("ModelPackageName" in container)
    if "ModelPackageName" in container:
        assert container["InferenceSpecificationName"] == "lmi"
    assert container["Environment"] == {
        "HF_MODEL_ID": "/opt/ml/model",
        "OPTION_ASYNC_MODE": "true",
        "OPTION_ROLLING_BATCH": "disable",
        "OPTION_ENTRYPOINT": "djl_python.lmi_vllm.vllm_async_service",
        "OPTION_TENSOR_PARALLEL_DEGREE": str(instances.gpu_count(serving.instance_type)),
        "OPTION_MODEL_LOADING_TIMEOUT": str(serving.container_startup_timeout_seconds),
        "SERVING_FAIL_FAST": "true",
    }
    text = json.dumps(stack.resources_of_type("AWS::IAM::ManagedPolicy"))
    # The role pulls from the LMI repository of the DLC account, not kiln's asset repository.
    assert ":ecr:us-east-1:763104351884:repository/djl-inference" in text
    assert "cdk-hnb659fds-container-assets" not in text


def test_uncompressed_model_data_is_a_prefix_read_least_privilege(
    served: tuple[str, SynthesizedStack, Path],
) -> None:
    """An S3 prefix goes in as ModelDataSource (S3Prefix, no compression); the role may read
    the objects under it and list the bucket only below it. An archive stays ModelDataUrl and
    the role reads that one object."""
    env, stack, _ = served
    container = _container(stack)
    text = json.dumps(stack.resources_of_type("AWS::IAM::ManagedPolicy"))
    bucket = f"kiln-{env}-artifacts-123456789012-us-east-1"
    if "ModelPackageName" in container:
        # Prod: the registry version brings its data; the template names none of its own.
        assert not {"ModelDataUrl", "ModelDataSource", "Image"} & set(container)
        return
    if "ModelDataUrl" in container:
        assert container["ModelDataUrl"] == ARTIFACT.format(env=env)
        assert "ModelDataSource" not in container and "s3:ListBucket" not in text
        assert f"{bucket}/models/v7/model.tar.gz" in text
        return
    assert container["ModelDataSource"] == {
        "S3DataSource": {
            "S3Uri": PREFIX.format(env=env),
            "S3DataType": "S3Prefix",
            "CompressionType": "None",
        }
    }
    statements = [
        s
        for p in stack.resources_of_type("AWS::IAM::ManagedPolicy").values()
        for s in p["Properties"]["PolicyDocument"]["Statement"]
        if str(s["Action"]).startswith("s3:")
    ]
    assert sorted(json.dumps(s, sort_keys=True) for s in statements) == sorted(
        json.dumps(s, sort_keys=True)
        for s in [
            {
                "Action": "s3:GetObject",
                "Effect": "Allow",
                "Resource": {
                    "Fn::Join": [
                        "",
                        ["arn:", {"Ref": "AWS::Partition"}, f":s3:::{bucket}/models/v7/model/*"],
                    ]
                },
            },
            {
                "Action": "s3:ListBucket",
                "Condition": {"StringLike": {"s3:prefix": ["models/v7/model/*"]}},
                "Effect": "Allow",
                "Resource": {
                    "Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}, f":s3:::{bucket}"]]
                },
            },
        ]
    )


def test_both_engines_keep_the_same_guards(served: tuple[str, SynthesizedStack, Path]) -> None:
    """Whatever the engine: blue/green with the configured shifting and the rollback alarms,
    autoscaling on invocations per instance, no KMS key on instance-storage types, capture
    only as configured."""
    env, stack, _ = served
    settings = load_settings(env)
    (endpoint,) = stack.resources_of_type("AWS::SageMaker::Endpoint").values()
    routing = endpoint["Properties"]["DeploymentConfig"]["BlueGreenUpdatePolicy"][
        "TrafficRoutingConfiguration"
    ]
    assert routing["Type"] == settings.serving.deployment.traffic.upper()
    assert (
        len(endpoint["Properties"]["DeploymentConfig"]["AutoRollbackConfiguration"]["Alarms"]) == 2
    )
    (target,) = stack.resources_of_type("AWS::ApplicationAutoScaling::ScalableTarget").values()
    assert target["Properties"]["MinCapacity"] == settings.serving.autoscaling.min_instances
    assert stack.resources_of_type("AWS::ApplicationAutoScaling::ScalingPolicy")
    (config,) = stack.resources_of_type("AWS::SageMaker::EndpointConfig").values()
    assert "KmsKeyId" not in config["Properties"]  # ml.g5: local NVMe storage
    assert ("DataCaptureConfig" in config["Properties"]) == (
        settings.serving.data_capture_percent > 0
    )


def test_served_template_matches_snapshot(
    served: tuple[str, SynthesizedStack, Path], snapshot: Any
) -> None:
    """The serving stack as each engine and data form synthesize it (reviewed like code)."""
    from syrupy.extensions.json import JSONSnapshotExtension

    from tests.stacks.test_snapshots import normalized

    _, stack, _ = served
    assert normalized(stack.template) == snapshot.use_extension(JSONSnapshotExtension)
