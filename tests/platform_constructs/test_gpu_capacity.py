"""Karpenter's and Kueue's objects for every environment: valid against the CRD schemas of the
vendored releases (unknown fields refused, as a structural schema would silently prune them, and
every CEL rule evaluated as the API server does on create) and Kubernetes' own schemas, and
saying what the platform promises (taint, limits, IMDSv2, EFA, reservations, quotas, gang
admission)."""

from __future__ import annotations

import copy
import hashlib
import json
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from kiln.config import load_settings
from kiln.contract import GPU_POOL_LABEL, GPU_TAINT
from kiln.settings import Settings
from platform_constructs import gpu_capacity as gc
from platform_constructs.handlers import kubernetes_apply as ka
from tests import crd_cel
from tests.support import ENVIRONMENTS, minimal_settings

BUNDLES = ka.BUNDLES_DIR
NETWORK = gc.NodeNetwork(
    node_role="kiln-prod-gpu-node",
    cluster_security_group="sg-0123456789abcdef0",
    private_subnets=["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"],
    efa_subnet="subnet-0aaaaaaaaaaaaaaaa",
    placement_group="kiln-prod-gpu",
    tags={"project": "kiln"},
)


@cache
def crd_sources() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the openAPIV3Schema of every CRD version in the bundles."""
    schemas = {}
    for path in sorted(BUNDLES.glob("*.json")):
        for obj in json.loads(path.read_text())["objects"]:
            if obj["kind"] != "CustomResourceDefinition":
                continue
            group, kind = obj["spec"]["group"], obj["spec"]["names"]["kind"]
            for version in obj["spec"]["versions"]:
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """The same, closed to unknown fields (for jsonschema)."""
    return {key: strict(schema) for key, schema in crd_sources().items()}


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever the API server would prune them."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate(obj: dict[str, Any], kubernetes: str) -> list[str]:
    """The object against its schema; a custom resource's CEL rules too (returns those
    evaluated; raises crd_cel.CELValidationError with the failed rules' messages)."""
    key = (obj["apiVersion"], obj["kind"])
    if key in crd_schemas():
        body = {k: v for k, v in obj.items() if k != "metadata"}
        jsonschema.validate(
            body,
            {
                **crd_schemas()[key],
                "properties": {
                    **crd_schemas()[key].get("properties", {}),
                    "metadata": {"type": "object"},
                },
            },
        )
        return crd_cel.evaluate(obj, crd_sources()[key])
    kubernetes_validate.validate(obj, f"{kubernetes}.0", strict=True)
    return []


def rendered(settings: Settings) -> list[dict[str, Any]]:
    compute = settings.compute
    return [
        *gc.karpenter_controller(
            version=compute.karpenter_version,
            cluster_name="kiln-prod",
            cluster_endpoint="https://ABC.gr7.us-east-1.eks.amazonaws.com",
            interruption_queue="kiln-prod-karpenter",
        ),
        *gc.gpu_pools(settings, NETWORK),
        *gc.team_namespaces(settings),
        gc.kueue_config_map(),
        *gc.kueue_objects(settings),
    ]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_object_of_every_environment_is_valid(env: str) -> None:
    settings = load_settings(env)
    evaluated: dict[str, set[str]] = {}
    for obj in rendered(settings):
        rules = validate(obj, settings.compute.kubernetes_version)
        evaluated.setdefault(obj["kind"], set()).update(rules)
    # The CEL rules really ran on what kiln sets (LocalQueue's only rule is a transition rule).
    assert {kind for kind, rules in evaluated.items() if rules} == {
        "EC2NodeClass",
        "NodePool",
        "ResourceFlavor",
        "ClusterQueue",
    }
    assert {
        "self.split('@')[0] in ['al2','al2023','bottlerocket','windows2019','windows2022',"
        "'windows2025']",
        "(has(self.role) && !has(self.instanceProfile)) || "
        "(!has(self.role) && has(self.instanceProfile))",
    } <= evaluated["EC2NodeClass"]
    assert 'self != "kubernetes.io/hostname"' in evaluated["NodePool"]
    taint_effects = "self.all(x, x.effect in ['NoSchedule', 'PreferNoSchedule', 'NoExecute'])"
    assert taint_effects in evaluated["ResourceFlavor"]
    flavors = "self.flavors.all(x, size(x.resources) == size(self.coveredResources))"
    assert flavors in evaluated["ClusterQueue"]


