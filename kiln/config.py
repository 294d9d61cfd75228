"""Loads `config/<env>.yaml` into `Settings`, turning every mistake into one clear `ConfigError`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kiln.settings import ENV_NAME_PATTERN, DeliverySettings, Settings

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
ALL_ENVIRONMENTS = "all"


class ConfigError(Exception):
    """A configuration mistake the user must fix; its message says where and what is allowed."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


# config/<name>.yaml files that are not environments.
DELIVERY = "delivery"
PIPELINE_SELECTOR = "pipeline"
RESERVED_NAMES = frozenset({DELIVERY, PIPELINE_SELECTOR, ALL_ENVIRONMENTS})


def available_environments(config_dir: Path = CONFIG_DIR) -> list[str]:
    """The environment names that have a config file, sorted."""
    return sorted(p.stem for p in config_dir.glob("*.yaml") if p.stem not in RESERVED_NAMES)


def resolve_environments(
    selector: str, config_dir: Path = CONFIG_DIR, *, allow_all: bool = True
) -> list[str]:
    """Turns `-c env=...` into environment names: one name, or `all` for every config file.
    `allow_all=False` (the `kiln` commands, which act on one environment) leaves `all` out."""
    available = available_environments(config_dir)
    choices = ", ".join(available) or "none"
    if allow_all:
        choices += " or 'all'"
    if selector == ALL_ENVIRONMENTS and allow_all:
        if not available:
            raise ConfigError(f"{_display(config_dir)}: no environment files (*.yaml) found")
        return available
    if selector in RESERVED_NAMES:
        raise ConfigError(f"{selector!r} is not an environment; available: {choices}")
    if not re.fullmatch(ENV_NAME_PATTERN, selector):
        raise ConfigError(
            f"environment name {selector!r} is not valid: use lower-case letters, digits and "
            f"dashes, starting with a letter; available: {choices}"
        )
    if selector not in available:
        example = f"cp {_display(config_dir / (available[0] + '.yaml'))} " if available else ""
        raise ConfigError(
            f"{_display(config_dir / (selector + '.yaml'))}: no such environment; "
            f"available: {choices}"
            + (
                f". To add {selector}, copy one ({example}"
                f"{_display(config_dir / (selector + '.yaml'))}) and edit it"
                if available
                else ""
            )
        )
    return [selector]


def _read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping, or a ConfigError naming the file and the problem."""
    shown = _display(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
        what = " ".join(part for part in (err.context, err.problem) if part)
        raise ConfigError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{shown}: not valid YAML: {_one_line(str(err))}") from None
    except OSError as err:
        raise ConfigError(f"{shown}: cannot be read: {err.strerror}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{shown}: the top level must be a mapping of settings, not {type(raw).__name__}"
        )
    return raw


def load_delivery(config_dir: Path = CONFIG_DIR) -> DeliverySettings:
    """`config/delivery.yaml`: the pipeline's settings; its environments must exist."""
    path = config_dir / f"{DELIVERY}.yaml"
    if not path.exists():
        raise ConfigError(f"{_display(path)}: missing; copy the example in the README")
    try:
        delivery = DeliverySettings.model_validate(_read_mapping(path))
    except ValidationError as err:
        raise ConfigError(format_validation_error(_display(path), err, DeliverySettings)) from None
    missing = [e for e in delivery.environments if e not in available_environments(config_dir)]
    if missing:
        raise ConfigError(f"{_display(path)}: environments {missing} have no config file")
    return delivery


def load_settings(name: str, config_dir: Path = CONFIG_DIR) -> Settings:
    """Reads and validates one environment's file. Raises ConfigError naming file and field."""
    if resolve_environments(name, config_dir, allow_all=False) != [name]:
        raise ConfigError(f"load_settings takes one environment name, not {name!r}")
    path = config_dir / f"{name}.yaml"
    shown = _display(path)
    raw = _read_mapping(path)
    if "name" in raw and raw["name"] != name:
        raise ConfigError(
            f"{shown}: field 'name' is {raw['name']!r} but the file is for environment "
            f"{name!r}; remove the field (the file name is the environment name)"
        )
    try:
        return Settings.model_validate({**raw, "name": name})
    except ValidationError as err:
        raise ConfigError(format_validation_error(shown, err)) from None


