"""`kiln change-instance-type`: moves the endpoint to the instance type in the environment's
file, in the order SageMaker requires of an autoscaled variant.

"If the update would change the instance type for any model that is a target for auto
scaling, the update fails ... delete any scaling policies configured for it and deregister the
variant as a scalable target ... After you update the endpoint, you can register the updated
variant as a scalable target and attach a scaling policy" ("Update endpoints that use auto
scaling", https://docs.aws.amazon.com/sagemaker/latest/dg/endpoint-scaling-update.html).

So: read the variant's scalable target, scaling policies and scheduled actions; delete them and
deregister the target; deploy the serving stack (the same artifact, the new instance type:
a blue/green update with the usual rollback alarms); then register the target again with what
was read, whatever the deploy's outcome. The policies come back under their own names, so the
serving stack's CloudFormation resources keep matching them (a policy's ARN is new: the next
deploy that changes a policy puts it by name, as CloudFormation does anyway).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.contract import (
    ENDPOINT_SCALABLE_DIMENSION,
    Component,
    Outputs,
    endpoint_scaling_resource_id,
)
from kiln_cli.operate import endpoint as ep
from kiln_cli.operate.aws import Aws, OperateError
from kiln_cli.operate.deploy import REPO, SETTLED, Runner, cdk_deploy_argv, run_cdk
from kiln_cli.operate.progress import Progress, wait_for

Result = Literal["resized", "unchanged", "rolled back", "failed"]
EXIT_CODES: dict[Result, int] = {"resized": 0, "unchanged": 0, "failed": 1, "rolled back": 3}
_NAMESPACE = "sagemaker"
# What PutScalingPolicy and PutScheduledAction take back from their Describe answers.
_POLICY_KEYS = (
    "PolicyName",
    "PolicyType",
    "TargetTrackingScalingPolicyConfiguration",
    "StepScalingPolicyConfiguration",
)
_ACTION_KEYS = ("ScheduledActionName", "Schedule", "Timezone", "StartTime", "EndTime")


@dataclass
class Scaling:
    """A variant's autoscaling as Application Auto Scaling describes it."""

    resource_id: str
    target: dict[str, Any] | None
    policies: list[dict[str, Any]] = field(default_factory=list)
    scheduled: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ResizeOutcome:
    result: Result
    endpoint: str
    was: str | None
    now: str | None
    wanted: str
    scaling_restored: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.result]


def read_scaling(aws: Aws, endpoint_name: str) -> Scaling:
    """The variant's scalable target, scaling policies and scheduled actions."""
    resource_id = endpoint_scaling_resource_id(endpoint_name)
    where = {
        "ServiceNamespace": _NAMESPACE,
        "ResourceId": resource_id,
        "ScalableDimension": ENDPOINT_SCALABLE_DIMENSION,
    }
    targets = aws.call(
        "application-autoscaling",
        "describe_scalable_targets",
        ServiceNamespace=_NAMESPACE,
        ResourceIds=[resource_id],
        ScalableDimension=ENDPOINT_SCALABLE_DIMENSION,
    )["ScalableTargets"]
    if not targets:
        return Scaling(resource_id, None)
    policies = aws.call("application-autoscaling", "describe_scaling_policies", **where)[
        "ScalingPolicies"
    ]
    scheduled = aws.call("application-autoscaling", "describe_scheduled_actions", **where)[
        "ScheduledActions"
    ]
    return Scaling(resource_id, targets[0], list(policies), list(scheduled))


def deregister(aws: Aws, scaling: Scaling) -> None:
    """Deletes the policies and scheduled actions, then deregisters the target."""
    where = {
        "ServiceNamespace": _NAMESPACE,
        "ResourceId": scaling.resource_id,
        "ScalableDimension": ENDPOINT_SCALABLE_DIMENSION,
    }
    for policy in scaling.policies:
        aws.call(
            "application-autoscaling",
            "delete_scaling_policy",
            PolicyName=policy["PolicyName"],
            **where,
        )
    for action in scaling.scheduled:
        aws.call(
            "application-autoscaling",
            "delete_scheduled_action",
            ScheduledActionName=action["ScheduledActionName"],
            **where,
        )
    aws.call("application-autoscaling", "deregister_scalable_target", **where)


