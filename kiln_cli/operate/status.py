"""`kiln status`: an environment's stacks, its endpoint and its latest SageMaker training jobs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kiln import naming
from kiln.contract import COMPONENTS, Component, Outputs
from kiln_cli.operate import endpoint as ep
from kiln_cli.operate import gpu_cluster
from kiln_cli.operate.aws import Aws, OperateError
from kiln_cli.operate.progress import elapsed


def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else "-"


def _utc(moment: Any) -> datetime | None:
    return moment.astimezone(UTC) if isinstance(moment, datetime) else None


# Stack states whose reason is not worth a line (anything else, rollbacks included, shows it).
HEALTHY = frozenset({"CREATE_COMPLETE", "UPDATE_COMPLETE", "IMPORT_COMPLETE", "not deployed"})


@dataclass(frozen=True)
class StackRow:
    name: str
    status: str  # CloudFormation's, or "not deployed"
    updated: datetime | None
    reason: str | None = None


@dataclass
class Report:
    """What `kiln status` shows; `problems` are sections it could not read."""

    environment: str
    region: str
    account: str
    stacks: list[StackRow] = field(default_factory=list)
    endpoint: list[tuple[str, str]] = field(default_factory=list)
    endpoint_title: str = "endpoint"
    jobs: list[tuple[str, str, str, str]] = field(default_factory=list)
    job_prefix: str = ""
    gpu: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def deployment_state(stack: dict[str, Any]) -> str:
    """The serving stack's last deployment in words."""
    status = str(stack.get("StackStatus", "?"))
    at = when(_utc(stack.get("LastUpdatedTime") or stack.get("CreationTime")))
    reason = stack.get("StackStatusReason")
    if status.endswith("_IN_PROGRESS"):
        return f"in progress ({status}, since {at})"
    if "ROLLBACK" in status:
        return f"rolled back ({status}, {at})" + (f": {reason}" if reason else "")
    if status.endswith("_COMPLETE"):
        return f"succeeded ({status}, {at})"
    return f"{status} ({at})" + (f": {reason}" if reason else "")


def _stacks(aws: Aws) -> list[StackRow]:
    rows = []
    for component in COMPONENTS:
        stack = aws.stack(component)
        if stack is None:
            rows.append(StackRow(aws.stack_name(component), "not deployed", None))
        else:
            rows.append(
                StackRow(
                    aws.stack_name(component),
                    str(stack["StackStatus"]),
                    _utc(stack.get("LastUpdatedTime") or stack.get("CreationTime")),
                    stack.get("StackStatusReason"),
                )
            )
    return rows


def _endpoint(aws: Aws, report: Report) -> None:
    env = aws.settings.name
    serving_stack = aws.stack(Component.SERVING)
    if serving_stack is None:
        report.endpoint.append(("status", "serving stack not deployed"))
        return
    name = aws.output(Outputs.ENDPOINT_NAME)
    report.endpoint_title = f"endpoint {name}"
    described = ep.describe_endpoint(aws, name)
    rows = report.endpoint
    if described is None:
        rows.append(
            (
                "status",
                "no endpoint yet (deploy a model: kiln deploy-model --env "
                f"{env} --artifact s3://.../model.tar.gz)",
            )
        )
        rows.append(("last deployment", deployment_state(serving_stack)))
        return
    status = str(described["EndpointStatus"])
    rows.append(("status", f"{status} (since {when(_utc(described.get('LastModifiedTime')))})"))
    if described.get("FailureReason"):
        rows.append(("failure reason", str(described["FailureReason"])))
    current = ep.serving(aws, described)
    artifact = current.artifact
    if current.package is not None:
        artifact = artifact or aws.outputs(Component.SERVING).get(Outputs.MODEL_ARTIFACT.key)
    rows.append(("model", artifact or "-"))
    rows.append(("model package", _package_row(aws, current.package, current.specification)))
    rows.append(("config", f"{current.config_name} (model {current.model_name or '-'})"))
    variants = described.get("ProductionVariants") or []
    rows.append(
        (
            "instances",
            ", ".join(
                f"{v.get('VariantName')}: {v.get('CurrentInstanceCount', '?')} x "
                f"{current.instance_type or '?'}"
                for v in variants
            )
            or "-",
        )
    )
    pending = described.get("PendingDeploymentSummary")
    if pending:
        rows.append(
            (
                "deploying",
                f"to {pending.get('EndpointConfigName')} since "
                f"{when(_utc(pending.get('StartTime')))}",
            )
        )
    rows.append(("last deployment", deployment_state(serving_stack)))
    names = ep.rollback_alarm_names(aws, name, described)
    states = ep.alarm_states(aws, names)
    rows.append(
        (
            "rollback alarms",
            # One alarm per line: their CloudFormation-generated names are long.
            "\n".join(f"{states.get(n, {}).get('StateValue', '?'):<6}{n}" for n in names)
            or "none found",
        )
    )


