"""Maps the configured retention (days) to the CDK's `RetentionDays` enum."""

from __future__ import annotations

from aws_cdk import aws_logs as logs

from kiln.settings import LOG_RETENTION_DAYS

# The enum lists the CloudWatch values in ascending order, as LOG_RETENTION_DAYS does;
# a test synthesizes every pair to prove the mapping.
_BY_DAYS: dict[int, logs.RetentionDays] = dict(
    zip(LOG_RETENTION_DAYS, [m for m in logs.RetentionDays if m.name != "INFINITE"], strict=True)
)


def retention_days(days: int) -> logs.RetentionDays:
    """The `RetentionDays` member for a CloudWatch-valid number of days."""
    try:
        return _BY_DAYS[days]
    except KeyError:
        raise ValueError(
            f"{days} is not a CloudWatch Logs retention; allowed: {list(_BY_DAYS)}"
        ) from None
