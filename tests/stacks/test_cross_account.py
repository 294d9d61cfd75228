"""Registry across accounts: dev (the registry's home) in one account, staging and prod in
others. The home shares its model data (bucket `models/`, lake key through S3), its image
repository and CreateModel on its versions with their accounts; their endpoints' roles read
the home's bucket, key and image. With every environment in one account (the shipped
configs) none of it exists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from cfnlint.api import ManualArgs, lint

from app import build_app
from kiln.config import load_settings, with_model_artifact, with_serving_engine
from kiln_policy.assembly import SynthesizedStack, read_assembly
from kiln_policy.guardrails import RULES, check
from tests.support import ENVIRONMENTS, Synthesis

HOME, STAGING, PROD = "111111111111", "222222222222", "333333333333"
ARTIFACT = f"s3://kiln-dev-artifacts-{HOME}-us-east-1/models/job-7/output/model.tar.gz"
PACKAGE = f"arn:aws:sagemaker:us-east-1:{HOME}:model-package/kiln-llm/7"


def _edit(path: Path, **changes: Any) -> None:
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped configs with an account each; dev's registry lists the other two."""
    config = tmp_path_factory.mktemp("accounts")
    for file in Path("config").glob("*.yaml"):
        shutil.copy(file, config / file.name)
    _edit(config / "dev.yaml", account=HOME, registry={"reader_accounts": [STAGING, PROD]})
    _edit(config / "staging.yaml", account=STAGING, registry={"account": HOME})
    _edit(config / "prod.yaml", account=PROD, registry={"account": HOME})
    return config


def _synth(
    tmp_path_factory: pytest.TempPathFactory, context: dict[str, str]
) -> tuple[dict[str, SynthesizedStack], Path]:
    out = tmp_path_factory.mktemp("xacct")
    # With the policy gates: an unacknowledged cdk-nag finding fails this synth.
    build_app(context, outdir=str(out)).synth()
    return {s.stack_name: s for s in read_assembly(out)}, out


@pytest.fixture(scope="module")
def synthesized_home(
    config: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, SynthesizedStack], Path]:
    return _synth(tmp_path_factory, {"env": "dev", "configDir": str(config)})


@pytest.fixture(scope="module")
def home(
    synthesized_home: tuple[dict[str, SynthesizedStack], Path],
) -> dict[str, SynthesizedStack]:
    return synthesized_home[0]


@pytest.fixture(scope="module")
def reader_models(
    config: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, SynthesizedStack]:
    """prod's stacks as configured (no model yet)."""
    return _synth(tmp_path_factory, {"env": "prod", "configDir": str(config)})[0]


def test_a_readers_registry_policy_decrypts_records_with_the_homes_key_through_sagemaker(
    config: Path, reader_models: dict[str, SynthesizedStack]
) -> None:
    """DescribeModelPackage of a version encrypted with the home's registry key: the home's
    key policy admits this account through SageMaker, and across accounts the caller's own
    policy must allow it as well."""
    models = reader_models["kiln-prod-models"]
    (policy,) = models.resources_of_type("AWS::IAM::ManagedPolicy").values()
    statements = _statements(policy["Properties"]["PolicyDocument"])
    key = statements["HomeRegistryKeyThroughSageMaker"]
    assert key["Action"] == ["kms:Decrypt", "kms:DescribeKey"]
    assert f":{HOME}:key/*" in json.dumps(key["Resource"])
    assert key["Condition"] == {
        "StringEquals": {"kms:ViaService": "sagemaker.us-east-1.amazonaws.com"}
    }
    prod = load_settings("prod", config)
    for stack in reader_models.values():
        assert [str(v) for v in check(stack, prod)] == [], stack.stack_name
    # Without kms:ViaService it would open every use of the home's keys: refused.
    loose = json.loads(json.dumps(policy))
    for statement in loose["Properties"]["PolicyDocument"]["Statement"]:
        statement.pop("Condition", None)
    probe = SynthesizedStack("prod", "p", "kiln-prod-probe", {"Resources": {"P": loose}}, False, {})
    assert [v.message for v in check(probe, prod, [RULES["home-key-use-scoped"]])] == [
        "HomeRegistryKeyThroughSageMaker uses the home's keys without kms:ViaService",
        "HomeRegistryKeyThroughSageMaker uses the home's keys without "
        "kms:EncryptionContext:aws:s3:arn",
    ]


@pytest.fixture(scope="module", params=["kiln", "lmi"])
def reader(
    request: pytest.FixtureRequest, config: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, SynthesizedStack]:
    """prod serving a version of dev's registry with each engine (as deploy-model passes it)."""
    context = {
        "env": "prod",
        "configDir": str(config),
        "modelArtifact": ARTIFACT,
        "modelPackage": PACKAGE,
        "servingEngine": request.param,
    }
    if request.param == "lmi":
        context["inferenceSpecification"] = "lmi"
    return request.param, _synth(tmp_path_factory, context)[0]["kiln-prod-serving"]