# Our own error types already quote the offending value in their message.
_SELF_EXPLAINING = {
    "invariant",
    "lifecycle",
    "log_retention",
    "cidr",
    "artifact",
    "reserved",
    "broker",
    "topics",
    "capacity",
    "sizes",
    "addons",
    "principal",
    "reservation",
    "hours",
    "instance_type",
    "rollout",
}


# What each pattern of the schema (`kiln/settings.py`) means, in words: a message never shows the
# regular expression itself. A test checks that every pattern in the schema has words here.
PATTERN_WORDS: dict[str, str] = {
    r"^ml\.[a-z0-9]+\.[a-z0-9]+$": "a SageMaker instance type is written ml.<family>.<size>, "
    "e.g. ml.g5.xlarge",
    r"^[a-z]{2}(-gov)?-[a-z]+-\d$": "an AWS region is written like us-east-1 or eu-west-2 "
    "(`aws ec2 describe-regions` lists them)",
    r"^\d{12}$": 'an AWS account id is 12 digits, quoted in YAML: "123456789012"',
    r"^[a-z][a-z0-9-]{1,19}$": "use 2 to 20 lower-case letters, digits and dashes, starting "
    "with a letter",
    r"^(kafka|express)\.[a-z0-9]+\.[a-z0-9]+$": "an MSK broker type is written "
    "kafka.<family>.<size> or express.<family>.<size>, e.g. kafka.m7g.large",
    r"^1\.(2[89]|3[0-6])$": 'a Kubernetes version EKS supports, quoted: "1.28" to "1.36"',
    r"^[^@\s]+@[^@\s]+\.[^@\s]+$": "an e-mail address, e.g. oncall@example.com",
    r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$": "a Kubernetes name: up to 63 lower-case letters, "
    "digits and dashes, starting and ending with a letter or digit",
    r"^[a-z0-9]+\.[a-z0-9]+$": "an EC2 instance type is written <family>.<size>, "
    "e.g. m7i.large (no ml. prefix)",
    r"^[a-zA-Z0-9._-]{1,249}$": "a Kafka topic name: letters, digits, '.', '_' and '-', up to "
    "249 characters",
    r"^[a-z][a-z0-9_]{0,126}$": "lower-case letters, digits and '_', starting with a letter, up "
    "to 127 characters",
    r"^[a-z][a-z0-9_]{0,63}$": "lower-case letters, digits and '_', starting with a letter, up "
    "to 64 characters",
    r"^\d+\.\d+\.(\d+|x)(\.kraft)?$": "a Kafka version MSK offers, e.g. 3.9.x or 3.6.0 "
    "(`aws kafka list-kafka-versions`)",
    r"^v\d+\.\d+\.\d+$": "a release tag like v0.17.0",
    r"^\d+\.\d+\.\d+$": "a release version like 1.14.1 (no leading v)",
    r"^v\d{8}$": "an EKS AMI release like v20251110 (the amazon-eks-ami release tag)",
    r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$": "a team name: up to 40 lower-case letters, digits "
    "and dashes, starting and ending with a letter or digit",
    r"^cr-[0-9a-f]{8,17}$": "a capacity reservation id like cr-0123456789abcdef0",
    r"^[a-z0-9](-?[a-z0-9]){0,39}$": "a model name: up to 40 lower-case letters and digits, "
    "single dashes between them",
    r"^o-[a-z0-9]{10,32}$": "an AWS Organization id like o-a1b2c3d4e5",
    r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$": "an inference specification's name: up to 63 "
    "letters and digits, dashes between them (kiln names them by engine: lmi, kiln)",
    r"^\d+\.\d+(\.\d+)?$": "an MLflow version like 3.0 or 2.16.2",
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun):([01]\d|2[0-3]):[0-5]\d$": "a weekly time like Sun:03:00 "
    "(day, then 24-hour UTC time)",
    r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$": "owner/repository, e.g. my-org/kiln",
    (  # the delivery pipeline's connection_arn
        r"^arn:aws[a-z-]*:(codeconnections|codestar-connections):[a-z0-9-]+:\d{12}"
        r":connection/[\w-]+$"
    ): (
        "a CodeConnections connection ARN, "
        "arn:aws:codeconnections:<region>:<account>:connection/<id> "
        "(`aws codeconnections list-connections`)"
    ),
}


