"""cfn-lint over every template of every environment: zero errors; warnings are listed."""

from __future__ import annotations

import json

import pytest
from cfnlint.api import ManualArgs, lint

from kiln.settings import Settings
from tests.support import Synthesis

# W3010 (hard-coded availability zones) is by design: zones come from config so synth needs
# no AWS lookup, and the settings schema checks them against the region.
# W3005 (a DependsOn that a Ref already implies) is the CDK's own doing: every Lambda it
# generates (custom-resource providers, their framework) depends on its role and the role's
# policy, and the role is also named in the function; nothing in kiln's code can remove it.
IGNORED = ["W3010", "W3005"]


def test_every_template_has_no_cfn_lint_errors(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    assert synthesis.stacks
    errors, warnings = [], []
    for stack in synthesis.stacks:
        region = settings_by_env[stack.environment].region
        for match in lint(
            json.dumps(stack.template),
            config=ManualArgs(regions=[region], ignore_checks=IGNORED),
        ):
            line = f"{stack.stack_name}: {match.rule.id} {match.message}"
            (errors if match.rule.id.startswith("E") else warnings).append(line)
    with capsys.disabled():
        for line in warnings:
            print(f"cfn-lint warning: {line}")
    assert not errors, "\n".join(errors)


def test_cfn_lint_catches_an_error() -> None:
    """Non-compliant case: the linter as configured does report an invalid template."""
    broken = {"Resources": {"B": {"Type": "AWS::S3::Bucket", "Properties": {"Nope": 1}}}}
    matches = lint(json.dumps(broken), config=ManualArgs(regions=["us-east-1"]))
    assert any(m.rule.id.startswith("E") for m in matches)
