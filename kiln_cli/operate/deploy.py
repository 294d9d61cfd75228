"""`kiln deploy-model`: rolls a model artifact through the serving stack's guarded deployment.

The serving stack turns `-c modelArtifact=<uri>` into a new SageMaker model and endpoint
config; CloudFormation updates the endpoint blue/green with canary or linear traffic shifting,
and SageMaker rolls the update back by itself when a rollback alarm fires. This module checks
the artifact, runs the CDK deploy, follows the endpoint and says which way it went.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from kiln.config import CONFIG_DIR
from kiln.contract import MODELS_PREFIX, Component, Outputs, is_model_prefix
from kiln.settings import Settings, model_artifact_problem
from kiln_cli.operate import endpoint as ep
from kiln_cli.operate.aws import (
    ACCESS_DENIED,
    Aws,
    AwsError,
    OperateError,
    cdk_stack_id,
    parse_s3_uri,
)
from kiln_cli.operate.models import registry_home
from kiln_cli.operate.progress import Progress, elapsed, wait_for

# The CDK app's directory (cdk.json): the checkout kiln runs from.
REPO = Path(__file__).resolve().parents[2]
Result = Literal["promoted", "rolled back", "failed", "unchanged"]
Runner = Callable[[Sequence[str], Path], int]
# Endpoint states that end a deployment (OutOfService: SageMaker took it out after a failure).
SETTLED = ("InService", "Failed", "UpdateRollbackFailed", "OutOfService", "absent")
EXIT_CODES: dict[Result, int] = {"promoted": 0, "unchanged": 0, "failed": 1, "rolled back": 3}


@dataclass
class Outcome:
    """How a deployment ended; `serving` is the artifact the endpoint serves afterwards."""

    result: Result
    endpoint: str
    artifact: str
    serving: str | None
    status: str | None
    took: float = 0.0
    alarms: list[ep.FiredAlarm] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.result]


def cdk_deploy_argv(
    settings: Settings,
    artifact: str,
    config_dir: Path = CONFIG_DIR,
    package: str | None = None,
    specification: str | None = None,
) -> list[str]:
    """The serving stack's deploy with the new artifact (of registry version `package`, served
    from its additional inference specification `specification` when given), and nothing else
    (`--exclusively`)."""
    argv = ["npx", "cdk", "deploy", cdk_stack_id(settings, Component.SERVING), "--exclusively"]
    argv += ["-c", f"env={settings.name}", "-c", f"modelArtifact={artifact}"]
    if package is not None:
        argv += ["-c", f"modelPackage={package}"]
    if specification is not None:
        argv += ["-c", f"inferenceSpecification={specification}"]
    if config_dir != CONFIG_DIR:
        argv += ["-c", f"configDir={config_dir}"]
    return [*argv, "--require-approval", "never"]


def run_cdk(argv: Sequence[str], cwd: Path) -> int:
    """Runs the CDK CLI in the checkout, with the venv's Node first on PATH; its exit status."""
    if not (cwd / "cdk.json").exists():
        raise OperateError(
            f"deploy-model runs the CDK app, but {cwd} has no cdk.json: run kiln from a kiln "
            "checkout (`make install-infra`, then `.venv/bin/kiln`)"
        )
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    try:
        return subprocess.run(list(argv), cwd=cwd, env=env, check=False).returncode
    except FileNotFoundError as err:
        raise OperateError(
            f"{argv[0]} is not installed: run `make install-infra` (Node and the pinned CDK "
            "CLI go into .venv/ and node_modules/)"
        ) from err


