"""The docs a new user reads match the code: their tables render, the deploy table names every
stack output the stacks write."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kiln.contract import Outputs, StackOutput

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", *REPO.glob("*/README.md"), *(REPO / "docs").glob("*.md")])


def cells(row: str) -> int:
    """The cells of a Markdown table row (`\\|` inside code is a literal pipe)."""
    return len(re.split(r"(?<!\\)\|", row.strip().strip("|")))


def tables(text: str) -> list[list[str]]:
    """Each table: its consecutive lines that start with `|`, outside code blocks."""
    found: list[list[str]] = []
    current: list[str] = []
    fenced = False
    for line in [*text.splitlines(), ""]:
        if line.startswith("```"):
            fenced = not fenced
        if line.startswith("|") and not fenced:
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_table_renders(doc: Path) -> None:
    text = doc.read_text()
    for table in tables(text):
        header, *rest = table
        where = f"{doc.name}: table {header[:60]!r}"
        # A header, a delimiter row, then rows with as many cells (a blank line ends a table:
        # rows after one render as text with raw pipes).
        assert len(rest) >= 2 and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rest[0].strip()), where
        assert all(cells(row) == cells(header) for row in rest), where
    # No table row stranded after a blank line (it would show as raw pipes).
    assert not re.search(r"\|\n\n\| `", text), f"{doc.name}: a blank line inside a table"


def test_the_deploy_table_lists_each_stacks_outputs() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("**What a deploy creates**", 1)[1].split("\n\n", 2)[1]
    outputs: dict[str, set[str]] = {}
    for value in vars(Outputs).values():
        if isinstance(value, StackOutput):
            outputs.setdefault(value.component.value, set()).add(value.key)
    for component, keys in outputs.items():
        row = next(line for line in section.splitlines() if f"`kiln-<env>-{component}`" in line)
        listed = set(re.findall(r"`([A-Z][A-Za-z]+)`", row.split("Output", 1)[1]))
        assert keys <= listed, f"{component}: the README omits outputs {sorted(keys - listed)}"
