"""The compute stack's posture, as synthesized for every environment."""

from __future__ import annotations

import json

import pytest
from aws_cdk.assertions import Match, Template

from kiln.gpu_instances import GPU_INSTANCES
from kiln.settings import Settings
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


def test_gpu_group_is_nvidia_tainted_labelled_and_sized_from_config(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    gpu = settings_by_env[env].compute.gpu_nodes
    props = groups(synthesis, env)["gpu"]["Properties"]
    assert props["AmiType"] == "AL2023_x86_64_NVIDIA"
    assert props["Taints"] == [{"Effect": "NO_SCHEDULE", "Key": "nvidia.com/gpu", "Value": "true"}]
    assert props["InstanceTypes"] == gpu.instance_types
    assert props["CapacityType"] == ("SPOT" if gpu.capacity == "spot" else "ON_DEMAND")
    assert props["ScalingConfig"] == {
        "MinSize": gpu.min_size,
        "DesiredSize": gpu.desired_size,
        "MaxSize": gpu.max_size,
    }
    system = groups(synthesis, env)["system"]["Properties"]
    assert system["AmiType"] == "AL2023_x86_64_STANDARD" and system["CapacityType"] == "ON_DEMAND"
    assert system["Taints"] == []


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
    gpu_template = groups(synthesis, env)["gpu"]["Properties"]["LaunchTemplate"]["Id"]["Ref"]
    gpu_data = templates[gpu_template]["Properties"]["LaunchTemplateData"]
    volume_gib = gpu_data["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
    assert volume_gib == settings_by_env[env].compute.gpu_nodes.root_volume_gib


def test_efa_interfaces_and_placement_group_exactly_for_efa_types(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    stack = synthesis.stack(env, "compute")
    gpu_type = GPU_INSTANCES[settings_by_env[env].compute.gpu_nodes.instance_types[0]]
    group = groups(synthesis, env)["gpu"]["Properties"]
    data = stack.resources_of_type("AWS::EC2::LaunchTemplate")[
        group["LaunchTemplate"]["Id"]["Ref"]
    ]["Properties"]["LaunchTemplateData"]
    placement = stack.resources_of_type("AWS::EC2::PlacementGroup")
    if gpu_type.efa_interfaces:
        interfaces = data["NetworkInterfaces"]
        assert [
            (i["NetworkCardIndex"], i["DeviceIndex"], i["InterfaceType"]) for i in interfaces
        ] == [(c, 0 if c == 0 else 1, "efa") for c in range(gpu_type.efa_interfaces)]
        (pg_id,) = placement
        assert placement[pg_id]["Properties"]["Strategy"] == "cluster"
        assert data["Placement"] == {"GroupName": {"Ref": pg_id}}
        assert len(group["Subnets"]) == 1  # one zone: a cluster placement group cannot span
        # ... the configured efa_zone (default: the first zone), read through the import.
        settings = settings_by_env[env]
        wanted = settings.compute.gpu_nodes.efa_zone or settings.availability_zones[0]
        network = synthesis.stack(env, "network")
        (subnet,) = group["Subnets"]
        exported = {
            o["Export"]["Name"]: o["Value"]
            for o in network.template.get("Outputs", {}).values()
            if "Export" in o
        }
        subnet_id = exported[subnet["Fn::ImportValue"]]["Ref"]
        assert network.resources[subnet_id]["Properties"]["AvailabilityZone"] == wanted
    else:
        assert "NetworkInterfaces" not in data and "Placement" not in data
        assert not placement
        assert len(group["Subnets"]) == len(settings_by_env[env].availability_zones)


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
    (objects,) = stack.resources_of_type("Custom::KubernetesObjects").values()
    manifests = json.loads(objects["Properties"]["Manifests"])
    names = [m["metadata"]["name"] for m in manifests]
    assert names[:3] == ["training", "trainer", "nvidia-device-plugin"]
    (entry,) = stack.resources_of_type("AWS::EKS::AccessEntry").values()
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
