"""The observability stack: the on-call topic, the alarms, and one dashboard per environment."""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import CfnOutput, Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from constructs import Construct

from kiln import naming
from kiln.contract import (
    CONTAINER_INSIGHTS,
    GPU_JOB_DIMENSIONS,
    POD_GPU_UTILIZATION,
    Component,
    Outputs,
    gpu_job_query,
)
from kiln.settings import Settings
from platform_constructs.eks import XID_METRIC, XID_NAMESPACE, GpuCluster
from platform_constructs.endpoint import VARIANT, RollbackAlarms, RollbackThresholds
from platform_constructs.firehose import MskToS3Delivery
from platform_constructs.kms import PlatformKey
from platform_constructs.msk import MskCluster
from platform_constructs.warehouse import ProvisionedWarehouse, ServerlessWarehouse, Warehouse
from stacks.base import KilnStack, removal_policy

PERIOD = Duration.minutes(1)
# The GPU series shown per node and per training job: (what, metric suffix, unit).
GPU_SERIES = (
    ("utilization", "utilization", "%"),
    ("memory used", "memory_used", "MiB"),
    ("power", "power_draw", "W"),
)
# A training job whose GPUs average under this (%) for half an hour is idle.
IDLE_GPU_PERCENT = 5


def _metric(
    namespace: str, name: str, dimensions: dict[str, str], statistic: str, label: str | None = None
) -> cloudwatch.Metric:
    return cloudwatch.Metric(
        namespace=namespace,
        metric_name=name,
        dimensions_map=dimensions,
        statistic=statistic,
        period=PERIOD,
        label=label,
    )


def _search(
    expression: str, statistic: str, label: str, period: int = 60
) -> cloudwatch.MathExpression:
    """A dashboard-only series found by a metric SEARCH (for dimensions named at run time)."""
    return cloudwatch.MathExpression(
        expression=f"SEARCH('{expression}', '{statistic}', {period})",
        label=label,
        period=Duration.seconds(period),
        using_metrics={},
    )


@dataclass(frozen=True)
class Watched:
    """The resources the alarms and the dashboard watch, read from the constructs that
    create them (attributes, never names rebuilt here): the delivery stream's name is its
    `Ref`, the cluster's, workgroup's and node group's names their own properties.

    The endpoint is the one exception: its deployment names the rollback alarms, so they
    exist before it and watch the name `naming.endpoint_name` gives it (a test checks the
    serving stack's EndpointName is that name)."""

    delivery_stream_name: str
    kafka_cluster_name: str
    warehouse_dimension: dict[str, str]
    eks_cluster_name: str

    @classmethod
    def of(
        cls, *, delivery: MskToS3Delivery, msk: MskCluster, warehouse: Warehouse, gpu: GpuCluster
    ) -> Watched:
        if isinstance(warehouse, ServerlessWarehouse):
            dimension = {"Workgroup": warehouse.workgroup.ref}
        else:
            assert isinstance(warehouse, ProvisionedWarehouse)
            dimension = {"ClusterIdentifier": warehouse.cluster.ref}
        return cls(
            delivery_stream_name=delivery.stream.ref,
            kafka_cluster_name=msk.cluster.cluster_name,
            warehouse_dimension=dimension,
            eks_cluster_name=gpu.cluster.cluster_name,
        )


