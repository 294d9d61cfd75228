"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.assembly import SynthesizedStack
from kiln.config import available_environments

REPO = Path(__file__).resolve().parent.parent
ENVIRONMENTS = available_environments()
COMPONENTS = ("network", "data-lake", "streaming", "warehouse")


@dataclass(frozen=True)
class Synthesis:
    """The result of synthesizing `-c env=all` once: stacks, plus the validation report."""

    outdir: Path
    stacks: list[SynthesizedStack]
    error: str | None
    report: dict[str, Any] | None

    def stack(self, environment: str, component: str) -> SynthesizedStack:
        name = f"kiln-{environment}-{component}"
        matches = [s for s in self.stacks if s.stack_name == name]
        assert matches, f"no stack {name}; have {[s.stack_name for s in self.stacks]}"
        return matches[0]