def _statements(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s.get("Sid", ""): s for s in document["Statement"]}


def _principals(statement: dict[str, Any]) -> str:
    return json.dumps(statement["Principal"])


def test_the_homes_bucket_shares_models_read_only_over_tls(
    home: dict[str, SynthesizedStack],
) -> None:
    lake = home["kiln-dev-data-lake"]
    policies = [
        p
        for p in lake.resources_of_type("AWS::S3::BucketPolicy").values()
        if "OtherEnvironmentsReadModels" in json.dumps(p)
    ]
    (policy,) = policies
    assert "Artifacts" in json.dumps(policy["Properties"]["Bucket"])
    statements = _statements(policy["Properties"]["PolicyDocument"])
    read, listing = (
        statements["OtherEnvironmentsReadModels"],
        statements["OtherEnvironmentsListModels"],
    )
    assert read["Action"] == "s3:GetObject" and listing["Action"] == "s3:ListBucket"
    assert json.dumps(read["Resource"]).endswith('/models/*"]]}')
    assert listing["Condition"]["StringLike"] == {"s3:prefix": ["models/*"]}
    for statement in (read, listing):
        assert STAGING in _principals(statement) and PROD in _principals(statement)
        assert statement["Condition"]["Bool"] == {"aws:SecureTransport": "true"}
        roles = json.dumps(statement["Condition"]["ArnLike"]["aws:PrincipalArn"])
        assert f":iam::{STAGING}:role/kiln-*" in roles and f":iam::{PROD}:role/kiln-*" in roles
    # The bucket's own deny of plain HTTP stays beside it.
    assert any(
        s.get("Effect") == "Deny" and "aws:SecureTransport" in json.dumps(s)
        for s in policy["Properties"]["PolicyDocument"]["Statement"]
    )


def test_the_homes_lake_key_decrypts_for_them_only_through_s3_for_the_artifacts_bucket(
    home: dict[str, SynthesizedStack],
) -> None:
    lake = home["kiln-dev-data-lake"]
    (key,) = lake.resources_of_type("AWS::KMS::Key").values()
    statement = _statements(key["Properties"]["KeyPolicy"])[
        "OtherEnvironmentsDecryptModelsThroughS3"
    ]
    assert statement["Action"] == ["kms:Decrypt", "kms:DescribeKey"]
    equals = statement["Condition"]["StringEquals"]
    assert equals["kms:ViaService"] == "s3.us-east-1.amazonaws.com"
    # S3 Bucket Keys: the encryption context is the bucket's ARN, so only that bucket.
    assert json.dumps(equals["kms:EncryptionContext:aws:s3:arn"]).endswith(
        ':s3:::kiln-dev-artifacts-", {"Ref": "AWS::AccountId"}, "-", {"Ref": "AWS::Region"}]]}'
    )


def test_the_home_shares_its_image_repository_and_publishes_kilns_image_there(
    synthesized_home: tuple[dict[str, SynthesizedStack], Path],
) -> None:
    home, out = synthesized_home
    models = home["kiln-dev-models"]
    (repository,) = models.resources_of_type("AWS::ECR::Repository").values()
    props = repository["Properties"]
    assert props["RepositoryName"] == "kiln-model-images"
    assert props["ImageTagMutability"] == "IMMUTABLE"
    assert props["ImageScanningConfiguration"] == {"ScanOnPush": True}
    assert repository["DeletionPolicy"] == "Retain"
    statements = _statements(props["RepositoryPolicyText"])
    pull = statements["OtherEnvironmentsPull"]
    assert sorted(pull["Action"]) == [
        "ecr:BatchCheckLayerAvailability",
        "ecr:BatchGetImage",
        "ecr:GetDownloadUrlForLayer",
    ]
    assert pull["Condition"]["Bool"] == {"aws:SecureTransport": "true"}
    push = statements["CdkImagePublishing"]
    assert "image-publishing-role" in json.dumps(push["Principal"])
    assert STAGING not in _principals(push) and PROD not in _principals(push)
    # The serving stack's image asset goes to that repository, after the models stack exists.
    serving = home["kiln-dev-serving"]
    assets = json.loads((out / "assembly-dev" / f"{serving.artifact_id}.assets.json").read_text())[
        "dockerImages"
    ]
    (image,) = assets.values()
    (destination,) = image["destinations"].values()
    assert destination["repositoryName"] == "kiln-model-images"
    manifest = json.loads((out / "assembly-dev" / "manifest.json").read_text())
    models_id = home["kiln-dev-models"].artifact_id
    assert models_id in manifest["artifacts"][serving.artifact_id]["dependencies"]


