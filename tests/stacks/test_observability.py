"""The observability stack: on-call topic, alarms, dashboard."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_cdk.assertions import Match, Template

from kiln.settings import Settings
from kiln_policy.published_metrics import placeholder_join
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
    (metric,) = freshness["Properties"]["Metrics"]
    assert metric["MetricStat"]["Metric"]["MetricName"] == "DeliveryToS3.DataFreshness"


def _export_values(synthesis: Synthesis, env: str) -> dict[str, tuple[str, Any]]:
    """Export name -> (producing stack, the exported value as its template writes it)."""
    return {
        output["Export"]["Name"]: (stack.stack_name, output["Value"])
        for stack in synthesis.stacks
        if stack.environment == env
        for output in stack.template.get("Outputs", {}).values()
        if "Export" in output
    }


def _watched(synthesis: Synthesis, env: str, value: Any) -> tuple[str, Any]:
    """(stack, value) an alarm dimension or dashboard token really reads: an imported value
    is followed to the producer's template."""
    if isinstance(value, dict) and "Fn::ImportValue" in value:
        return _export_values(synthesis, env)[value["Fn::ImportValue"]]
    return f"kiln-{env}-observability", value


def test_alarms_and_widgets_read_the_watched_resources_attributes(
    synthesis: Synthesis, env: str
) -> None:
    """Each alarm and widget reads the name of the resource it watches from that resource
    (its Ref or property, imported from the producing stack), not a name rebuilt here: the
    Firehose freshness alarm once watched `kiln-<env>-raw-delivery` while the stream got a
    generated name."""
    stack = synthesis.stack(env, "observability")
    alarms = stack.resources_of_type("AWS::CloudWatch::Alarm")
    (freshness,) = [a for k, a in alarms.items() if k.startswith("FirehoseFreshness")]
    (metric,) = freshness["Properties"]["Metrics"]
    (dimension,) = metric["MetricStat"]["Metric"]["Dimensions"]
    producer, value = _watched(synthesis, env, dimension["Value"])
    streaming = synthesis.stack(env, "streaming")
    (stream_id,) = streaming.resources_of_type("AWS::KinesisFirehose::DeliveryStream")
    assert (producer, value) == (f"kiln-{env}-streaming", {"Ref": stream_id})

    (dashboard,) = stack.resources_of_type("AWS::CloudWatch::Dashboard").values()
    tokens = [
        _watched(synthesis, env, part)
        for part in dashboard["Properties"]["DashboardBody"]["Fn::Join"][1]
        if isinstance(part, dict)
    ]
    compute = synthesis.stack(env, "compute")
    (eks_cluster,) = compute.resources_of_type("AWS::EKS::Cluster")
    warehouse = synthesis.stack(env, "warehouse")
    (workgroup,) = warehouse.resources_of_type(
        "AWS::RedshiftServerless::Workgroup", "AWS::Redshift::Cluster"
    )
    assert (f"kiln-{env}-streaming", {"Ref": stream_id}) in tokens
    assert (f"kiln-{env}-compute", {"Ref": eks_cluster}) in tokens
    assert (f"kiln-{env}-warehouse", {"Ref": workgroup}) in tokens


def test_broker_alarms_watch_the_cluster_by_its_name(synthesis: Synthesis, env: str) -> None:
    (cluster,) = synthesis.stack(env, "streaming").resources_of_type("AWS::MSK::Cluster").values()
    alarms = synthesis.stack(env, "observability").resources_of_type("AWS::CloudWatch::Alarm")
    disks = [
        a for a in alarms.values() if a["Properties"].get("MetricName") == "KafkaDataLogsDiskUsed"
    ]
    for alarm in disks:
        dims = {d["Name"]: d["Value"] for d in alarm["Properties"]["Dimensions"]}
        assert dims["Cluster Name"] == cluster["Properties"]["ClusterName"]


