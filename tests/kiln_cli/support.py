"""Helpers of the operating-command tests (no tests here): kiln's stacks, endpoint and alarms in
moto, a fake clock, and AWS event-stream framing for a loopback SageMaker runtime."""

from __future__ import annotations

import binascii
import contextlib
import copy
import hashlib
import json
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import boto3
import pytest

from kiln.config import load_settings
from kiln.contract import COMPONENTS, Component
from kiln_cli.operate.aws import Aws
from kiln_policy.assembly import SynthesizedStack

REGION = "us-east-1"  # every shipped environment's region
ACCOUNT = "123456789012"  # moto's account
ARTIFACT = f"s3://kiln-dev-artifacts-{ACCOUNT}-{REGION}/models/job-1/output/model.tar.gz"
NEW_ARTIFACT = f"s3://kiln-dev-artifacts-{ACCOUNT}-{REGION}/models/job-2/output/model.tar.gz"


# What the `stack_outputs` fixture (conftest.py) read from the synthesized templates, by
# environment: every stack's outputs as CloudFormation would resolve them in moto's account.
DEPLOYED: dict[str, dict[Component, dict[str, str]]] = {}

_PSEUDO = {
    "AWS::AccountId": ACCOUNT,
    "AWS::Region": REGION,
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::StackName": "",  # filled per stack
}
# The property that holds a resource's physical name, where a template names it.
_NAME_PROPERTIES = ("BucketName", "Name", "DeliveryStreamName", "DashboardName", "TopicName")


class _Resolver:
    """Resolves template values (Ref, Fn::GetAtt, Fn::Join, Fn::Sub, Fn::ImportValue,
    Fn::GetStackOutput) to the
    strings a deployment in moto's account and region would give: physical names where the
    template sets them, deterministic made-up ids where AWS would make them up."""

    def __init__(self, stacks: Mapping[str, SynthesizedStack]) -> None:
        self.stacks = stacks

    def outputs(self, stack_name: str) -> dict[str, str]:
        template = self.stacks[stack_name].template
        return {
            key: self.value(stack_name, output["Value"])
            for key, output in template.get("Outputs", {}).items()
        }

    def value(self, stack: str, node: Any) -> str:
        if isinstance(node, str):
            return node
        ((function, argument),) = node.items()
        if function == "Ref":
            return self.ref(stack, argument)
        if function == "Fn::GetAtt":
            return self.attribute(stack, *argument)
        if function == "Fn::Join":
            separator, parts = argument
            return str(separator).join(self.value(stack, part) for part in parts)
        if function == "Fn::Sub":
            return re.sub(r"\$\{([^}]+)\}", lambda m: self.ref(stack, m.group(1)), argument)
        if function == "Fn::GetStackOutput":
            return self.outputs(argument["StackName"])[argument["OutputName"]]
        if function == "Fn::ImportValue":
            return self.exported(argument)
        raise NotImplementedError(f"{stack}: cannot resolve {function} in a fake output")

    def exported(self, name: str) -> str:
        """The value of the output some stack exports as `name` (a strong reference)."""
        for producer, synthesized in self.stacks.items():
            for output in synthesized.template.get("Outputs", {}).values():
                if output.get("Export", {}).get("Name") == name:
                    return self.value(producer, output["Value"])
        raise NotImplementedError(f"no stack exports {name}")

    def _resource(self, stack: str, logical_id: str) -> dict[str, Any]:
        return self.stacks[stack].resources[logical_id]

    def _made_up(self, stack: str, logical_id: str, digits: int = 8) -> str:
        return hashlib.sha256(f"{stack}/{logical_id}".encode()).hexdigest()[:digits]

    def ref(self, stack: str, logical_id: str) -> str:
        if logical_id == "AWS::StackName":
            return stack
        if logical_id in _PSEUDO:
            return _PSEUDO[logical_id]
        resource = self._resource(stack, logical_id)
        kind, props = resource["Type"], resource.get("Properties", {})
        name = next((props[k] for k in _NAME_PROPERTIES if k in props), None)
        if kind == "AWS::SNS::Topic":
            topic = self.value(stack, name) if name else f"{stack}-{logical_id}"
            return f"arn:aws:sns:{REGION}:{ACCOUNT}:{topic}"
        if name is not None:
            return self.value(stack, name)
        prefixes = {"AWS::EC2::VPC": "vpc", "AWS::EC2::Subnet": "subnet"}
        return f"{prefixes.get(kind, stack)}-{self._made_up(stack, logical_id)}"

    def attribute(self, stack: str, logical_id: str, attribute: str) -> str:
        kind = self._resource(stack, logical_id)["Type"]
        made_up = self._made_up(stack, logical_id)
        arns = {
            "AWS::IAM::Role": f"arn:aws:iam::{ACCOUNT}:role/{stack}-{logical_id}",
            "AWS::KMS::Key": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{made_up}",
            "AWS::MSK::Cluster": f"arn:aws:kafka:{REGION}:{ACCOUNT}:cluster/{stack}/{made_up}",
        }
        if attribute == "Arn" and kind in arns:
            return arns[kind]
        if (kind, attribute) == ("AWS::EC2::SecurityGroup", "GroupId"):
            return f"sg-{made_up}"
        if (kind, attribute) == ("Custom::ManagedPrefixList", "PrefixListId"):
            return f"pl-{made_up}"
        props = self._resource(stack, logical_id).get("Properties", {})
        if attribute in props:  # e.g. a node group's NodegroupName, as the template sets it
            return self.value(stack, props[attribute])
        raise NotImplementedError(f"{stack}: cannot resolve {logical_id}.{attribute}")