def test_other_accounts_may_create_models_from_versions_but_not_approve(
    home: dict[str, SynthesizedStack],
) -> None:
    (group,) = (
        home["kiln-dev-models"].resources_of_type("AWS::SageMaker::ModelPackageGroup").values()
    )
    statements = _statements(group["Properties"]["ModelPackageGroupPolicy"])
    create = statements["OtherEnvironmentsCreateModels"]
    assert create["Action"] == "sagemaker:CreateModel"
    assert json.dumps(create["Resource"]).count("model-package/kiln-llm/*") == 1
    assert "model-package-group/" not in json.dumps(create["Resource"])
    actions = json.dumps([s["Action"] for s in statements.values()])
    assert "UpdateModelPackage" not in actions and "CreateModelPackage" not in actions


def test_a_readers_role_reads_the_homes_key_through_s3_and_pulls_kilns_image_there(
    reader: tuple[str, SynthesizedStack],
) -> None:
    engine, stack = reader
    (policy,) = [
        p
        for p in stack.resources_of_type("AWS::IAM::ManagedPolicy").values()
        if "HomeLakeKeyThroughS3" in json.dumps(p)
    ]
    statements = _statements(policy["Properties"]["PolicyDocument"])
    key = statements["HomeLakeKeyThroughS3"]
    assert key["Action"] == "kms:Decrypt"
    assert f":{HOME}:key/*" in json.dumps(key["Resource"])
    equals = key["Condition"]["StringEquals"]
    assert json.dumps(equals["kms:EncryptionContext:aws:s3:arn"]).endswith(
        f':s3:::kiln-dev-artifacts-{HOME}-us-east-1"]]}}'
    )
    # The artifact's object itself, in the home's bucket.
    assert f"kiln-dev-artifacts-{HOME}-us-east-1/models/job-7/output/model.tar.gz" in json.dumps(
        policy["Properties"]["PolicyDocument"]["Statement"]
    )
    if engine == "kiln":
        pull = statements["HomeImageRepository"]
        assert ":ecr:" in json.dumps(pull["Resource"])
        assert f":{HOME}:repository/kiln-model-images" in json.dumps(pull["Resource"])
    else:
        # LMI's image is AWS's, which every account may pull.
        assert "HomeImageRepository" not in statements
    (model,) = stack.resources_of_type("AWS::SageMaker::Model").values()
    container = model["Properties"]["PrimaryContainer"]
    assert container["ModelPackageName"] == PACKAGE
    assert container.get("InferenceSpecificationName") == ("lmi" if engine == "lmi" else None)


def test_guardrails_and_cfn_lint_pass_across_accounts(
    config: Path, home: dict[str, SynthesizedStack], reader: tuple[str, SynthesizedStack]
) -> None:
    engine, serving = reader
    dev = load_settings("dev", config)
    prod = with_model_artifact(
        with_serving_engine(load_settings("prod", config), engine),
        ARTIFACT,
        "-c modelArtifact",
        PACKAGE,
        "lmi" if engine == "lmi" else None,
    )
    judged = [(s, dev) for s in home.values()] + [(serving, prod)]
    for stack, settings in judged:
        assert [str(v) for v in check(stack, settings)] == [], stack.stack_name
        matches = lint(json.dumps(stack.template), config=ManualArgs(regions=["us-east-1"]))
        assert not [str(m) for m in matches if m.rule.id.startswith("E")], stack.stack_name


def _with_statement(resource: dict[str, Any], where: str, change: Any) -> dict[str, Any]:
    changed = json.loads(json.dumps(resource))
    for statement in changed["Properties"][where]["Statement"]:
        if statement.get("Sid", "").startswith("OtherEnvironments"):
            change(statement)
    return changed


