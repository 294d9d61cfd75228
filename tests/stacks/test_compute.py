"""The compute stack's posture, as synthesized for every environment."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_cdk.assertions import Match, Template

from kiln.gpu_instances import GPU_INSTANCES
from kiln.settings import Settings
from kiln_policy.published_metrics import placeholder_join
from tests.support import ENVIRONMENTS, Synthesis


@pytest.fixture(params=ENVIRONMENTS)
def env(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def compute(synthesis: Synthesis, env: str) -> Template:
    return Template.from_json(synthesis.stack(env, "compute").template)


def groups(synthesis: Synthesis, env: str) -> dict[str, dict]:
    found = synthesis.stack(env, "compute").resources_of_type("AWS::EKS::Nodegroup")
    return {g["Properties"]["Labels"]["kiln.dev/node-pool"]: g for g in found.values()}


def test_cluster_is_pinned_private_encrypted_logged_and_uses_access_entries(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    settings = settings_by_env[env]
    compute(synthesis, env).has_resource_properties(
        "AWS::EKS::Cluster",
        {
            "Name": f"kiln-{env}",
            "Version": settings.compute.kubernetes_version,
            "AccessConfig": {
                "AuthenticationMode": "API",
                "BootstrapClusterCreatorAdminPermissions": False,
            },
            "BootstrapSelfManagedAddons": False,
            "EncryptionConfig": [
                {
                    "Provider": {
                        "KeyArn": {"Fn::GetAtt": [Match.string_like_regexp("ClusterKey"), "Arn"]}
                    },
                    "Resources": ["secrets"],
                }
            ],
            "Logging": {
                "ClusterLogging": {
                    "EnabledTypes": [
                        {"Type": t}
                        for t in ("api", "audit", "authenticator", "controllerManager", "scheduler")
                    ]
                }
            },
            "ResourcesVpcConfig": Match.object_like(
                {"EndpointPrivateAccess": True, "EndpointPublicAccess": False}
            ),
        },
    )


def test_control_plane_logs_go_to_an_encrypted_group_eks_writes_to(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    compute(synthesis, env).has_resource_properties(
        "AWS::Logs::LogGroup",
        {
            "LogGroupName": f"/aws/eks/kiln-{env}/cluster",
            "KmsKeyId": Match.any_value(),
            "RetentionInDays": settings_by_env[env].log_retention_days,
        },
    )


def test_addons_are_pinned(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    addons = synthesis.stack(env, "compute").resources_of_type("AWS::EKS::Addon").values()
    pinned = {a["Properties"]["AddonName"]: a["Properties"]["AddonVersion"] for a in addons}
    assert pinned == settings_by_env[env].compute.addons


def cluster_objects(synthesis: Synthesis, env: str) -> dict[str, list[dict[str, Any]]]:
    """The deploy-time handler's object lists (Manifests, Privileged, Bundles), with every
    CloudFormation intrinsic replaced by the placeholder TOKEN."""
    stack = synthesis.stack(env, "compute")
    (resource,) = stack.resources_of_type("Custom::KubernetesObjects").values()
    props = resource["Properties"]
    return {
        key: json.loads(placeholder_join(props[key]))
        for key in ("Manifests", "Privileged", "Bundles")
    }


def test_gpu_nodes_come_from_karpenter_pools_not_a_node_group(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    settings = settings_by_env[env]
    assert set(groups(synthesis, env)) == {"system"}
    system = groups(synthesis, env)["system"]["Properties"]
    assert system["AmiType"] == "AL2023_x86_64_STANDARD" and system["CapacityType"] == "ON_DEMAND"
    assert system["Taints"] == []
    objects = cluster_objects(synthesis, env)
    pools = [o for o in objects["Manifests"] if o["kind"] == "NodePool"]
    assert [p["metadata"]["name"] for p in pools] == [
        f"gpu-{f}" for f in settings.compute.gpu_families
    ]
    for pool in pools:
        assert pool["spec"]["template"]["spec"]["taints"] == [
            {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}
        ]
        assert pool["spec"]["limits"] == {
            "nvidia.com/gpu": str(settings.compute.gpu_nodes.max_gpus)
        }
    # The controller is kiln's (privileged) objects; CRDs and Kueue come as pinned bundles.
    (deployment,) = [o for o in objects["Privileged"] if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith(f":{settings.compute.karpenter_version}")
    assert [b["file"] for b in objects["Bundles"]] == [
        f"karpenter-{settings.compute.karpenter_version}.json",
        f"kueue-{settings.compute.kueue_version}.json",
    ]
    template = compute(synthesis, env)
    template.has_resource_properties("AWS::EKS::AccessEntry", {"Type": "EC2_LINUX"})
    template.has_resource_properties(
        "AWS::EKS::PodIdentityAssociation",
        {"Namespace": "karpenter", "ServiceAccount": "karpenter"},
    )
    template.has_resource_properties(
        "AWS::SQS::Queue", {"SqsManagedSseEnabled": True, "MessageRetentionPeriod": 300}
    )
    rules = synthesis.stack(env, "compute").resources_of_type("AWS::Events::Rule").values()
    assert sorted(r["Properties"]["EventPattern"]["detail-type"][0] for r in rules) == [
        "AWS Health Event",
        "EC2 Instance Rebalance Recommendation",
        "EC2 Instance State-change Notification",
        "EC2 Spot Instance Interruption Warning",
    ]


def test_every_node_group_requires_imdsv2_and_encrypts_its_root_volume(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    stack = synthesis.stack(env, "compute")
    templates = stack.resources_of_type("AWS::EC2::LaunchTemplate")
    for group in groups(synthesis, env).values():
        template_id = group["Properties"]["LaunchTemplate"]["Id"]["Ref"]
        data = templates[template_id]["Properties"]["LaunchTemplateData"]
        assert data["MetadataOptions"] == {
            "HttpEndpoint": "enabled",
            "HttpTokens": "required",
            "HttpPutResponseHopLimit": 1,
        }
        (volume,) = data["BlockDeviceMappings"]
        assert volume["Ebs"]["Encrypted"] is True and volume["Ebs"]["VolumeType"] == "gp3"
    for node_class in cluster_objects(synthesis, env)["Manifests"]:
        if node_class["kind"] != "EC2NodeClass":
            continue
        spec = node_class["spec"]
        assert spec["metadataOptions"]["httpTokens"] == "required"
        assert spec["metadataOptions"]["httpPutResponseHopLimit"] == 1
        (volume,) = spec["blockDeviceMappings"]
        assert volume["ebs"]["encrypted"] is True
        assert volume["ebs"]["volumeSize"] == (
            f"{settings_by_env[env].compute.gpu_nodes.root_volume_gib}Gi"
        )


def test_efa_interfaces_and_placement_group_exactly_for_efa_types(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    stack = synthesis.stack(env, "compute")
    settings = settings_by_env[env]
    placement = stack.resources_of_type("AWS::EC2::PlacementGroup")
    for family, types in settings.compute.gpu_families.items():
        efa = GPU_INSTANCES[types[0]].efa_interfaces
        (spec,) = [
            o["spec"]
            for o in cluster_objects(synthesis, env)["Manifests"]
            if o["kind"] == "EC2NodeClass" and o["metadata"]["name"] == f"gpu-{family}"
        ]
        if efa:
            assert [i["networkCardIndex"] for i in spec["networkInterfaces"]] == list(range(efa))
            (pg_id,) = placement
            assert placement[pg_id]["Properties"]["Strategy"] == "cluster"
            assert spec["placementGroupSelector"] == {"name": "TOKEN"}
            assert len(spec["subnetSelectorTerms"]) == 1  # one zone for the placement group
        else:
            assert "networkInterfaces" not in spec and "placementGroupSelector" not in spec
            assert len(spec["subnetSelectorTerms"]) == len(settings.availability_zones)
    if not any(GPU_INSTANCES[t].efa_interfaces for t in settings.compute.gpu_nodes.instance_types):
        assert not placement


def test_trainer_identity_is_pod_identity_with_only_its_lake_paths(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    stack = synthesis.stack(env, "compute")
    compute_settings = settings_by_env[env].compute
    compute(synthesis, env).has_resource_properties(
        "AWS::EKS::PodIdentityAssociation",
        {
            "Namespace": compute_settings.training_namespace,
            "ServiceAccount": compute_settings.trainer_service_account,
            "RoleArn": {"Fn::GetAtt": [Match.string_like_regexp("TrainerRole"), "Arn"]},
        },
    )
    compute(synthesis, env).has_resource_properties(
        "AWS::IAM::Role",
        {
            "AssumeRolePolicyDocument": {
                "Statement": [
                    {
                        "Action": ["sts:AssumeRole", "sts:TagSession"],
                        "Effect": "Allow",
                        "Principal": {"Service": "pods.eks.amazonaws.com"},
                    }
                ],
                "Version": "2012-10-17",
            },
        },
    )
    (policy,) = [
        p
        for k, p in stack.resources_of_type("AWS::IAM::ManagedPolicy").items()
        if k.startswith("TrainerPolicy")
    ]
    text = json.dumps(policy["Properties"]["PolicyDocument"])
    assert f"kiln-{env}-curated-" in text and f"kiln-{env}-artifacts-" in text
    assert "/checkpoints/*" in text and "/models/*" in text
    assert "-raw-" not in text and "-capture-" not in text
    writes = [
        s
        for s in policy["Properties"]["PolicyDocument"]["Statement"]
        if "s3:PutObject" in s["Action"]
    ]
    assert all("curated" not in json.dumps(s["Resource"]) for s in writes)


def test_in_cluster_objects_applied_by_a_kubernetes_group_over_the_private_endpoint(
    synthesis: Synthesis, env: str
) -> None:
    stack = synthesis.stack(env, "compute")
    manifests = cluster_objects(synthesis, env)["Manifests"]
    names = [m["metadata"]["name"] for m in manifests]
    assert names[:3] == ["training", "trainer", "nvidia-device-plugin"]
    (entry,) = [
        e
        for e in stack.resources_of_type("AWS::EKS::AccessEntry").values()
        if e["Properties"]["Type"] == "STANDARD"
    ]
    assert entry["Properties"]["PrincipalArn"]["Fn::GetAtt"][0].startswith("ClusterObjectsRole")
    # A Kubernetes group bound to exactly the kinds it applies, no access policy (issue 17).
    assert entry["Properties"]["KubernetesGroups"] == ["kiln:cluster-objects"]
    assert "AccessPolicies" not in entry["Properties"]
    compute(synthesis, env).has_resource_properties(
        "AWS::EC2::SecurityGroupIngress",
        {
            "IpProtocol": "tcp",
            "FromPort": 443,
            "ToPort": 443,
            "Description": "Deploy-time object applier",
        },
    )


def test_training_image_is_built_on_deploy_for_amd64_from_training_and_kernels(
    synthesis: Synthesis, env: str
) -> None:
    stack = synthesis.stack(env, "compute")
    assets_file = synthesis.outdir / f"assembly-{env}" / f"{stack.artifact_id}.assets.json"
    images = json.loads(assets_file.read_text())["dockerImages"]
    (image,) = images.values()
    source = image["source"]
    assert source["dockerFile"] == "training/Dockerfile"
    assert source["platform"] == "linux/amd64"
    context = synthesis.outdir / f"assembly-{env}" / source["directory"]
    if not context.exists():  # nested assemblies keep assets in the root cloud assembly
        context = synthesis.outdir / source["directory"]
    assert sorted(p.name for p in context.iterdir()) == ["kernels", "kiln", "modeling", "training"]
    assert sorted(p.name for p in (context / "kiln").iterdir()) == [
        "__init__.py",
        "contract.py",
        "registry.py",
    ]
    assert not list(context.rglob("*.so")) and not list(context.rglob("__pycache__"))
    compute(synthesis, env).has_output("TrainingImageUri", Match.any_value())


def test_sagemaker_training_role_shares_the_trainer_lake_policy(
    synthesis: Synthesis, env: str
) -> None:
    stack = synthesis.stack(env, "compute")
    policies = stack.resources_of_type("AWS::IAM::ManagedPolicy")
    (lake,) = [p for k, p in policies.items() if k.startswith("TrainerPolicy")]
    attached = {r["Ref"] for r in lake["Properties"]["Roles"]}
    assert any(r.startswith("TrainerRole") for r in attached)
    assert any(r.startswith("SageMakerTrainingRole") for r in attached)
    (runtime,) = [p for k, p in policies.items() if k.startswith("SageMakerTrainingPolicy")]
    text = json.dumps(runtime["Properties"]["PolicyDocument"])
    assert "/aws/sagemaker/TrainingJobs" in text and "ecr:BatchGetImage" in text
    template = compute(synthesis, env)
    template.has_resource_properties(
        "AWS::IAM::Role",
        {
            "AssumeRolePolicyDocument": {
                "Statement": [
                    Match.object_like({"Principal": {"Service": "sagemaker.amazonaws.com"}})
                ]
            }
        },
    )
    for output in ("SageMakerTrainingRoleArn", "TrainingSecurityGroupId", "TrainingSubnetIds"):
        template.has_output(output, Match.any_value())
