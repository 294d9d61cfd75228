"""The `kiln` command-line tool. Today: `kiln envs`; the operating commands build on it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln import training_job
from kiln.config import CONFIG_DIR, ConfigError, available_environments, load_settings
from kiln.settings import Settings, Tier

TIER_ORDER: tuple[Tier, ...] = ("dev", "staging", "prod")


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for index, item in enumerate(value):
                flat.update(flatten(item, f"{prefix}{key}[{index}]."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(settings: Sequence[Settings]) -> list[tuple[str, list[Any]]]:
    """The dotted fields whose values are not the same in every environment, in schema order."""
    flats = [flatten(s.model_dump(exclude={"name"})) for s in settings]
    return [
        (key, [flat.get(key) for flat in flats])
        for key in flats[0]
        if len({repr(flat.get(key)) for flat in flats}) > 1
    ]


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def cmd_envs(args: argparse.Namespace) -> int:
    """Validates every environment file, lists them, and prints where they differ."""
    config_dir = Path(args.config_dir)
    names = available_environments(config_dir)
    if not names:
        print(f"kiln: no environment files (*.yaml) in {config_dir}", file=sys.stderr)
        return 1
    loaded: list[Settings] = []  # shown in tier order: dev, staging, prod
    failures = 0
    for name in names:
        try:
            loaded.append(load_settings(name, config_dir))
        except ConfigError as err:
            failures += 1
            print(f"INVALID {err}", file=sys.stderr)
    loaded.sort(key=lambda s: (TIER_ORDER.index(s.tier), s.name))
    if loaded:
        print(f"{'environment':<14}{'tier':<9}{'region':<16}{'account':<15}zones")
        for s in loaded:
            print(
                f"{s.name:<14}{s.tier:<9}{s.region:<16}{s.account or '(current)':<15}"
                f"{len(s.availability_zones)}"
            )
    if len(loaded) > 1:
        rows = differences(loaded)
        table = [["differs", *(s.name for s in loaded)]]
        table += [[key, *(_show(v) for v in values)] for key, values in rows]
        widths = [max(len(row[i]) for row in table) + 2 for i in range(len(table[0]))]
        print()
        for row in table:
            print("".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if failures:
        print(f"\n{failures} of {len(names)} environment files are invalid", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Operate the kiln ML platform.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    envs = commands.add_parser(
        "envs", help="list environments, validate every config file, show their differences"
    )
    envs.add_argument("--config-dir", default=str(CONFIG_DIR), help="default: %(default)s")
    envs.set_defaults(handler=cmd_envs)
    job = commands.add_parser(
        "training-job", help="render a multi-node torchrun training run as Kubernetes YAML"
    )
    training_job.add_arguments(job)
    job.set_defaults(handler=training_job.render_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = args.handler
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())
