"""The deploy-time custom-resource handlers, against moto (Redshift Data API) and botocore's
Stubber where moto lacks the API (redshift-serverless GetNamespace, kafka UpdateConnectivity,
DescribeClusterV2 with connectivity details)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from platform_constructs.handlers import msk_connectivity, redshift_sql

REGION = "us-east-1"
SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:redshift!kiln-dev-admin-AbCdEf"
CLUSTER_ARN = "arn:aws:kafka:us-east-1:123456789012:cluster/kiln-dev/uuid-1"


class RedshiftOutcomes:
    """Decides, through botocore hooks on a moto client, how each statement ends.

    moto's Data API leaves every statement STARTED and returns fixed rows; the hooks set the
    status, error and rows a real warehouse would give for the SQL that was sent.
    """

    def __init__(self, client: Any) -> None:
        self.failures: dict[str, str] = {}  # SQL fragment -> Redshift error
        self.rows: dict[str, list[list[dict[str, Any]]]] = {}  # SQL fragment -> records
        self.polls_before_done = 1
        self.sql_by_id: dict[str, str] = {}
        self.polls: dict[str, int] = {}
        self.executed: list[str] = []
        events = client.meta.events
        events.register("after-call.redshift-data.DescribeStatement", self._describe)
        events.register("after-call.redshift-data.GetStatementResult", self._result)

    def _match(self, table: dict[str, Any], sql: str) -> Any:
        return next((value for fragment, value in table.items() if fragment in sql), None)

    def _describe(self, parsed: dict[str, Any], **_: Any) -> None:
        statement_id, sql = parsed["Id"], parsed["QueryString"]
        if statement_id not in self.sql_by_id:
            self.sql_by_id[statement_id] = sql
            self.executed.append(sql)
        self.polls[statement_id] = self.polls.get(statement_id, 0) + 1
        if self.polls[statement_id] <= self.polls_before_done:
            parsed["Status"] = "STARTED"
            return
        error = self._match(self.failures, sql)
        parsed["Status"] = "FAILED" if error else "FINISHED"
        if error:
            parsed["Error"] = error
        parsed["HasResultSet"] = sql.lstrip().upper().startswith("SELECT")

    def _result(self, parsed: dict[str, Any], **_: Any) -> None:
        # The response names no statement: the handler reads the SELECT it just ran.
        last_select = next(s for s in reversed(self.executed) if s.upper().startswith("SELECT"))
        parsed["Records"] = self._match(self.rows, last_select) or []


@pytest.fixture
def data_api() -> Iterator[tuple[Any, RedshiftOutcomes]]:
    with mock_aws():
        client = boto3.client("redshift-data", region_name=REGION)
        yield client, RedshiftOutcomes(client)


def cluster_properties(**statements: Any) -> dict[str, Any]:
    return {
        "ClusterIdentifier": "kiln-dev",
        "SecretArn": SECRET,
        "Database": "analytics",
        "Statements": statements.get("statements", []),
    }


STATEMENTS = [
    {"Sql": "CREATE EXTERNAL SCHEMA IF NOT EXISTS kiln_msk FROM MSK ..."},
    {
        "Sql": "CREATE MATERIALIZED VIEW public.prediction_events_v1 AUTO REFRESH YES AS ...",
        "SkipIfRows": "SELECT 1 FROM svv_mv_info WHERE name = 'prediction_events_v1'",
    },
]


def event(request: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "RequestType": request,
        "ResourceProperties": properties,
        "PhysicalResourceId": "redshift-sql",
    }


def no_sleep(_: float) -> None:
    return None


def test_create_runs_every_statement_in_order(data_api: tuple[Any, RedshiftOutcomes]) -> None:
    client, outcomes = data_api
    runner = redshift_sql.Runner(cluster_properties(statements=STATEMENTS), client, sleep=no_sleep)
    assert runner.run(STATEMENTS) == ["1: done", "2: done"]
    assert [s.split(" ")[1] for s in outcomes.executed] == ["EXTERNAL", "1", "MATERIALIZED"]


def test_rerun_skips_what_exists(data_api: tuple[Any, RedshiftOutcomes]) -> None:
    client, outcomes = data_api
    outcomes.rows["svv_mv_info"] = [[{"longValue": 1}]]
    runner = redshift_sql.Runner(cluster_properties(), client, sleep=no_sleep)
    assert runner.run(STATEMENTS) == ["1: done", "2: skipped, already present"]
    assert not any("CREATE MATERIALIZED" in s for s in outcomes.executed)


def test_failed_statement_raises_redshift_error(data_api: tuple[Any, RedshiftOutcomes]) -> None:
    client, outcomes = data_api
    outcomes.failures["EXTERNAL SCHEMA"] = "ERROR: permission denied for database analytics"
    runner = redshift_sql.Runner(cluster_properties(), client, sleep=no_sleep)
    with pytest.raises(redshift_sql.StatementFailed) as caught:
        runner.run(STATEMENTS)
    message = str(caught.value)
    assert message.startswith("ERROR: permission denied for database analytics -- in: CREATE")
    assert not any("MATERIALIZED" in s for s in outcomes.executed)  # stopped at the failure


def test_on_event_reports_failure_to_the_framework(
    data_api: tuple[Any, RedshiftOutcomes], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, outcomes = data_api
    outcomes.failures["MATERIALIZED VIEW"] = 'ERROR: column "x" does not exist'
    monkeypatch.setattr(redshift_sql.time, "sleep", no_sleep)
    with pytest.raises(redshift_sql.StatementFailed, match='column "x" does not exist'):
        redshift_sql.on_event(
            event("Create", cluster_properties(statements=STATEMENTS)), client=client
        )


def test_on_event_update_returns_the_same_physical_id(
    data_api: tuple[Any, RedshiftOutcomes], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = data_api
    monkeypatch.setattr(redshift_sql.time, "sleep", no_sleep)
    result = redshift_sql.on_event(
        event("Update", cluster_properties(statements=STATEMENTS)), client=client
    )
    assert result["PhysicalResourceId"] == "redshift-sql"
    assert result["Data"]["Outcome"] == "1: done; 2: done"


def test_delete_touches_nothing(data_api: tuple[Any, RedshiftOutcomes]) -> None:
    client, outcomes = data_api
    result = redshift_sql.on_event(event("Delete", cluster_properties()), client=client)
    assert result == {"PhysicalResourceId": "redshift-sql"}
    assert outcomes.executed == []


def test_timeout_cancels_the_statement(data_api: tuple[Any, RedshiftOutcomes]) -> None:
    client, outcomes = data_api
    outcomes.polls_before_done = 10**6
    runner = redshift_sql.Runner(cluster_properties(), client, sleep=no_sleep, timeout_seconds=0)
    with pytest.raises(redshift_sql.StatementFailed, match="no result after 0 s, cancelled"):
        runner.execute("SELECT 1")


def test_serverless_target_looks_up_the_managed_admin_secret(
    data_api: tuple[Any, RedshiftOutcomes],
) -> None:
    client, outcomes = data_api
    serverless = boto3.client("redshift-serverless", region_name=REGION)
    with Stubber(serverless) as stub:
        stub.add_response(
            "get_namespace",
            {"namespace": {"adminPasswordSecretArn": SECRET}},
            {"namespaceName": "kiln-dev"},
        )
        runner = redshift_sql.Runner(
            {"WorkgroupName": "kiln-dev", "NamespaceName": "kiln-dev", "Database": "analytics"},
            client,
            serverless_client=serverless,
            sleep=no_sleep,
        )
        stub.assert_no_pending_responses()
    assert runner.target == {
        "Database": "analytics",
        "WorkgroupName": "kiln-dev",
        "SecretArn": SECRET,
    }
    runner.execute("CREATE EXTERNAL SCHEMA IF NOT EXISTS x")
    assert outcomes.executed == ["CREATE EXTERNAL SCHEMA IF NOT EXISTS x"]


def test_namespace_without_managed_secret_is_a_clear_error() -> None:
    serverless = boto3.client("redshift-serverless", region_name=REGION)
    with Stubber(serverless) as stub:
        stub.add_response("get_namespace", {"namespace": {}}, {"namespaceName": "kiln-dev"})
        with pytest.raises(RuntimeError, match="ManageAdminPassword: true"):
            redshift_sql.admin_secret_of_namespace("kiln-dev", serverless)


@pytest.mark.parametrize("target", [{}, {"WorkgroupName": "w", "ClusterIdentifier": "c"}])
def test_exactly_one_target(target: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="exactly one of WorkgroupName and ClusterIdentifier"):
        redshift_sql.Runner({"Database": "d", **target}, client=object())


# --- MSK multi-VPC private connectivity -------------------------------------------------


def cluster_info(state: str, iam_on: bool) -> dict[str, Any]:
    connectivity: dict[str, Any] = {"PublicAccess": {"Type": "DISABLED"}}
    if iam_on:
        connectivity.update(msk_connectivity.IAM_ON)
    return {
        "ClusterInfo": {
            "ClusterArn": CLUSTER_ARN,
            "ClusterName": "kiln-dev",
            "ClusterType": "PROVISIONED",
            "State": state,
            "CurrentVersion": "K3AEGXETSR30VB",
            "Provisioned": {
                "BrokerNodeGroupInfo": {
                    "ClientSubnets": ["subnet-1", "subnet-2"],
                    "InstanceType": "kafka.m7g.large",
                    "ConnectivityInfo": connectivity,
                },
                "NumberOfBrokerNodes": 3,
            },
        }
    }


def msk_event(request: str) -> dict[str, Any]:
    return {"RequestType": request, "ResourceProperties": {"ClusterArn": CLUSTER_ARN}}


@pytest.fixture
def kafka() -> Iterator[tuple[Any, Stubber]]:
    client = boto3.client("kafka", region_name=REGION)
    with Stubber(client) as stub:
        yield client, stub
        stub.assert_no_pending_responses()


def test_create_starts_the_connectivity_update(kafka: tuple[Any, Stubber]) -> None:
    client, stub = kafka
    stub.add_response(
        "describe_cluster_v2", cluster_info("ACTIVE", False), {"ClusterArn": CLUSTER_ARN}
    )
    stub.add_response(
        "update_connectivity",
        {"ClusterArn": CLUSTER_ARN, "ClusterOperationArn": f"{CLUSTER_ARN}/op-1"},
        {
            "ClusterArn": CLUSTER_ARN,
            "CurrentVersion": "K3AEGXETSR30VB",
            "ConnectivityInfo": msk_connectivity.IAM_ON,
        },
    )
    result = msk_connectivity.on_event(msk_event("Create"), client=client)
    assert result == {"PhysicalResourceId": f"{CLUSTER_ARN}/vpc-connectivity-iam"}


def test_already_on_changes_nothing(kafka: tuple[Any, Stubber]) -> None:
    client, stub = kafka
    stub.add_response(
        "describe_cluster_v2", cluster_info("ACTIVE", True), {"ClusterArn": CLUSTER_ARN}
    )
    msk_connectivity.on_event(msk_event("Update"), client=client)  # no update_connectivity


def test_busy_cluster_is_left_for_is_complete(kafka: tuple[Any, Stubber]) -> None:
    """A re-run of a deploy that stopped at CloudFormation's hour finds the cluster UPDATING
    (the first run's operation still going): it waits instead of failing or starting a
    second update."""
    client, stub = kafka
    stub.add_response(
        "describe_cluster_v2", cluster_info("UPDATING", False), {"ClusterArn": CLUSTER_ARN}
    )
    result = msk_connectivity.on_event(msk_event("Create"), client=client)
    assert result == {"PhysicalResourceId": f"{CLUSTER_ARN}/vpc-connectivity-iam"}


def test_is_complete_starts_the_update_once_the_cluster_is_active(
    kafka: tuple[Any, Stubber],
) -> None:
    client, stub = kafka
    stub.add_response(
        "describe_cluster_v2", cluster_info("ACTIVE", False), {"ClusterArn": CLUSTER_ARN}
    )
    stub.add_response(
        "update_connectivity",
        {"ClusterArn": CLUSTER_ARN, "ClusterOperationArn": f"{CLUSTER_ARN}/op-2"},
        {
            "ClusterArn": CLUSTER_ARN,
            "CurrentVersion": "K3AEGXETSR30VB",
            "ConnectivityInfo": msk_connectivity.IAM_ON,
        },
    )
    assert msk_connectivity.is_complete(msk_event("Update"), client=client) == {"IsComplete": False}


def test_a_cluster_taken_by_another_operation_is_tried_again(kafka: tuple[Any, Stubber]) -> None:
    client, stub = kafka
    stub.add_response(
        "describe_cluster_v2", cluster_info("ACTIVE", False), {"ClusterArn": CLUSTER_ARN}
    )
    stub.add_client_error(
        "update_connectivity",
        service_error_code="BadRequestException",
        service_message="The request does not include the current version of the cluster.",
    )
    assert msk_connectivity.is_complete(msk_event("Update"), client=client) == {"IsComplete": False}


def test_other_update_errors_fail_the_deployment(kafka: tuple[Any, Stubber]) -> None:
    client, stub = kafka
    stub.add_response(
        "describe_cluster_v2", cluster_info("ACTIVE", False), {"ClusterArn": CLUSTER_ARN}
    )
    stub.add_client_error(
        "update_connectivity", service_error_code="ForbiddenException", service_message="no"
    )
    with pytest.raises(Exception, match="ForbiddenException"):
        msk_connectivity.on_event(msk_event("Create"), client=client)


@pytest.mark.parametrize(
    ("state", "done"), [("CREATING", False), ("UPDATING", False), ("ACTIVE", True)]
)
def test_topic_gate_waits_for_active_only(
    kafka: tuple[Any, Stubber], state: str, done: bool
) -> None:
    """The gate topics wait behind: the topic APIs need an ACTIVE cluster; connectivity is
    not its business (it runs after the topics)."""
    client, stub = kafka
    event = {
        "RequestType": "Update",
        "ResourceProperties": {"ClusterArn": CLUSTER_ARN, "Step": "active", "Fingerprint": "f"},
    }
    assert msk_connectivity.on_event(event, client=object()) == {
        "PhysicalResourceId": f"{CLUSTER_ARN}/active"
    }
    stub.add_response(
        "describe_cluster_v2", cluster_info(state, False), {"ClusterArn": CLUSTER_ARN}
    )
    assert msk_connectivity.is_complete(event, client=client) == {"IsComplete": done}


@pytest.mark.parametrize(
    ("state", "iam_on", "done"),
    [
        ("UPDATING", False, False),
        ("UPDATING", True, False),
        ("ACTIVE", True, True),
    ],
)
def test_is_complete_waits_for_active_with_iam_on(
    kafka: tuple[Any, Stubber], state: str, iam_on: bool, done: bool
) -> None:
    client, stub = kafka
    stub.add_response(
        "describe_cluster_v2", cluster_info(state, iam_on), {"ClusterArn": CLUSTER_ARN}
    )
    assert msk_connectivity.is_complete(msk_event("Create"), client=client) == {"IsComplete": done}


def test_failed_cluster_fails_the_deployment(kafka: tuple[Any, Stubber]) -> None:
    client, stub = kafka
    stub.add_response(
        "describe_cluster_v2", cluster_info("FAILED", False), {"ClusterArn": CLUSTER_ARN}
    )
    with pytest.raises(RuntimeError, match="entered FAILED state"):
        msk_connectivity.is_complete(msk_event("Update"), client=client)


def test_delete_is_a_no_op() -> None:
    assert msk_connectivity.on_event(
        {**msk_event("Delete"), "PhysicalResourceId": "p"}, client=object()
    ) == {"PhysicalResourceId": "p"}
    assert msk_connectivity.is_complete(msk_event("Delete"), client=object()) == {
        "IsComplete": True
    }


# --- issue 17, item 8: waits fit the function's time; a changed schema is re-created ---------


def test_wait_fits_the_functions_remaining_time_and_cancels_what_it_abandons(
    data_api: tuple[Any, RedshiftOutcomes],
) -> None:
    client, outcomes = data_api
    outcomes.polls_before_done = 10**6  # never finishes
    cancelled: list[str] = []
    client.meta.events.register(
        "provide-client-params.redshift-data.CancelStatement",
        lambda params, **_: cancelled.append(params["Id"]),
    )
    runner = redshift_sql.Runner(
        cluster_properties(),
        client,
        sleep=no_sleep,
        timeout_seconds=600.0,
        remaining_seconds=lambda: 20.5,  # the function has 20.5 s left: 0.5 s to wait
    )
    with pytest.raises(redshift_sql.StatementFailed, match="no result after 0 s, cancelled"):
        runner.execute("SELECT 1")
    assert len(cancelled) == 1


def test_a_changed_external_schema_is_dropped_and_re_created(
    data_api: tuple[Any, RedshiftOutcomes],
) -> None:
    from platform_constructs.streaming_sql import streaming_ingestion

    client, outcomes = data_api
    old = [
        s.as_property()
        for s in streaming_ingestion(iam_role_arn="arn:r1", cluster_arn="arn:c", topics=["t"])
    ]
    new = [
        s.as_property()
        for s in streaming_ingestion(iam_role_arn="arn:r2", cluster_arn="arn:c", topics=["t"])
    ]
    runner = redshift_sql.Runner(cluster_properties(), client, sleep=no_sleep)
    assert runner.run(new, old)[:2] == ["1: changed, dropped the old one", "1: done"]
    assert outcomes.executed[0] == "DROP SCHEMA IF EXISTS kiln_msk CASCADE"
    # Unchanged: nothing dropped.
    outcomes.executed.clear()
    runner.run(new, new)
    assert not any(s.startswith("DROP") for s in outcomes.executed)


def test_prefix_list_lookup_returns_the_id() -> None:
    from platform_constructs.handlers import managed_prefix_list

    client = boto3.client("ec2", region_name=REGION)
    with Stubber(client) as stub:
        stub.add_response(
            "describe_managed_prefix_lists",
            {"PrefixLists": [{"PrefixListId": "pl-63a5400a", "PrefixListName": "s3"}]},
            {"Filters": [{"Name": "prefix-list-name", "Values": ["com.amazonaws.us-east-1.s3"]}]},
        )
        result = managed_prefix_list.on_event(
            {
                "RequestType": "Create",
                "ResourceProperties": {"PrefixListName": "com.amazonaws.us-east-1.s3"},
            },
            client=client,
        )
    assert result == {"PhysicalResourceId": "pl-63a5400a", "Data": {"PrefixListId": "pl-63a5400a"}}
    with Stubber(client) as stub:
        stub.add_response("describe_managed_prefix_lists", {"PrefixLists": []})
        with pytest.raises(RuntimeError, match="no managed prefix list named x"):
            managed_prefix_list.prefix_list_id("x", client)