def check_artifact(aws: Aws, artifact: str) -> None:
    """HeadObject on a model.tar.gz, or a listing of an uncompressed model's prefix (which must
    hold config.json and only keys SageMaker can copy to /opt/ml/model); a clear error when it
    is missing or unreadable."""
    # parse_s3_uri takes objects only: a prefix's bucket and key are split here.
    bucket, key = (
        artifact[5:].split("/", 1) if is_model_prefix(artifact) else parse_s3_uri(artifact)
    )
    try:
        if is_model_prefix(artifact):
            _check_model_prefix(aws, artifact, bucket, key)
        else:
            aws.call("s3", "head_object", Bucket=bucket, Key=key)
    except AwsError as err:
        hint = _artifact_hint(aws)
        if err.code in ("404", "NoSuchKey", "NotFound"):
            raise OperateError(
                f"artifact not found: there is no object {artifact}. {hint}"
            ) from err
        if err.code == "NoSuchBucket":
            raise OperateError(
                f"artifact not found: bucket {bucket} does not exist. {hint}"
            ) from err
        if err.code in ACCESS_DENIED:
            raise OperateError(
                f"cannot read {artifact}: access denied. You need s3:GetObject on it and "
                "kms:Decrypt on the data lake key; S3 also answers this way for a missing "
                f"object when you may not list the bucket. {hint}"
            ) from err
        raise


