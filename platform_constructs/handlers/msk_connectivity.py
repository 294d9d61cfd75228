"""Custom-resource handler: waits for the MSK cluster to be ACTIVE, and turns on multi-VPC
private connectivity for IAM clients.

Two steps share this handler (the `Step` property):

- `active`: a gate that completes once the cluster is ACTIVE. Topics wait behind it: the
  topic APIs need an ACTIVE cluster, and a cluster operation (a broker storage or version
  update, the connectivity update below) takes it out of ACTIVE for tens of minutes. The
  gate's properties carry a fingerprint of the topics and of the cluster's settings, so any
  later change to either runs the gate again before the topic changes reach MSK.
- `connectivity` (the default): Firehose reads a private MSK cluster only through multi-VPC
  private connectivity, and MSK refuses to enable it at cluster creation ("all
  vpcConnectivity auth schemes must be disabled" on create), so it is switched on here, after
  the topics exist. `on_event` starts the update when the cluster is ACTIVE; `is_complete`
  polls until the cluster is ACTIVE with IAM connectivity on, and starts the update itself if
  the cluster was busy when `on_event` ran.

Every call decides from the cluster's current state, never from what an earlier deploy did: a
deploy that stopped (CloudFormation gives a custom resource at most an hour, its
`ServiceTimeout`) leaves the MSK operation running, and the next deploy's handler finds the
cluster UPDATING, waits, and completes when the operation has, without starting a second one.
Delete does nothing (deleting the cluster removes the connectivity).
"""

from __future__ import annotations

import logging
from typing import Any

import boto3  # type: ignore[import-untyped]  # in the Lambda runtime

LOG = logging.getLogger(__name__)
LOG.setLevel(logging.INFO)

IAM_ON = {"VpcConnectivity": {"ClientAuthentication": {"Sasl": {"Iam": {"Enabled": True}}}}}
ACTIVE_GATE = "active"
CONNECTIVITY = "connectivity"
# MSK's answers when another operation holds the cluster or its version moved on: the update
# is tried again on the next poll instead of failing the deploy.
_BUSY_CODES = {"ConflictException", "TooManyRequestsException"}
_BUSY_WORDS = ("version", "in progress", "operation", "state")


def _cluster(client: Any, arn: str) -> dict[str, Any]:
    info: dict[str, Any] = client.describe_cluster_v2(ClusterArn=arn)["ClusterInfo"]
    return info


def _step(event: dict[str, Any]) -> str:
    return str(event["ResourceProperties"].get("Step", CONNECTIVITY))


def iam_connectivity_on(info: dict[str, Any]) -> bool:
    """Whether the cluster already admits IAM clients over multi-VPC private connectivity."""
    provisioned = info.get("Provisioned", {})
    connectivity = provisioned.get("BrokerNodeGroupInfo", {}).get("ConnectivityInfo", {})
    sasl = connectivity.get("VpcConnectivity", {}).get("ClientAuthentication", {}).get("Sasl", {})
    return bool(sasl.get("Iam", {}).get("Enabled"))


def _is_busy(err: Exception) -> bool:
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return False
    error = response.get("Error", {})
    code, message = str(error.get("Code", "")), str(error.get("Message", "")).lower()
    return code in _BUSY_CODES or (
        code == "BadRequestException" and any(word in message for word in _BUSY_WORDS)
    )


def _start_update(client: Any, arn: str, info: dict[str, Any]) -> None:
    """UpdateConnectivity from the cluster's current version; a busy cluster is left for the
    next poll."""
    try:
        operation = client.update_connectivity(
            ClusterArn=arn, CurrentVersion=info["CurrentVersion"], ConnectivityInfo=IAM_ON
        )
    except Exception as err:
        if not _is_busy(err):
            raise
        LOG.info("cluster %s busy (%s); trying again on the next poll", arn, err)
        return
    LOG.info("started %s on %s", operation.get("ClusterOperationArn"), arn)


def on_event(event: dict[str, Any], context: Any = None, *, client: Any = None) -> dict[str, Any]:
    """Starts the connectivity update when the cluster is ACTIVE without it; otherwise leaves
    the work to `is_complete` (the gate has nothing to start)."""
    del context
    arn = event["ResourceProperties"]["ClusterArn"]
    step = _step(event)
    physical_id = f"{arn}/vpc-connectivity-iam" if step == CONNECTIVITY else f"{arn}/{step}"
    if event["RequestType"] == "Delete" or step == ACTIVE_GATE:
        return {"PhysicalResourceId": event.get("PhysicalResourceId", physical_id)}
    client = client or boto3.client("kafka")
    info = _cluster(client, arn)
    if iam_connectivity_on(info):
        LOG.info("multi-VPC IAM connectivity already on for %s", arn)
    elif info["State"] == "ACTIVE":
        _start_update(client, arn, info)
    else:
        LOG.info("cluster %s is %s: the update starts once it is ACTIVE", arn, info["State"])
    return {"PhysicalResourceId": physical_id}


def is_complete(
    event: dict[str, Any], context: Any = None, *, client: Any = None
) -> dict[str, Any]:
    """Gate: done when the cluster is ACTIVE. Connectivity: done when the cluster is ACTIVE
    with IAM connectivity on; an ACTIVE cluster without it gets the update started."""
    del context
    if event["RequestType"] == "Delete":
        return {"IsComplete": True}
    client = client or boto3.client("kafka")
    arn = event["ResourceProperties"]["ClusterArn"]
    info = _cluster(client, arn)
    if info["State"] == "FAILED":
        raise RuntimeError(f"MSK cluster {info.get('ClusterArn')} entered FAILED state")
    if info["State"] != "ACTIVE":
        return {"IsComplete": False}
    if _step(event) == ACTIVE_GATE or iam_connectivity_on(info):
        return {"IsComplete": True}
    _start_update(client, arn, info)
    return {"IsComplete": False}
