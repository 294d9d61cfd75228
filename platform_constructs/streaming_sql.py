"""Generates the Redshift SQL for streaming ingestion from MSK, from the prediction-event schema.

Redshift's streaming-ingestion guidance (https://docs.aws.amazon.com/redshift/latest/dg/
materialized-view-streaming-ingestion.html, "Data-parsing best practices") shapes it: each
record is parsed once, with JSON_PARSE into a SUPER column, instead of once per extracted
column (JSON_EXTRACT_PATH_TEXT re-parses the record for every column, and fails past 64 KB),
and each topic feeds one materialized view, not several. So:

- one auto-refreshing materialized view per topic, `public.<topic>_stream`: Kafka metadata and
  the parsed `payload` (SUPER) of every record that is valid JSON, whatever its schema version;
- one plain view per event schema version, `public.<topic>_v<version>`: typed columns
  projected from `payload` with PartiQL, for the records of that version. A new schema version
  is a new plain view beside the old one over the same materialized view: nothing is
  re-ingested and nothing already ingested is lost.

The statements are idempotent: the external schema is created `IF NOT EXISTS`, the
materialized view comes with a query that finds it (the deploy-time handler then skips it),
and the versioned views are `CREATE OR REPLACE`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from kiln_events.events import MAX_ID_CHARS, SCHEMA_VERSION, PayloadField, payload_fields

EXTERNAL_SCHEMA = "kiln_msk"
VIEW_SCHEMA = "public"
# Redshift's VARCHAR limit is in bytes; 65535 holds MAX_TEXT_CHARS of 4-byte UTF-8.
_TEXT_BYTES = 65535
_TEXT_FIELDS = {"prompt_text", "completion_text"}
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,126}$")


@dataclass(frozen=True)
class Statement:
    """One SQL statement for the handler; skipped when `skip_if_rows` returns any row."""

    sql: str
    skip_if_rows: str | None = None
    # Run first when an update changes `sql` (the object exists, but with old settings).
    drop_when_changed: str | None = None

    def as_property(self) -> dict[str, str]:
        """The form the custom resource's properties carry (CloudFormation strings)."""
        prop = {"Sql": self.sql}
        if self.skip_if_rows is not None:
            prop["SkipIfRows"] = self.skip_if_rows
        if self.drop_when_changed is not None:
            prop["DropWhenChanged"] = self.drop_when_changed
        return prop


def _identifier(name: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"{name!r} is not a safe SQL identifier (lower-case, digits, _)")
    return name


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def view_name(topic: str, schema_version: int = SCHEMA_VERSION) -> str:
    """The materialized view of one topic, e.g. `prediction_events_v1`."""
    return _identifier(re.sub(r"[^a-z0-9]+", "_", topic.lower()).strip("_") + f"_v{schema_version}")


def redshift_type(field: PayloadField) -> str:
    """The column type a payload field is cast to."""
    if field.python_type is bool:
        return "BOOLEAN"
    if field.python_type is int:
        return "BIGINT"
    if field.python_type is float:
        return "DOUBLE PRECISION"
    if field.python_type is datetime:
        return "TIMESTAMPTZ"
    if field.python_type is str:
        # Identifiers are at most MAX_ID_CHARS characters, 4 bytes each in UTF-8.
        return f"VARCHAR({_TEXT_BYTES if field.name in _TEXT_FIELDS else MAX_ID_CHARS * 4})"
    raise TypeError(f"no Redshift type for {field.name}: {field.python_type!r}")


def _projection(field: PayloadField) -> str:
    """A PartiQL projection of one payload key to its typed column. A missing key or a JSON
    null is NULL; a SUPER string cast to TIMESTAMPTZ goes through VARCHAR."""
    path = f"payload.{_identifier(field.name)}"
    kind = redshift_type(field)
    if kind == "TIMESTAMPTZ":
        return f"{path}::VARCHAR::TIMESTAMPTZ AS {field.name}"
    return f"{path}::{kind} AS {field.name}"


