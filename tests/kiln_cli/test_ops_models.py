"""`kiln models` against moto: a run registers, is approved dev -> staging -> prod (who and why
from STS), the pipeline's resolve picks each environment's latest approved version, `kiln
deploy-model --latest-approved` rolls it out and `kiln status` names the version it runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws

from kiln import registry
from kiln.contract import Component, Outputs, RegistryMetadata
from kiln_cli.cli import main
from kiln_cli.operate import deploy
from kiln_cli.operate.models import Registry
from tests.kiln_cli.support import (
    ACCOUNT,
    ARTIFACT,
    NEW_ARTIFACT,
    client,
    create_buckets,
    deploy_stacks,
    make_aws,
    put_object,
)

pytestmark = pytest.mark.usefixtures("stack_outputs")
GROUP = "kiln-llm"
IMAGE = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/cdk-hnb659fds-container-assets:abc"


def register_run(artifact: str, job: str, val_loss: float) -> str:
    """What training does at its end (kiln/registry.py), against moto."""
    run = registry.RunRecord(
        job=job,
        artifact=artifact,
        data="s3://kiln-dev-curated/train/",
        steps=600,
        tokens=2_457_600,
        val_loss=val_loss,
        hyperparameters=registry.hyperparameters(
            {"model": "small", "lr": 0.002, "max_steps": 600, "warmup_steps": 20},
            {"model": "small", "lr": 0.002, "max_steps": 600, "warmup_steps": 50},
        ),
    )
    target = registry.Target(group=GROUP, image=IMAGE, code_revision="0123abc")
    return registry.register(run, target, client("sagemaker"))


def registry_with_two_versions() -> list[str]:
    client("sagemaker").create_model_package_group(ModelPackageGroupName=GROUP)
    return [
        register_run(ARTIFACT, "kiln-dev-train-20251201-000000", 1.8341),
        register_run(NEW_ARTIFACT, "kiln-dev-train-20251202-000000", 1.7012),
    ]


@mock_aws
def test_a_registered_run_records_artifact_image_metrics_and_revision() -> None:
    first, _ = registry_with_two_versions()
    described = client("sagemaker").describe_model_package(ModelPackageName=first)
    assert described["ModelApprovalStatus"] == "PendingManualApproval"
    (container,) = described["InferenceSpecification"]["Containers"]
    assert container == {"Image": IMAGE, "ModelDataUrl": ARTIFACT}
    metadata = described["CustomerMetadataProperties"]
    assert metadata[RegistryMetadata.VAL_LOSS] == "1.8341"
    assert metadata[RegistryMetadata.VAL_PERPLEXITY] == "6.2595"
    assert metadata[RegistryMetadata.STEPS] == "600"
    assert metadata[RegistryMetadata.CODE_REVISION] == "0123abc"
    # Core hyperparameters always, others only where they differ from the default.
    assert metadata["hp.lr"] == "0.002" and metadata["hp.warmup_steps"] == "20"
    assert described["MetadataProperties"]["CommitId"] == "0123abc"


@mock_aws
def test_list_approve_in_order_and_reject(capsys: pytest.CaptureFixture[str]) -> None:
    deploy_stacks(components=(Component.MODELS,))
    registry_with_two_versions()
    assert main(["models", "list", "--env", "dev"]) == 0
    listed = capsys.readouterr().out
    print(listed)  # shown with -s: the report quotes it
    lines = listed.splitlines()
    assert lines[0].split() == [
        "version", "status", "approved", "for", "val_loss", "steps", "created", "job",
    ]  # fmt: skip
    assert lines[1].split()[:5] == ["kiln-llm/2", "PendingManualApproval", "-", "1.7012", "600"]
    assert lines[2].split()[0] == "kiln-llm/1"

    # prod before dev and staging is refused: promotion is dev -> staging -> prod.
    assert main(["models", "approve", "llm/2", "--env", "prod", "--reason", "ship it"]) == 2
    assert "not approved for dev, staging yet" in capsys.readouterr().err

    assert main(["models", "approve", "llm/2", "--env", "dev", "--reason", "eval 2.1 ok"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("approved kiln-llm/2 for dev (Approved)\n")
    assert "approved for dev by arn:aws:sts::123456789012:user/moto at " in out
    assert ": eval 2.1 ok\ndeploy it: kiln deploy-model --env dev --latest-approved llm\n" in out
    assert main(["models", "approve", "kiln-llm/2", "--env", "staging", "--reason", "soak"]) == 0
    capsys.readouterr()
    assert main(["models", "show", "llm/2", "--env", "dev"]) == 0
    shown = capsys.readouterr().out
    assert "approval dev" in shown and "approval staging" in shown
    assert "val_loss" in shown and "hp.lr" in shown and NEW_ARTIFACT in shown

    assert main(["models", "reject", "llm/2", "--env", "staging", "--reason", "p99 regressed"]) == 0
    capsys.readouterr()
    version = Registry(make_aws("dev")).describe("llm/2")
    assert version.status == "Approved" and sorted(version.approvals) == ["dev"]
    assert "rejected for staging by arn:aws:sts" in version.approval_description
    assert main(["models", "reject", "llm/2", "--env", "dev", "--reason", "bad data"]) == 0
    assert Registry(make_aws("dev")).describe("llm/2").status == "Rejected"
    # The run's record outlives the decisions.
    assert Registry(make_aws("dev")).describe("llm/2").metadata[RegistryMetadata.STEPS] == "600"


@mock_aws
def test_resolve_writes_each_environments_latest_approved_version(tmp_path: Path) -> None:
    first, second = registry_with_two_versions()
    reg = Registry(make_aws("dev"))
    now = __import__("datetime").datetime(2025, 12, 3, tzinfo=__import__("datetime").UTC)
    reg.approve("llm/1", "dev", "baseline", now=now)
    reg.approve("llm/1", "staging", "baseline", now=now)
    reg.approve("llm/2", "dev", "better loss", now=now)
    out = tmp_path / "approved.json"
    assert main(["models", "resolve", "--environments", "dev,staging,prod", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {
        "dev": {"model_package": second, "model_artifact": NEW_ARTIFACT},
        "staging": {"model_package": first, "model_artifact": ARTIFACT},
    }
    # An environment serving with LMI deploys the versions' `lmi` specification.
    from kiln.config import load_settings
    from kiln_cli.operate.models import resolve

    staging = load_settings("staging")
    on_lmi = staging.model_copy(
        update={"serving": staging.serving.model_copy(update={"engine": "lmi"})}
    )
    found = resolve([load_settings("dev"), on_lmi], lambda s: make_aws(s.name))
    assert found["staging"] == {
        "model_package": first,
        "model_artifact": ARTIFACT,
        "inference_specification": "lmi",
    }
    assert "inference_specification" not in found["dev"]


class Runner:
    """The CDK deploy, faked: records its argv and makes the endpoint serve the package."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: Any, cwd: Path) -> int:
        self.calls.append(list(argv))
        context = dict(a.split("=", 1) for a in argv if "=" in a)
        sagemaker = client("sagemaker")
        container = {"ModelPackageName": context["modelPackage"]}
        if "inferenceSpecification" in context:
            container["InferenceSpecificationName"] = context["inferenceSpecification"]
        sagemaker.create_model(
            ModelName="kiln-dev-llm-model-p2",
            ExecutionRoleArn=f"arn:aws:iam::{ACCOUNT}:role/serving",
            PrimaryContainer=container,
        )
        sagemaker.create_endpoint_config(
            EndpointConfigName="kiln-dev-llm-config-p2",
            ProductionVariants=[
                {
                    "VariantName": "AllTraffic",
                    "ModelName": "kiln-dev-llm-model-p2",
                    "InstanceType": "ml.g4dn.xlarge",
                    "InitialInstanceCount": 1,
                }
            ],
        )
        sagemaker.create_endpoint(
            EndpointName="kiln-dev-llm", EndpointConfigName="kiln-dev-llm-config-p2"
        )
        return 0