def synthesized_outputs(
    stacks: Sequence[SynthesizedStack],
) -> dict[str, dict[Component, dict[str, str]]]:
    """Every environment's stack outputs, read from the synthesized templates and resolved as a
    deployment in moto's account would resolve them: `{env: {component: {key: value}}}`."""
    resolver = _Resolver({s.stack_name: s for s in stacks})
    result: dict[str, dict[Component, dict[str, str]]] = {}
    for stack in stacks:
        component = Component(stack.stack_name.removeprefix(f"kiln-{stack.environment}-"))
        result.setdefault(stack.environment, {})[component] = resolver.outputs(stack.stack_name)
    return result


def outputs(env: str = "dev") -> dict[Component, dict[str, str]]:
    """What kiln's stacks of `env` output once deployed (serving before a model exists)."""
    assert DEPLOYED, "the test needs the stack_outputs fixture (tests/kiln_cli/conftest.py)"
    return copy.deepcopy(DEPLOYED[env])


def _template(values: Mapping[str, str]) -> str:
    return json.dumps(
        {
            "Resources": {"Marker": {"Type": "AWS::SNS::Topic"}},
            "Outputs": {key: {"Value": value} for key, value in values.items()},
        }
    )


def deploy_stacks(
    env: str = "dev",
    components: Sequence[Component] = COMPONENTS,
    extra: Mapping[Component, Mapping[str, str]] | None = None,
    endpoint_url: str | None = None,
) -> dict[Component, dict[str, str]]:
    """Creates the named stacks with kiln's outputs (plus `extra`); returns all outputs."""
    values = outputs(env)
    cloudformation = client("cloudformation", endpoint_url)
    for component in components:
        values[component].update((extra or {}).get(component, {}))
        cloudformation.create_stack(
            StackName=f"kiln-{env}-{component}", TemplateBody=_template(values[component])
        )
    return values


def update_outputs(component: Component, values: Mapping[str, str], env: str = "dev") -> None:
    client("cloudformation").update_stack(
        StackName=f"kiln-{env}-{component}", TemplateBody=_template(values)
    )


def client(service: str, endpoint_url: str | None = None) -> Any:
    return boto3.client(service, region_name=REGION, endpoint_url=endpoint_url)


def create_buckets(endpoint_url: str | None = None, env: str = "dev") -> None:
    s3 = client("s3", endpoint_url)
    for zone in ("curated", "artifacts"):
        s3.create_bucket(Bucket=f"kiln-{env}-{zone}-{ACCOUNT}-{REGION}")


def put_object(uri: str, body: bytes = b"x", endpoint_url: str | None = None) -> None:
    bucket, key = uri[5:].split("/", 1)
    client("s3", endpoint_url).put_object(Bucket=bucket, Key=key, Body=body)