def _package_row(aws: Aws, package: str | None, specification: str | None = None) -> str:
    """Which registry version the endpoint runs, with its approval state and the inference
    specification (engine) it was made from."""
    if package is None:
        return "none (a raw artifact, not a registry version)"
    from kiln_cli.operate.models import Registry

    try:
        version = Registry(aws).describe(package)
    except OperateError as err:
        return f"{package} (cannot read it: {err})"
    approved = ", ".join(sorted(version.approvals)) or "no environment"
    held = {s.name: s.engine for s in version.specifications}
    spec = f"specification {specification}" if specification else "primary specification"
    engine = held.get(specification)
    served = f", {spec} ({engine})" if engine else f", {spec}"
    return f"{version.ref} ({version.status}, approved for {approved}){served}"


def _jobs(aws: Aws, report: Report, count: int) -> None:
    prefix = f"{naming.prefix(aws.settings)}-"
    report.job_prefix = prefix
    summaries = aws.call(
        "sagemaker",
        "list_training_jobs",
        NameContains=prefix,
        SortBy="CreationTime",
        SortOrder="Descending",
        MaxResults=100,
    )["TrainingJobSummaries"]
    mine = [s for s in summaries if str(s["TrainingJobName"]).startswith(prefix)][:count]
    for job in mine:
        created, ended = _utc(job.get("CreationTime")), _utc(job.get("TrainingEndTime"))
        state = str(job["TrainingJobStatus"])
        if state == "InProgress" and job.get("SecondaryStatus"):
            state = f"InProgress/{job['SecondaryStatus']}"
        took = elapsed((ended - created).total_seconds()) if created and ended else "-"
        report.jobs.append((str(job["TrainingJobName"]), state, when(created), took))


def _gpu(kube: gpu_cluster.Kubectl, report: Report) -> None:
    """GPU capacity from the cluster itself. kubectl reaches it with its own kubeconfig, not
    the AWS credentials of the other sections: without one the section says so and the
    command still succeeds."""
    try:
        report.gpu.extend(gpu_cluster.capacity(kube).rows())
    except OperateError as err:
        report.gpu.append(("unavailable", f"{err} (aws eks update-kubeconfig first)"))


def gather(aws: Aws, *, jobs: int = 5, kube: gpu_cluster.Kubectl | None = None) -> Report:
    """Reads every section; one that fails is recorded in `problems`, the others still shown.
    With `kube` (kubectl on the cluster), also the GPU capacity in use and queued."""
    account = aws.check_identity()
    report = Report(aws.settings.name, aws.region, account)
    sections: list[tuple[str, Callable[[], None]]] = [
        ("stacks", lambda: report.stacks.extend(_stacks(aws))),
        ("endpoint", lambda: _endpoint(aws, report)),
        ("training jobs", lambda: _jobs(aws, report, jobs)),
    ]
    if kube is not None:
        sections.append(("GPU capacity", lambda: _gpu(kube, report)))
    for title, read in sections:
        try:
            read()
        except OperateError as err:
            report.problems.append(f"{title}: {err}")
    return report


def render(report: Report) -> str:
    lines = [f"kiln {report.environment}: region {report.region}, account {report.account}", ""]
    lines.append("stacks")
    width = max((len(row.name) for row in report.stacks), default=0) + 2
    for row in report.stacks:
        line = f"  {row.name:<{width}}{row.status:<26}{when(row.updated) if row.updated else ''}"
        if row.reason and row.status not in HEALTHY:
            line += f"  {row.reason}"
        lines.append(line.rstrip())
    lines += ["", report.endpoint_title]
    for key, value in report.endpoint:
        lines.append(f"  {key:<17}" + value.replace("\n", "\n" + " " * 19))
    lines += ["", f"training jobs (SageMaker, latest first, names {report.job_prefix}*)"]
    if report.jobs:
        name_width = max(len(job[0]) for job in report.jobs) + 2
        for name, state, created, took in report.jobs:
            lines.append(f"  {name:<{name_width}}{state:<24}{created:<22}{took}".rstrip())
    else:
        lines.append("  none")
    if report.gpu:
        lines += ["", "GPU capacity (EKS: Karpenter nodes, Kueue queues)"]
        width = max(len(key) for key, _ in report.gpu) + 2
        lines += [f"  {key:<{width}}{value}" for key, value in report.gpu]
    if report.problems:
        lines += ["", "could not read:"] + [f"  {problem}" for problem in report.problems]
    return "\n".join(lines) + "\n"
