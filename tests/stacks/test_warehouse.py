"""The warehouse stack's posture, as synthesized for every environment, and the provisioned
variant built from a changed config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aws_cdk.assertions import Match, Template

from kiln.settings import Settings
from tests.support import ENVIRONMENTS, Synthesis


@pytest.fixture(params=ENVIRONMENTS)
def env(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def warehouse(synthesis: Synthesis, env: str) -> Template:
    return Template.from_json(synthesis.stack(env, "warehouse").template)


def test_serverless_is_private_encrypted_audited_and_sized_from_config(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    settings = settings_by_env[env]
    template = warehouse(synthesis, env)
    template.has_resource_properties(
        "AWS::RedshiftServerless::Namespace",
        {
            "NamespaceName": f"kiln-{env}",
            "DbName": settings.warehouse.database,
            "AdminUsername": settings.warehouse.admin_username,
            "ManageAdminPassword": True,
            "AdminPasswordSecretKmsKeyId": Match.any_value(),
            "KmsKeyId": {"Fn::GetAtt": [Match.string_like_regexp("WarehouseKey"), "Arn"]},
            "LogExports": ["connectionlog", "userlog", "useractivitylog"],
            "IamRoles": [{"Fn::GetAtt": [Match.string_like_regexp("WarehouseRole"), "Arn"]}],
        },
    )
    template.has_resource_properties(
        "AWS::RedshiftServerless::Workgroup",
        {
            "PubliclyAccessible": False,
            "EnhancedVpcRouting": True,
            "BaseCapacity": settings.warehouse.serverless.base_capacity,
            "MaxCapacity": settings.warehouse.serverless.max_capacity,
            "Port": 5440,
            "ConfigParameters": Match.array_with(
                [
                    {"ParameterKey": "require_ssl", "ParameterValue": "true"},
                    {"ParameterKey": "enable_user_activity_logging", "ParameterValue": "true"},
                ]
            ),
        },
    )


def test_no_password_in_any_template(synthesis: Synthesis) -> None:
    for stack in synthesis.stacks:
        text = json.dumps(stack.template)
        assert "AdminUserPassword" not in text and "MasterUserPassword" not in text


def test_warehouse_sits_in_the_isolated_subnets(synthesis: Synthesis, env: str) -> None:
    (workgroup,) = (
        synthesis.stack(env, "warehouse")
        .resources_of_type("AWS::RedshiftServerless::Workgroup")
        .values()
    )
    subnet_refs = json.dumps(workgroup["Properties"]["SubnetIds"])
    assert "IsolatedSubnet" in subnet_refs and "PrivateSubnet" not in subnet_refs


def test_role_reads_only_raw_and_curated_and_msk(synthesis: Synthesis, env: str) -> None:
    stack = synthesis.stack(env, "warehouse")
    (policy,) = [
        p
        for k, p in stack.resources_of_type("AWS::IAM::ManagedPolicy").items()
        if k.startswith("WarehouseRolePolicy")
    ]
    text = json.dumps(policy["Properties"]["PolicyDocument"])
    assert f"kiln-{env}-raw-" in text and f"kiln-{env}-curated-" in text
    assert "artifacts" not in text and "capture" not in text
    actions = {
        a
        for s in policy["Properties"]["PolicyDocument"]["Statement"]
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert not {
        a
        for a in actions
        if a.startswith("s3:")
        and a not in {"s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"}
    }
    assert "kafka-cluster:ReadData" in actions and "kafka-cluster:WriteData" not in actions


def test_streaming_ingestion_runs_the_generated_sql(synthesis: Synthesis, env: str) -> None:
    stack = synthesis.stack(env, "warehouse")
    (resource,) = stack.resources_of_type("Custom::RedshiftStreamingIngestion").values()
    props = resource["Properties"]
    assert props["Database"] == "analytics"
    assert {"WorkgroupName", "NamespaceName"} <= set(props)
    first, stream, version = props["Statements"]
    assert "CREATE EXTERNAL SCHEMA IF NOT EXISTS kiln_msk FROM MSK" in json.dumps(first["Sql"])
    assert "AUTHENTICATION iam" in json.dumps(first["Sql"])
    # One materialized view per topic, parsing into SUPER; typed columns in a plain view.
    assert stream["Sql"].startswith("CREATE MATERIALIZED VIEW public.prediction_events_stream")
    assert stream["SkipIfRows"].startswith("SELECT 1 FROM svv_mv_info")
    assert version["Sql"].startswith("CREATE OR REPLACE VIEW public.prediction_events_v1 AS")
    # The MSK cluster's ARN is imported (strong): a replaced cluster cannot leave this stale.
    assert "Fn::ImportValue" in json.dumps(first["Sql"])


def test_handlers_run_in_private_subnets_with_https_egress_only(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    stack = synthesis.stack(env, "warehouse")
    functions = stack.resources_of_type("AWS::Lambda::Function")
    ours = {k: f for k, f in functions.items() if k.startswith("StreamingIngestionOnEvent")}
    assert ours
    for function in functions.values():
        assert "VpcConfig" in function["Properties"], "every function runs in the VPC"
    for function in ours.values():
        props = function["Properties"]
        assert props["Runtime"] == "python3.14"
        assert props["Handler"] == "redshift_sql.on_event"
        assert props["ReservedConcurrentExecutions"] == 2
        assert "LoggingConfig" in props
    groups = stack.resources_of_type("AWS::EC2::SecurityGroup")
    (handler_group,) = [
        g for k, g in groups.items() if k.startswith("StreamingIngestionSecurityGroup")
    ]
    # HTTPS to the VPC's interface endpoints, and S3 through its prefix list (issue 17).
    assert handler_group["Properties"]["SecurityGroupEgress"] == [
        {
            "CidrIp": settings_by_env[env].network.vpc_cidr,
            "Description": "Deploy-time handler: AWS APIs (interface endpoints)",
            "FromPort": 443,
            "IpProtocol": "tcp",
            "ToPort": 443,
        }
    ]
    (s3,) = [
        e["Properties"]
        for e in stack.resources_of_type("AWS::EC2::SecurityGroupEgress").values()
        if e["Properties"]["Description"] == "Deploy-time handler: S3 (gateway endpoint)"
    ]
    assert "DestinationPrefixListId" in s3 and s3["FromPort"] == 443


def test_provisioned_variant_has_the_same_posture(tmp_path: Path) -> None:
    """Built from a copy of staging's config switched to a provisioned cluster."""
    from app import build_app
    from kiln.config import CONFIG_DIR, load_settings
    from kiln_policy.assembly import read_assembly
    from kiln_policy.guardrails import check

    config = tmp_path / "config"
    config.mkdir()
    text = (
        (CONFIG_DIR / "staging.yaml").read_text().replace("kind: serverless", "kind: provisioned")
    )
    (config / "qa.yaml").write_text(text)
    out = tmp_path / "out"
    build_app({"env": "qa", "configDir": str(config)}, outdir=str(out)).synth()
    stacks = {s.stack_name: s for s in read_assembly(out)}
    stack = stacks["kiln-qa-warehouse"]
    template = Template.from_json(stack.template)
    template.has_resource_properties(
        "AWS::Redshift::Cluster",
        {
            "NodeType": "ra3.large",
            "NumberOfNodes": 2,
            "ClusterType": "multi-node",
            "Encrypted": True,
            "PubliclyAccessible": False,
            "EnhancedVpcRouting": True,
            "ManageMasterPassword": True,
            "Port": 5440,
            "AutomatedSnapshotRetentionPeriod": 7,
            "LoggingProperties": {
                "LogDestinationType": "cloudwatch",
                "LogExports": ["connectionlog", "userlog", "useractivitylog"],
            },
        },
    )
    template.has_resource_properties(
        "AWS::Redshift::ClusterParameterGroup",
        {
            "Parameters": Match.array_with(
                [{"ParameterName": "require_ssl", "ParameterValue": "true"}]
            ),
        },
    )
    (cluster,) = stack.resources_of_type("AWS::Redshift::Cluster").values()
    assert cluster["DeletionPolicy"] == "Retain"
    (ingestion,) = stack.resources_of_type("Custom::RedshiftStreamingIngestion").values()
    assert {"ClusterIdentifier", "SecretArn"} <= set(ingestion["Properties"])
    settings = load_settings("qa", config)
    assert [str(v) for s in stacks.values() for v in check(s, settings)] == []