class Recorder:
    """A CDK deploy that records its argv and changes nothing."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: Any, cwd: Path) -> int:
        self.calls.append(list(argv))
        return 0


@mock_aws
def test_deploy_latest_approved_then_status_names_the_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    outputs = deploy_stacks(
        components=(Component.DATA_LAKE, Component.MODELS, Component.OBSERVABILITY),
    )
    create_buckets()
    put_object(NEW_ARTIFACT)
    _, second = registry_with_two_versions()
    aws = make_aws("dev")
    reg = Registry(aws)
    # Not approved for dev yet: refused before any deploy.
    with pytest.raises(deploy.OperateError, match="no version of llm is approved for dev"):
        __import__("kiln_cli.operate.models", fromlist=["x"]).latest_or_explain(reg, "llm")
    now = __import__("datetime").datetime(2025, 12, 3, tzinfo=__import__("datetime").UTC)
    version = reg.approve("llm/2", "dev", "better loss", now=now)
    # The serving stack as the deploy leaves it (its outputs name the version).
    serving = {
        **outputs[Component.SERVING],
        Outputs.MODEL_ARTIFACT.key: NEW_ARTIFACT,
        Outputs.MODEL_PACKAGE.key: second,
    }
    deploy_stacks(components=(Component.SERVING,), extra={Component.SERVING: serving})
    runner = Runner()
    outcome = deploy.deploy_version(
        make_aws("dev"), version, runner=runner, sleep=lambda s: None, interval=0
    )
    assert outcome.result == "promoted" and outcome.serving == second
    (argv,) = runner.calls
    assert f"modelPackage={second}" in argv and f"modelArtifact={NEW_ARTIFACT}" in argv

    assert main(["status", "--env", "dev"]) == 0
    shown = capsys.readouterr().out
    print(shown)  # shown with -s: the report quotes it
    assert f"  model            {NEW_ARTIFACT}" in shown
    assert (
        "  model package    kiln-llm/2 (Approved, approved for dev), primary specification (kiln)"
        in shown
    )


@mock_aws
def test_prod_refuses_a_raw_artifact(capsys: pytest.CaptureFixture[str]) -> None:
    deploy_stacks("prod", components=(Component.DATA_LAKE, Component.SERVING))
    assert main(["deploy-model", "--env", "prod", "--artifact", ARTIFACT]) == 2
    assert "serves approved registry versions only" in capsys.readouterr().err


def test_a_run_without_a_group_does_not_register_and_a_misconfigured_one_says_why() -> None:
    assert registry.Target.from_environment(None, {}) is None
    with pytest.raises(registry.RegistrationError, match="KILN_INFERENCE_IMAGE"):
        registry.Target.from_environment(GROUP, {})
    target = registry.Target(group=GROUP, image=IMAGE)
    local = registry.RunRecord("job", "runs/job/model.tar.gz", "data/", 1, 1, None)
    with pytest.raises(registry.RegistrationError, match="needs an S3 artifact"):
        registry.create_request(local, target)


def test_an_uncompressed_model_registers_as_a_prefix_data_source() -> None:
    """`--model-format directory` writes `<output>/model/`: the version names that prefix as
    S3Prefix model data with no compression (an archive stays ModelDataUrl)."""
    target = registry.Target(group=GROUP, image=IMAGE)
    prefix = ARTIFACT.removesuffix("model.tar.gz") + "model/"
    run = registry.RunRecord("job", prefix, "s3://d/", 1, 1, None)
    (container,) = registry.create_request(run, target)["InferenceSpecification"]["Containers"]
    assert container == {
        "Image": IMAGE,
        "ModelDataSource": {
            "S3DataSource": {"S3Uri": prefix, "S3DataType": "S3Prefix", "CompressionType": "None"}
        },
    }
    archive = registry.RunRecord("job", ARTIFACT, "s3://d/", 1, 1, None)
    (container,) = registry.create_request(archive, target)["InferenceSpecification"]["Containers"]
    assert container == {"Image": IMAGE, "ModelDataUrl": ARTIFACT}


@mock_aws
def test_registration_into_a_missing_group_says_what_to_deploy() -> None:
    run = registry.RunRecord("job-1", ARTIFACT, "s3://d/", 10, 100, 2.0)
    target = registry.Target(group="kiln-nope", image=IMAGE)
    with pytest.raises(registry.RegistrationError) as err:
        registry.register(run, target, client("sagemaker"))
    assert "kiln models register --env <env>" in str(err.value)
    assert ARTIFACT in str(err.value)


def _approved_version(specifications: tuple[Any, ...]) -> Any:
    from datetime import UTC, datetime

    from kiln_cli.operate.models import Version

    return Version(
        arn=f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:model-package/{GROUP}/3",
        group=GROUP,
        number=3,
        status="Approved",
        created=datetime(2026, 1, 1, tzinfo=UTC),
        artifact=ARTIFACT,
        image=specifications[0].image,
        description="",
        approval_description="",
        metadata={f"{RegistryMetadata.APPROVAL_PREFIX}dev": "ok"},
        specifications=specifications,
    )


def _with_engine(aws: Any, engine: str) -> Any:
    serving = aws.settings.serving.model_copy(update={"engine": engine})
    aws.settings = aws.settings.model_copy(update={"serving": serving})
    return aws


def test_a_version_without_the_engines_specification_is_refused_before_any_deploy() -> None:
    """A version registered with one image (before versions held both engines): kiln's image
    on an LMI environment (or the reverse) would start the wrong server with the engine's
    variables, so the tool refuses it and gives the command that adds the engine."""
    from kiln.lmi import image_uri
    from kiln_cli.operate.models import Specification

    aws = _with_engine(make_aws("dev"), "lmi")
    kiln_only = _approved_version((Specification(None, IMAGE, ARTIFACT),))
    runner = Runner()
    with pytest.raises(deploy.OperateError, match="holds no specification for engine lmi") as err:
        deploy.deploy_version(aws, kiln_only, runner=runner, sleep=lambda s: None, interval=0)
    assert "((primary): kiln)" in str(err.value)
    assert "`kiln models add-engine kiln-llm/3 --env dev --engine lmi`" in str(err.value)
    assert not runner.calls
    lmi_only = _approved_version((Specification(None, image_uri("us-east-1"), ARTIFACT),))
    with pytest.raises(deploy.OperateError, match="--engine kiln"):
        deploy.deploy_version(
            _with_engine(aws, "kiln"), lmi_only, runner=runner, sleep=lambda s: None, interval=0
        )
    assert not runner.calls


@mock_aws
def test_one_version_serves_with_either_engine_by_its_specifications_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Training registers kiln's server as the primary specification and the pinned LMI
    container as the `lmi` one, over the same model data; an environment serving with LMI
    deploys the `lmi` specification (`-c inferenceSpecification=lmi`), one with kiln's engine
    the primary (no name)."""
    from kiln.lmi import image_uri

    deploy_stacks(
        components=(
            Component.DATA_LAKE,
            Component.MODELS,
            Component.OBSERVABILITY,
            Component.SERVING,
        )
    )
    create_buckets()
    put_object(NEW_ARTIFACT)
    _, second = registry_with_two_versions()
    described = client("sagemaker").describe_model_package(ModelPackageName=second)
    assert described["InferenceSpecification"]["Containers"] == [
        {"Image": IMAGE, "ModelDataUrl": NEW_ARTIFACT}
    ]
    (extra,) = described["AdditionalInferenceSpecifications"]
    assert extra["Name"] == "lmi"
    assert extra["Containers"] == [{"Image": image_uri("us-east-1"), "ModelDataUrl": NEW_ARTIFACT}]
    now = __import__("datetime").datetime(2025, 12, 3, tzinfo=__import__("datetime").UTC)
    version = Registry(make_aws("dev")).approve("llm/2", "dev", "ok", now=now)
    assert [(s.name, s.engine) for s in version.specifications] == [(None, "kiln"), ("lmi", "lmi")]
    assert version.specification_for("kiln") is None
    assert version.specification_for("lmi") == "lmi"
    for engine, expected in (("lmi", ["inferenceSpecification=lmi"]), ("kiln", [])):
        runner = Runner()
        deploy.deploy_version(
            _with_engine(make_aws("dev"), engine),
            version,
            runner=runner,
            sleep=lambda s: None,
            interval=0,
        )
        (argv,) = runner.calls
        assert [a for a in argv if a.startswith("inferenceSpecification=")] == expected
        # `kiln status` names the specification the endpoint's model was made from.
        assert main(["status", "--env", "dev"]) == 0
        served = "specification lmi (lmi)" if engine == "lmi" else "primary specification (kiln)"
        assert f"kiln-llm/2 (Approved, approved for dev), {served}\n" in capsys.readouterr().out
        # Deployed again with the same engine: unchanged; the other engine would redeploy.
        again = deploy.deploy_version(
            _with_engine(make_aws("dev"), engine), version, runner=runner, interval=0
        )
        assert again.result == "unchanged" and len(runner.calls) == 1
        other = "kiln" if engine == "lmi" else "lmi"
        recorder = Recorder()
        deploy.deploy_version(
            _with_engine(make_aws("dev"), other),
            version,
            runner=recorder,
            sleep=lambda s: None,
            interval=0,
        )
        assert len(recorder.calls) == 1  # not "unchanged": the engine's specification differs
        client("sagemaker").delete_endpoint(EndpointName="kiln-dev-llm")
        client("sagemaker").delete_endpoint_config(EndpointConfigName="kiln-dev-llm-config-p2")
        client("sagemaker").delete_model(ModelName="kiln-dev-llm-model-p2")