def _check_model_prefix(aws: Aws, artifact: str, bucket: str, prefix: str) -> None:
    keys: list[str] = []
    token: str | None = None
    while True:
        page = aws.call(
            "s3",
            "list_objects_v2",
            Bucket=bucket,
            Prefix=prefix,
            **({"ContinuationToken": token} if token else {}),
        )
        keys += [str(o["Key"]) for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            break
    names = [k[len(prefix) :] for k in keys]
    if not names:
        raise OperateError(f"artifact not found: there are no objects under {artifact}")
    problems = model_prefix_problems(names)
    if problems:
        raise OperateError(
            f"{artifact} cannot be served uncompressed; SageMaker copies each object under the "
            "prefix to /opt/ml/model/<rest of its key>, and these names break that "
            "(S3ModelDataSource):\n  - " + "\n  - ".join(problems),
            exit_code=2,
        )


def model_prefix_problems(names: Sequence[str]) -> list[str]:
    """What keeps the objects `names` (keys less the prefix) from forming a model directory:
    SageMaker's rules for uncompressed model data (S3ModelDataSource.CompressionType: no empty
    or blank name, no null bytes, none over 255 bytes, no `.` or `..`, no object that is also
    a directory, no 0-byte "folder" object ending in /), and config.json at the top."""
    problems = []
    files = set(names)
    for name in names:
        if name.endswith("/"):
            problems.append(f"{name!r} is a folder object (S3 console folders break deployment)")
            continue
        for part in name.split("/"):
            if not part.strip() or "\0" in part or len(part.encode()) > 255 or part in (".", ".."):
                problems.append(f"{name!r} has a path part SageMaker refuses: {part[:40]!r}")
                break
        parents = ["/".join(name.split("/")[:i]) for i in range(1, name.count("/") + 1)]
        clashing = [p for p in parents if p in files]
        if clashing:
            problems.append(f"{clashing[0]!r} is both a file and the directory of {name!r}")
    if "config.json" not in files:
        problems.append(
            "no config.json at the top: the prefix must be the model directory itself "
            f"(found {sorted(names)[:5]})"
        )
    return problems


def _artifact_hint(aws: Aws) -> str:
    try:
        bucket = aws.output(Outputs.ARTIFACTS_BUCKET)
    except OperateError:
        return f"Training writes <artifacts bucket>/{MODELS_PREFIX}<job>/..."
    return (
        f"Training writes s3://{bucket}/{MODELS_PREFIX}<job>/output/model.tar.gz (SageMaker) "
        f"or s3://{bucket}/{MODELS_PREFIX}<job>/model.tar.gz (EKS); `kiln status --env "
        f"{aws.settings.name}` lists the latest jobs."
    )


def stack_failure(aws: Aws, component: Component, since: datetime) -> str | None:
    """The first failed resource's reason in the stack's events since `since`, if any."""
    try:
        events = aws.call(
            "cloudformation", "describe_stack_events", StackName=aws.stack_name(component)
        )["StackEvents"]
    except AwsError:
        return None
    failed = [
        e
        for e in events
        if e.get("Timestamp")
        and e["Timestamp"] >= since
        and str(e.get("ResourceStatus", "")).endswith("_FAILED")
        and e.get("ResourceStatusReason")
        and "cancelled" not in str(e["ResourceStatusReason"]).lower()
    ]
    if not failed:
        return None
    first = failed[-1]  # events come newest first
    return f"{first.get('LogicalResourceId')}: {first['ResourceStatusReason']}"


def deploy_model(
    aws: Aws,
    artifact: str,
    *,
    runner: Runner = run_cdk,
    progress: Progress | None = None,
    interval: float = 15.0,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    package: str | None = None,
    specification: str | None = None,
) -> Outcome:
    """Deploys `artifact` (the artifact of registry version `package`, when given, served from
    its inference specification `specification`, or the primary one)."""
    settings = aws.settings
    problem = model_artifact_problem(artifact)
    if problem is not None:
        raise OperateError(f"--artifact {problem}", exit_code=2)
    if package is None and settings.is_prod:
        raise OperateError(
            f"{settings.name} is a prod-tier environment: it serves approved registry versions "
            f"only; register the artifact (`kiln models register`), approve it for each "
            f"environment up to {settings.name}, then `kiln deploy-model --env {settings.name} "
            "--latest-approved <model>`",
            exit_code=2,
        )
    served = package or artifact
    progress = progress or Progress()
    aws.check_identity()
    check_artifact(aws, artifact)
    name = aws.output(Outputs.ENDPOINT_NAME)
    before = ep.describe_endpoint(aws, name)
    before_serving = ep.serving(aws, before) if before else None
    if (
        before is not None
        and before_serving is not None
        and before["EndpointStatus"] == "InService"
        and before_serving.identity == served
        # The same version from another engine's specification is a change (engine switch).
        and before_serving.specification == specification
    ):
        return Outcome("unchanged", name, served, served, "InService")
    if before is not None and before["EndpointStatus"] not in ("InService", "Failed"):
        raise OperateError(
            f"endpoint {name} is {before['EndpointStatus']}: wait until the change under way "
            f"ends (`kiln status --env {settings.name}`), then deploy again"
        )
    deployment = settings.serving.deployment
    started_at, started = now(), progress.clock()
    if deployment.traffic == "all_at_once":
        shifting = "all at once"
    else:
        step = (
            f"{deployment.step_instances} instance(s)"
            if deployment.step_instances is not None
            else f"{deployment.step_percent}%"
        )
        shifting = f"{deployment.traffic} {step}"
    progress.note(
        f"deploying {served} to {name} ({shifting}, "
        f"{deployment.wait_minutes} min bake, auto-rollback on alarms)"
    )
    argv = cdk_deploy_argv(settings, artifact, aws.config_dir, package, specification)
    progress.note("running " + " ".join(argv))
    code = runner(argv, REPO)
    progress.note(f"cdk deploy exited {code}")
    aws.forget(Component.SERVING)

    after: dict[str, Any] = {}

    def poll() -> tuple[str, str]:
        after.clear()
        after.update(ep.describe_endpoint(aws, name) or {"EndpointStatus": "absent"})
        pending = after.get("PendingDeploymentSummary")
        detail = f"to {pending.get('EndpointConfigName')}" if pending else ""
        return str(after["EndpointStatus"]), str(after.get("FailureReason") or detail)

    status = wait_for(
        poll,
        SETTLED,
        progress=progress,
        subject=f"endpoint {name}",
        interval=interval,
        timeout=(deployment.max_deployment_minutes + 30) * 60,
        hint=f"kiln status --env {settings.name}",
        sleep=sleep,
    )
    took = progress.clock() - started
    outcome = Outcome("failed", name, served, None, status, took)
    if status == "absent":
        outcome.reasons.append(
            stack_failure(aws, Component.SERVING, started_at)
            or f"cdk deploy exited {code} and there is no endpoint {name}: see its output above"
        )
        return outcome
    outcome.serving = ep.serving(aws, after).identity
    if after.get("FailureReason"):
        outcome.reasons.append(f"endpoint: {after['FailureReason']}")
    if status != "InService":
        return _with_cfn_reason(aws, outcome, started_at)
    if outcome.serving == served:
        outcome.result = "promoted"
        if code != 0:
            outcome.reasons.append(f"cdk deploy exited {code} after the endpoint changed")
        return outcome
    names = ep.rollback_alarm_names(aws, name, after)
    outcome.alarms = ep.fired_since(aws, names, started_at)
    touched = before is not None and after.get("LastModifiedTime") != before.get("LastModifiedTime")
    if outcome.alarms or touched or outcome.reasons:
        outcome.result = "rolled back"
    elif code != 0:
        outcome.reasons.append(
            f"cdk deploy exited {code} before the endpoint changed (synth, the image build or "
            "permissions): see its output above"
        )
    return _with_cfn_reason(aws, outcome, started_at)


def deploy_version(aws: Aws, version: Any, **options: Any) -> Outcome:
    """Deploys a registry version (`kiln_cli.operate.models.Version`) approved for the
    environment: SageMaker makes the model from the package, which it allows only while the
    version is Approved."""
    env = aws.settings.name
    if not version.approved_for(env):
        approved = ", ".join(sorted(version.approvals)) or "no environment"
        raise OperateError(
            f"{version.ref} is {version.status} and approved for {approved}, not for {env}: "
            f"approve it first (`kiln models approve {version.ref} --env {env} --reason ...`)",
            exit_code=2,
        )
    if not version.artifact:
        raise OperateError(f"{version.ref} names no model artifact; register it again")
    # A version carries one image per specification, and SageMaker starts the chosen one with
    # the engine's variables: the environment's engine picks it by name, and a version without
    # one for the engine is refused before anything is deployed.
    specification = version.specification_for(
        aws.settings.serving.engine, home=registry_home(aws.settings, aws.config_dir)
    )
    return deploy_model(
        aws, version.artifact, package=version.arn, specification=specification, **options
    )


def _with_cfn_reason(aws: Aws, outcome: Outcome, since: datetime) -> Outcome:
    reason = stack_failure(aws, Component.SERVING, since)
    if reason:
        outcome.reasons.append(f"CloudFormation: {reason}")
    return outcome


def render(outcome: Outcome, settings_name: str) -> str:
    took = f", {elapsed(outcome.took)}" if outcome.took else ""
    if outcome.result == "unchanged":
        lines = [f"unchanged: {outcome.endpoint} already serves {outcome.artifact}"]
    elif outcome.result == "promoted":
        lines = [f"promoted: {outcome.endpoint} serves {outcome.artifact} (InService{took})"]
    elif outcome.result == "rolled back":
        lines = [
            f"rolled back: {outcome.endpoint} still serves {outcome.serving or '?'} "
            f"({outcome.status}{took})"
        ]
    else:
        serving = f", serving {outcome.serving}" if outcome.serving else ""
        lines = [f"failed: {outcome.endpoint} is {outcome.status}{serving}{took}"]
    for alarm in outcome.alarms:
        at = alarm.at.astimezone(UTC).strftime(" at %H:%M:%S UTC") if alarm.at else ""
        lines.append(f"  alarm fired: {alarm.name}{at}: {alarm.reason}")
    if outcome.result == "rolled back" and not outcome.alarms:
        lines.append("  no rollback alarm fired")
    lines += [f"  {reason}" for reason in outcome.reasons]
    if outcome.result == "promoted" and ":model-package/" in outcome.artifact:
        lines.append(
            "  the delivery pipeline keeps serving it while it is the latest version approved "
            f"for {settings_name}"
        )
    elif outcome.result == "promoted":
        lines.append(
            f"  to keep it, set serving.model_artifact: {outcome.artifact} in "
            f"config/{settings_name}.yaml: a deploy without -c modelArtifact serves the "
            "configured model"
        )
    return "\n".join(lines) + "\n"
