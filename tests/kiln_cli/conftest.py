"""Fixtures of the operating-command tests."""

from __future__ import annotations

import pytest

from kiln.contract import Component
from tests.kiln_cli import support
from tests.support import Synthesis


@pytest.fixture(scope="session")
def stack_outputs(synthesis: Synthesis) -> dict[str, dict[Component, dict[str, str]]]:
    """The fake stacks' outputs, derived from the synthesized templates (never written by
    hand), so a renamed or new output reaches these tests by itself."""
    if not support.DEPLOYED:
        support.DEPLOYED.update(support.synthesized_outputs(synthesis.stacks))
    return support.DEPLOYED