@mock_aws
def test_models_show_lists_the_specifications_and_add_engine_fills_a_missing_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A version registered with kiln's image alone gets an `lmi` specification over its own
    model data (UpdateModelPackage, AdditionalInferenceSpecificationsToAdd); `kiln models show`
    lists each specification with its engine and image."""
    from kiln.lmi import image_uri

    deploy_stacks(components=(Component.MODELS, Component.SERVING))
    sagemaker = client("sagemaker")
    sagemaker.create_model_package_group(ModelPackageGroupName=GROUP)
    run = registry.RunRecord("old-run", ARTIFACT, "s3://d/", 10, 100, 2.0)
    old = registry.create_request(run, registry.Target(group=GROUP, image=IMAGE))
    assert "AdditionalInferenceSpecifications" not in old
    sagemaker.create_model_package(**old)
    assert main(["models", "add-engine", "llm/1", "--env", "dev", "--engine", "lmi"]) == 0
    assert capsys.readouterr().out == "kiln-llm/1 serves with lmi ((primary): kiln, lmi: lmi)\n"
    assert main(["models", "show", "llm/1", "--env", "dev"]) == 0
    shown = capsys.readouterr().out
    print(shown)  # shown with -s: the report quotes it
    assert f"specification (primary)  kiln  {IMAGE}\n" in shown
    assert f"specification lmi        lmi  {image_uri('us-east-1')}\n" in shown
    # Again: nothing to add, nothing changes.
    assert main(["models", "add-engine", "llm/1", "--env", "dev", "--engine", "lmi"]) == 0
    (extra,) = sagemaker.describe_model_package(
        ModelPackageName=f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:model-package/{GROUP}/1"
    )["AdditionalInferenceSpecifications"]
    assert extra["Containers"] == [{"Image": image_uri("us-east-1"), "ModelDataUrl": ARTIFACT}]


def test_the_registration_request_is_what_the_sagemaker_api_accepts() -> None:
    """botocore's Stubber checks the request against the SageMaker API model (names, lengths,
    patterns of AdditionalInferenceSpecifications): the primary and `lmi` specifications,
    archive and uncompressed prefix alike; and CreateModel takes InferenceSpecificationName."""
    import boto3
    from botocore.stub import Stubber

    from kiln.lmi import image_uri

    sagemaker = boto3.client(
        "sagemaker", region_name="eu-west-1", aws_access_key_id="a", aws_secret_access_key="b"
    )
    target = registry.Target(group=GROUP, image=IMAGE, key_arn="arn:aws:kms:eu-west-1:1:key/k")
    prefix = ARTIFACT.removesuffix("model.tar.gz") + "model/"
    for artifact in (ARTIFACT, prefix):
        run = registry.RunRecord("job", artifact, "s3://d/", 1, 1, 1.5)
        expected = registry.create_request(run, registry.with_lmi(target, "eu-west-1"))
        (extra,) = expected["AdditionalInferenceSpecifications"]
        assert extra["Name"] == "lmi"
        assert extra["Containers"][0]["Image"] == image_uri("eu-west-1")
        assert extra["Containers"][0] == {
            "Image": image_uri("eu-west-1"),
            **registry.model_data(artifact),
        }
        arn = f"arn:aws:sagemaker:eu-west-1:{ACCOUNT}:model-package/{GROUP}/1"
        with Stubber(sagemaker) as stub:
            stub.add_response("create_model_package", {"ModelPackageArn": arn}, expected)
            assert registry.register(run, target, sagemaker) == arn
            stub.assert_no_pending_responses()
    with Stubber(sagemaker) as stub:
        request = {
            "ModelName": "m",
            "ExecutionRoleArn": f"arn:aws:iam::{ACCOUNT}:role/serving",
            "PrimaryContainer": {
                "ModelPackageName": f"arn:aws:sagemaker:eu-west-1:{ACCOUNT}:model-package/g/1",
                "InferenceSpecificationName": "lmi",
            },
        }
        stub.add_response(
            "create_model", {"ModelArn": f"arn:aws:sagemaker:eu-west-1:{ACCOUNT}:model/m"}, request
        )
        sagemaker.create_model(**request)
    # An additional specification is named by an engine other than the primary's.
    with pytest.raises(registry.RegistrationError, match="name it by an engine"):
        registry.create_request(run, registry.Target(GROUP, IMAGE, additional={"kiln": IMAGE}))
    # No LMI registry recorded for the region: the version keeps kiln's specification alone.
    assert registry.with_lmi(target, "xx-nowhere-1") == target


def test_a_run_registers_kilns_image_as_primary_whatever_the_home_serves_with() -> None:
    """`kiln train` hands the trainer kiln's serving image as the primary specification; the
    trainer adds LMI's beside it, so the home's engine no longer decides what a version holds."""
    from types import SimpleNamespace

    from kiln.config import load_settings
    from kiln.contract import TrainerEnv
    from kiln_cli.operate.train import TrainOptions, registration_environment

    dev = load_settings("dev")
    outputs = {Outputs.IMAGE_URI: IMAGE, Outputs.REGISTRY_KEY_ARN: "arn:aws:kms:k"}

    def environment(engine: str) -> dict[str, str]:
        settings = dev.model_copy(
            update={"serving": dev.serving.model_copy(update={"engine": engine})}
        )
        aws = SimpleNamespace(
            settings=settings, stack=lambda component: {}, output=lambda o: outputs[o]
        )
        return registration_environment(
            aws,  # type: ignore[arg-type]
            TrainOptions(on="eks"),
            artifact=ARTIFACT,
            data_uri="s3://d/",
            warn=lambda m: None,
        )

    assert environment("kiln")[TrainerEnv.INFERENCE_IMAGE] == IMAGE
    assert environment("lmi")[TrainerEnv.INFERENCE_IMAGE] == IMAGE


@mock_aws
def test_register_by_hand_holds_both_engines_and_engine_picks_the_primary(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`kiln models register` registers kiln's serving image (the serving stack's output) as the
    primary and LMI's as `lmi`; `--engine lmi` swaps them (LMI primary, kiln's as `kiln`), and
    an environment on kiln's engine then serves that version's `kiln` specification."""
    from kiln.lmi import image_uri

    outputs = deploy_stacks(components=(Component.MODELS, Component.SERVING))
    kiln_image = outputs[Component.SERVING][Outputs.IMAGE_URI.key]
    client("sagemaker").create_model_package_group(ModelPackageGroupName=GROUP)
    for engine in ("kiln", "lmi"):
        argv = ["models", "register", "--env", "dev", "--artifact", ARTIFACT, "--job", "j"]
        assert main([*argv, "--engine", engine]) == 0
        assert capsys.readouterr().out.endswith("(PendingManualApproval)\n")
    kiln_first = Registry(make_aws("dev")).describe("llm/1")
    assert [(s.name, s.engine, s.image) for s in kiln_first.specifications] == [
        (None, "kiln", kiln_image),
        ("lmi", "lmi", image_uri("us-east-1")),
    ]
    lmi_first = Registry(make_aws("dev")).describe("llm/2")
    assert [(s.name, s.engine, s.image) for s in lmi_first.specifications] == [
        (None, "lmi", image_uri("us-east-1")),
        ("kiln", "kiln", kiln_image),
    ]
    assert lmi_first.specification_for("kiln") == "kiln"
    assert lmi_first.specification_for("lmi") is None
    assert all(s.artifact == ARTIFACT for s in lmi_first.specifications)