def test_the_validator_refuses_a_misspelt_field_and_a_wrong_type() -> None:
    pool = gc.node_pool(load_settings("prod"), "p4d")
    validate(pool, "1.34")
    typo = copy.deepcopy(pool)
    typo["spec"]["disruption"]["consolidateAftr"] = "5m"
    with pytest.raises(jsonschema.ValidationError, match="consolidateAftr"):
        validate(typo, "1.34")
    wrong = copy.deepcopy(pool)
    wrong["spec"]["disruption"]["consolidationPolicy"] = "WhenIdle"
    with pytest.raises(jsonschema.ValidationError, match="WhenIdle"):
        validate(wrong, "1.34")


def _set(obj: dict[str, Any], path: str, value: Any) -> None:
    """Sets obj's field at a dotted path (list indexes as numbers); None deletes it."""
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = obj
    for part in parents:
        node = node[part]
    if value is None:
        del node[last]
    elif isinstance(node, list) and last == len(node):
        node.append(value)
    else:
        node[last] = value


# Each breaks one CEL rule of the release and nothing jsonschema checks: (kind, changes to the
# prod object, the failing field's path, the rule's message).
BROKEN = [
    (
        "NodePool",
        {"spec.template.spec.requirements.1.key": "karpenter.sh/team"},
        "spec.template.spec.requirements[1].key",
        'label domain "karpenter.sh" is restricted',
    ),
    (
        "NodePool",
        {"spec.template.metadata.labels": {"kubernetes.io/hostname": "node-1"}},
        "spec.template.metadata.labels",
        'label "kubernetes.io/hostname" is restricted',
    ),
    (
        "NodePool",
        {"spec.disruption.budgets.1.schedule": "0 9 * * 1-5"},
        "spec.disruption.budgets",
        "'schedule' must be set with 'duration'",
    ),
    (
        "NodePool",
        {"spec.template.spec.requirements.2": {"key": "karpenter.k8s.aws/instance-gpu-count",
                                               "operator": "Gt", "values": ["-1"]}},
        "spec.template.spec.requirements",
        "requirements operator 'Gt', 'Lt', 'Gte', or 'Lte' must have a single positive integer",
    ),
    (
        "EC2NodeClass",
        {"spec.tags": {"kubernetes.io/cluster/kiln-prod": "owned"}},
        "spec.tags",
        "tag contains a restricted tag matching kubernetes.io/cluster/",
    ),
    (
        "EC2NodeClass",
        {"spec.amiSelectorTerms": [{"alias": "windows2022@v20250101"}]},
        "spec.amiSelectorTerms[0].alias",
        "windows families may only specify version 'latest'",
    ),
    (
        "EC2NodeClass",
        {"spec.instanceProfile": "kiln-prod-gpu-node"},
        "spec",
        "must specify exactly one of ['role', 'instanceProfile']",
    ),
    (
        "EC2NodeClass",
        {"spec.networkInterfaces.2.networkCardIndex": 1},
        "spec.networkInterfaces",
        "networkInterfaces must not have duplicate networkCardIndex and deviceIndex pairs",
    ),
    (
        "ClusterQueue",
        {"spec.cohortName": None},
        "spec",
        "borrowingLimit must be nil when cohort is empty",
    ),
    (
        "ClusterQueue",
        {"spec.resourceGroups.0.flavors.1": {"name": "gpu-spare",
                                             "resources": [{"name": "cpu", "nominalQuota": 1}]}},
        "spec.resourceGroups[0]",
        "flavors must have the same number of resources as the coveredResources",
    ),
    (
        "ClusterQueue",
        {"spec.preemption": {"reclaimWithinCohort": "Never",
                             "borrowWithinCohort": {"policy": "LowerPriority"}}},
        "spec.preemption",
        "reclaimWithinCohort=Never and borrowWithinCohort.Policy!=Never",
    ),
    (
        # whenCanBorrow and whenCanPreempt are left to their defaults: the rule sees them only
        # because defaults are applied first, as the API server does.
        "ClusterQueue",
        {"spec.flavorFungibility": {"preference": "BorrowingOverPreemption"}},
        "spec.flavorFungibility",
        "preference can only be set when both whenCanBorrow and whenCanPreempt are TryNextFlavor",
    ),
    (
        "ResourceFlavor",
        {"spec.nodeTaints.0.effect": "Evict"},
        "spec.nodeTaints",
        "supported taint effect values: 'NoSchedule', 'PreferNoSchedule', 'NoExecute'",
    ),
    (
        "ResourceFlavor",
        {"spec.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                               "effect": "NoSchedule", "tolerationSeconds": 60}]},
        "spec.tolerations",
        "effect must be 'NoExecute' when 'tolerationSeconds' is set",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "changes", "path", "message"), BROKEN)
def test_a_broken_object_fails_the_release_cel_rule_with_its_message(
    kind: str, changes: dict[str, Any], path: str, message: str
) -> None:
    """The CEL evaluation is real: each change passes jsonschema and fails only the rule."""
    obj = copy.deepcopy(next(o for o in rendered(load_settings("prod")) if o["kind"] == kind))
    for field, value in changes.items():
        _set(obj, field, value)
    key = (obj["apiVersion"], kind)
    jsonschema.validate({k: v for k, v in obj.items() if k != "metadata"}, crd_schemas()[key])
    with pytest.raises(crd_cel.CELValidationError) as err:
        validate(obj, "1.34")
    expected = f"{path}: Invalid value: {message}"
    (failure,) = err.value.failures
    assert failure.startswith(expected), failure


def test_bundles_are_the_pinned_releases_and_the_handler_can_check_them() -> None:
    for env in ENVIRONMENTS:
        compute = load_settings(env).compute
        for name in (f"karpenter-{compute.karpenter_version}", f"kueue-{compute.kueue_version}"):
            path = BUNDLES / f"{name}.json"
            assert path.is_file(), f"{env}: no vendored bundle {path.name}"
    path = next(BUNDLES.glob("kueue-*.json"))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    objects = ka.load_bundle({"file": path.name, "sha256": digest})
    assert {o["kind"] for o in objects} >= {"CustomResourceDefinition", "Deployment"}
    images = [
        c["image"]
        for o in objects
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
    ]
    assert images == [f"registry.k8s.io/kueue/kueue:{path.stem.removeprefix('kueue-')}"]
    with pytest.raises(ValueError, match="SHA-256"):
        ka.load_bundle({"file": path.name, "sha256": "0" * 64})


def test_prod_pool_is_tainted_limited_on_demand_and_never_disrupts_running_work() -> None:
    settings = load_settings("prod")
    pool = gc.node_pool(settings, "p4d")
    template = pool["spec"]["template"]
    assert template["spec"]["taints"] == [GPU_TAINT]
    assert template["metadata"]["labels"] == {GPU_POOL_LABEL[0]: GPU_POOL_LABEL[1]}
    requirements = {r["key"]: r["values"] for r in template["spec"]["requirements"]}
    assert requirements["karpenter.sh/capacity-type"] == ["on-demand"]
    assert requirements["node.kubernetes.io/instance-type"] == ["p4d.24xlarge"]
    assert pool["spec"]["limits"] == {"nvidia.com/gpu": str(settings.compute.gpu_nodes.max_gpus)}
    disruption = pool["spec"]["disruption"]
    # Only empty nodes are consolidated: a node with a training pod is never taken for cost.
    assert disruption["consolidationPolicy"] == "WhenEmpty"
    assert {tuple(b["reasons"]) for b in disruption["budgets"]} == {("Empty",), ("Drifted",)}


def test_spot_outside_prod_and_reservations_first() -> None:
    dev = load_settings("dev")
    pool = gc.node_pool(dev, "g5")
    (capacity,) = [
        r["values"]
        for r in pool["spec"]["template"]["spec"]["requirements"]
        if r["key"] == "karpenter.sh/capacity-type"
    ]
    assert capacity == ["spot", "on-demand"]
    raw = minimal_settings()
    raw["compute"]["gpu_nodes"]["capacity_reservations"] = [
        {"id": "cr-0123456789abcdef0"},
        {"tags": {"team": "ml"}},
    ]
    reserved = Settings.model_validate(raw)
    assert gc.capacity_types(reserved) == ["reserved", "on-demand"]
    node_class = gc.node_class(reserved, "g5", NETWORK)
    assert node_class["spec"]["capacityReservationSelectorTerms"] == [
        {"id": "cr-0123456789abcdef0"},
        {"tags": {"team": "ml"}},
    ]
    validate(node_class, "1.34")


def test_node_class_imdsv2_encrypted_private_and_efa_on_every_card() -> None:
    prod = load_settings("prod")
    spec = gc.node_class(prod, "p4d", NETWORK)["spec"]
    assert spec["metadataOptions"]["httpTokens"] == "required"
    assert spec["metadataOptions"]["httpPutResponseHopLimit"] == 1
    (volume,) = spec["blockDeviceMappings"]
    assert volume["ebs"]["encrypted"] is True
    assert spec["associatePublicIPAddress"] is False
    # p4d: 4 network cards, each with an EFA interface; one zone, one placement group.
    cards = [(i["networkCardIndex"], i["interfaceType"]) for i in spec["networkInterfaces"]]
    assert cards == [(0, "interface"), (1, "efa-only"), (2, "efa-only"), (3, "efa-only")]
    assert spec["subnetSelectorTerms"] == [{"id": NETWORK.efa_subnet}]
    assert spec["placementGroupSelector"] == {"name": "kiln-prod-gpu"}
    assert spec["amiSelectorTerms"] == [{"alias": f"al2023@{prod.compute.gpu_nodes.ami_release}"}]
    # g5.2xlarge has no EFA: every private subnet, no interfaces named, no placement group.
    dev = gc.node_class(load_settings("dev"), "g5", NETWORK)["spec"]
    assert "networkInterfaces" not in dev and "placementGroupSelector" not in dev
    assert dev["subnetSelectorTerms"] == [{"id": s} for s in NETWORK.private_subnets]


def test_queues_give_each_team_its_quota_and_admission_is_all_or_nothing() -> None:
    settings = load_settings("prod")
    objects = gc.kueue_objects(settings)
    queues = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterQueue"}
    for team in settings.compute.teams:
        queue = queues[gc.queue_name(team.name)]
        (flavor,) = queue["spec"]["resourceGroups"][0]["flavors"]
        gpu = {r["name"]: r for r in flavor["resources"]}["nvidia.com/gpu"]
        assert gpu["nominalQuota"] == team.gpu_quota
        assert gpu["nominalQuota"] + gpu["borrowingLimit"] <= settings.compute.gpu_nodes.max_gpus
        namespace = settings.compute.team_namespace(team.name)
        (local,) = [
            o
            for o in objects
            if o["kind"] == "LocalQueue" and o["metadata"]["namespace"] == namespace
        ]
        assert local["spec"]["clusterQueue"] == queue["metadata"]["name"]
    config = json.loads(gc.kueue_config_map()["data"]["controller_manager_config.yaml"])
    assert config["waitForPodsReady"]["blockAdmission"] is True
    assert "trainer.kubeflow.org/trainjob" in config["integrations"]["frameworks"]
    assert "batch/job" in config["integrations"]["frameworks"]


def test_kueue_configuration_is_what_the_release_reads() -> None:
    """The ConfigMap replaces the bundle's own: same name, namespace and data key."""
    path = next(BUNDLES.glob("kueue-*.json"))
    (theirs,) = [o for o in json.loads(path.read_text())["objects"] if o["kind"] == "ConfigMap"]
    ours = gc.kueue_config_map()
    assert ka.object_path(ours) == ka.object_path(theirs)
    assert set(ours["data"]) == set(theirs["data"])