def test_every_alarm_and_widget_asks_for_a_metric_aws_publishes(
    synthesis: Synthesis, env: str
) -> None:
    """The table in kiln_policy/published_metrics.py (namespace, metric, dimensions, from the
    AWS page of each service) against every alarm and every widget."""
    from kiln_policy.published_metrics import PUBLISHED, alarm_uses, dashboard_uses

    stack = synthesis.stack(env, "observability")
    uses = [
        *(
            u
            for k, a in stack.resources_of_type("AWS::CloudWatch::Alarm").items()
            for u in alarm_uses(a, k)
        ),
        *(
            u
            for k, d in stack.resources_of_type("AWS::CloudWatch::Dashboard").items()
            for u in dashboard_uses(d, k)
        ),
    ]
    assert len(uses) >= 15
    assert [u.problem() for u in uses if u.problem()] == []
    # Nothing relies on a metric that needs a switch kiln does not turn on.
    used = {(u.namespace, u.name, u.dimensions) for u in uses}
    assert all(
        not row.requires for row in PUBLISHED if (row.namespace, row.name, row.dimensions) in used
    )


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
        "GPUs allocated to pods / on nodes",
        "GPU utilization per node (%)",
        "GPU memory used per node (MiB)",
        "GPU power per node (W)",
        "GPU utilization per training job (%)",
        "GPU memory used per training job (MiB)",
        "GPU power per training job (W)",
        "GPU XID errors per node",
        "Alarms",
    ):
        assert title in body, title
    # The dimensions SageMaker and Auto Scaling do not publish here are gone.
    assert "Host}" not in body and "GroupInServiceInstances" not in body


def test_gpu_alarms_fire_on_xid_errors_and_on_each_teams_idle_jobs(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    alarms = synthesis.stack(env, "observability").resources_of_type("AWS::CloudWatch::Alarm")
    (xid,) = [a["Properties"] for k, a in alarms.items() if k.startswith("GpuXidErrors")]
    assert (xid["Namespace"], xid["MetricName"], xid["Threshold"]) == ("kiln/GPU", "XidErrors", 1)
    assert "Dimensions" not in xid  # the filter's no-dimension series: any node
    # The XID metric is exactly what the compute stack's filters on the host log group emit.
    compute = synthesis.stack(env, "compute")
    filters = [
        f["Properties"] for f in compute.resources_of_type("AWS::Logs::MetricFilter").values()
    ]
    assert {
        (t["MetricNamespace"], t["MetricName"]) for f in filters for t in f["MetricTransformations"]
    } == {(xid["Namespace"], xid["MetricName"])}
    assert sorted(json.dumps(f["MetricTransformations"][0].get("Dimensions")) for f in filters) == [
        '[{"Key": "InstanceId", "Value": "$.ec2_instance_id"}]',
        "null",
    ]
    # One idle alarm per team namespace, each job of the team a contributor.
    settings = settings_by_env[env]
    idle = {k: a["Properties"] for k, a in alarms.items() if k.startswith("GpusIdle")}
    assert len(idle) == len(settings.compute.team_namespaces) >= 1
    for namespace in settings.compute.team_namespaces:
        (props,) = [
            p for p in idle.values() if namespace in placeholder_join(p["AlarmDescription"])
        ]
        (query,) = props["Metrics"]
        expression = placeholder_join(query["Expression"])
        assert expression == (
            'SELECT AVG(pod_gpu_utilization) FROM SCHEMA("ContainerInsights", ClusterName, '
            f"Namespace, PodName) WHERE ClusterName = 'TOKEN' AND Namespace = '{namespace}' "
            "GROUP BY PodName"
        )
        assert query["Period"] == 300 and query["ReturnData"] is True
        assert props["ComparisonOperator"] == "LessThanThreshold" and props["Threshold"] == 5
        assert props["EvaluationPeriods"] * 5 == 30  # half an hour of 5-minute periods
        assert props["TreatMissingData"] == "notBreaching"  # no series: no job holds GPUs
