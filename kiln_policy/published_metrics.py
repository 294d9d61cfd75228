"""What AWS publishes to CloudWatch for the resources kiln watches: namespace, metric name and
dimension set, each row from the AWS page that lists it, and a reader that pulls every metric
an alarm or a dashboard of a synthesized template asks for.

A metric CloudWatch never receives is no error anywhere: the alarm sits in INSUFFICIENT_DATA
(or OK, with missing data "not breaching") and the widget stays empty. So every alarm and
every widget is checked against this table (the `metrics-published` guardrail).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

SAGEMAKER = "https://docs.aws.amazon.com/sagemaker/latest/dg/monitoring-cloudwatch.html"
FIREHOSE = "https://docs.aws.amazon.com/firehose/latest/dev/monitoring-with-cloudwatch-metrics.html"
MSK = "https://docs.aws.amazon.com/msk/latest/developerguide/metrics-details.html"
REDSHIFT = "https://docs.aws.amazon.com/redshift/latest/mgmt/metrics-listing.html"
REDSHIFT_SERVERLESS = "https://docs.aws.amazon.com/redshift/latest/mgmt/serverless-monitoring.html"
EC2 = "https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/viewing_metrics_with_cloudwatch.html"
AUTOSCALING = "https://docs.aws.amazon.com/autoscaling/ec2/userguide/ec2-auto-scaling-metrics.html"
# Container Insights with enhanced observability (the amazon-cloudwatch-observability add-on,
# which the compute stack installs): GPU metrics from its DCGM exporter and GPU capacity from
# the kubelet, with exactly the dimension sets the add-on's CloudWatch agent declares to its
# EMF exporter (aws/amazon-cloudwatch-agent v1.300069.0, the agent of add-on v6.2.0:
# translator/translate/otel/exporter/awsemf/kubernetes.go, getGPUMetricDeclarations and
# getNodeMetricDeclarations). There is no cluster_gpu_* metric.
CONTAINER_INSIGHTS = (
    "https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/"
    "Container-Insights-metrics-enhanced-EKS.html; aws/amazon-cloudwatch-agent v1.300069.0 "
    "translator/translate/otel/exporter/awsemf/kubernetes.go"
)
KILN_XID = "platform_constructs/eks.py (XID_PATTERN metric filters)"


@dataclass(frozen=True)
class PublishedMetric:
    """One metric under one dimension set; `requires` names what must be switched on for
    AWS to publish it (empty: published as soon as the resource has activity)."""

    namespace: str
    name: str
    dimensions: frozenset[str]
    source: str
    requires: str = ""


def _rows(
    namespace: str, names: str, dimensions: str, source: str, requires: str = ""
) -> list[PublishedMetric]:
    dims = frozenset(d.strip() for d in dimensions.split(",") if d.strip())
    return [PublishedMetric(namespace, n, dims, source, requires) for n in names.split()]


# The DCGM-based GPU series the agent publishes per node, pod and container ('@' is the level).
_GPU_SERIES = (
    "@_gpu_utilization @_gpu_memory_utilization @_gpu_memory_total @_gpu_memory_used "
    "@_gpu_power_draw @_gpu_temperature @_gpu_tensor_core_utilization"
)
_ENHANCED = "SageMaker enhanced metrics (the endpoint config's MetricsConfig)"
_GROUP_METRICS = (
    "group metrics collection on the Auto Scaling group (EnableMetricsCollection), which EKS "
    "does not turn on for a managed node group's group"
)

PUBLISHED: tuple[PublishedMetric, ...] = (
    # SageMaker endpoint invocation metrics, per variant.
    *_rows(
        "AWS/SageMaker",
        "Invocations InvocationsPerInstance ModelLatency OverheadLatency "
        "Invocation4XXErrors Invocation5XXErrors",
        "EndpointName, VariantName",
        SAGEMAKER,
    ),
    # SageMaker endpoint instance metrics: per variant by default ...
    *_rows(
        "/aws/sagemaker/Endpoints",
        "CPUUtilization MemoryUtilization GPUUtilization GPUMemoryUtilization DiskUtilization",
        "EndpointName, VariantName",
        SAGEMAKER,
    ),
    # ... per instance and per accelerator only with enhanced metrics (there is no `Host`).
    *_rows(
        "/aws/sagemaker/Endpoints",
        "CPUUtilization MemoryUtilization GPUUtilization GPUMemoryUtilization DiskUtilization",
        "EndpointName, VariantName, InstanceId",
        SAGEMAKER,
        _ENHANCED,
    ),
    *_rows(
        "/aws/sagemaker/Endpoints",
        "GPUUtilization GPUMemoryUtilization",
        "EndpointName, VariantName, InstanceId, AcceleratorId",
        SAGEMAKER,
        _ENHANCED,
    ),
    # Firehose delivery to S3.
    *_rows(
        "AWS/Firehose",
        "DeliveryToS3.DataFreshness DeliveryToS3.Success DeliveryToS3.Records DeliveryToS3.Bytes",
        "DeliveryStreamName",
        FIREHOSE,
    ),
    # MSK, DEFAULT monitoring level (kiln's clusters run PER_BROKER, a superset).
    *_rows("AWS/Kafka", "KafkaDataLogsDiskUsed CpuUser", "Cluster Name, Broker ID", MSK),
    *_rows("AWS/Kafka", "BytesInPerSec BytesOutPerSec", "Cluster Name, Broker ID, Topic", MSK),
    *_rows(
        "AWS/Kafka",
        "SumOffsetLag MaxOffsetLag EstimatedMaxTimeLag",
        "Cluster Name, Consumer Group, Topic",
        MSK,
    ),
    # Redshift.
    *_rows(
        "AWS/Redshift-Serverless",
        "ComputeCapacity ComputeSeconds",
        "Workgroup",
        REDSHIFT_SERVERLESS,
    ),
    *_rows("AWS/Redshift", "CPUUtilization DatabaseConnections", "ClusterIdentifier", REDSHIFT),
    # EC2 instance metrics aggregated per Auto Scaling group (basic monitoring included).
    *_rows("AWS/EC2", "CPUUtilization StatusCheckFailed", "AutoScalingGroupName", EC2),
    # GPU metrics per node, per pod (a training job's pods) and for the whole cluster.
    *(
        row
        for dims in ("ClusterName", "ClusterName, NodeName, InstanceId")
        for row in _rows(
            "ContainerInsights",
            f"{_GPU_SERIES.replace('@', 'node')} node_gpu_limit node_gpu_usage_total",
            dims,
            CONTAINER_INSIGHTS,
        )
    ),
    *_rows(
        "ContainerInsights",
        _GPU_SERIES.replace("@", "node"),
        "ClusterName, NodeName, InstanceId, InstanceType, GpuDevice",
        CONTAINER_INSIGHTS,
    ),
    *(
        row
        for dims in (
            "ClusterName",
            "ClusterName, Namespace",
            "ClusterName, Namespace, Service",
            "ClusterName, Namespace, PodName",
            "ClusterName, Namespace, PodName, FullPodName",
            "ClusterName, Namespace, PodName, FullPodName, GpuDevice",
        )
        for row in _rows(
            "ContainerInsights", _GPU_SERIES.replace("@", "pod"), dims, CONTAINER_INSIGHTS
        )
    ),
    *_rows("kiln/GPU", "XidErrors", "InstanceId", KILN_XID),
    *_rows("kiln/GPU", "XidErrors", "", KILN_XID),
    # Auto Scaling group metrics: only where group metrics collection is on.
    *_rows(
        "AWS/AutoScaling",
        "GroupInServiceInstances GroupDesiredCapacity GroupTotalInstances",
        "AutoScalingGroupName",
        AUTOSCALING,
        _GROUP_METRICS,
    ),
)


@dataclass(frozen=True)
class MetricUse:
    """A metric an alarm or a widget asks CloudWatch for."""

    namespace: str
    name: str
    dimensions: frozenset[str]
    where: str

    def problem(self) -> str | None:
        """Why CloudWatch would have no data for it, or None when AWS publishes it."""
        rows = [
            r
            for r in PUBLISHED
            if (r.namespace, r.name, r.dimensions) == (self.namespace, self.name, self.dimensions)
        ]
        if not rows:
            known = sorted(
                ", ".join(sorted(r.dimensions))
                for r in PUBLISHED
                if (r.namespace, r.name) == (self.namespace, self.name)
            )
            return (
                f"{self.where}: AWS publishes no {self.namespace} {self.name} with dimensions "
                f"{sorted(self.dimensions)}"
                + (f"; published with: {' | '.join(known)}" if known else "")
            )
        needs = [r.requires for r in rows if r.requires]
        if len(needs) == len(rows):
            return f"{self.where}: {self.namespace} {self.name} exists only with {needs[0]}"
        return None


_SEARCH = re.compile(r"SEARCH\(\s*'\{(?P<schema>[^}]*)\}(?P<terms>[^']*)'")
# A Metrics Insights query over a schema: `SELECT FN(metric) FROM SCHEMA(namespace, dim, ...)`.
_SELECT = re.compile(
    r"SELECT\s+\w+\(\s*\"?(?P<name>[A-Za-z0-9_.\-]+)\"?\s*\)\s+FROM\s+SCHEMA\((?P<schema>[^)]*)\)",
    re.IGNORECASE,
)
_METRIC_NAME = re.compile(r'MetricName\s*=\s*"?(?P<name>[A-Za-z0-9_.\-]+)"?')


def _schema(text: str) -> list[str]:
    return [part.strip().strip('"') for part in text.split(",")]


def search_uses(expression: str, where: str) -> Iterator[MetricUse]:
    """The metric a `SEARCH('{namespace,dim,...} MetricName="..." ...')` expression finds."""
    for match in _SEARCH.finditer(expression):
        namespace, *dimensions = _schema(match.group("schema"))
        name = _METRIC_NAME.search(match.group("terms"))
        yield MetricUse(
            namespace, name.group("name") if name else "?", frozenset(dimensions), where
        )


def select_uses(expression: str, where: str) -> Iterator[MetricUse]:
    """The metric a Metrics Insights `SELECT ... FROM SCHEMA(...)` query reads: SCHEMA names
    the exact dimension set (a query FROM a bare namespace is not checked)."""
    for match in _SELECT.finditer(expression):
        namespace, *dimensions = _schema(match.group("schema"))
        yield MetricUse(namespace, match.group("name"), frozenset(dimensions), where)


def expression_uses(expression: str, where: str) -> Iterator[MetricUse]:
    yield from search_uses(expression, where)
    yield from select_uses(expression, where)


def placeholder_join(value: Any) -> str:
    """A template string value with every intrinsic function replaced by a placeholder."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return str(separator).join(placeholder_join(p) for p in parts)
    return "TOKEN"


