"""Every taggable resource of every stack carries the environment's standard tags."""

from __future__ import annotations

from kiln.settings import Settings
from tests.support import Synthesis


def test_taggable_resources_carry_project_environment_owner(
    synthesis: Synthesis, settings_by_env: dict[str, Settings]
) -> None:
    checked = 0
    for stack in synthesis.stacks:
        settings = settings_by_env[stack.environment]
        expected = {
            "project": settings.project,
            "environment": settings.name,
            "owner": settings.owner,
        }
        for logical_id, resource in stack.resources.items():
            tags = resource.get("Properties", {}).get("Tags")
            if not isinstance(tags, list):
                continue
            present = {t["Key"]: t["Value"] for t in tags}
            assert expected.items() <= present.items(), f"{stack.stack_name}/{logical_id}"
            checked += 1
    assert checked > 50  # VPC, subnets, keys, buckets, endpoints, ... in three environments
