"""The guardrail gate: every registered rule is green on every synthesized stack."""

from __future__ import annotations

from kiln.contract import COMPONENTS
from kiln.settings import Settings
from kiln_policy.guardrails import check
from tests.support import Synthesis


def test_every_synthesized_stack_passes(
    synthesis: Synthesis, settings_by_env: dict[str, Settings]
) -> None:
    assert len(synthesis.stacks) == len(COMPONENTS) * len(settings_by_env)
    violations = [
        str(v) for s in synthesis.stacks for v in check(s, settings_by_env[s.environment])
    ]
    assert not violations, "\n".join(violations)
