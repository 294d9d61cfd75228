"""Reading the SageMaker endpoint: what it serves, and the alarms that roll its deployments back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kiln_cli.operate.aws import Aws, AwsError

ROLLBACK_MARK = "rolls a deployment back"  # in the rollback alarms' descriptions


@dataclass(frozen=True)
class Serving:
    """What an endpoint serves: its config, the model in it, the model's artifact."""

    config_name: str
    model_name: str | None
    artifact: str | None
    instance_type: str | None
    package: str | None = None  # the registry version the model was made from, if any
    # The version's inference specification it was made from (None: the primary).
    specification: str | None = None

    @property
    def identity(self) -> str | None:
        """What is served: the registry version when there is one, else the artifact."""
        return self.package or self.artifact


@dataclass(frozen=True)
class FiredAlarm:
    name: str
    at: datetime | None
    reason: str


def is_missing(err: AwsError) -> bool:
    """Whether SageMaker answered that the named resource does not exist."""
    return err.code in ("ValidationException", "ValidationError") and (
        "Could not find" in err.aws_message or "not found" in err.aws_message
    )


def describe_endpoint(aws: Aws, name: str) -> dict[str, Any] | None:
    """DescribeEndpoint, or None when the endpoint does not exist."""
    try:
        return aws.call("sagemaker", "describe_endpoint", EndpointName=name)
    except AwsError as err:
        if is_missing(err):
            return None
        raise


def serving(aws: Aws, endpoint: dict[str, Any]) -> Serving:
    """The endpoint's current config, model and artifact (DescribeEndpointConfig, DescribeModel)."""
    config_name = str(endpoint["EndpointConfigName"])
    config = aws.call("sagemaker", "describe_endpoint_config", EndpointConfigName=config_name)
    variants = config.get("ProductionVariants") or [{}]
    model_name = variants[0].get("ModelName")
    artifact = package = specification = None
    if model_name:
        model = aws.call("sagemaker", "describe_model", ModelName=model_name)
        container = model.get("PrimaryContainer") or (model.get("Containers") or [{}])[0]
        artifact = container.get("ModelDataUrl") or (
            container.get("ModelDataSource", {}).get("S3DataSource", {}).get("S3Uri")
        )
        package = container.get("ModelPackageName")
        specification = container.get("InferenceSpecificationName")
    return Serving(
        config_name, model_name, artifact, variants[0].get("InstanceType"), package, specification
    )


def rollback_alarm_names(
    aws: Aws, endpoint_name: str, endpoint: dict[str, Any] | None
) -> list[str]:
    """The alarms that roll the endpoint's deployments back.

    The endpoint names them in its last deployment config; before it has one (or when the
    caller cannot see it) they are the alarms whose description starts with the endpoint's
    name and says they roll back (their names are CloudFormation-generated).
    """
    configured = (
        ((endpoint or {}).get("LastDeploymentConfig") or {})
        .get("AutoRollbackConfiguration", {})
        .get("Alarms", [])
    )
    if configured:
        return [str(alarm["AlarmName"]) for alarm in configured]
    alarms = aws.pages("cloudwatch", "describe_alarms", "MetricAlarms", AlarmTypes=["MetricAlarm"])
    return sorted(
        str(alarm["AlarmName"])
        for alarm in alarms
        if str(alarm.get("AlarmDescription", "")).startswith(f"{endpoint_name}:")
        and ROLLBACK_MARK in str(alarm.get("AlarmDescription", ""))
    )


def alarm_states(aws: Aws, names: list[str]) -> dict[str, dict[str, Any]]:
    """DescribeAlarms of the named alarms, by name."""
    if not names:
        return {}
    alarms = aws.call("cloudwatch", "describe_alarms", AlarmNames=names)["MetricAlarms"]
    return {str(alarm["AlarmName"]): alarm for alarm in alarms}


def fired_since(aws: Aws, names: list[str], since: datetime) -> list[FiredAlarm]:
    """The alarms among `names` that went into ALARM since `since` (DescribeAlarmHistory),
    first firing first; alarms in ALARM now count too when their history cannot be read."""
    fired: list[FiredAlarm] = []
    for name in names:
        try:
            items = aws.pages(
                "cloudwatch",
                "describe_alarm_history",
                "AlarmHistoryItems",
                AlarmName=name,
                HistoryItemType="StateUpdate",
                StartDate=since,
                ScanBy="TimestampAscending",
            )
        except AwsError:
            items = []
            alarm = alarm_states(aws, [name]).get(name, {})
            if alarm.get("StateValue") == "ALARM":
                fired.append(
                    FiredAlarm(
                        name, alarm.get("StateUpdatedTimestamp"), alarm.get("StateReason", "")
                    )
                )
        for item in items:
            try:
                data = json.loads(item.get("HistoryData") or "{}")
            except json.JSONDecodeError:
                data = {}
            new_state = data.get("newState", {})
            if new_state.get("stateValue") == "ALARM":
                reason = new_state.get("stateReason") or item.get("HistorySummary", "")
                fired.append(FiredAlarm(name, item.get("Timestamp"), str(reason)))
                break
    return sorted(fired, key=lambda f: (f.at is None, f.at or datetime.min))
