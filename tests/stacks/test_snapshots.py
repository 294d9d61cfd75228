"""A JSON snapshot of every stack of every environment, to make any template drift visible.

A change here is reviewed like code: run `make test PYTEST_ARGS="--snapshot-update"` only
after reading the diff of the templates it rewrites in tests/stacks/__snapshots__/.
"""

from __future__ import annotations

import pytest
from syrupy.assertion import SnapshotAssertion
from syrupy.extensions.json import JSONSnapshotExtension

from tests.support import COMPONENTS, ENVIRONMENTS, Synthesis


@pytest.fixture
def snapshot_json(snapshot: SnapshotAssertion) -> SnapshotAssertion:
    return snapshot.use_extension(JSONSnapshotExtension)


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_template_matches_snapshot(
    synthesis: Synthesis, snapshot_json: SnapshotAssertion, env: str, component: str
) -> None:
    assert synthesis.stack(env, component).template == snapshot_json
