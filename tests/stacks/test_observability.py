"""The observability stack: on-call topic, alarms, dashboard."""

from __future__ import annotations

import json

import pytest
from aws_cdk.assertions import Match, Template

from kiln.settings import Settings
from tests.support import ENVIRONMENTS, Synthesis


@pytest.fixture(params=ENVIRONMENTS)
def env(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def observability(synthesis: Synthesis, env: str) -> Template:
    return Template.from_json(synthesis.stack(env, "observability").template)


def test_on_call_topic_is_kms_encrypted_tls_only_and_alarms_may_use_the_key(
    synthesis: Synthesis, env: str
) -> None:
    template = observability(synthesis, env)
    template.has_resource_properties(
        "AWS::SNS::Topic",
        {
            "KmsMasterKeyId": {"Fn::GetAtt": [Match.string_like_regexp("AlertsKey"), "Arn"]},
        },
    )
    template.has_resource_properties(
        "AWS::SNS::TopicPolicy",
        {
            "PolicyDocument": {
                "Statement": [
                    Match.object_like(
                        {"Effect": "Deny", "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
                    )
                ]
            }
        },
    )
    template.has_resource_properties(
        "AWS::KMS::Key",
        {
            "KeyPolicy": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "Principal": {"Service": "cloudwatch.amazonaws.com"},
                                "Action": ["kms:Decrypt", "kms:GenerateDataKey*"],
                            }
                        )
                    ]
                )
            }
        },
    )


def test_rollback_alarms_follow_config_and_page(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    alarms = settings_by_env[env].serving.alarms
    template = observability(synthesis, env)
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "MetricName": "ModelLatency",
            "ExtendedStatistic": "p99",
            "Threshold": alarms.latency_p99_ms * 1000,
            "EvaluationPeriods": alarms.evaluation_minutes,
            "Dimensions": [
                {"Name": "EndpointName", "Value": f"kiln-{env}-llm"},
                {"Name": "VariantName", "Value": "AllTraffic"},
            ],
            "AlarmActions": [{"Ref": Match.string_like_regexp("OnCall")}],
            "OKActions": [{"Ref": Match.string_like_regexp("OnCall")}],
        },
    )
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "Threshold": alarms.error_rate_percent,
            "Metrics": Match.array_with([Match.object_like({"Id": "expr_1"})]),
        },
    )


def test_every_alarm_notifies_on_call(synthesis: Synthesis, env: str) -> None:
    alarms = synthesis.stack(env, "observability").resources_of_type("AWS::CloudWatch::Alarm")
    assert len(alarms) >= 4
    for alarm in alarms.values():
        (action,) = alarm["Properties"]["AlarmActions"]
        assert action["Ref"].startswith("OnCall")
        assert alarm["Properties"]["OKActions"] == [action]


def test_data_plane_alarms(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    settings = settings_by_env[env]
    alarms = synthesis.stack(env, "observability").resources_of_type("AWS::CloudWatch::Alarm")
    disks = [
        a for a in alarms.values() if a["Properties"].get("MetricName") == "KafkaDataLogsDiskUsed"
    ]
    assert len(disks) == settings.broker_count
    (freshness,) = [a for k, a in alarms.items() if k.startswith("FirehoseFreshness")]
    text = json.dumps(freshness["Properties"])
    assert '"MetricName": "DeliveryToS3.DataFreshness"' in text
    assert f'"Value": "kiln-{env}-raw-delivery"' in text


def test_dashboard_covers_the_loop(synthesis: Synthesis, env: str) -> None:
    (dashboard,) = (
        synthesis.stack(env, "observability")
        .resources_of_type("AWS::CloudWatch::Dashboard")
        .values()
    )
    body = json.dumps(dashboard["Properties"]["DashboardBody"])
    for title in (
        "Endpoint invocations",
        "Endpoint latency",
        "Endpoint errors",
        "Endpoint instances",
        "MSK bytes in",
        "MSK consumer lag",
        "Firehose delivery freshness",
        "Redshift (streaming ingestion)",
        "GPU node group size",
        "Alarms",
    ):
        assert title in body, title
    assert f"eks-kiln-{env}-gpu" in body
