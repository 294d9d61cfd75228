"""Issue 17's findings, each pinned on the synthesized templates of every environment: a test
here fails if the finding comes back."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_cdk.assertions import Template

from kiln.contract import EVENT_FLUSH_SECONDS, SAGEMAKER_STOP_SECONDS, SERVER_DRAIN_SECONDS
from kiln.settings import Settings
from platform_constructs.cluster_manifests import APPLIER_GROUP
from tests.support import ENVIRONMENTS, Synthesis


@pytest.fixture(params=ENVIRONMENTS)
def env(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def template(synthesis: Synthesis, env: str, component: str) -> Template:
    return Template.from_json(synthesis.stack(env, component).template)


def statements(synthesis: Synthesis, env: str, component: str) -> list[dict[str, Any]]:
    found = []
    stack = synthesis.stack(env, component)
    for resource in stack.resources_of_type("AWS::IAM::ManagedPolicy", "AWS::IAM::Policy").values():
        found += resource["Properties"]["PolicyDocument"]["Statement"]
    return found


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# --- item 3: the streaming-ingestion handler reads its own namespace's secret only -----------


def test_ingestion_reads_only_its_namespaces_admin_secret(synthesis: Synthesis, env: str) -> None:
    secret_reads = [
        s
        for s in statements(synthesis, env, "warehouse")
        if "secretsmanager:GetSecretValue" in _list(s["Action"])
    ]
    (read,) = secret_reads
    (resource,) = _list(read["Resource"])
    text = json.dumps(resource)
    assert "redshift!*" not in text
    assert f"redshift!kiln-{env}-kiln_admin-??????" in text


# --- item 4: the applier is no standing cluster-admin -----------------------------------------


def test_applier_has_a_kubernetes_group_and_no_access_policy(
    synthesis: Synthesis, env: str
) -> None:
    stack = synthesis.stack(env, "compute")
    entries = stack.resources_of_type("AWS::EKS::AccessEntry")
    applier = [e for e in entries.values() if e["Properties"].get("KubernetesGroups")]
    (entry,) = applier
    assert entry["Properties"]["KubernetesGroups"] == [APPLIER_GROUP]
    assert not entry["Properties"].get("AccessPolicies")
    # No access entry of the stack holds cluster-admin (compute.admin_principal_arns is empty).
    assert "AmazonEKSClusterAdminPolicy" not in json.dumps(
        [e["Properties"].get("AccessPolicies", []) for e in entries.values()]
    )
    # The role may associate that policy with its own access entry only, and only that policy.
    (associate,) = [
        s
        for s in statements(synthesis, env, "compute")
        if "eks:AssociateAccessPolicy" in _list(s["Action"])
    ]
    resource = json.dumps(associate["Resource"])
    assert ":access-entry/" in resource and "ClusterObjectsRole" in resource
    assert json.dumps(associate["Condition"]["StringEquals"]["eks:policyArn"]).endswith(
        'cluster-access-policy/AmazonEKSClusterAdminPolicy"'
    )
    assert associate["Condition"]["StringEquals"]["eks:accessScope"] == "cluster"


def test_applier_rbac_travels_with_the_manifests(synthesis: Synthesis, env: str) -> None:
    stack = synthesis.stack(env, "compute")
    (objects,) = stack.resources_of_type("Custom::KubernetesObjects").values()
    rbac = json.loads(objects["Properties"]["Rbac"])
    assert [o["kind"] for o in rbac] == ["ClusterRole", "ClusterRoleBinding"]
    assert rbac[1]["subjects"] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": APPLIER_GROUP}
    ]
    kinds = {r for rule in rbac[0]["rules"] for r in rule["resources"]}
    assert "*" not in kinds and "secrets" not in kinds


# --- item 5: workload egress to the VPC and the S3 prefix list only ---------------------------

_PRIVATE_EGRESS = (
    "Model container",
    "SageMaker training",
    "Deploy-time handler",
)


def test_workload_security_groups_send_nothing_to_the_internet(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    assert settings_by_env[env].network.interface_endpoints
    open_rules = []
    for component in ("streaming", "warehouse", "compute", "serving"):
        stack = synthesis.stack(env, component)
        for logical_id, group in stack.resources_of_type("AWS::EC2::SecurityGroup").items():
            for rule in group["Properties"].get("SecurityGroupEgress", []):
                if rule.get("CidrIp") == "0.0.0.0/0" and rule.get("Description", "").startswith(
                    _PRIVATE_EGRESS
                ):
                    open_rules.append(f"{component}/{logical_id}: {rule['Description']}")
        for logical_id, rule in stack.resources_of_type("AWS::EC2::SecurityGroupEgress").items():
            props = rule["Properties"]
            if props.get("CidrIp") == "0.0.0.0/0" and props.get("Description", "").startswith(
                _PRIVATE_EGRESS
            ):
                open_rules.append(f"{component}/{logical_id}: {props['Description']}")
    assert not open_rules
    # And each of them reaches S3 through the prefix list the network stack looks up.
    s3_rules = [
        rule["Properties"]
        for component in ("streaming", "warehouse", "compute", "serving")
        for rule in synthesis.stack(env, component)
        .resources_of_type("AWS::EC2::SecurityGroupEgress")
        .values()
        if rule["Properties"].get("Description", "").endswith(": S3 (gateway endpoint)")
    ]
    # MSK connectivity, streaming ingestion, cluster objects, SageMaker training.
    assert len(s3_rules) == 4
    assert all("DestinationPrefixListId" in r for r in s3_rules)


def test_interface_endpoints_for_every_api_the_workloads_call(
    synthesis: Synthesis, env: str
) -> None:
    stack = synthesis.stack(env, "network")
    endpoints = stack.resources_of_type("AWS::EC2::VPCEndpoint")
    services = json.dumps([e["Properties"]["ServiceName"] for e in endpoints.values()])
    for service in ("eks", "kafka", "redshift-data", "redshift-serverless", "lambda", "states"):
        assert f".{service}" in services or f"{service}" in services, service
    for endpoint in endpoints.values():
        if endpoint["Properties"].get("VpcEndpointType") != "Interface":
            continue
        (statement,) = endpoint["Properties"]["PolicyDocument"]["Statement"]
        assert statement["Condition"]["StringEquals"] == {
            "aws:PrincipalAccount": {"Ref": "AWS::AccountId"}
        }


# --- item 6: trust policies with conditions ---------------------------------------------------


def _trust(synthesis: Synthesis, env: str, component: str, service: str) -> list[dict]:
    stack = synthesis.stack(env, component)
    return [
        statement
        for role in stack.resources_of_type("AWS::IAM::Role").values()
        for statement in role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
        if service in json.dumps(statement["Principal"])
    ]


def test_pod_identity_roles_trust_one_service_account_of_one_cluster(
    synthesis: Synthesis, env: str
) -> None:
    trusts = _trust(synthesis, env, "compute", "pods.eks.amazonaws.com")
    # The trainer, the VPC CNI, Karpenter's controller and the CloudWatch agent.
    assert len(trusts) == 4
    accounts = set()
    for trust in trusts:
        equals = trust["Condition"]["StringEquals"]
        accounts.add(equals["aws:RequestTag/kubernetes-service-account"])
        assert {"aws:SourceAccount", "aws:RequestTag/kubernetes-namespace"} <= set(equals)
        assert "aws:RequestTag/eks-cluster-arn" in equals
        assert "aws:SourceArn" in trust["Condition"]["ArnEquals"]
        assert sorted(trust["Action"]) == ["sts:AssumeRole", "sts:TagSession"]
    assert accounts == {"trainer", "aws-node", "karpenter", "cloudwatch-agent"}


def test_sagemaker_and_redshift_roles_name_their_source(synthesis: Synthesis, env: str) -> None:
    (training,) = _trust(synthesis, env, "compute", "sagemaker.amazonaws.com")
    assert "aws:SourceAccount" in training["Condition"]["StringEquals"]
    assert "aws:SourceArn" in training["Condition"]["ArnLike"]
    for trust in _trust(synthesis, env, "warehouse", "redshift"):
        assert "aws:SourceAccount" in trust["Condition"]["StringEquals"]


# --- item 8 -----------------------------------------------------------------------------------


def test_kms_grants_to_warehouse_roles_go_through_a_service(synthesis: Synthesis, env: str) -> None:
    for statement in statements(synthesis, env, "warehouse"):
        if any(a.startswith("kms:") for a in _list(statement["Action"])):
            assert "kms:ViaService" in statement["Condition"]["StringEquals"], statement


def test_cni_uses_its_own_pod_identity_role_not_the_node_role(
    synthesis: Synthesis, env: str
) -> None:
    stack = synthesis.stack(env, "compute")
    (cni,) = [
        a
        for a in stack.resources_of_type("AWS::EKS::Addon").values()
        if a["Properties"]["AddonName"] == "vpc-cni"
    ]
    (association,) = cni["Properties"]["PodIdentityAssociations"]
    assert association["ServiceAccount"] == "aws-node"
    groups = stack.resources_of_type("AWS::EKS::Nodegroup").values()
    for group in groups:
        role_id = group["Properties"]["NodeRole"]["Fn::GetAtt"][0]
        managed = json.dumps(stack.resources[role_id]["Properties"]["ManagedPolicyArns"])
        assert "AmazonEKS_CNI_Policy" not in managed
        assert "AmazonEKSWorkerNodePolicy" in managed


# --- item 9 -----------------------------------------------------------------------------------


def test_drain_and_event_flush_fit_sagemakers_stop_window() -> None:
    from inference import serve
    from inference.events import EventPublisher

    # The drain, the flush, the 1 s purge after an unfinished flush, and a margin.
    assert SERVER_DRAIN_SECONDS + EVENT_FLUSH_SECONDS + 1 < SAGEMAKER_STOP_SECONDS
    assert serve.DEFAULT_GRACE_S == SERVER_DRAIN_SECONDS
    default = EventPublisher.close.__defaults__
    assert default == (EVENT_FLUSH_SECONDS,)
