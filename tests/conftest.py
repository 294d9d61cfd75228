"""Shared fixtures: one synthesis of every environment per test session, read back as records."""

from __future__ import annotations

import json

import pytest

from kiln.config import available_environments, load_settings
from kiln.settings import Settings
from kiln_policy.assembly import read_assembly
from tests.support import Synthesis


@pytest.fixture(scope="session")
def synthesis(tmp_path_factory: pytest.TempPathFactory) -> Synthesis:
    """Synthesizes every environment with the cdk-nag gates, as `cdk synth -c env=all` does.

    A failed policy validation still writes the templates and the report, so the gate test
    can list the findings while the other tests judge the templates.
    """
    from app import build_app  # imported here: the CDK's start-up is paid once, in the fixture

    outdir = tmp_path_factory.mktemp("cdk.out")
    error = None
    try:
        build_app({"env": "all"}, outdir=str(outdir)).synth()
    except RuntimeError as err:
        error = str(err)
    report_file = outdir / "validation-report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    return Synthesis(outdir=outdir, stacks=read_assembly(outdir), error=error, report=report)


@pytest.fixture(scope="session")
def settings_by_env() -> dict[str, Settings]:
    return {name: load_settings(name) for name in available_environments()}
