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


def resolve_environments(selector: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """Turns `-c env=...` into environment names: one name, or `all` for every config file."""
    available = available_environments(config_dir)
    if selector == ALL_ENVIRONMENTS:
        if not available:
            raise ConfigError(f"{_display(config_dir)}: no environment files (*.yaml) found")
        return available
    if selector in RESERVED_NAMES:
        raise ConfigError(
            f"{selector!r} is not an environment; available: {', '.join(available)} or 'all'"
        )
    if not re.fullmatch(ENV_NAME_PATTERN, selector):
        raise ConfigError(
            f"environment name {selector!r} is not valid: use lower-case letters, digits and "
            f"dashes, starting with a letter; available: {', '.join(available)} or 'all'"
        )
    if selector not in available:
        raise ConfigError(
            f"{_display(config_dir / (selector + '.yaml'))}: no such environment; "
            f"available: {', '.join(available) or 'none'} or 'all' "
            "(add an environment by copying one of their files)"
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
    if resolve_environments(name, config_dir) != [name]:
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
    "hours",
}


def read_approved_models(path: Path) -> dict[str, dict[str, str]]:
    """The file `kiln models resolve` writes for the delivery pipeline: per environment, the
    latest version approved for it, `{env: {"model_package": arn, "model_artifact": uri}}`."""
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
            message = f"{message} (got {problem['input']!r})"
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
) -> Settings:
    """`settings` serving `artifact` (of registry version `package`, when given) instead of
    the configured model (validated the same way)."""
    data = settings.model_dump()
    data["serving"]["model_artifact"] = artifact
    data["serving"]["model_package"] = package
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None