def create_endpoint(
    name: str,
    artifact: str,
    version: str,
    endpoint_url: str | None = None,
    instance_type: str = "ml.g4dn.xlarge",  # moto knows older types only
) -> None:
    """Model, endpoint config and endpoint serving `artifact`, as the serving stack makes them."""
    sagemaker = client("sagemaker", endpoint_url)
    model = f"{name}-model-{version}"
    sagemaker.create_model(
        ModelName=model,
        ExecutionRoleArn=f"arn:aws:iam::{ACCOUNT}:role/serving",
        PrimaryContainer={"Image": "inference:1", "ModelDataUrl": artifact},
    )
    sagemaker.create_endpoint_config(
        EndpointConfigName=f"{name}-config-{version}",
        ProductionVariants=[
            {
                "VariantName": "AllTraffic",
                "ModelName": model,
                "InstanceType": instance_type,
                "InitialInstanceCount": 1,
            }
        ],
    )
    with contextlib.suppress(sagemaker.exceptions.ClientError):
        sagemaker.delete_endpoint(EndpointName=name)  # moto has no UpdateEndpoint
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=f"{name}-config-{version}")


def create_rollback_alarms(endpoint: str, endpoint_url: str | None = None) -> list[str]:
    """The observability stack's two rollback alarms, with CloudFormation-style names."""
    cloudwatch = client("cloudwatch", endpoint_url)
    names = [
        "kiln-dev-observability-EndpointRollbackErrorRate1A2B3C-XYZ",
        "kiln-dev-observability-EndpointRollbackLatencyP99D4E5F6-UVW",
    ]
    cloudwatch.put_metric_alarm(
        AlarmName=names[0],
        AlarmDescription=f"{endpoint}: 5XX error rate above 1.0% (rolls a deployment back)",
        Metrics=[{"Id": "rate", "Expression": "100 * errors / invocations", "ReturnData": True}],
        EvaluationPeriods=3,
        Threshold=1.0,
        ComparisonOperator="GreaterThanThreshold",
    )
    cloudwatch.put_metric_alarm(
        AlarmName=names[1],
        AlarmDescription=f"{endpoint}: p99 model latency above 2000 ms (rolls a deployment back)",
        Namespace="AWS/SageMaker",
        MetricName="ModelLatency",
        Dimensions=[
            {"Name": "EndpointName", "Value": endpoint},
            {"Name": "VariantName", "Value": "AllTraffic"},
        ],
        ExtendedStatistic="p99",
        Period=60,
        EvaluationPeriods=3,
        Threshold=2_000_000,
        ComparisonOperator="GreaterThanThreshold",
    )
    cloudwatch.put_metric_alarm(
        AlarmName="kiln-dev-observability-FirehoseFreshness-QRS",
        AlarmDescription="kiln-dev-raw-delivery: raw-zone delivery is behind",
        Namespace="AWS/Firehose",
        MetricName="DeliveryToS3.DataFreshness",
        Statistic="Maximum",
        Period=60,
        EvaluationPeriods=5,
        Threshold=900,
        ComparisonOperator="GreaterThanThreshold",
    )
    return names


def make_aws(env: str = "dev", clients: Mapping[str, Any] | None = None) -> Aws:
    return Aws(load_settings(env), clients=clients)


class FakeClock:
    """A monotonic clock that `sleep` advances: waiting loops run instantly."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@contextmanager
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[None]:
    """An environment where boto3 finds no credentials and asks no metadata service."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield


# --- AWS event-stream framing (application/vnd.amazon.eventstream) ----------------------------


def _header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    return (
        struct.pack("B", len(raw_name))
        + raw_name
        + b"\x07"  # string
        + struct.pack(">H", len(raw_value))
        + raw_value
    )


def event_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (lengths + CRC), headers, payload, message CRC."""
    encoded = b"".join(_header(k, v) for k, v in headers.items())
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", binascii.crc32(prelude) & 0xFFFFFFFF)
    body = prelude + encoded + payload
    return body + struct.pack(">I", binascii.crc32(body) & 0xFFFFFFFF)


def payload_part(data: bytes) -> bytes:
    return event_message(
        {
            ":message-type": "event",
            ":event-type": "PayloadPart",
            ":content-type": "application/octet-stream",
        },
        data,
    )


def stream_exception(kind: str, message: str) -> bytes:
    return event_message(
        {
            ":message-type": "exception",
            ":exception-type": kind,
            ":content-type": "application/json",
        },
        json.dumps({"Message": message, "ErrorCode": "ModelError"}).encode(),
    )
