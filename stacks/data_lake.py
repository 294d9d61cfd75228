"""The data lake stack: one KMS key and the raw, curated, artifacts and capture buckets."""

from __future__ import annotations

from aws_cdk import Aws, CfnOutput, Duration
from aws_cdk import aws_s3 as s3
from constructs import Construct

from kiln import naming
from kiln.contract import CHECKPOINTS_PREFIX, Component, Outputs, lake_bucket_output
from kiln.settings import DataLakeSettings, Settings
from platform_constructs.kms import PlatformKey
from platform_constructs.model_sharing import SharedModelArtifacts
from platform_constructs.secure_bucket import AccessLogsBucket, SecureBucket
from stacks.base import KilnStack, removal_policy


def _days(value: int | None) -> Duration | None:
    return None if value is None else Duration.days(value)


def zone_lifecycle_rules(lake: DataLakeSettings) -> dict[str, list[s3.LifecycleRule]]:
    """Lifecycle rules per zone beyond the common ones (multipart abort, noncurrent expiry)."""
    raw: list[s3.LifecycleRule] = []
    if lake.raw_transition_to_infrequent_access_days is not None:
        raw.append(
            s3.LifecycleRule(
                id="RawToInfrequentAccess",
                transitions=[
                    s3.Transition(
                        storage_class=s3.StorageClass.INFREQUENT_ACCESS,
                        transition_after=Duration.days(
                            lake.raw_transition_to_infrequent_access_days
                        ),
                    )
                ],
            )
        )
    if lake.raw_expiration_days is not None:
        raw.append(s3.LifecycleRule(id="ExpireRaw", expiration=_days(lake.raw_expiration_days)))
    artifacts = []
    if lake.checkpoint_expiration_days is not None:
        artifacts.append(
            s3.LifecycleRule(
                id="ExpireCheckpoints",
                prefix=CHECKPOINTS_PREFIX,
                expiration=_days(lake.checkpoint_expiration_days),
            )
        )
    capture = []
    if lake.capture_expiration_days is not None:
        capture.append(
            s3.LifecycleRule(id="ExpireCapture", expiration=_days(lake.capture_expiration_days))
        )
    return {"Raw": raw, "Curated": [], "Artifacts": artifacts, "Capture": capture}


def lake_bucket_name(settings: Settings, zone: str) -> str:
    """A zone bucket's name in a template: account and region are filled in at deploy."""
    return naming.bucket_name(settings, zone, account=Aws.ACCOUNT_ID, region=Aws.REGION)


def lake_bucket(scope: Construct, settings: Settings, zone: str) -> s3.IBucket:
    """A reference to a zone bucket by name, for stacks that read or write the lake.

    By name rather than by passing the Bucket across stacks: its ARN then holds only
    pseudo parameters, so IAM statements and their reviews read plainly. Stacks using it
    declare their dependency on the data lake stack.
    """
    construct_id = "".join(part.title() for part in zone.split("-")) + "ZoneBucket"
    return s3.Bucket.from_bucket_name(scope, construct_id, lake_bucket_name(settings, zone))


class DataLakeStack(KilnStack):
    """Composes the data lake key, the access-log bucket and the four zone buckets.

    Attributes: `key`, `access_logs`, and `raw`, `curated`, `artifacts`, `capture` (buckets),
    and `shared_models` (SharedModelArtifacts: on the registry's home when other environments
    read it from other accounts, else None).
    """

    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(
            scope,
            construct_id,
            settings=settings,
            component=Component.DATA_LAKE,
            description=f"kiln {settings.name}: data lake buckets (raw, curated, artifacts, "
            "capture) and their KMS key",
        )
        lake = settings.data_lake
        policy = removal_policy(settings)
        noncurrent = Duration.days(lake.noncurrent_version_expiration_days)
        self.key = PlatformKey(
            self,
            "DataLakeKey",
            alias=naming.kms_alias(settings, "data-lake"),
            description=f"kiln {settings.name}: encrypts the data lake buckets",
            removal_policy=policy,
        ).key
        self.access_logs = AccessLogsBucket(
            self,
            "AccessLogs",
            bucket_name=lake_bucket_name(settings, "access-logs"),
            removal_policy=policy,
            expiration=Duration.days(lake.access_logs_expiration_days),
            noncurrent_version_expiration=noncurrent,
        ).bucket
        buckets: dict[str, s3.Bucket] = {}
        for zone, rules in zone_lifecycle_rules(lake).items():
            buckets[zone] = SecureBucket(
                self,
                zone,
                bucket_name=lake_bucket_name(settings, zone.lower()),
                encryption_key=self.key,
                access_logs_bucket=self.access_logs,
                access_logs_prefix=f"{zone.lower()}/",
                removal_policy=policy,
                noncurrent_version_expiration=noncurrent,
                lifecycle_rules=rules,
            ).bucket
            CfnOutput(self, lake_bucket_output(zone.lower()).key, value=buckets[zone].bucket_name)
        self.raw = buckets["Raw"]
        self.curated = buckets["Curated"]
        self.artifacts = buckets["Artifacts"]
        self.capture = buckets["Capture"]
        # The registry's versions name model data in this bucket: environments in other
        # accounts create their models from them, so their roles may read models/ (only).
        registry = settings.registry
        self.shared_models: SharedModelArtifacts | None = None
        if registry.home and registry.reader_accounts:
            self.shared_models = SharedModelArtifacts(
                self,
                "SharedModels",
                bucket=self.artifacts,
                bucket_name=lake_bucket_name(settings, "artifacts"),
                key=self.key,
                reader_accounts=registry.reader_accounts,
                project=settings.project,
                organization_id=registry.organization_id,
            )
        CfnOutput(self, Outputs.DATA_LAKE_KEY_ARN.key, value=self.key.key_arn)
