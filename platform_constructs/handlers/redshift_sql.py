"""Custom-resource handler: runs SQL statements in Redshift through the Data API at deploy time.

Properties: `Database`; the target: `ClusterIdentifier` with `SecretArn`, or `WorkgroupName`
with `NamespaceName` (the handler looks up the admin secret Redshift manages for that
namespace, since CloudFormation does not return its ARN); and `Statements`: a list of
{`Sql`, optional `SkipIfRows`, optional `DropWhenChanged`}. Each statement runs in order and
is waited for; one whose `SkipIfRows` query returns rows is skipped, so re-running a deploy
changes nothing; on an update that changed a statement's `Sql`, its `DropWhenChanged` runs
first. A failed statement fails the deployment with Redshift's own message. Every wait ends
before the Lambda function's own time does, and a statement given up on is cancelled.
Delete does nothing: dropping views or schemas would lose ingested data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import boto3  # type: ignore[import-untyped]  # in the Lambda runtime

LOG = logging.getLogger(__name__)
LOG.setLevel(logging.INFO)

_DONE = {"FINISHED", "FAILED", "ABORTED"}
# Kept back from the function's remaining time: cancelling, logging and answering the framework.
_RESERVE_SECONDS = 20.0


class StatementFailed(RuntimeError):
    """A statement ended FAILED or ABORTED; the message carries Redshift's error."""


def admin_secret_of_namespace(namespace: str, client: Any = None) -> str:
    """The ARN of the admin secret Redshift manages for a Serverless namespace."""
    client = client or boto3.client("redshift-serverless")
    arn = client.get_namespace(namespaceName=namespace)["namespace"].get("adminPasswordSecretArn")
    if not arn:
        raise RuntimeError(
            f"namespace {namespace} has no managed admin secret; create it with "
            "ManageAdminPassword: true"
        )
    return str(arn)


class Runner:
    """Runs statements against one Redshift target and waits for each."""

    def __init__(
        self,
        properties: dict[str, Any],
        client: Any = None,
        *,
        serverless_client: Any = None,
        poll_seconds: float = 1.0,
        timeout_seconds: float = 600.0,
        sleep: Callable[[float], None] = time.sleep,
        remaining_seconds: Callable[[], float] | None = None,
    ) -> None:
        self.client = client or boto3.client("redshift-data")
        if bool(properties.get("WorkgroupName")) == bool(properties.get("ClusterIdentifier")):
            raise ValueError("give exactly one of WorkgroupName and ClusterIdentifier")
        self.target = {"Database": properties["Database"]}
        if properties.get("ClusterIdentifier"):
            self.target["ClusterIdentifier"] = properties["ClusterIdentifier"]
            self.target["SecretArn"] = properties["SecretArn"]
        else:
            self.target["WorkgroupName"] = properties["WorkgroupName"]
            self.target["SecretArn"] = admin_secret_of_namespace(
                properties["NamespaceName"], serverless_client
            )
        self.poll_seconds = poll_seconds
        self.timeout_seconds = timeout_seconds
        self.sleep = sleep
        # The invocation's own clock (Lambda's get_remaining_time_in_millis), if any.
        self.remaining_seconds = remaining_seconds

    def _wait_budget(self) -> float:
        """How long the next statement may run: its timeout, or less if the function would
        be stopped first (a killed function leaves its statement running, uncancelled)."""
        if self.remaining_seconds is None:
            return self.timeout_seconds
        return max(0.0, min(self.timeout_seconds, self.remaining_seconds() - _RESERVE_SECONDS))

    def execute(self, sql: str) -> dict[str, Any]:
        """Runs one statement to completion; returns its final description."""
        budget = self._wait_budget()
        statement_id = self.client.execute_statement(Sql=sql, **self.target)["Id"]
        deadline = time.monotonic() + budget
        while True:
            description: dict[str, Any] = self.client.describe_statement(Id=statement_id)
            status = description["Status"]
            if status == "FINISHED":
                return description
            if status in _DONE:
                error = description.get("Error") or f"statement {status.lower()}"
                raise StatementFailed(f"{error} -- in: {_excerpt(sql)}")
            if time.monotonic() > deadline:
                self.client.cancel_statement(Id=statement_id)
                waited = f"{budget:.0f} s"
                raise StatementFailed(f"no result after {waited}, cancelled -- in: {_excerpt(sql)}")
            self.sleep(self.poll_seconds)

    def has_rows(self, query: str) -> bool:
        description = self.execute(query)
        if not description.get("HasResultSet"):
            return False
        result = self.client.get_statement_result(Id=description["Id"])
        return bool(result.get("Records"))

    def run(
        self, statements: list[dict[str, str]], previous: list[dict[str, str]] | None = None
    ) -> list[str]:
        """Runs every statement not skipped; returns what happened to each, for the log.
        `previous`: the statements of the last deploy (an update), to find changed ones."""
        outcomes = []
        old_sql = {s.get("DropWhenChanged"): s["Sql"] for s in previous or [] if "Sql" in s}
        for index, statement in enumerate(statements, start=1):
            drop = statement.get("DropWhenChanged")
            if drop and drop in old_sql and old_sql[drop] != statement["Sql"]:
                self.execute(drop)
                outcomes.append(f"{index}: changed, dropped the old one")
            skip_query = statement.get("SkipIfRows")
            if skip_query and self.has_rows(skip_query):
                outcomes.append(f"{index}: skipped, already present")
                continue
            self.execute(statement["Sql"])
            outcomes.append(f"{index}: done")
        return outcomes


def _excerpt(sql: str, limit: int = 300) -> str:
    flat = " ".join(sql.split())
    return flat if len(flat) <= limit else flat[:limit] + " ..."


def on_event(
    event: dict[str, Any],
    context: Any = None,
    *,
    client: Any = None,
    serverless_client: Any = None,
) -> dict[str, Any]:
    """The Provider framework's onEvent entry point."""
    request = event["RequestType"]
    physical_id = event.get("PhysicalResourceId") or "redshift-sql"
    if request == "Delete":
        LOG.info("delete: leaving schemas and views in place (they hold ingested data)")
        return {"PhysicalResourceId": physical_id}
    properties = event["ResourceProperties"]
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    runner = Runner(
        properties,
        client,
        serverless_client=serverless_client,
        remaining_seconds=(lambda: remaining() / 1000.0) if remaining else None,
    )
    previous = event.get("OldResourceProperties", {}).get("Statements")
    outcomes = runner.run(properties["Statements"], previous)
    LOG.info("%s: %s", request, "; ".join(outcomes))
    return {"PhysicalResourceId": physical_id, "Data": {"Outcome": "; ".join(outcomes)}}
