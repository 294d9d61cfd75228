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


def test_view_has_a_typed_column_per_scalar_field_and_the_payload() -> None:
    statement = streaming_sql.materialized_view("prediction-events")
    sql = statement.sql
    assert sql.startswith(
        f"CREATE MATERIALIZED VIEW public.prediction_events_v{SCHEMA_VERSION} AUTO REFRESH YES AS"
    )
    assert 'FROM kiln_msk."prediction-events"' in sql
    assert sql.rstrip().endswith("WHERE CAN_JSON_PARSE(kafka_value)")
    columns = re.findall(r"AS ([A-Z ]+(?:\(\d+\))?)\) AS (\w+)", sql)
    typed = {name: kind for kind, name in columns}
    expected = {f.name for f in payload_fields()} - {"prompt_text", "completion_text"}
    assert set(typed) == expected
    assert typed["latency_ms"] == "DOUBLE PRECISION"
    assert typed["prompt_tokens"] == "BIGINT"
    assert typed["request_received_at"] == "TIMESTAMPTZ"
    assert typed["request_id"] == "VARCHAR(512)"
    assert "JSON_PARSE(kafka_value) AS payload" in sql
    # Raw text stays out of typed columns: it is read from `payload`.
    assert "'prompt_text'" not in sql and "'completion_text'" not in sql


def test_missing_keys_and_oversized_messages_become_nulls_not_refresh_failures() -> None:
    sql = streaming_sql.materialized_view("t").sql
    for line in sql.splitlines():
        if "JSON_EXTRACT_PATH_TEXT" in line:
            assert "CAST(NULLIF(CASE WHEN OCTET_LENGTH(kafka_value) <= 65535 THEN" in line
            assert ", true) END, '')" in line


def test_view_comes_with_an_existence_query() -> None:
    statement = streaming_sql.materialized_view("prediction-events")
    assert statement.skip_if_rows == (
        "SELECT 1 FROM svv_mv_info WHERE schema_name = 'public' "
        f"AND name = 'prediction_events_v{SCHEMA_VERSION}'"
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
        streaming_sql.materialized_view("t", [PayloadField('a"; DROP', str, True)])


def test_statements_in_order_schema_then_one_view_per_topic() -> None:
    statements = streaming_sql.streaming_ingestion(
        iam_role_arn=ROLE, cluster_arn=CLUSTER, topics=["a", "b"]
    )
    heads = [s.sql.split(" FROM ")[0].split(" AUTO ")[0] for s in statements]
    assert heads == [
        "CREATE EXTERNAL SCHEMA IF NOT EXISTS kiln_msk",
        f"CREATE MATERIALIZED VIEW public.a_v{SCHEMA_VERSION}",
        f"CREATE MATERIALIZED VIEW public.b_v{SCHEMA_VERSION}",
    ]
