"""The delivery pipeline (config/delivery.yaml): built only when enabled, gated like the rest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cfnlint.api import ManualArgs, lint

from app import build_app
from kiln.config import CONFIG_DIR, ConfigError, available_environments, load_delivery
from kiln.contract import COMPONENTS

CONNECTION = "arn:aws:codeconnections:us-east-1:111111111111:connection/abcd-1234"


@pytest.fixture(scope="module")
def enabled_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tmp_path_factory.mktemp("config")
    for path in CONFIG_DIR.glob("*.yaml"):
        shutil.copy(path, config)
    text = (config / "delivery.yaml").read_text()
    text = text.replace("enabled: false", "enabled: true").replace(
        "connection_arn: null", f"connection_arn: {CONNECTION}"
    )
    (config / "delivery.yaml").write_text(text)
    return config


@pytest.fixture(scope="module")
def pipeline_template(enabled_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("out")
    # Raises on any unacknowledged policy finding, as every synth does.
    build_app({"env": "pipeline", "configDir": str(enabled_config)}, outdir=str(out)).synth()
    template: dict = json.loads((out / "Delivery.template.json").read_text())
    return template


def stages(template: dict) -> dict[str, list[str]]:
    (pipeline,) = [
        r for r in template["Resources"].values() if r["Type"] == "AWS::CodePipeline::Pipeline"
    ]
    return {s["Name"]: [a["Name"] for a in s["Actions"]] for s in pipeline["Properties"]["Stages"]}


def test_delivery_file_is_not_an_environment() -> None:
    assert "delivery" not in available_environments()
    assert not load_delivery().enabled


def test_disabled_pipeline_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="enabled is false"):
        build_app({"env": "pipeline"})


def test_tests_then_environments_in_order_with_approval_before_prod(
    pipeline_template: dict,
) -> None:
    order = stages(pipeline_template)
    assert list(order) == ["Source", "Build", "UpdatePipeline", "Assets", "dev", "staging", "prod"]
    assert order["prod"][0] == "ApproveProd"
    assert not any(a.startswith("Approve") for a in order["dev"] + order["staging"])
    for env in ("dev", "staging", "prod"):
        deployed = {a.removesuffix(".Deploy") for a in order[env] if a.endswith(".Deploy")}
        assert deployed == {f"kiln-{env}-{c}" for c in COMPONENTS}


def test_synth_step_runs_the_readme_test_command(pipeline_template: dict) -> None:
    projects = [
        r for r in pipeline_template["Resources"].values() if r["Type"] == "AWS::CodeBuild::Project"
    ]
    specs = [json.dumps(p["Properties"]["Source"].get("BuildSpec", "")) for p in projects]
    (synth,) = [s for s in specs if "make test" in s]
    assert synth.index("make test") < synth.index("npx cdk synth -c env=pipeline")


def test_artifacts_are_kms_encrypted_logged_and_versioned(pipeline_template: dict) -> None:
    buckets = [r for r in pipeline_template["Resources"].values() if r["Type"] == "AWS::S3::Bucket"]
    artifacts = [b for b in buckets if "LoggingConfiguration" in b["Properties"]]
    (bucket,) = artifacts
    (rule,) = bucket["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
    assert bucket["Properties"]["VersioningConfiguration"] == {"Status": "Enabled"}


def test_no_smoke_test_before_a_model_is_served(pipeline_template: dict) -> None:
    assert not any(
        a.startswith("Smoke") for actions in stages(pipeline_template).values() for a in actions
    )


def test_cfn_lint_has_no_errors(pipeline_template: dict) -> None:
    # E3703 here is cfn-lint 1.58 preferring Fn::Sub over the Fn::Join the CDK writes for the
    # stage actions' role ARNs: a style preference filed under an error id, not an error.
    matches = lint(
        json.dumps(pipeline_template),
        config=ManualArgs(regions=["us-east-1"], ignore_checks=["E3703"]),
    )
    errors = [f"{m.rule.id} {m.message}" for m in matches if m.rule.id.startswith("E")]
    assert not errors, errors


def test_delivery_settings_errors(tmp_path: Path) -> None:
    for path in CONFIG_DIR.glob("*.yaml"):
        shutil.copy(path, tmp_path)
    delivery = tmp_path / "delivery.yaml"
    delivery.write_text(delivery.read_text().replace("enabled: false", "enabled: true"))
    with pytest.raises(ConfigError, match="connection_arn: required when enabled"):
        load_delivery(tmp_path)
    delivery.write_text(delivery.read_text().replace("[dev, staging, prod]", "[dev, qa]"))
    with pytest.raises(ConfigError, match=r"manual_approval_before: \['prod'\] are not in"):
        load_delivery(tmp_path)