def alarm_uses(alarm: dict[str, Any], where: str) -> Iterator[MetricUse]:
    """The metrics of an AWS::CloudWatch::Alarm (a single metric, or a metric-math alarm's)."""
    props = alarm.get("Properties", {})
    if "MetricName" in props:
        yield MetricUse(
            props.get("Namespace", ""),
            props["MetricName"],
            frozenset(d["Name"] for d in props.get("Dimensions", [])),
            where,
        )
    for query in props.get("Metrics", []):
        metric = query.get("MetricStat", {}).get("Metric")
        if metric:
            yield MetricUse(
                metric.get("Namespace", ""),
                metric["MetricName"],
                frozenset(d["Name"] for d in metric.get("Dimensions", [])),
                where,
            )
        expression = query.get("Expression")
        if expression is not None:
            yield from expression_uses(placeholder_join(expression), where)


def dashboard_uses(dashboard: dict[str, Any], where: str) -> Iterator[MetricUse]:
    """The metrics of every widget of an AWS::CloudWatch::Dashboard body."""
    body = json.loads(placeholder_join(dashboard.get("Properties", {}).get("DashboardBody")))
    for widget in body.get("widgets", []):
        title = widget.get("properties", {}).get("title", widget.get("type"))
        for entry in widget.get("properties", {}).get("metrics", []):
            here = f"{where} widget {title!r}"
            options = entry[-1] if entry and isinstance(entry[-1], dict) else {}
            if "expression" in options:
                yield from expression_uses(options["expression"], here)
                continue
            fields = [e for e in entry if not isinstance(e, dict)]
            namespace, name, *pairs = fields
            yield MetricUse(namespace, name, frozenset(pairs[0::2]), here)
