"""The constraints AWS documents and no linter checks (issue 17): each one enforced by the
settings schema, with a compliant and a non-compliant case, and each listed in the README.

The guardrail-enforced ones (instance storage and KMS, data capture) have their cases in
tests/kiln_policy/test_guardrails.py; the README row names them too.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from pydantic import ValidationError

from kiln import instances
from kiln.settings import Settings
from tests.support import REPO, minimal_settings


def settings(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(minimal_settings())
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def problems(data: dict[str, Any]) -> str:
    try:
        Settings.model_validate(data)
    except ValidationError as err:
        return "\n".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    return ""


EU_NORTH = {
    "region": "eu-north-1",
    "availability_zones": ["eu-north-1a", "eu-north-1b", "eu-north-1c"],
}

# (README constraint, source, compliant changes, non-compliant changes, expected fragment)
RULES: list[tuple[str, str, dict[str, Any], dict[str, Any], str]] = [
    (
        "SageMaker instance type is one kiln serves on",
        "SageMaker API Reference, ProductionVariant.InstanceType",
        {"serving.instance_type": "ml.g5.2xlarge"},
        {"serving.instance_type": "ml.banana.huge"},
        "serving.instance_type: 'ml.banana.huge' is not a SageMaker instance type kiln serves "
        "on; allowed families: ml.g4dn, ml.g5",
    ),
    (
        "SageMaker instance family offered in the region",
        "Amazon SageMaker AI pricing, Real-Time Inference",
        {"serving.instance_type": "ml.g5.xlarge"},
        {"serving.instance_type": "ml.g6e.xlarge"},
        "serving.instance_type: ml.g6e.xlarge: ml.g6e is not offered for SageMaker hosting in "
        "eu-west-1",
    ),
    (
        "Canary at most 50% of the fleet",
        "SageMaker API Reference, TrafficRoutingConfig.CanarySize",
        # A fleet of 2: a 50% canary is one instance (with 3, rounding up makes it 2 of 3,
        # which the rollout rule refuses too).
        {"serving.deployment.step_percent": 50, "serving.autoscaling.max_instances": 2},
        {"serving.deployment.step_percent": 60, "serving.autoscaling.max_instances": 2},
        "serving.deployment.step_percent: Input should be less than or equal to 50",
    ),
    (
        "Linear step 10-50% of the fleet",
        "SageMaker API Reference, TrafficRoutingConfig.LinearStepSize",
        {"serving.deployment.traffic": "linear", "serving.deployment.step_percent": 10},
        {"serving.deployment.traffic": "linear", "serving.deployment.step_percent": 5},
        "serving.deployment.step_percent: 5 is below what SageMaker allows for a linear step",
    ),
    (
        "Wait between steps and before terminating the old fleet: 0-3600 s",
        "SageMaker API Reference, TrafficRoutingConfig.WaitIntervalInSeconds, "
        "BlueGreenUpdatePolicy.TerminationWaitInSeconds",
        # A deployment timeout long enough for the waits (the rollout rule checks that too).
        {"serving.deployment.wait_minutes": 60, "serving.deployment.max_deployment_minutes": 240},
        {"serving.deployment.wait_minutes": 61, "serving.deployment.max_deployment_minutes": 240},
        "serving.deployment.wait_minutes: Input should be less than or equal to 60",
    ),
    (
        "Deployment timeout longer than all its waits",
        "SageMaker API Reference, BlueGreenUpdatePolicy.MaximumExecutionTimeoutInSeconds",
        # The rollout rule counts a wait after each of a canary's two shifts (2 x 10 + 5 = 25).
        {"serving.deployment.wait_minutes": 10, "serving.deployment.max_deployment_minutes": 26},
        {"serving.deployment.wait_minutes": 10, "serving.deployment.max_deployment_minutes": 15},
        # Issue 21's rollout rule answers first (it counts the canary's two shifts).
        "the waits add up to 25 minutes (shifts x wait_minutes + termination_wait_minutes), "
        "which does not fit max_deployment_minutes (15)",
    ),
    (
        "MSK brokers: 2 or 3 zones, a multiple of the zones, at most 30",
        "Amazon MSK Developer Guide, Amazon MSK quota; CreateCluster NumberOfBrokerNodes",
        {"streaming.brokers_per_zone": 10},
        {"streaming.brokers_per_zone": 11},
        "streaming.brokers_per_zone: Input should be less than or equal to 10",
    ),
    (
        "MSK broker storage 1-16384 GiB",
        "Amazon MSK API Reference, EBSStorageInfo.VolumeSize",
        {"streaming.broker_storage_gib": 16384},
        {"streaming.broker_storage_gib": 16385},
        "streaming.broker_storage_gib: Input should be less than or equal to 16384",
    ),
    (
        "Redshift Serverless base capacity: steps of 8 up to 512",
        "Amazon Redshift Management Guide, Compute capacity for Amazon Redshift Serverless",
        {"warehouse.serverless.base_capacity": 512, "warehouse.serverless.max_capacity": 512},
        {"warehouse.serverless.base_capacity": 12, "warehouse.serverless.max_capacity": 64},
        "warehouse.serverless.base_capacity: Input should be a multiple of 8",
    ),
    (
        "Redshift Serverless base capacity above 512: steps of 32, five regions",
        "Amazon Redshift Management Guide, Compute capacity for Amazon Redshift Serverless",
        {"warehouse.serverless.base_capacity": 544, "warehouse.serverless.max_capacity": 544},
        {"warehouse.serverless.base_capacity": 520, "warehouse.serverless.max_capacity": 520},
        "warehouse.serverless.base_capacity: 520 RPUs; above 512 Redshift Serverless takes "
        "steps of 32",
    ),
    (
        "kube-proxy add-on built for the cluster's Kubernetes version",
        "Amazon EKS User Guide, Manage kube-proxy (versions table)",
        {"compute.kubernetes_version": "1.34"},
        {"compute.kubernetes_version": "1.33"},
        "compute.addons.kube-proxy: v1.34.1-eksbuild.2 is not built for Kubernetes 1.33",
    ),
    (
        "Endpoint autoscaling: 1 <= min <= initial <= max",
        "Application Auto Scaling API Reference, RegisterScalableTarget (MinCapacity, MaxCapacity)",
        {"serving.autoscaling.max_instances": 2},
        {"serving.autoscaling.max_instances": 1},
        "initial_instance_count (2) must lie within autoscaling min_instances (2) .. "
        "max_instances (1)",
    ),
    (
        "Firehose buffering 0-900 s and 1-128 MiB",
        "Amazon Data Firehose API Reference, BufferingHints",
        {"streaming.firehose.buffer_interval_seconds": 900},
        {"streaming.firehose.buffer_interval_seconds": 901},
        "streaming.firehose.buffer_interval_seconds: Input should be less than or equal to 900",
    ),
    (
        "CloudWatch Logs retention is one of its values",
        "Amazon CloudWatch Logs API Reference, PutRetentionPolicy.retentionInDays",
        {"log_retention_days": 731},
        {"log_retention_days": 700},
        "log_retention_days: 700 is not a CloudWatch Logs retention",
    ),
]
ARCHIVE = "s3://kiln-qa-artifacts/models/v7/model.tar.gz"
PREFIX = "s3://kiln-qa-artifacts/models/v7/model/"
RULES += [
    (
        "Model data: a .tar.gz archive, or an S3 prefix ending in /",
        "SageMaker API Reference, ContainerDefinition.ModelDataUrl, S3ModelDataSource.S3DataType",
        {"serving.model_artifact": PREFIX},
        {"serving.model_artifact": PREFIX.rstrip("/")},
        "is neither a .tar.gz archive nor a prefix; allowed: s3://<bucket>/<key>.tar.gz (a model "
        "archive",
    ),
    (
        "Model data URI at most 1024 characters",
        "SageMaker API Reference, S3ModelDataSource.S3Uri, ContainerDefinition.ModelDataUrl",
        {"serving.model_artifact": "s3://kiln-qa-artifacts/" + "m" * 990 + "/"},
        {"serving.model_artifact": "s3://kiln-qa-artifacts/" + "m" * 1010 + "/"},
        "characters; SageMaker takes an S3 URI of at most 1024",
    ),
    (
        "LMI engine on a GPU type whose GPU count kiln knows",
        "LMI configuration guide, option.tensor_parallel_degree (1 to the instance's GPUs)",
        {"serving.engine": "lmi", "serving.instance_type": "ml.g5.12xlarge"},
        {"serving.engine": "lmi", "serving.instance_type": "ml.m5.xlarge"},
        "serving.engine: lmi runs vLLM on GPUs and ml.m5.xlarge has none",
    ),
]
GUARDRAIL_RULES = [
    # (README constraint, guardrail id)
    ("No KmsKeyId on endpoint configs of instance types with local storage", "endpoint-kms"),
    ("Data capture only where raw text is allowed", "endpoint-capture-privacy"),
    ("Model data and container variables that CreateModel accepts", "model-data-documented"),
]


def test_a_whole_bucket_is_not_a_model() -> None:
    found = problems(settings(**{"serving.model_artifact": "s3://kiln-qa-artifacts/"}))
    assert "is a whole bucket; give the model's own:" in found


def test_lmi_needs_a_gpu_count_and_a_registry() -> None:
    found = problems(
        settings(**{"serving.engine": "lmi", "serving.instance_type": "ml.g4dn.xlarge"})
    )
    assert "kiln's GPU catalog (kiln/gpu_instances.py) has no entry for ml.g4dn.xlarge" in found
    from kiln import lmi

    # The tensor parallel degree: every GPU of the type (a 70B model on 8 GPUs).
    assert instances.gpu_count("ml.p4d.24xlarge") == instances.gpu_count("ml.p5.48xlarge") == 8
    assert instances.gpu_count("ml.g5.12xlarge") == 4 and instances.gpu_count("ml.m5.large") is None
    assert lmi.region_problem("eu-west-1") is None
    assert "add the region to REGISTRIES in kiln/lmi.py" in str(lmi.region_problem("mx-central-1"))
    assert lmi.image_uri("eu-south-1") == (
        f"692866216735.dkr.ecr.eu-south-1.amazonaws.com/djl-inference:{lmi.LMI_VERSION}"
    )


@pytest.mark.parametrize(("constraint", "source", "good", "bad", "fragment"), RULES)
def test_documented_limit(
    constraint: str, source: str, good: dict[str, Any], bad: dict[str, Any], fragment: str
) -> None:
    assert problems(settings(**good)) == "", constraint
    found = problems(settings(**bad))
    assert fragment in found, f"{constraint} ({source}): {found}"


def test_region_outside_the_record_is_refused_with_where_to_add_it() -> None:
    found = problems(settings(**EU_NORTH))
    assert "kiln has no record of the SageMaker instance families offered in eu-north-1" in found
    assert "kiln/instances.py" in found


def test_base_capacity_above_512_only_in_the_regions_that_offer_it() -> None:
    data = settings(**{"warehouse.serverless.base_capacity": 544})
    data["warehouse"]["serverless"]["max_capacity"] = 544
    assert problems(data) == ""
    data.update(EU_NORTH)
    assert "544 RPUs exceeds 512, the most Redshift Serverless allows in eu-north-1" in problems(
        data
    )


def test_catalog_knows_which_types_take_a_key() -> None:
    assert instances.has_instance_storage("ml.g5.xlarge")
    assert instances.has_instance_storage("ml.p4d.24xlarge")
    assert not instances.has_instance_storage("ml.m5.xlarge")
    assert not instances.has_instance_storage("ml.c5.2xlarge")
    # Outside the catalog: EC2's instance-store naming.
    assert instances.has_instance_storage("ml.m5d.large")
    assert not instances.has_instance_storage("ml.r5.large")


def test_every_environment_serves_on_a_recorded_type_and_region() -> None:
    from kiln.config import available_environments, load_settings

    for name in available_environments():
        loaded = load_settings(name)
        assert instances.region_problem(loaded.serving.instance_type, loaded.region) is None


def _readme_rows() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("### Rules for what AWS documents", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]


def test_readme_lists_every_rule_with_where_and_source() -> None:
    rows = _readme_rows()
    constraints = [re.split(r"\s*\|\s*", row.strip("| "))[0] for row in rows[1:]]
    expected = [c for c, *_ in RULES] + [c for c, _ in GUARDRAIL_RULES]
    assert sorted(constraints) == sorted(expected)
    for row in rows[1:]:
        assert row.count("|") == 4, row  # constraint | where | source


def test_public_endpoint_cidrs_that_together_cover_the_internet_are_refused() -> None:
    """Issue 17, item 8: not only 0.0.0.0/0 but any set of ranges covering every address."""
    base = {"tier": "dev", "termination_protection": False, "removal_policy": "destroy"}
    office = settings(**base, **{"compute.public_endpoint_cidrs": ["203.0.113.0/24"]})
    assert problems(office) == ""
    halves = settings(**base, **{"compute.public_endpoint_cidrs": ["0.0.0.0/1", "128.0.0.0/1"]})
    assert "0.0.0.0/1, 128.0.0.0/1 together cover the whole internet" in problems(halves)
    v6 = settings(**base, **{"compute.public_endpoint_cidrs": ["::/1", "8000::/1"]})
    assert "cover the whole internet" in problems(v6)
