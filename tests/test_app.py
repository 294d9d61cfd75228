"""The CDK entry point: environment selection, and bad input stopping synth with one clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app import build_app
from kiln.config import CONFIG_DIR
from kiln.contract import COMPONENTS
from tests.support import REPO

OFFLINE = {
    # No credentials anywhere: synth must not need them.
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "CDK_DISABLE_CLI_TELEMETRY": "true",
}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CDK_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **OFFLINE, **extra}


def run_app(context: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Runs app.py the way the CDK CLI does: context arrives in CDK_CONTEXT_JSON."""
    return subprocess.run(
        [sys.executable, "app.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(CDK_CONTEXT_JSON=json.dumps(context)),
    )


def test_default_environment_is_dev(tmp_path: Path) -> None:
    app = build_app(outdir=str(tmp_path))
    stages = [c.node.id for c in app.node.children if c.node.id in {"dev", "staging", "prod"}]
    assert stages == ["dev"]


def test_one_environment_builds_its_stacks_only(tmp_path: Path) -> None:
    app = build_app({"env": "prod"}, outdir=str(tmp_path))
    prod = app.node.find_child("prod")
    stacks = {
        "Network",
        "DataLake",
        "Streaming",
        "Warehouse",
        "Compute",
        "Observability",
        "Models",
        "Serving",
    }
    assert {c.node.id for c in prod.node.children if c.node.id in stacks} == stacks
    assert app.node.try_find_child("dev") is None


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    target = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, target)
    return target


def assert_clean_failure(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("kiln: synth stopped, the configuration needs a fix.")
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_unknown_environment_stops_cleanly() -> None:
    assert_clean_failure(
        run_app({"env": "qa"}),
        "qa.yaml: no such environment",
        "available: dev, prod, staging or 'all'",
    )


def test_broken_config_stops_cleanly_naming_file_and_field(config_copy: Path) -> None:
    dev = config_copy / "dev.yaml"
    dev.write_text(dev.read_text().replace("nat_gateways: 1", "nat_gateways: many"))
    assert_clean_failure(
        run_app({"env": "dev", "configDir": str(config_copy)}),
        "dev.yaml: invalid configuration:",
        "network.nat_gateways:",
        "(got 'many')",
    )


def test_weakened_prod_stops_cleanly(config_copy: Path) -> None:
    prod = config_copy / "prod.yaml"
    prod.write_text(prod.read_text().replace("removal_policy: retain", "removal_policy: destroy"))
    assert_clean_failure(
        run_app({"env": "all", "configDir": str(config_copy)}),
        "prod.yaml: invalid configuration:",
        "removal_policy: 'destroy' is not allowed in a prod-tier environment",
    )


@pytest.mark.cli
def test_cdk_cli_synthesizes_every_environment_offline(tmp_path: Path) -> None:
    """`npx cdk synth -c env=all` with no AWS credentials: the pinned CLI, cdk.json, the app."""
    cdk = REPO / "node_modules" / ".bin" / "cdk"
    assert cdk.exists(), "node_modules missing: run `make test`, which installs the CDK CLI"
    out = tmp_path / "cdk.out"
    result = subprocess.run(
        [str(cdk), "synth", "--quiet", "-c", "env=all", "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for env in ("dev", "staging", "prod"):
        templates = sorted(p.name for p in (out / f"assembly-{env}").glob("*.template.json"))
        assert len(templates) == len(COMPONENTS), templates

    failing = subprocess.run(
        [str(cdk), "synth", "--quiet", "-c", "env=qa", "--output", str(tmp_path / "bad")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert failing.returncode != 0
    assert "qa.yaml: no such environment" in failing.stderr
    assert "Traceback" not in failing.stderr


def test_model_artifact_from_context_is_validated() -> None:
    assert_clean_failure(
        run_app({"env": "dev", "modelArtifact": "s3://bucket/model.zip"}),
        "-c modelArtifact: invalid configuration:",
        "serving.model_artifact: 's3://bucket/model.zip' is neither a .tar.gz archive nor a "
        "prefix; allowed:",
    )
    assert_clean_failure(
        run_app({"env": "all", "modelArtifact": "s3://bucket/models/v1/model.tar.gz"}),
        "-c modelArtifact/-c modelPackage apply to one environment",
    )
    package = "arn:aws:sagemaker:us-east-1:123456789012:model-package/kiln-llm/3"
    assert_clean_failure(
        run_app({"env": "prod", "modelPackage": package}),
        "-c modelPackage needs -c modelArtifact",
    )
    assert_clean_failure(
        run_app(
            {
                "env": "prod",
                "modelPackage": "arn:aws:sagemaker:us-east-1:1:model-package/x",
                "modelArtifact": "s3://bucket/models/v1/model.tar.gz",
            }
        ),
        "serving.model_package: 'arn:aws:sagemaker:us-east-1:1:model-package/x' is not the ARN "
        "of a model package version",
    )
