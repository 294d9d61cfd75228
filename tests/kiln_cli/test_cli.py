"""`kiln envs`: validates every environment file and shows where they differ."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.config import CONFIG_DIR, load_settings
from kiln_cli.cli import build_parser, differences, flatten, main


def test_flatten_nested_settings() -> None:
    assert flatten({"a": 1, "b": {"c": 2, "d": {"e": [3]}}}) == {"a": 1, "b.c": 2, "b.d.e": [3]}
    assert flatten({"t": [{"n": "x"}, {"n": "y"}]}) == {"t[0].n": "x", "t[1].n": "y"}


def test_differences_lists_only_fields_that_differ() -> None:
    dev, prod = load_settings("dev"), load_settings("prod")
    rows = dict(differences([dev, prod]))
    assert rows["removal_policy"] == ["destroy", "retain"]
    assert rows["network.nat_gateways"] == [1, 3]
    assert "region" not in rows and "owner" not in rows and "name" not in rows


def test_envs_lists_in_tier_order_and_shows_differences(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:4]] == ["dev", "staging", "prod"]
    header = next(line for line in out if line.startswith("differs"))
    assert header.split() == ["differs", "dev", "staging", "prod"]
    assert any(line.split() == ["removal_policy", "destroy", "retain", "retain"] for line in out)


def test_envs_fails_on_an_invalid_file_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(CONFIG_DIR, tmp_path / "config")
    (tmp_path / "config" / "qa.yaml").write_text("tier: qa\n")
    assert main(["envs", "--config-dir", str(tmp_path / "config")]) == 1
    captured = capsys.readouterr()
    assert "INVALID" in captured.err and "qa.yaml: invalid configuration:" in captured.err
    assert "1 of 4 environment files are invalid" in captured.err
    assert "staging" in captured.out  # the valid ones are still listed


def test_envs_with_no_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envs", "--config-dir", str(tmp_path)]) == 1
    assert "no environment files" in capsys.readouterr().err


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in (
        "envs",
        "training-job",
        "status",
        "train",
        "deploy-model",
        "invoke",
        "local",
        "diagram",
    ):
        assert f"    {command}" in out
    for command in ("status", "train", "deploy-model", "invoke"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        assert "--env ENV" in capsys.readouterr().out


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_command_and_option_says_what_it_is_and_its_default(command: str) -> None:
    sub = _subcommands()[command]
    assert sub.description and len(sub.description) > 40, f"kiln {command} has no description"
    # One option of a required group is always given (`invoke --prompt | --message | ...`).
    chosen = {a for g in sub._mutually_exclusive_groups if g.required for a in g._group_actions}
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 10, f"kiln {command} {name} has no help"
        needs_default = (
            not action.required
            and action not in chosen
            and not isinstance(action, argparse._StoreTrueAction | argparse._StoreConstAction)
        )
        if needs_default:
            # Shown as `(default: ...)`, or said in words ("default: every GPU of ...").
            assert "default" in action.help, f"kiln {command} {name} hides its default"


def test_the_cli_imports_no_aws_sdk() -> None:
    code = (
        "import sys, kiln_cli.cli; "
        "print(sorted(m for m in ('boto3', 'botocore', 'torch') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
