"""What carries an NVIDIA XID error from a GPU node's kernel to the XID alarm, end to end and
offline: the node's journal entry, the amazon-cloudwatch-observability add-on's Fluent Bit
host pipeline (as its chart at the pinned release writes it), the record CloudWatch Logs
receives, and the compute stack's metric filters as synthesized.

The pipeline below restates `host-log.conf` of aws-observability/helm-charts, tag
amazon-cloudwatch-observability-6.2.0, charts/amazon-cloudwatch-observability/values.yaml:

    [INPUT]  systemd, Tag host.dmesg,    Systemd_Filter _TRANSPORT=kernel, Path /var/log/journal
    [INPUT]  systemd, Tag host.messages, Systemd_Filter PRIORITY=0 ... PRIORITY=6
    [INPUT]  systemd, Tag host.secure,   Systemd_Filter SYSLOG_FACILITY=10
    [FILTER] aws (imds_version v2; defaults: ec2_instance_id and az on)
    [FILTER] grep host.messages, Exclude SYSLOG_FACILITY /^(2|9|10)$/
    [FILTER] modify host.*, Rename _HOSTNAME host, MESSAGE message, SYSLOG_IDENTIFIER ident,
             SYSLOG_PID pid; Remove_regex [A-Z]
    [OUTPUT] cloudwatch_logs, log_group_name /aws/containerinsights/${CLUSTER_NAME}/host

A new add-on release must be re-read against that file before its version is pinned
(`test_addon_release_is_the_one_the_host_pipeline_was_read_from`)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from kiln.settings import Settings
from platform_constructs.eks import (
    CLOUDWATCH_ADDON,
    HOST_LOG_INSTANCE_FIELD,
    HOST_LOG_MESSAGE_FIELD,
    HOST_LOG_VERIFIED_ADDON,
    XID_METRIC,
    XID_NAMESPACE,
)
from tests.support import ENVIRONMENTS, Synthesis

INSTANCE = "i-0123456789abcdef0"
XID_LINE = "NVRM: Xid (PCI:0000:10:1c): 79, pid=1234, name=python, GPU has fallen off the bus."


def journal_entry(message: str, *, transport: str, priority: int, facility: int) -> dict[str, str]:
    """A journal entry as sd-journal hands it to Fluent Bit's systemd input."""
    return {
        "MESSAGE": message,
        "PRIORITY": str(priority),
        "SYSLOG_FACILITY": str(facility),
        "SYSLOG_IDENTIFIER": "kernel",
        "_TRANSPORT": transport,
        "_HOSTNAME": "ip-10-10-1-17.ec2.internal",
        "_BOOT_ID": "b0",
        "__REALTIME_TIMESTAMP": "1764672000000000",
    }


def _input_tags(entry: dict[str, str]) -> list[str]:
    """The host inputs whose Systemd_Filter matches (filters on one key are OR'ed)."""
    tags = []
    if entry.get("_TRANSPORT") == "kernel":
        tags.append("host.dmesg")
    if entry.get("PRIORITY") in {str(p) for p in range(7)}:
        tags.append("host.messages")
    if entry.get("SYSLOG_FACILITY") == "10":
        tags.append("host.secure")
    return tags


def host_pipeline(entry: dict[str, str]) -> list[str]:
    """The JSON log events the host log group receives for one journal entry."""
    events = []
    for tag in _input_tags(entry):
        record: dict[str, Any] = dict(entry)
        record |= {"ec2_instance_id": INSTANCE, "az": "us-east-1a"}  # aws filter
        if tag == "host.messages" and re.fullmatch(r"2|9|10", record["SYSLOG_FACILITY"]):
            continue  # grep filter
        for old, new in (
            ("_HOSTNAME", "host"),
            ("MESSAGE", "message"),
            ("SYSLOG_IDENTIFIER", "ident"),
            ("SYSLOG_PID", "pid"),
        ):
            if old in record:
                record[new] = record.pop(old)
        record = {k: v for k, v in record.items() if not re.search("[A-Z]", k)}
        events.append(json.dumps(record))
    return events


_JSON_EQUALS = re.compile(r'^\{ (?P<selector>\$\.[A-Za-z0-9_.]+) = "(?P<value>[^"]*)" \}$')