def test_cross_account_grants_read_only_refuses_writes_whole_accounts_and_plain_http(
    home: dict[str, SynthesizedStack],
) -> None:
    """The guardrail's non-compliant cases, made from the compliant templates above."""
    dev = load_settings("dev")
    dev = dev.model_copy(
        update={"registry": dev.registry.model_copy(update={"reader_accounts": [STAGING, PROD]})}
    )
    rule = [RULES["cross-account-grants-read-only"]]
    models = home["kiln-dev-models"]
    ((name, repository),) = models.resources_of_type("AWS::ECR::Repository").items()

    def probe(resource_name: str, resource: dict[str, Any]) -> list[str]:
        template = {"Resources": {resource_name: resource}}
        stack = SynthesizedStack("dev", "p", "kiln-dev-probe", template, False, {})
        return [v.message for v in check(stack, dev, rule)]

    assert probe(name, repository) == []
    writes = _with_statement(
        repository, "RepositoryPolicyText", lambda s: s.update(Action=["ecr:PutImage"])
    )
    assert probe(name, writes) == ["OtherEnvironmentsPull grants other accounts ecr:PutImage"]
    http = _with_statement(repository, "RepositoryPolicyText", lambda s: s["Condition"].pop("Bool"))
    assert probe(name, http) == ["OtherEnvironmentsPull does not require TLS (aws:SecureTransport)"]
    accounts = _with_statement(
        repository, "RepositoryPolicyText", lambda s: s["Condition"].pop("ArnLike")
    )
    assert probe(name, accounts) == [
        "OtherEnvironmentsPull names whole accounts: limit it to roles (aws:PrincipalArn)"
    ]
    lake = home["kiln-dev-data-lake"]
    ((key_name, key),) = lake.resources_of_type("AWS::KMS::Key").items()
    assert probe(key_name, key) == []
    direct = _with_statement(
        key, "KeyPolicy", lambda s: s["Condition"]["StringEquals"].pop("kms:ViaService")
    )
    assert probe(key_name, direct) == [
        "OtherEnvironmentsDecryptModelsThroughS3 lets other accounts use the key directly, "
        "not only through S3"
    ]
    ((policy_name, policy),) = [
        item
        for item in lake.resources_of_type("AWS::S3::BucketPolicy").items()
        if "OtherEnvironmentsReadModels" in json.dumps(item[1])
    ]
    assert probe(policy_name, policy) == []

    def whole_bucket(statement: dict[str, Any]) -> None:
        if statement["Sid"] == "OtherEnvironmentsReadModels":
            statement["Resource"] = json.loads(
                json.dumps(statement["Resource"]).replace("/models/*", "/*")
            )
        else:
            statement["Condition"]["StringLike"]["s3:prefix"] = ["*"]

    problems = probe(policy_name, _with_statement(policy, "PolicyDocument", whole_bucket))
    assert len(problems) == 2
    assert problems[0].startswith("OtherEnvironmentsReadModels opens objects outside models/")
    assert (
        problems[1]
        == "OtherEnvironmentsListModels lists the bucket beyond models/ (s3:prefix ['*'])"
    )


def test_home_key_use_scoped_refuses_the_homes_keys_without_s3_and_bucket_conditions(
    config: Path, reader: tuple[str, SynthesizedStack]
) -> None:
    _, serving = reader
    prod = load_settings("prod", config)
    rule = [RULES["home-key-use-scoped"]]
    ((name, policy),) = [
        item
        for item in serving.resources_of_type("AWS::IAM::ManagedPolicy").items()
        if "HomeLakeKeyThroughS3" in json.dumps(item[1])
    ]

    def probe(resource: dict[str, Any]) -> list[str]:
        stack = SynthesizedStack(
            "prod", "p", "kiln-prod-probe", {"Resources": {name: resource}}, False, {}
        )
        return [v.message for v in check(stack, prod, rule)]

    assert probe(policy) == []
    loose = json.loads(json.dumps(policy))
    for statement in loose["Properties"]["PolicyDocument"]["Statement"]:
        if statement.get("Sid") == "HomeLakeKeyThroughS3":
            del statement["Condition"]
    assert probe(loose) == [
        "HomeLakeKeyThroughS3 uses the home's keys without kms:ViaService",
        "HomeLakeKeyThroughS3 uses the home's keys without kms:EncryptionContext:aws:s3:arn",
    ]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_nothing_is_shared_when_every_environment_is_in_one_account(
    synthesis: Synthesis, env: str
) -> None:
    """The shipped configs put every environment in one account: no cross-account statement,
    no model image repository, the image stays in the bootstrap's repository."""
    text = json.dumps(
        [synthesis.stack(env, c).template for c in ("data-lake", "models", "serving")]
    )
    for marker in (
        "OtherEnvironmentsReadModels",
        "OtherEnvironmentsDecryptModelsThroughS3",
        "OtherEnvironmentsCreateModels",
        "kiln-model-images",
        "HomeLakeKeyThroughS3",
        "HomeImageRepository",
        "HomeRegistryKeyThroughSageMaker",
    ):
        assert marker not in text, marker
    assets = json.loads(
        (
            synthesis.outdir
            / f"assembly-{env}"
            / f"{synthesis.stack(env, 'serving').artifact_id}.assets.json"
        ).read_text()
    )["dockerImages"]
    (image,) = assets.values()
    (destination,) = image["destinations"].values()
    assert (
        destination["repositoryName"]
        == "cdk-hnb659fds-container-assets-${AWS::AccountId}-us-east-1"
    )
