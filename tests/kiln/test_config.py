"""Loading config files: the shipped ones are valid, and every mistake becomes one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kiln.config import (
    CONFIG_DIR,
    ConfigError,
    available_environments,
    load_settings,
    resolve_environments,
)
from kiln.settings import Settings
from tests.support import REPO, minimal_settings

# A valid file: every required field, in YAML (the name comes from the file name).
GOOD = yaml.safe_dump(
    {
        k: v
        for k, v in minimal_settings(
            tier="dev", termination_protection=False, removal_policy="destroy"
        ).items()
        if k != "name"
    },
    sort_keys=False,
)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "sandbox.yaml").write_text(GOOD)
    return tmp_path


def write(config_dir: Path, text: str, name: str = "broken") -> str:
    (config_dir / f"{name}.yaml").write_text(text)
    return name


def load_error(config_dir: Path, name: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(name, config_dir)
    return str(caught.value)


def test_shipped_environments_are_valid() -> None:
    assert available_environments() == ["dev", "prod", "staging"]
    tiers = {name: load_settings(name).tier for name in available_environments()}
    assert tiers == {"dev": "dev", "staging": "staging", "prod": "prod"}


def test_prod_config_keeps_prod_invariants() -> None:
    prod = load_settings("prod")
    assert prod.termination_protection and prod.removal_policy == "retain"


def test_name_comes_from_the_file(config_dir: Path) -> None:
    assert load_settings("sandbox", config_dir).name == "sandbox"


def test_resolve_all_and_one(config_dir: Path) -> None:
    write(config_dir, GOOD, "second")
    assert resolve_environments("all", config_dir) == ["sandbox", "second"]
    assert resolve_environments("second", config_dir) == ["second"]


def test_unknown_environment_lists_the_available_ones(config_dir: Path) -> None:
    message = load_error(config_dir, "qa")
    assert "qa.yaml: no such environment" in message
    # One environment is what a command acts on: `all` means nothing there.
    assert "available: sandbox." in message and "'all'" not in message
    assert "sandbox.yaml" in message and "and edit it" in message
    with pytest.raises(ConfigError, match=r"available: sandbox or 'all'"):
        resolve_environments("qa", config_dir)  # -c env=... of the CDK app takes `all`
    with pytest.raises(ConfigError, match=r"'all' is not an environment; available: sandbox$"):
        load_settings("all", config_dir)


@pytest.mark.parametrize("name", ["Prod", "../dev", "x", "a b"])
def test_invalid_environment_names(config_dir: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="is not valid"):
        resolve_environments(name, config_dir)


def test_all_is_not_a_single_environment(config_dir: Path) -> None:
    assert "'all' is not an environment" in load_error(config_dir, "all")


def test_empty_config_dir() -> None:
    with pytest.raises(ConfigError, match="no environment files"):
        resolve_environments("all", CONFIG_DIR / "does-not-exist")


def test_yaml_syntax_error_names_file_line_and_column(config_dir: Path) -> None:
    message = load_error(config_dir, write(config_dir, "tier: dev\nowner: [unclosed\n"))
    assert "broken.yaml:3:1: not valid YAML" in message


def test_duplicate_keys_are_rejected(config_dir: Path) -> None:
    message = load_error(config_dir, write(config_dir, GOOD + "tier: prod\n"))
    assert "duplicate key 'tier'" in message and "broken.yaml:" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(config_dir: Path, text: str) -> None:
    assert "top level must be a mapping" in load_error(config_dir, write(config_dir, text))


def test_empty_file_reports_required_fields(config_dir: Path) -> None:
    message = load_error(config_dir, write(config_dir, ""))
    assert "broken.yaml: invalid configuration:" in message
    assert "  - region: required field is missing" in message


def test_every_problem_is_one_line_naming_the_field(config_dir: Path) -> None:
    text = (
        GOOD.replace("removal_policy: destroy", "removal_policy: nuke").replace(
            "nat_gateways: 2", "nat_gateways: 2\n  nat_gatways: 2"
        )
        + "log_retention: 3\n"
    )
    lines = load_error(config_dir, write(config_dir, text)).splitlines()
    assert lines[0].endswith("broken.yaml: invalid configuration:")
    assert "  - removal_policy: Input should be 'retain' or 'destroy' (got 'nuke')" in lines
    assert any(
        line.startswith("  - network.nat_gatways: unknown field; allowed here: vpc_cidr,")
        for line in lines
    )
    assert any(
        line.startswith("  - log_retention: unknown field; allowed here: tier, project, owner")
        for line in lines
    )


def test_invariant_errors_read_as_fields(config_dir: Path) -> None:
    text = GOOD.replace("tier: dev", "tier: prod")
    message = load_error(config_dir, write(config_dir, text))
    assert "  - termination_protection: must be true in a prod-tier environment" in message
    assert "  - removal_policy: 'destroy' is not allowed in a prod-tier environment" in message


def test_name_field_must_match_the_file(config_dir: Path) -> None:
    message = load_error(config_dir, write(config_dir, GOOD + "name: other\n"))
    assert "field 'name' is 'other'" in message


def test_unreadable_file_is_a_config_error(config_dir: Path) -> None:
    (config_dir / "folder.yaml").mkdir()
    assert "cannot be read" in load_error(config_dir, "folder")


def test_with_model_artifact_overrides_and_validates() -> None:
    from kiln.config import with_model_artifact

    dev = load_settings("dev")
    uri = "s3://kiln-dev-artifacts-123456789012-us-east-1/models/v7/model.tar.gz"
    assert with_model_artifact(dev, uri).serving.model_artifact == uri
    assert dev.serving.model_artifact is None  # the original is untouched (frozen)
    prefix = uri.removesuffix(".tar.gz") + "/"  # an uncompressed model directory
    assert with_model_artifact(dev, prefix).serving.model_artifact == prefix
    with pytest.raises(ConfigError, match=r"is neither a \.tar\.gz archive nor a prefix; allowed"):
        with_model_artifact(dev, "s3://bucket/model")


def _schema_patterns() -> set[str]:
    import json
    import re

    from kiln.settings import DeliverySettings, Settings

    found: set[str] = set()
    for model in (Settings, DeliverySettings):
        text = json.dumps(model.model_json_schema())
        found |= {json.loads(f'"{p}"') for p in re.findall(r'"pattern": "((?:[^"\\]|\\.)*)"', text)}
    return found


def test_every_pattern_of_the_schema_is_said_in_words() -> None:
    from kiln.config import PATTERN_WORDS

    assert _schema_patterns() <= set(PATTERN_WORDS)


def test_every_custom_error_of_the_schema_names_its_input_once() -> None:
    """A check of ours writes the value into its message; `(got ...)` after it would say it
    twice, or print a whole section for a check over several fields."""
    import re

    from kiln.config import _SELF_EXPLAINING

    source = (REPO / "kiln" / "settings.py").read_text()
    assert set(re.findall(r'PydanticCustomError\(\s*"([a-z_]+)"', source)) <= _SELF_EXPLAINING


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        ("region: eu-west-1", "region: eu-west-one", "an AWS region is written like us-east-1"),
        (
            "instance_type: ml.g5.xlarge",
            "instance_type: ml.banana.huge",
            "serving.instance_type: 'ml.banana.huge' is not a SageMaker instance type kiln serves "
            "on; allowed families: ml.g4dn",
        ),
        ("instance_type: ml.g5.xlarge", "instance_type: ml_g5_xlarge", "ml.<family>.<size>"),
        (
            "- eu-west-1c",
            "- us-east-1c",
            "(eu-west-1a, eu-west-1b, eu-west-1c); `aws ec2 describe-availability-zones",
        ),
    ],
)
def test_mistakes_are_said_in_words_not_patterns(
    config_dir: Path, old: str, new: str, words: str
) -> None:
    source = (config_dir / "sandbox.yaml").read_text()
    assert old in source
    write(config_dir, source.replace(old, new), "qa")
    message = load_error(config_dir, "qa")
    assert words in message, message
    assert "should match pattern" not in message and "^" not in message, message
    assert message.count(new.split(" ", 1)[1]) == 1, message  # once, not again as "(got ...)"


def test_with_serving_engine_overrides_and_validates() -> None:
    from kiln.config import with_serving_engine

    prod = load_settings("prod")
    assert prod.serving.engine == "kiln"  # kiln's engine is the default
    assert with_serving_engine(prod, "lmi").serving.engine == "lmi"
    with pytest.raises(ConfigError, match="-c servingEngine: invalid configuration"):
        with_serving_engine(prod, "triton")


def test_a_packages_specification_is_the_engines_and_needs_the_package() -> None:
    """`-c inferenceSpecification` names one of a version's additional specifications, named
    by its engine: it needs the version, and it must be this environment's engine."""
    from kiln.config import with_model_artifact, with_serving_engine

    artifact = "s3://kiln-prod-artifacts-123456789012-us-east-1/models/v7/model/"
    package = "arn:aws:sagemaker:us-east-1:123456789012:model-package/kiln-llm/7"
    prod = with_serving_engine(load_settings("prod"), "lmi")
    served = with_model_artifact(prod, artifact, "-c modelArtifact", package, "lmi")
    assert served.serving.inference_specification == "lmi"
    with pytest.raises(ConfigError, match="no model_package is set"):
        with_model_artifact(prod, artifact, "-c modelArtifact", None, "lmi")
    with pytest.raises(ConfigError, match="is not this environment's engine"):
        with_model_artifact(load_settings("prod"), artifact, "-c modelArtifact", package, "lmi")
    with pytest.raises(ConfigError, match="inference_specification"):
        with_model_artifact(prod, artifact, "-c modelArtifact", package, "-lmi")


def test_a_registry_in_another_account_is_another_account() -> None:
    """`registry.account` is what turns on the cross-account grants: it must differ from the
    environment's own account, and a version deployed must come from it."""
    prod = load_settings("prod").model_dump()
    prod.update(account="333333333333")
    prod["registry"]["account"] = "333333333333"
    with pytest.raises(ValidationError, match="is this environment's own account"):
        Settings.model_validate(prod)
    prod["registry"]["account"] = "111111111111"
    prod["serving"]["model_artifact"] = "s3://kiln-dev-artifacts-1-us-east-1/models/v7/model/"
    prod["serving"]["model_package"] = (
        "arn:aws:sagemaker:us-east-1:222222222222:model-package/kiln-llm/7"
    )
    with pytest.raises(ValidationError, match="is not in the registry's account"):
        Settings.model_validate(prod)
    prod["serving"]["model_package"] = (
        "arn:aws:sagemaker:us-east-1:111111111111:model-package/kiln-llm/7"
    )
    assert Settings.model_validate(prod).registry.account == "111111111111"