class ObservabilityStack(KilnStack):
    """Composes the KMS-encrypted on-call topic, the endpoint's rollback alarms (which the
    serving stack's deployment guardrails use), the data-plane alarms, and the dashboard.

    Attributes: `key`, `topic`, `rollback_alarms`, `alarms`, `dashboard`.
    """

    def __init__(
        self, scope: Construct, construct_id: str, *, settings: Settings, watched: Watched
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            settings=settings,
            component=Component.OBSERVABILITY,
            description=f"kiln {settings.name}: alarms, on-call topic and dashboard",
        )
        self.key = PlatformKey(
            self,
            "AlertsKey",
            alias=naming.kms_alias(settings, "alerts"),
            description=f"kiln {settings.name}: encrypts the on-call topic",
            removal_policy=removal_policy(settings),
            alarm_notifications=True,
        ).key
        self.topic = sns.Topic(
            self,
            "OnCall",
            display_name=f"kiln {settings.name} alarms",
            master_key=self.key,
            enforce_ssl=True,
        )
        for email in settings.observability.alert_emails:
            self.topic.add_subscription(subscriptions.EmailSubscription(email))
        notify = cw_actions.SnsAction(self.topic)
        endpoint = naming.endpoint_name(settings)
        alarms = settings.serving.alarms
        self.rollback_alarms = RollbackAlarms(
            self,
            "EndpointRollback",
            endpoint_name=endpoint,
            thresholds=RollbackThresholds(
                error_rate_percent=alarms.error_rate_percent,
                latency_p99_ms=alarms.latency_p99_ms,
                evaluation_minutes=alarms.evaluation_minutes,
            ),
            actions=[notify],
        )
        cluster = watched.kafka_cluster_name
        firehose = settings.streaming.firehose
        stream_name = naming.delivery_stream_name(settings)
        freshness = _metric(
            "AWS/Firehose",
            "DeliveryToS3.DataFreshness",
            {"DeliveryStreamName": watched.delivery_stream_name},
            "Maximum",
            "data freshness (s)",
        )
        self.alarms: list[cloudwatch.Alarm] = [
            cloudwatch.Alarm(
                self,
                "FirehoseFreshness",
                alarm_description=f"{stream_name}: raw-zone delivery is more than 3 buffer "
                "intervals behind",
                metric=freshness,
                threshold=max(3 * firehose.buffer_interval_seconds, 900),
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                evaluation_periods=5,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            *[
                cloudwatch.Alarm(
                    self,
                    f"BrokerDisk{broker}",
                    alarm_description=f"{cluster} broker {broker}: data disk above 80%",
                    metric=_metric(
                        "AWS/Kafka",
                        "KafkaDataLogsDiskUsed",
                        {"Cluster Name": cluster, "Broker ID": str(broker)},
                        "Maximum",
                    ),
                    threshold=80,
                    comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                    evaluation_periods=5,
                    treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                )
                for broker in range(1, settings.broker_count + 1)
            ],
        ]
        self.alarms += self._gpu_alarms(settings, watched)
        for alarm in self.alarms:
            alarm.add_alarm_action(notify)
            alarm.add_ok_action(notify)
        self.dashboard = self._dashboard(settings, endpoint, watched, freshness)
        CfnOutput(self, Outputs.ON_CALL_TOPIC_ARN.key, value=self.topic.topic_arn)
        CfnOutput(self, Outputs.DASHBOARD_NAME.key, value=self.dashboard.dashboard_name)

    def _gpu_alarms(self, settings: Settings, watched: Watched) -> list[cloudwatch.Alarm]:
        """XID errors on any GPU node, and, per team, a training job whose GPUs sit idle."""
        xid = cloudwatch.Alarm(
            self,
            "GpuXidErrors",
            alarm_description=f"{watched.eks_cluster_name}: an NVIDIA XID error on a GPU node "
            "(kernel log); see the dashboard's XID widget for the node, then drain it",
            metric=_metric(XID_NAMESPACE, XID_METRIC, {}, "Sum"),
            threshold=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        # Idle: a job's GPUs average under 5% busy for 30 minutes (a hung job, a data loader
        # stall, a run waiting on a lost peer). One multi-time-series Metrics Insights alarm
        # per team namespace, each job a contributor: Container Insights reports
        # pod_gpu_utilization only for GPUs allocated to pods, under PodName = the owning
        # Job's name (see GPU_JOB_SCHEMA), so a series exists exactly while a job holds GPUs
        # and missing data is no breach.
        return [
            xid,
            *(
                cloudwatch.Alarm(
                    self,
                    f"GpusIdle{''.join(p.title() for p in namespace.split('-'))}",
                    alarm_description=f"{watched.eks_cluster_name}: a training job in "
                    f"{namespace} has held GPUs under {IDLE_GPU_PERCENT}% busy for 30 minutes "
                    "(the contributor names the job)",
                    metric=cloudwatch.MathExpression(
                        expression=gpu_job_query(
                            "AVG", POD_GPU_UTILIZATION, watched.eks_cluster_name, namespace
                        ),
                        using_metrics={},
                        period=Duration.minutes(5),
                        label=f"GPU % per job in {namespace}",
                    ),
                    threshold=IDLE_GPU_PERCENT,
                    comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
                    evaluation_periods=6,
                    treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                )
                for namespace in settings.compute.team_namespaces
            ),
        ]

    def _dashboard(
        self, settings: Settings, endpoint: str, watched: Watched, freshness: cloudwatch.Metric
    ) -> cloudwatch.Dashboard:
        variant = {"EndpointName": endpoint, "VariantName": VARIANT}
        cluster = watched.kafka_cluster_name

        def sagemaker(name: str, statistic: str, label: str) -> cloudwatch.Metric:
            return _metric("AWS/SageMaker", name, variant, statistic, label)

        def instances(name: str, statistic: str, label: str) -> cloudwatch.Metric:
            # Instance metrics are per variant; per-instance ones need enhanced metrics.
            return _metric("/aws/sagemaker/Endpoints", name, variant, statistic, label)

        warehouse = (
            [
                _metric(
                    "AWS/Redshift-Serverless",
                    "ComputeCapacity",
                    watched.warehouse_dimension,
                    "Average",
                    "RPUs",
                ),
            ]
            if settings.warehouse.kind == "serverless"
            else [
                _metric(
                    "AWS/Redshift",
                    "CPUUtilization",
                    watched.warehouse_dimension,
                    "Average",
                    "CPU %",
                )
            ]
        )
        dashboard = cloudwatch.Dashboard(
            self,
            "Dashboard",
            dashboard_name=f"{naming.prefix(settings)}-platform",
            default_interval=Duration.hours(3),
        )
        dashboard.add_widgets(
            cloudwatch.TextWidget(
                markdown=f"# kiln {settings.name}\nEndpoint `{endpoint}`, "
                f"MSK `{cluster}`, EKS `{naming.prefix(settings)}`",
                width=24,
                height=1,
            ),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Endpoint invocations",
                width=6,
                left=[
                    sagemaker("Invocations", "Sum", "invocations"),
                    sagemaker("InvocationsPerInstance", "Sum", "per instance"),
                ],
            ),
            cloudwatch.GraphWidget(
                title="Endpoint latency (µs)",
                width=6,
                left=[
                    sagemaker("ModelLatency", "p50", "model p50"),
                    sagemaker("ModelLatency", "p99", "model p99"),
                    sagemaker("OverheadLatency", "p99", "overhead p99"),
                ],
            ),
            cloudwatch.GraphWidget(
                title="Endpoint errors",
                width=6,
                left=[
                    sagemaker("Invocation4XXErrors", "Sum", "4XX"),
                    sagemaker("Invocation5XXErrors", "Sum", "5XX"),
                ],
            ),
            cloudwatch.GraphWidget(
                title="Endpoint instances (GPU use, variant average)",
                width=6,
                left=[
                    instances("GPUUtilization", "Average", "GPU %"),
                    instances("GPUMemoryUtilization", "Average", "GPU memory %"),
                ],
                right=[instances("CPUUtilization", "SampleCount", "instances reporting")],
            ),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="MSK bytes in",
                width=6,
                left=[
                    _search(
                        f'{{AWS/Kafka,"Cluster Name","Broker ID",Topic}} '
                        f'MetricName="BytesInPerSec" "Cluster Name"="{cluster}"',
                        "Average",
                        "bytes/s by broker and topic",
                    )
                ],
            ),
            cloudwatch.GraphWidget(
                title="MSK consumer lag",
                width=6,
                left=[
                    _search(
                        f'{{AWS/Kafka,"Cluster Name","Consumer Group",Topic}} '
                        f'MetricName="SumOffsetLag" "Cluster Name"="{cluster}"',
                        "Maximum",
                        "offset lag by group",
                    )
                ],
            ),
            cloudwatch.GraphWidget(
                title="Firehose delivery freshness (s)", width=6, left=[freshness]
            ),
            cloudwatch.GraphWidget(title="Redshift (streaming ingestion)", width=6, left=warehouse),
        )
        eks_cluster = watched.eks_cluster_name
        cluster_dim = {"ClusterName": eks_cluster}
        # Container Insights' dimension sets (kiln.contract, GPU metrics of a training job):
        # a node is (ClusterName, NodeName, InstanceId); a training job is PodName, which for a
        # Job's pods is the Job's name.
        levels = {
            "node": "ClusterName,NodeName,InstanceId",
            "training job": ",".join(GPU_JOB_DIMENSIONS),
        }

        def per(level: str, what: str, metric: str, unit: str) -> cloudwatch.GraphWidget:
            """One series per node or per training job, found by SEARCH."""
            return cloudwatch.GraphWidget(
                title=f"GPU {what} per {level} ({unit})",
                width=6,
                left=[
                    _search(
                        f'{{{CONTAINER_INSIGHTS},{levels[level]}}} MetricName="{metric}" '
                        f'ClusterName="{eks_cluster}"',
                        "Average",
                        level,
                    )
                ],
            )

        def gpus(name: str, label: str) -> cloudwatch.Metric:
            # Each node reports once a minute (the agent's default interval) under
            # {ClusterName}: the minute's Sum is about the cluster's total.
            return _metric(CONTAINER_INSIGHTS, name, cluster_dim, "Sum", label)

        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="GPUs allocated to pods / on nodes",
                width=6,
                left=[
                    gpus("node_gpu_usage_total", "GPUs allocated to pods"),
                    gpus("node_gpu_limit", "GPUs on nodes"),
                ],
            ),
            *(per("node", what, f"node_gpu_{metric}", unit) for what, metric, unit in GPU_SERIES),
        )
        dashboard.add_widgets(
            *(
                per("training job", what, f"pod_gpu_{metric}", unit)
                for what, metric, unit in GPU_SERIES
            ),
            cloudwatch.GraphWidget(
                title="GPU XID errors per node (kernel log lines)",
                width=6,
                left=[
                    _search(
                        f'{{{XID_NAMESPACE},InstanceId}} MetricName="{XID_METRIC}"',
                        "Sum",
                        "XID log lines",
                    )
                ],
            ),
        )
        dashboard.add_widgets(
            cloudwatch.AlarmStatusWidget(
                title="Alarms",
                width=12,
                alarms=[*self.rollback_alarms.all, *self.alarms],
            ),
        )
        return dashboard
