"""Custom-resource handler: finds the id of an AWS-managed prefix list (the region's S3 one).

Security groups can send only to S3 (through the gateway endpoint) by naming the region's
S3 prefix list, whose id differs per region and account partition and which CloudFormation
does not return; a synth without AWS access cannot look it up either. Properties:
`PrefixListName` (e.g. `com.amazonaws.us-east-1.s3`). Returns `Data.PrefixListId`.
Delete does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import boto3  # type: ignore[import-untyped]  # in the Lambda runtime

LOG = logging.getLogger(__name__)
LOG.setLevel(logging.INFO)


def prefix_list_id(name: str, client: Any = None) -> str:
    """The id of the managed prefix list called `name`; fails with a message if there is none."""
    client = client or boto3.client("ec2")
    found = client.describe_managed_prefix_lists(
        Filters=[{"Name": "prefix-list-name", "Values": [name]}]
    ).get("PrefixLists", [])
    if not found:
        raise RuntimeError(f"no managed prefix list named {name} in this region")
    return str(found[0]["PrefixListId"])


def on_event(event: dict[str, Any], context: Any = None, *, client: Any = None) -> dict[str, Any]:
    """The Provider framework's onEvent entry point."""
    del context
    name = event["ResourceProperties"]["PrefixListName"]
    if event["RequestType"] == "Delete":
        return {"PhysicalResourceId": event.get("PhysicalResourceId", name)}
    found = prefix_list_id(name, client)
    LOG.info("%s is %s", name, found)
    return {"PhysicalResourceId": found, "Data": {"PrefixListId": found}}