def pattern_matches(pattern: str, event: str) -> bool:
    """CloudWatch Logs' JSON string comparison `{ $.a.b = "value" }`, where '*' may open or
    close the value (CDK FilterPattern.stringValue). Any other pattern form fails the test:
    teach this evaluator the new form before relying on it."""
    match = _JSON_EQUALS.match(pattern)
    assert match, f"pattern {pattern!r} is not a single JSON string comparison"
    value: Any = json.loads(event)
    for key in match.group("selector")[2:].split("."):
        if not isinstance(value, dict) or key not in value:
            return False
        value = value[key]
    if not isinstance(value, str):
        return False
    expected = match.group("value")
    regex = re.escape(expected.strip("*"))
    regex = (".*" if expected.startswith("*") else "") + regex
    regex += ".*" if expected.endswith("*") else ""
    return re.fullmatch(regex, value, re.DOTALL) is not None


def select(selector: str, event: str) -> Any:
    value: Any = json.loads(event)
    for key in selector[2:].split("."):
        value = value[key]
    return value


def xid_filters(synthesis: Synthesis, env: str) -> list[dict[str, Any]]:
    compute = synthesis.stack(env, "compute")
    groups = compute.resources_of_type("AWS::Logs::LogGroup")
    (host,) = [
        logical_id
        for logical_id, group in groups.items()
        if str(group["Properties"].get("LogGroupName", "")).endswith("/host")
    ]
    filters = [
        f["Properties"] for f in compute.resources_of_type("AWS::Logs::MetricFilter").values()
    ]
    assert filters and all(f["LogGroupName"] == {"Ref": host} for f in filters)
    return filters


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_an_xid_kernel_line_counts_on_its_node(synthesis: Synthesis, env: str) -> None:
    xid = journal_entry(XID_LINE, transport="kernel", priority=3, facility=0)
    events = host_pipeline(xid)
    # The kernel input and the messages input both carry it: two log lines per XID.
    assert len(events) == 2
    for f in xid_filters(synthesis, env):
        (transformation,) = f["MetricTransformations"]
        assert (transformation["MetricNamespace"], transformation["MetricName"]) == (
            XID_NAMESPACE,
            XID_METRIC,
        )
        assert transformation["MetricValue"] == "1"
        assert [pattern_matches(f["FilterPattern"], e) for e in events] == [True, True]
        for dimension in transformation.get("Dimensions", []):
            assert dimension == {"Key": "InstanceId", "Value": HOST_LOG_INSTANCE_FIELD}
            assert {select(dimension["Value"], e) for e in events} == {INSTANCE}


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_other_host_lines_count_nothing(synthesis: Synthesis, env: str) -> None:
    others = [
        journal_entry(
            "NVRM: loading NVIDIA UNIX x86_64 Kernel Module",
            transport="kernel",
            priority=6,
            facility=0,
        ),
        journal_entry(
            "pam_unix(sshd:session): Xid session opened",
            transport="syslog",
            priority=6,
            facility=10,
        ),
        journal_entry("Started kubelet.service", transport="journal", priority=6, facility=3),
    ]
    events = [e for entry in others for e in host_pipeline(entry)]
    assert events
    for f in xid_filters(synthesis, env):
        assert not any(pattern_matches(f["FilterPattern"], e) for e in events)


def test_the_fields_the_filters_read_are_the_records_fields() -> None:
    """Both selectors name keys the pipeline leaves on the record; the field a filter read
    before (`$.log`, the container log key) is not one of them."""
    (event, _) = host_pipeline(journal_entry(XID_LINE, transport="kernel", priority=3, facility=0))
    record = json.loads(event)
    assert set(record) == {"message", "host", "ident", "ec2_instance_id", "az"}
    assert HOST_LOG_MESSAGE_FIELD == "$.message" and HOST_LOG_INSTANCE_FIELD == "$.ec2_instance_id"
    assert "log" not in record


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_addon_release_is_the_one_the_host_pipeline_was_read_from(
    settings_by_env: dict[str, Settings], env: str
) -> None:
    version = settings_by_env[env].compute.addons.get(CLOUDWATCH_ADDON)
    assert version is not None and version.startswith(f"{HOST_LOG_VERIFIED_ADDON}-eksbuild."), (
        f"config/{env}.yaml pins {CLOUDWATCH_ADDON} {version}; the XID filters were checked "
        f"against the host-log.conf of {HOST_LOG_VERIFIED_ADDON}. Read that release's "
        "charts/amazon-cloudwatch-observability/values.yaml in aws-observability/helm-charts, "
        "update platform_constructs/eks.py (HOST_LOG_*) and this test, then the pin."
    )
