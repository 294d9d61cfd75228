"""The settings schema: every invariant and every kind of error, named by field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from kiln.settings import Settings
from tests.support import minimal_settings

VALID: dict[str, Any] = minimal_settings()


def settings(**changes: Any) -> dict[str, Any]:
    """VALID with dotted-path changes applied, e.g. settings(**{"network.nat_gateways": 9})."""
    data = copy.deepcopy(VALID)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def errors(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as caught:
        Settings.model_validate(data)
    return [(".".join(map(str, e["loc"])), e["msg"]) for e in caught.value.errors()]


def test_valid_settings_load_with_defaults() -> None:
    loaded = Settings.model_validate(VALID)
    assert loaded.network.subnets.private_mask == 20
    assert loaded.data_lake.access_logs_expiration_days == 365
    assert loaded.account is None
    assert not loaded.is_prod


def test_prod_tier_valid_when_invariants_hold() -> None:
    loaded = Settings.model_validate(settings(tier="prod"))
    assert loaded.is_prod


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"termination_protection": False}, "", "termination_protection: must be true"),
        ({"removal_policy": "destroy"}, "", "removal_policy: 'destroy' is not allowed"),
        ({"network.nat_gateways": 1}, "", "network.nat_gateways: a prod-tier environment"),
        ({"compute.gpu_nodes.capacity": "spot"}, "", "compute.gpu_nodes.capacity: spot is not"),
        (
            {
                "serving.initial_instance_count": 1,
                "serving.autoscaling.min_instances": 1,
                "serving.deployment.traffic": "all_at_once",
            },
            "",
            "serving: a prod-tier endpoint runs at least 2 instances",
        ),
        (
            {
                "serving.autoscaling.scheduled_scale_down": {},
                "serving.deployment.traffic": "all_at_once",
            },
            "",
            "scheduled_scale_down: not allowed in a prod-tier",
        ),
    ],
)
def test_prod_invariants(changes: dict[str, Any], field: str, fragment: str) -> None:
    problems = errors(settings(tier="prod", **changes))
    assert len(problems) == 1
    assert problems[0][0] == field
    assert fragment in problems[0][1]


def test_prod_invariants_are_reported_together() -> None:
    (problem,) = errors(
        settings(tier="prod", termination_protection=False, removal_policy="destroy")
    )
    assert "termination_protection" in problem[1] and "removal_policy" in problem[1]


def test_non_prod_tiers_may_destroy_and_skip_protection() -> None:
    loaded = Settings.model_validate(
        settings(tier="dev", termination_protection=False, removal_policy="destroy")
    )
    assert loaded.removal_policy == "destroy"


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"tier": "qa"}, "tier", "'dev', 'staging' or 'prod'"),
        ({"removal_policy": "snapshot"}, "removal_policy", "'retain' or 'destroy'"),
        ({"account": "1234"}, "account", "pattern"),
        ({"region": "moon-1"}, "region", "pattern"),
        ({"availability_zones": ["eu-west-1a"]}, "availability_zones", "at least 2"),
        ({"log_retention_days": 31}, "log_retention_days", "allowed: 1, 3, 5"),
        ({"owner": ""}, "owner", "at least 1 character"),
        ({"network.vpc_cidr": "10.0.0.0/33"}, "network.vpc_cidr", "CIDR form"),
        ({"network.vpc_cidr": "10.0.0.1/16"}, "network.vpc_cidr", "host bits set"),
        ({"network.vpc_cidr": "8.8.0.0/16"}, "network.vpc_cidr", "not a private range"),
        ({"network.vpc_cidr": "10.0.0.0/8"}, "network.vpc_cidr", "allowed: /16 to /24"),
        ({"network.nat_gateways": 0}, "network.nat_gateways", "greater than or equal to 1"),
        ({"network.nat_gateways": "two"}, "network.nat_gateways", "valid integer"),
        ({"network.subnets.private_mask": 30}, "network.subnets.private_mask", "less than"),
        (
            {"data_lake.raw_transition_to_infrequent_access_days": 10},
            "data_lake.raw_transition_to_infrequent_access_days",
            "greater than or equal to 30",
        ),
        ({"data_lake.raw_expiration_days": 20}, "data_lake", "must be greater than"),
        (
            {"data_lake.access_logs_expiration_days": 0},
            "data_lake.access_logs_expiration_days",
            "greater than or equal to 1",
        ),
        ({"warehouse.kind": "redshift"}, "warehouse.kind", "'serverless' or 'provisioned'"),
        ({"warehouse.admin_username": "awsuser"}, "warehouse.admin_username", "reserved"),
        ({"warehouse.admin_username": "Admin!"}, "warehouse.admin_username", "pattern"),
        (
            {"warehouse.serverless.base_capacity": 12},
            "warehouse.serverless.base_capacity",
            "multiple of 8",
        ),
        (
            {"warehouse.serverless.max_capacity": 8, "warehouse.serverless.base_capacity": 16},
            "warehouse.serverless",
            "must be at least base_capacity",
        ),
        (
            {"warehouse.provisioned.node_type": "dc2.large"},
            "warehouse.provisioned.node_type",
            "'ra3.large'",
        ),
        (
            {"warehouse.snapshot_retention_days": 0},
            "warehouse.snapshot_retention_days",
            "greater than or equal to 1",
        ),
        ({"streaming.kafka_version": "latest"}, "streaming.kafka_version", "pattern"),
        (
            {"streaming.broker_instance_type": "kafka.t3.small"},
            "streaming.broker_instance_type",
            "multi-VPC private connectivity",
        ),
        ({"streaming.topics": []}, "streaming.topics", "at least 1"),
        (
            {"streaming.topics": [{"name": "a b", "partitions": 1}]},
            "streaming.topics.0.name",
            "pattern",
        ),
        (
            {"streaming.topics": [{"name": "a", "partitions": 0}]},
            "streaming.topics.0.partitions",
            "greater than or equal to 1",
        ),
        (
            {"streaming.topics": [{"name": "a", "partitions": 3}, {"name": "a", "partitions": 3}]},
            "streaming",
            "names repeat",
        ),
        ({"streaming.firehose.topic": "other"}, "streaming", "not a declared topic"),
        (
            {"streaming.firehose.buffer_interval_seconds": 901},
            "streaming.firehose.buffer_interval_seconds",
            "less than or equal to 900",
        ),
        ({"events.allow_raw_text": "maybe"}, "events.allow_raw_text", "valid boolean"),
        (
            {"serving.model_artifact": "s3://b/model.zip"},
            "serving.model_artifact",
            "the bucket name 'b' has 1 character; S3 bucket names have 3 to 63",
        ),
        (
            {"serving.model_artifact": "s3://bucket/model.zip"},
            "serving.model_artifact",
            "is neither a .tar.gz archive nor a prefix; allowed: s3://<bucket>/<key>.tar.gz",
        ),
        ({"serving.instance_type": "g5.xlarge"}, "serving.instance_type", "pattern"),
        (
            {"serving.deployment.traffic": "all"},
            "serving.deployment.traffic",
            "'canary', 'linear' or 'all_at_once'",
        ),
        (
            {"serving.deployment.step_percent": 60},
            "serving.deployment.step_percent",
            "less than or equal to 50",
        ),
        ({"serving.initial_instance_count": 5}, "serving", "must lie within autoscaling"),
        (
            {
                "serving.autoscaling.scheduled_scale_down": {
                    "work_start_hour_utc": 9,
                    "work_end_hour_utc": 8,
                }
            },
            "serving.autoscaling.scheduled_scale_down",
            "must be after work_start_hour_utc",
        ),
        ({"compute.kubernetes_version": "1.20"}, "compute.kubernetes_version", "pattern"),
        (
            {"compute.public_endpoint_cidrs": ["0.0.0.0/0"]},
            "compute.public_endpoint_cidrs",
            "whole internet",
        ),
        (
            {"compute.admin_principal_arns": ["admin"]},
            "compute.admin_principal_arns",
            "not an IAM role or user ARN",
        ),
        (
            {"compute.addons": {"vpc-cni": "v1.20.4-eksbuild.1"}},
            "compute.addons",
            "missing: amazon-cloudwatch-observability, coredns, eks-pod-identity-agent, kube-proxy",
        ),
        ({"compute.addons.coredns": "latest"}, "compute.addons", "not an EKS add-on version"),
        (
            {"compute.system_nodes.min_size": 3},
            "compute.system_nodes",
            "min_size <= desired_size <= max_size",
        ),
        (
            {
                "compute.gpu_nodes.capacity_reservations": [
                    {"id": "cr-0123456789abcdef0", "tags": {"a": "b"}}
                ]
            },
            "compute.gpu_nodes.capacity_reservations.0",
            "by id (cr-0123456789abcdef0) or by tags, not both",
        ),
        (
            {"compute.gpu_nodes.capacity_reservations": [{"id": "odcr-1"}]},
            "compute.gpu_nodes.capacity_reservations.0.id",
            "should match pattern",
        ),
        (
            {"compute.gpu_nodes.ami_release": "latest"},
            "compute.gpu_nodes.ami_release",
            "should match pattern",
        ),
        (
            {"compute.gpu_nodes.capacity": "reserved"},
            "compute.gpu_nodes.capacity",
            "'on_demand' or 'spot'",
        ),
        ({"surprise": 1}, "surprise", "Extra inputs"),
        ({"network.extra": 1}, "network.extra", "Extra inputs"),
    ],
)
def test_bad_values_name_their_field(changes: dict[str, Any], field: str, fragment: str) -> None:
    problems = errors(settings(**changes))
    assert any(loc == field and fragment in msg for loc, msg in problems), problems


def test_serverless_warehouse_needs_three_zones() -> None:
    two_zones = {"availability_zones": ["eu-west-1a", "eu-west-1b"]}
    problems = errors(settings(**two_zones))
    assert any("Redshift Serverless needs subnets in 3 zones" in msg for _, msg in problems)
    provisioned = Settings.model_validate(
        settings(**two_zones, **{"warehouse.kind": "provisioned"})
    )
    assert provisioned.warehouse.kind == "provisioned"


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        (
            {"compute.gpu_nodes.instance_types": ["g5.2xlarge", "g5.12xlarge"]},
            "the g5 sizes listed (g5.2xlarge, g5.12xlarge) have different EFA interface counts",
        ),
        (
            {"compute.gpu_nodes.instance_types": ["g5.12xlarge"], "compute.gpu_nodes.max_gpus": 2},
            "max_gpus: 2 is fewer than one node of the largest listed type has (4)",
        ),
        (
            {"compute.teams": [{"name": "ml", "gpu_quota": 8}]},
            "compute.teams.ml.gpu_quota: 8 exceeds compute.gpu_nodes.max_gpus (2)",
        ),
        (
            {"compute.teams": [{"name": "ml", "gpu_quota": 1}, {"name": "ml", "gpu_quota": 1}]},
            "repeats a team name",
        ),
        ({"compute.teams": [{"name": "ml", "gpu_quota": 0}]}, "every gpu_quota is 0"),
        ({"compute.gpu_nodes.instance_types": ["x9.huge"]}, "x9.huge not supported; allowed: g5."),
        (
            {"compute.public_endpoint_cidrs": ["203.0.113.0/24"]},
            "a staging-tier cluster keeps its endpoint private",
        ),
    ],
)
def test_compute_cross_field_checks(changes: dict[str, Any], fragment: str) -> None:
    problems = errors(settings(**changes))
    assert any(fragment in msg for _, msg in problems), problems


def test_dev_may_open_a_restricted_public_endpoint() -> None:
    loaded = Settings.model_validate(
        settings(
            tier="dev",
            termination_protection=False,
            removal_policy="destroy",
            **{"compute.public_endpoint_cidrs": ["203.0.113.0/24"]},
        )
    )
    assert loaded.compute.public_endpoint_cidrs == ["203.0.113.0/24"]


def test_msk_takes_two_or_three_zones() -> None:
    zones = [f"eu-west-1{z}" for z in "abcd"]
    problems = errors(settings(availability_zones=zones))
    assert any("MSK places brokers in 2 or 3 zones" in msg for _, msg in problems)


@pytest.mark.parametrize(
    ("zones", "per_zone", "brokers", "rf"), [(2, 1, 2, 2), (3, 1, 3, 3), (3, 2, 6, 3), (2, 2, 4, 3)]
)
def test_broker_count_and_replication(zones: int, per_zone: int, brokers: int, rf: int) -> None:
    loaded = Settings.model_validate(
        settings(
            **{
                "availability_zones": [f"eu-west-1{z}" for z in "abc"[:zones]],
                "warehouse.kind": "provisioned",
                "streaming.brokers_per_zone": per_zone,
            }
        )
    )
    assert (loaded.broker_count, loaded.kafka_replication_factor) == (brokers, rf)


def test_missing_required_fields_are_named() -> None:
    data = settings()
    del data["region"], data["network"]["vpc_cidr"]
    locations = {loc for loc, _ in errors(data)}
    assert {"region", "network.vpc_cidr"} <= locations


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"availability_zones": ["eu-west-1a", "eu-west-1a"]}, "repeats a zone"),
        ({"availability_zones": ["eu-west-1a", "us-east-1b"]}, "not a zone of region eu-west-1"),
        ({"network.nat_gateways": 4}, "network.nat_gateways: 4 exceeds the 3 availability zones"),
        ({"network.vpc_cidr": "10.0.0.0/20"}, "need 17152 addresses"),
        (
            {
                "network.vpc_cidr": "10.0.0.0/24",
                "network.subnets.public_mask": 28,
                "network.subnets.private_mask": 20,
                "network.subnets.isolated_mask": 28,
            },
            "does not fit in the /24 VPC",
        ),
    ],
)
def test_cross_field_checks(changes: dict[str, Any], fragment: str) -> None:
    problems = errors(settings(**changes))
    assert any(fragment in msg for _, msg in problems), problems


def test_smallest_layout_that_fits_is_accepted() -> None:
    # 3 zones of /26, then /25 (aligned from 192 up to 256), then /25: 896 of 1024 addresses.
    loaded = Settings.model_validate(
        settings(
            **{
                "network.vpc_cidr": "10.0.0.0/22",
                "network.subnets.public_mask": 26,
                "network.subnets.private_mask": 25,
                "network.subnets.isolated_mask": 25,
            }
        )
    )
    assert loaded.network.vpc_cidr == "10.0.0.0/22"


def test_settings_are_immutable() -> None:
    loaded = Settings.model_validate(VALID)
    with pytest.raises(ValidationError):
        loaded.region = "us-west-2"  # type: ignore[misc]


# --- rollout settings SageMaker refuses or cannot meet ------------------------------------
# AWS::SageMaker::Endpoint TrafficRoutingConfig: CanarySize "must be less than or equal to 50%
# of the variant's total instance count"; LinearStepSize "must be 10-50% of the variant's total
# instance count" (https://docs.aws.amazon.com/AWSCloudFormation/latest/TemplateReference/
# aws-properties-sagemaker-endpoint-trafficroutingconfig.html). BlueGreenUpdatePolicy:
# MaximumExecutionTimeoutInSeconds "should be larger than the total waiting time specified in
# TerminationWaitInSeconds and WaitIntervalInSeconds"
# (https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_BlueGreenUpdatePolicy.html).


def single_instance(**deployment: Any) -> dict[str, Any]:
    return settings(
        **{
            "serving.initial_instance_count": 1,
            "serving.autoscaling.min_instances": 1,
            "serving.deployment": deployment,
        }
    )


@pytest.mark.parametrize("traffic", ["canary", "linear"])
def test_a_single_instance_fleet_cannot_take_a_canary_or_a_linear_step(traffic: str) -> None:
    problems = errors(single_instance(traffic=traffic, step_percent=10))
    (message,) = [msg for loc, msg in problems if loc == "serving"]
    assert "fleet of 1 instance(s)" in message and "traffic: all_at_once" in message


def test_single_instance_fleets_roll_out_all_at_once() -> None:
    loaded = Settings.model_validate(single_instance(traffic="all_at_once"))
    assert loaded.serving.deployment.traffic == "all_at_once"


def test_a_scheduled_scale_down_to_one_instance_counts_as_a_fleet_size() -> None:
    data = settings(
        **{
            "serving.autoscaling.scheduled_scale_down": {},
            "serving.deployment": {"traffic": "canary"},
        }
    )
    assert "fleet of 1 instance(s)" in dict(errors(data))["serving"]


def test_canary_over_half_of_some_fleet_size_is_refused() -> None:
    # 2 instances of a fleet that autoscaling may shrink to 3: more than half.
    data = settings(**{"serving.deployment": {"traffic": "canary", "step_instances": 2}})
    assert "fleet of 2, 3 instance(s)" in dict(errors(data))["serving"]


def test_linear_steps_outside_10_to_50_percent_are_refused() -> None:
    data = settings(
        **{
            "serving.autoscaling.max_instances": 20,
            "serving.deployment": {"traffic": "linear", "step_instances": 1},
        }
    )
    # One instance is under 10% of fleets of 11..20 and over 50% of none of 2..20.
    message = dict(errors(data))["serving"]
    assert "not 10-50% of a fleet of 11, 12" in message and "20 instance(s)" in message


def test_waits_must_fit_the_deployment_timeout() -> None:
    # linear 10% of up to 10 instances: 10 shifts x 15 min + 5 = 155 min > 120.
    data = settings(
        **{
            "serving.autoscaling.max_instances": 10,
            "serving.deployment": {"traffic": "linear", "step_percent": 10, "wait_minutes": 15},
        }
    )
    message = dict(errors(data))["serving"]
    assert "waits add up to 155 minutes" in message and "max_deployment_minutes (120)" in message
    ok = settings(
        **{
            "serving.autoscaling.max_instances": 10,
            "serving.deployment": {
                "traffic": "linear",
                "step_percent": 10,
                "wait_minutes": 15,
                "max_deployment_minutes": 160,
            },
        }
    )
    Settings.model_validate(ok)


def test_every_environment_file_rolls_out_within_what_sagemaker_accepts() -> None:
    from kiln.config import available_environments, load_settings
    from kiln.settings import fleet_sizes, rollout_problems

    for env in available_environments():
        serving = load_settings(env).serving
        assert rollout_problems(serving) == [], env
        if 1 in fleet_sizes(serving):
            assert serving.deployment.traffic == "all_at_once", env


def test_the_efa_zone_is_one_of_the_environments_zones() -> None:
    """p4d/p4de/p5 are not offered in every zone (and a zone name means a different zone in
    each account), so the zone the EFA pool is pinned to is a setting, checked here."""
    ok = settings(**{"compute.gpu_nodes.efa_zone": "eu-west-1b"})
    assert Settings.model_validate(ok).compute.gpu_nodes.efa_zone == "eu-west-1b"
    bad = settings(**{"compute.gpu_nodes.efa_zone": "eu-west-1d"})
    assert "efa_zone: 'eu-west-1d' is not one of availability_zones" in dict(errors(bad))[""]
