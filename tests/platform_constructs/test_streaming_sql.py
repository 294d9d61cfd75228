"""The Redshift streaming-ingestion SQL generated from the prediction-event schema."""

from __future__ import annotations

import re
from datetime import datetime

import pytest

from kiln_events.events import SCHEMA_VERSION, PayloadField, payload_fields
from platform_constructs import streaming_sql

ROLE = "arn:aws:iam::123456789012:role/warehouse"
CLUSTER = "arn:aws:kafka:us-east-1:123456789012:cluster/kiln-dev/abc-1"


def test_view_names_carry_the_schema_version() -> None:
    assert streaming_sql.view_name("prediction-events") == f"prediction_events_v{SCHEMA_VERSION}"
    assert streaming_sql.view_name("Model.Events-2", 3) == "model_events_2_v3"


def test_external_schema_is_idempotent_and_uses_iam() -> None:
    sql = streaming_sql.external_schema(iam_role_arn=ROLE, cluster_arn=CLUSTER).sql
    assert sql.startswith("CREATE EXTERNAL SCHEMA IF NOT EXISTS kiln_msk FROM MSK ")
    assert f"IAM_ROLE '{ROLE}' AUTHENTICATION iam CLUSTER_ARN '{CLUSTER}'" in sql


def test_literals_are_escaped() -> None:
    sql = streaming_sql.external_schema(iam_role_arn="it's", cluster_arn=CLUSTER).sql
    assert "IAM_ROLE 'it''s'" in sql


def test_one_materialized_view_per_topic_parses_each_record_once_into_super() -> None:
    """Redshift's streaming-ingestion best practices: parse with JSON_PARSE into SUPER once
    (JSON_EXTRACT_PATH_TEXT re-parses the record per column and fails past 64 KB) and do not
    map one topic to several materialized views
    (https://docs.aws.amazon.com/redshift/latest/dg/materialized-view-streaming-ingestion.html)."""
    statement = streaming_sql.materialized_view("prediction-events")
    sql = statement.sql
    assert sql.startswith(
        "CREATE MATERIALIZED VIEW public.prediction_events_stream AUTO REFRESH YES AS"
    )
    assert 'FROM kiln_msk."prediction-events"' in sql
    assert sql.rstrip().endswith("WHERE CAN_JSON_PARSE(kafka_value)")
    assert len(re.findall(r"(?<!CAN_)JSON_PARSE\(", sql)) == 1
    assert "JSON_EXTRACT_PATH_TEXT" not in sql
    assert "JSON_PARSE(kafka_value) AS payload" in sql
    # The schema version is not in its name: every version's records land in this one view.
    assert f"_v{SCHEMA_VERSION}" not in sql


def test_version_view_projects_typed_columns_from_super_with_partiql() -> None:
    sql = streaming_sql.version_view("prediction-events").sql
    assert sql.startswith(f"CREATE OR REPLACE VIEW public.prediction_events_v{SCHEMA_VERSION} AS")
    assert "FROM public.prediction_events_stream\n" in sql
    assert sql.rstrip().endswith(f"WHERE payload.schema_version = {SCHEMA_VERSION}")
    assert "JSON_PARSE" not in sql and "JSON_EXTRACT_PATH_TEXT" not in sql
    columns = dict(re.findall(r"payload\.(\w+)::([A-Z ]+(?:\(\d+\))?(?:::[A-Z]+)?) AS \1", sql))
    expected = {f.name for f in payload_fields()} - {"prompt_text", "completion_text"}
    assert set(columns) == expected
    assert columns["latency_ms"] == "DOUBLE PRECISION"
    assert columns["prompt_tokens"] == "BIGINT"
    assert columns["request_received_at"] == "VARCHAR::TIMESTAMPTZ"
    assert columns["request_id"] == "VARCHAR(512)"
    assert sql.rstrip().splitlines()[-3].strip() == "payload"
    # Raw text stays out of typed columns: it is read from `payload`.
    assert "prompt_text" not in sql and "completion_text" not in sql


def test_a_new_schema_version_is_a_new_view_over_the_same_materialized_view() -> None:
    v1 = streaming_sql.version_view("prediction-events", schema_version=1).sql
    v2 = streaming_sql.version_view("prediction-events", schema_version=2).sql
    assert "public.prediction_events_v1 AS" in v1 and "public.prediction_events_v2 AS" in v2
    for sql in (v1, v2):
        assert "FROM public.prediction_events_stream" in sql


def test_materialized_view_comes_with_an_existence_query() -> None:
    statement = streaming_sql.materialized_view("prediction-events")
    assert statement.skip_if_rows == (
        "SELECT 1 FROM svv_mv_info WHERE schema_name = 'public' "
        "AND name = 'prediction_events_stream'"
    )
    assert statement.as_property() == {"Sql": statement.sql, "SkipIfRows": statement.skip_if_rows}


def test_every_python_type_maps() -> None:
    kinds = {
        t: streaming_sql.redshift_type(PayloadField("x", t, True))
        for t in (str, int, float, bool, datetime)
    }
    assert kinds == {
        str: "VARCHAR(512)",
        int: "BIGINT",
        float: "DOUBLE PRECISION",
        bool: "BOOLEAN",
        datetime: "TIMESTAMPTZ",
    }
    with pytest.raises(TypeError, match="no Redshift type"):
        streaming_sql.redshift_type(PayloadField("x", bytes, False))


def test_unsafe_identifiers_are_refused() -> None:
    with pytest.raises(ValueError, match="not a safe SQL identifier"):
        streaming_sql.version_view("t", [PayloadField('a"; DROP', str, True)])


def test_statements_in_order_schema_then_per_topic_its_stream_and_version_view() -> None:
    statements = streaming_sql.streaming_ingestion(
        iam_role_arn=ROLE, cluster_arn=CLUSTER, topics=["a", "b"]
    )
    heads = [s.sql.split(" FROM ")[0].split(" AUTO ")[0].split(" AS\n")[0] for s in statements]
    assert heads == [
        "CREATE EXTERNAL SCHEMA IF NOT EXISTS kiln_msk",
        "CREATE MATERIALIZED VIEW public.a_stream",
        f"CREATE OR REPLACE VIEW public.a_v{SCHEMA_VERSION}",
        "CREATE MATERIALIZED VIEW public.b_stream",
        f"CREATE OR REPLACE VIEW public.b_v{SCHEMA_VERSION}",
    ]
