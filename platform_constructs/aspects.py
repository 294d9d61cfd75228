"""Cross-cutting controls applied to every resource of a stage."""

from __future__ import annotations

import jsii
from aws_cdk import IAspect
from aws_cdk import aws_logs as logs
from constructs import IConstruct


@jsii.implements(IAspect)
class LogGroupRetention:
    """Gives every log group that has no retention the environment's retention.

    CloudWatch keeps logs forever by default: a cost that grows silently and data kept
    longer than the policy says. Log groups that set their own retention keep it.
    """

    def __init__(self, days: int) -> None:
        self.days = days

    def visit(self, node: IConstruct) -> None:
        if isinstance(node, logs.CfnLogGroup) and node.retention_in_days is None:
            node.retention_in_days = self.days