def _in_words(problem: Any) -> str:
    """Pydantic's message for a problem, with a pattern mismatch said in words."""
    if problem["type"] == "string_pattern_mismatch":
        pattern = str(problem.get("ctx", {}).get("pattern", ""))
        words = PATTERN_WORDS.get(pattern, "see the field's row in the README's table")
        return f"{problem['input']!r} is not valid: {words}"
    return f"{problem['msg']} (got {problem['input']!r})"


def read_approved_models(path: Path) -> dict[str, dict[str, str]]:
    """The file `kiln models resolve` writes for the delivery pipeline: per environment, the
    latest version approved for it, `{env: {"model_package": arn, "model_artifact": uri}}`,
    with `"inference_specification": name` where the environment's engine serves from an
    additional specification."""
    import json

    shown = _display(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{shown}: cannot be read: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{shown}: not valid JSON: {err}") from None
    ok = isinstance(data, dict) and all(
        isinstance(v, dict) and {"model_package", "model_artifact"} <= set(v) for v in data.values()
    )
    if not ok:
        raise ConfigError(
            f"{shown}: expected {{env: {{model_package, model_artifact}}}} as `kiln models "
            "resolve` writes it"
        )
    return {str(k): {str(a): str(b) for a, b in v.items()} for k, v in data.items()}


def format_validation_error(
    source: str, err: ValidationError, model: type[BaseModel] = Settings
) -> str:
    """One paragraph: the file, then each problem as `field: what is wrong (got ...)`."""
    lines = [f"{source}: invalid configuration:"]
    for problem in err.errors(include_url=False):
        location = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            allowed = _fields_at(model, problem["loc"][:-1])
            message = f"unknown field; allowed here: {', '.join(allowed)}"
        elif problem["type"] == "missing":
            message = "required field is missing"
        elif problem["type"] not in _SELF_EXPLAINING:
            message = _in_words(problem)
        lines.append(f"  - {location}: {message}" if location else f"  - {message}")
    return "\n".join(lines)


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the nested model found by following `loc` from `model`."""
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return [name for name in model.model_fields if name != "name" or model is not Settings]


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def with_model_artifact(
    settings: Settings,
    artifact: str,
    source: str = "-c modelArtifact",
    package: str | None = None,
    specification: str | None = None,
) -> Settings:
    """`settings` serving `artifact` (of registry version `package`, from its inference
    specification `specification`, when given) instead of the configured model (validated the
    same way): a model.tar.gz, or an uncompressed model directory's S3 prefix (ending in /)."""
    return _with_serving(
        settings,
        source,
        model_artifact=artifact,
        model_package=package,
        inference_specification=specification,
    )


def with_serving_engine(
    settings: Settings, engine: str, source: str = "-c servingEngine"
) -> Settings:
    """`settings` with `serving.engine` set to `engine` (`kiln` or `lmi`), validated alike."""
    return _with_serving(settings, source, engine=engine)


def _with_serving(settings: Settings, source: str, **changes: Any) -> Settings:
    data = settings.model_dump()
    data["serving"].update(changes)
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None
