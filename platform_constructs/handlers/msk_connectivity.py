"""Custom-resource handler: turns on MSK multi-VPC private connectivity for IAM clients.

Firehose reads a private MSK cluster only through multi-VPC private connectivity, and MSK
refuses to enable it at cluster creation ("all vpcConnectivity auth schemes must be
disabled" on create), so it is switched on here, right after the cluster exists. The update
takes tens of minutes: `on_event` starts it, `is_complete` polls until the cluster is ACTIVE
with IAM connectivity on. Delete does nothing (deleting the cluster removes it).
"""

from __future__ import annotations

import logging
from typing import Any

import boto3  # type: ignore[import-untyped]  # in the Lambda runtime

LOG = logging.getLogger(__name__)
LOG.setLevel(logging.INFO)

IAM_ON = {"VpcConnectivity": {"ClientAuthentication": {"Sasl": {"Iam": {"Enabled": True}}}}}


def _cluster(client: Any, arn: str) -> dict[str, Any]:
    info: dict[str, Any] = client.describe_cluster_v2(ClusterArn=arn)["ClusterInfo"]
    return info


def iam_connectivity_on(info: dict[str, Any]) -> bool:
    """Whether the cluster already admits IAM clients over multi-VPC private connectivity."""
    provisioned = info.get("Provisioned", {})
    connectivity = provisioned.get("BrokerNodeGroupInfo", {}).get("ConnectivityInfo", {})
    sasl = connectivity.get("VpcConnectivity", {}).get("ClientAuthentication", {}).get("Sasl", {})
    return bool(sasl.get("Iam", {}).get("Enabled"))


def on_event(event: dict[str, Any], context: Any = None, *, client: Any = None) -> dict[str, Any]:
    """Starts the connectivity update unless it is already on (re-deploys change nothing)."""
    del context
    client = client or boto3.client("kafka")
    arn = event["ResourceProperties"]["ClusterArn"]
    physical_id = f"{arn}/vpc-connectivity-iam"
    if event["RequestType"] == "Delete":
        return {"PhysicalResourceId": event.get("PhysicalResourceId", physical_id)}
    info = _cluster(client, arn)
    if iam_connectivity_on(info):
        LOG.info("multi-VPC IAM connectivity already on for %s", arn)
    elif info["State"] != "ACTIVE":
        raise RuntimeError(
            f"MSK cluster {arn} is {info['State']}, not ACTIVE; connectivity can only be "
            "changed on an active cluster. Retry the deployment once the cluster is active."
        )
    else:
        operation = client.update_connectivity(
            ClusterArn=arn, CurrentVersion=info["CurrentVersion"], ConnectivityInfo=IAM_ON
        )
        LOG.info("started %s on %s", operation.get("ClusterOperationArn"), arn)
    return {"PhysicalResourceId": physical_id}


def is_complete(
    event: dict[str, Any], context: Any = None, *, client: Any = None
) -> dict[str, Any]:
    """Done when the cluster is ACTIVE again with IAM connectivity on."""
    del context
    if event["RequestType"] == "Delete":
        return {"IsComplete": True}
    client = client or boto3.client("kafka")
    info = _cluster(client, event["ResourceProperties"]["ClusterArn"])
    if info["State"] == "FAILED":
        raise RuntimeError(f"MSK cluster {info.get('ClusterArn')} entered FAILED state")
    return {"IsComplete": info["State"] == "ACTIVE" and iam_connectivity_on(info)}