def external_schema(*, iam_role_arn: str, cluster_arn: str) -> Statement:
    """The external schema over the MSK cluster, read with IAM authentication.

    `IF NOT EXISTS` would keep a schema pointing at a replaced cluster or role: when either
    changes, the handler first drops the schema with the views built on it (they read the old
    cluster; its events are in the raw zone through Firehose), and the views are re-created.
    """
    return Statement(
        f"CREATE EXTERNAL SCHEMA IF NOT EXISTS {EXTERNAL_SCHEMA} FROM MSK "
        f"IAM_ROLE {_literal(iam_role_arn)} AUTHENTICATION iam "
        f"CLUSTER_ARN {_literal(cluster_arn)}",
        drop_when_changed=f"DROP SCHEMA IF EXISTS {EXTERNAL_SCHEMA} CASCADE",
    )


def stream_view_name(topic: str) -> str:
    """The one materialized view of a topic, e.g. `prediction_events_stream`."""
    return _identifier(re.sub(r"[^a-z0-9]+", "_", topic.lower()).strip("_") + "_stream")


def materialized_view(topic: str) -> Statement:
    """The topic's auto-refreshing materialized view: each record parsed once into SUPER.

    Records that are not valid JSON are left out (CAN_JSON_PARSE) rather than failing the
    refresh.
    """
    name = stream_view_name(topic)
    select = ",\n  ".join(
        [
            "kafka_partition",
            "kafka_offset",
            "kafka_timestamp",
            "FROM_VARBYTE(kafka_key, 'utf-8') AS kafka_key",
            "JSON_PARSE(kafka_value) AS payload",
        ]
    )
    sql = (
        f"CREATE MATERIALIZED VIEW {VIEW_SCHEMA}.{name} AUTO REFRESH YES AS\n"
        f"SELECT\n  {select}\n"
        f'FROM {EXTERNAL_SCHEMA}."{topic}"\n'
        "WHERE CAN_JSON_PARSE(kafka_value)"
    )
    exists = (
        f"SELECT 1 FROM svv_mv_info WHERE schema_name = {_literal(VIEW_SCHEMA)} "
        f"AND name = {_literal(name)}"
    )
    return Statement(sql, skip_if_rows=exists)


def version_view(
    topic: str,
    fields: list[PayloadField] | None = None,
    schema_version: int = SCHEMA_VERSION,
) -> Statement:
    """A plain view with one typed column per scalar payload field of `schema_version`,
    projected from the materialized view's `payload` (no second parse, no second ingestion).

    Raw prompt and completion text are not typed columns (together they can exceed a
    VARCHAR); they, and any field added later, are read from the `payload` SUPER column.
    """
    typed = [
        f
        for f in (fields if fields is not None else payload_fields())
        if f.name not in _TEXT_FIELDS
    ]
    select = ",\n  ".join(
        [
            "kafka_partition",
            "kafka_offset",
            "kafka_timestamp",
            "kafka_key",
            *(_projection(f) for f in typed),
            "payload",
        ]
    )
    sql = (
        f"CREATE OR REPLACE VIEW {VIEW_SCHEMA}.{view_name(topic, schema_version)} AS\n"
        f"SELECT\n  {select}\n"
        f"FROM {VIEW_SCHEMA}.{stream_view_name(topic)}\n"
        f"WHERE payload.schema_version = {int(schema_version)}"
    )
    return Statement(sql)


def streaming_ingestion(
    *, iam_role_arn: str, cluster_arn: str, topics: list[str]
) -> list[Statement]:
    """Every statement, in order: the external schema, then per topic its materialized view
    and the view of the current schema version."""
    return [
        external_schema(iam_role_arn=iam_role_arn, cluster_arn=cluster_arn),
        *(s for topic in topics for s in (materialized_view(topic), version_view(topic))),
    ]
