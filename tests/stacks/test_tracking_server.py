"""Experiment tracking: with `experiment_tracking.enabled` the compute stack holds a SageMaker
managed MLflow tracking server on a KMS-encrypted prefix, its role reaching that prefix only,
and both training identities may log to it; without it (every shipped environment) nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cfnlint.api import ManualArgs, lint
from pydantic import ValidationError

from app import build_app
from kiln.config import load_settings
from kiln.contract import MLFLOW_TRAINING_ACTIONS
from kiln.settings import Settings
from kiln_policy.assembly import SynthesizedStack, read_assembly
from kiln_policy.guardrails import check
from tests.support import ENVIRONMENTS, Synthesis, minimal_settings


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthesizedStack, Path]:
    """dev with `experiment_tracking: {enabled: true}`, synthesized with the policy gates."""
    config = tmp_path_factory.mktemp("config")
    for file in Path("config").glob("*.yaml"):
        shutil.copy(file, config / file.name)
    with (config / "dev.yaml").open("a") as f:
        f.write("\nexperiment_tracking:\n  enabled: true\n  size: Small\n")
    out = tmp_path_factory.mktemp("tracked")
    build_app({"env": "dev", "configDir": str(config)}, outdir=str(out)).synth()
    stacks = {s.stack_name: s for s in read_assembly(out)}
    return stacks["kiln-dev-compute"], config


def test_the_server_stores_artifacts_under_its_own_prefix(
    tracked: tuple[SynthesizedStack, Path],
) -> None:
    stack, _ = tracked
    (server,) = stack.resources_of_type("AWS::SageMaker::MlflowTrackingServer").values()
    props = server["Properties"]
    assert props["TrackingServerName"] == "kiln-dev-mlflow"
    assert props["TrackingServerSize"] == "Small" and props["MlflowVersion"] == "3.0"
    assert props["AutomaticModelRegistration"] is False
    assert props["WeeklyMaintenanceWindowStart"] == "Sun:03:00"
    assert props["ArtifactStoreUri"] == {
        "Fn::Join": [
            "",
            [
                "s3://kiln-dev-artifacts-",
                {"Ref": "AWS::AccountId"},
                "-",
                {"Ref": "AWS::Region"},
                "/mlflow/",
            ],
        ]
    }
    assert "TrackingServerArn" in stack.template["Outputs"]


def test_roles_reach_the_prefix_and_the_server_only(tracked: tuple[SynthesizedStack, Path]) -> None:
    stack, _ = tracked
    policies = stack.resources_of_type("AWS::IAM::ManagedPolicy")
    store = next(p for k, p in policies.items() if "ArtifactStore" in k)
    text = json.dumps(store)
    assert '"s3:*"' not in text and "AmazonS3FullAccess" not in text
    assert '{"s3:prefix": ["mlflow/*"]}' in text and "artifacts-" in text
    assert "kms:ViaService" in text
    logging = next(p for k, p in policies.items() if "MlflowLogging" in k)
    statements = logging["Properties"]["PolicyDocument"]["Statement"]
    (mlflow,) = [s for s in statements if "sagemaker-mlflow:CreateRun" in s["Action"]]
    # The calls a run makes (recorded in tests/training/test_tracking_sagemaker.py), no more.
    assert sorted(mlflow["Action"]) == sorted(MLFLOW_TRAINING_ACTIONS)
    assert "Fn::GetAtt" in json.dumps(mlflow["Resource"])  # this server's ARN, nothing wider
    # ... and only through the VPC's MLflow endpoint.
    (endpoint_id,) = stack.resources_of_type("AWS::EC2::VPCEndpoint")
    assert mlflow["Condition"] == {"StringEquals": {"aws:SourceVpce": {"Ref": endpoint_id}}}
    assert len(logging["Properties"]["Roles"]) == 2  # EKS pods and SageMaker training jobs
    assert "sagemaker:CreatePresignedMlflowTrackingServerUrl" not in json.dumps(statements)


def test_training_reaches_the_server_through_its_own_interface_endpoint(
    tracked: tuple[SynthesizedStack, Path],
) -> None:
    stack, _ = tracked
    (endpoint,) = stack.resources_of_type("AWS::EC2::VPCEndpoint").values()
    props = endpoint["Properties"]
    assert props["ServiceName"] == "aws.sagemaker.us-east-1.experiments"
    assert props["VpcEndpointType"] == "Interface" and props["PrivateDnsEnabled"] is True
    assert len(props["SubnetIds"]) == 3  # the private subnets of every zone training runs in
    # Its policy: this account's principals, this server's MLflow API.
    (statement,) = props["PolicyDocument"]["Statement"]
    assert statement["Principal"] == {"AWS": "*"} and statement["Action"] == "sagemaker-mlflow:*"
    assert "Fn::GetAtt" in json.dumps(statement["Resource"])
    assert statement["Condition"] == {
        "StringEquals": {"aws:PrincipalAccount": {"Ref": "AWS::AccountId"}}
    }
    # Its security group admits HTTPS from the SageMaker training group and the EKS cluster
    # group (which Karpenter's GPU nodes carry), nothing else.
    (training,) = [
        k
        for k in stack.resources_of_type("AWS::EC2::SecurityGroup")
        if "TrainingSecurityGroup" in k
    ]
    (cluster,) = stack.resources_of_type("AWS::EKS::Cluster")
    (group_ref,) = props["SecurityGroupIds"]
    group_id = group_ref["Fn::GetAtt"][0]
    ingress = stack.template["Resources"][group_id]["Properties"].get("SecurityGroupIngress", [])
    ingress += [
        r["Properties"]
        for r in stack.resources_of_type("AWS::EC2::SecurityGroupIngress").values()
        if r["Properties"]["GroupId"] == group_ref
    ]
    assert sorted(
        (r["IpProtocol"], r["FromPort"], r["ToPort"], json.dumps(r["SourceSecurityGroupId"]))
        for r in ingress
    ) == sorted(
        [
            ("tcp", 443, 443, json.dumps({"Fn::GetAtt": [training, "GroupId"]})),
            ("tcp", 443, 443, json.dumps({"Fn::GetAtt": [cluster, "ClusterSecurityGroupId"]})),
        ]
    ) and all("CidrIp" not in r for r in ingress)


def test_gates_pass(tracked: tuple[SynthesizedStack, Path]) -> None:
    stack, config = tracked
    assert [str(v) for v in check(stack, load_settings("dev", config))] == []
    matches = lint(json.dumps(stack.template), config=ManualArgs(regions=["us-east-1"]))
    assert not [m for m in matches if m.rule.id.startswith("E")]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_no_server_unless_asked(synthesis: Synthesis, env: str) -> None:
    assert not synthesis.stack(env, "compute").resources_of_type(
        "AWS::SageMaker::MlflowTrackingServer"
    )


def test_settings_refuse_what_the_api_refuses() -> None:
    good = minimal_settings(experiment_tracking={"enabled": True, "size": "Large"})
    assert Settings.model_validate(good).experiment_tracking.size == "Large"
    for bad in ({"size": "Huge"}, {"weekly_maintenance_window_start": "Sunday 3am"}):
        with pytest.raises(ValidationError):
            Settings.model_validate(minimal_settings(experiment_tracking=bad))


def test_without_interface_endpoints_training_reaches_mlflow_through_the_nat(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """An environment that sends AWS traffic through the NAT (`network.interface_endpoints:
    false`: training's egress is HTTPS anywhere) gets no MLflow endpoint, and the roles' MLflow
    statement has no endpoint condition it could never meet."""
    config = tmp_path_factory.mktemp("config")
    for file in Path("config").glob("*.yaml"):
        shutil.copy(file, config / file.name)
    text = (config / "dev.yaml").read_text()
    assert "  interface_endpoints: true\n" in text
    text = text.replace("  interface_endpoints: true\n", "  interface_endpoints: false\n")
    (config / "dev.yaml").write_text(text + "\nexperiment_tracking:\n  enabled: true\n")
    out = tmp_path_factory.mktemp("nat")
    build_app({"env": "dev", "configDir": str(config)}, outdir=str(out)).synth()
    stack = next(s for s in read_assembly(out) if s.stack_name == "kiln-dev-compute")
    assert stack.resources_of_type("AWS::SageMaker::MlflowTrackingServer")
    assert not stack.resources_of_type("AWS::EC2::VPCEndpoint")
    logging = next(
        p
        for k, p in stack.resources_of_type("AWS::IAM::ManagedPolicy").items()
        if "MlflowLogging" in k
    )
    (mlflow,) = [
        s
        for s in logging["Properties"]["PolicyDocument"]["Statement"]
        if "sagemaker-mlflow:CreateRun" in s["Action"]
    ]
    assert "Condition" not in mlflow
    assert [str(v) for v in check(stack, load_settings("dev", config))] == []