def register(aws: Aws, scaling: Scaling) -> None:
    """Registers the target, policies and scheduled actions as `read_scaling` found them."""
    if scaling.target is None:
        return
    where = {
        "ServiceNamespace": _NAMESPACE,
        "ResourceId": scaling.resource_id,
        "ScalableDimension": ENDPOINT_SCALABLE_DIMENSION,
    }
    aws.call(
        "application-autoscaling",
        "register_scalable_target",
        MinCapacity=scaling.target["MinCapacity"],
        MaxCapacity=scaling.target["MaxCapacity"],
        **where,
    )
    for policy in scaling.policies:
        aws.call(
            "application-autoscaling",
            "put_scaling_policy",
            **{k: policy[k] for k in _POLICY_KEYS if k in policy},
            **where,
        )
    for action in scaling.scheduled:
        aws.call(
            "application-autoscaling",
            "put_scheduled_action",
            ScalableTargetAction=action.get("ScalableTargetAction", {}),
            **{k: action[k] for k in _ACTION_KEYS if k in action},
            **where,
        )


def change_instance_type(
    aws: Aws,
    *,
    runner: Runner = run_cdk,
    progress: Progress | None = None,
    interval: float = 15.0,
    sleep: Callable[[float], None] = time.sleep,
) -> ResizeOutcome:
    settings = aws.settings
    wanted = settings.serving.instance_type
    progress = progress or Progress()
    aws.check_identity()
    name = aws.output(Outputs.ENDPOINT_NAME)
    before = ep.describe_endpoint(aws, name)
    if before is None:
        raise OperateError(
            f"there is no endpoint {name} to resize: deploy a model first "
            f"(`kiln deploy-model --env {settings.name} --artifact s3://...`)"
        )
    if before["EndpointStatus"] != "InService":
        raise OperateError(
            f"endpoint {name} is {before['EndpointStatus']}: wait until the change under way "
            f"ends (`kiln status --env {settings.name}`), then run this again"
        )
    serving = ep.serving(aws, before)
    if serving.instance_type == wanted:
        return ResizeOutcome("unchanged", name, wanted, wanted, wanted, True)
    artifact = serving.artifact
    if serving.package is not None:
        # A registry version: its artifact is the one the serving stack was deployed with.
        artifact = aws.outputs(Component.SERVING).get(Outputs.MODEL_ARTIFACT.key, artifact)
    if artifact is None:
        raise OperateError(f"endpoint {name} has no model artifact to keep serving")
    scaling = read_scaling(aws, name)
    progress.note(
        f"{name}: {serving.instance_type} -> {wanted}; step 1/3: deregister autoscaling "
        f"({len(scaling.policies)} policies, {len(scaling.scheduled)} scheduled actions)"
    )
    if scaling.target is not None:
        deregister(aws, scaling)
    outcome = ResizeOutcome("failed", name, serving.instance_type, None, wanted, False)
    try:
        progress.note("step 2/3: deploy the serving stack with the new instance type")
        argv = cdk_deploy_argv(settings, artifact, aws.config_dir, serving.package)
        progress.note("running " + " ".join(argv))
        code = runner(argv, REPO)
        aws.forget(Component.SERVING)
        after: dict[str, Any] = {}

        def poll() -> tuple[str, str]:
            after.clear()
            after.update(ep.describe_endpoint(aws, name) or {"EndpointStatus": "absent"})
            return str(after["EndpointStatus"]), str(after.get("FailureReason") or "")

        status = wait_for(
            poll,
            SETTLED,
            progress=progress,
            subject=f"endpoint {name}",
            interval=interval,
            timeout=(settings.serving.deployment.max_deployment_minutes + 30) * 60,
            hint=f"kiln status --env {settings.name}",
            sleep=sleep,
        )
        outcome.now = ep.serving(aws, after).instance_type if status != "absent" else None
        if status == "InService" and outcome.now == wanted:
            outcome.result = "resized"
        elif status == "InService":
            outcome.result = "rolled back"
        if code != 0:
            outcome.reasons.append(f"cdk deploy exited {code}: see its output above")
        if after.get("FailureReason"):
            outcome.reasons.append(f"endpoint: {after['FailureReason']}")
    finally:
        progress.note("step 3/3: register autoscaling again")
        register(aws, scaling)
        outcome.scaling_restored = True
    return outcome


def render(outcome: ResizeOutcome) -> str:
    if outcome.result == "unchanged":
        lines = [f"unchanged: {outcome.endpoint} already runs {outcome.wanted}"]
    elif outcome.result == "resized":
        lines = [f"resized: {outcome.endpoint} runs {outcome.now} (was {outcome.was})"]
    elif outcome.result == "rolled back":
        lines = [f"rolled back: {outcome.endpoint} still runs {outcome.now}"]
    else:
        lines = [f"failed: {outcome.endpoint} did not move to {outcome.wanted}"]
    if outcome.result != "unchanged":
        lines.append(
            "  autoscaling registered again"
            if outcome.scaling_restored
            else "  autoscaling NOT registered again: run this command again"
        )
    lines += [f"  {reason}" for reason in outcome.reasons]
    return "\n".join(lines) + "\n"
