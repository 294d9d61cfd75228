"""A JSON snapshot of every stack of every environment, to make any template drift visible.

A change here is reviewed like code: run `make test PYTEST_ARGS="--snapshot-update"` only
after reading the diff of the templates it rewrites in tests/stacks/__snapshots__/.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from syrupy.assertion import SnapshotAssertion
from syrupy.extensions.json import JSONSnapshotExtension

from kiln.contract import COMPONENTS
from tests.support import ENVIRONMENTS, Synthesis


@pytest.fixture
def snapshot_json(snapshot: SnapshotAssertion) -> SnapshotAssertion:
    return snapshot.use_extension(JSONSnapshotExtension)


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_template_matches_snapshot(
    synthesis: Synthesis, snapshot_json: SnapshotAssertion, env: str, component: str
) -> None:
    assert normalized(synthesis.stack(env, component).template) == snapshot_json


def normalized(template: dict[str, Any]) -> dict[str, Any]:
    """The template with container-image tags blanked: they hash the workload code (training/,
    inference/, kernels/, kiln/), which the image and workload tests judge, not this one."""
    text = re.sub(
        r"(container-assets-[^\"]*?:)[0-9a-f]{64}(?=\")", r"\1<image-hash>", json.dumps(template)
    )
    result: dict[str, Any] = json.loads(text)
    return result
