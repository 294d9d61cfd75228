"""S3 buckets with kiln's posture: encrypted, TLS-only, private, versioned, logged, lifecycled."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aws_cdk import Acknowledgment, Duration, RemovalPolicy, Validations
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

# Replication needs a second region's bucket and key: a per-organisation disaster-recovery
# choice. Versioning, RETAIN in prod and noncurrent-version lifecycles protect the data here.
_REPLICATION_ACK = Acknowledgment(
    id="NIST.800.53.R5-S3BucketReplicationEnabled",
    reason="Cross-region replication is a per-organisation DR decision needing a bucket and key "
    "in a second region; versioning, RETAIN in prod and noncurrent-version expiry protect "
    "objects in this region.",
)


# What every kiln bucket is, whatever its encryption: TLS 1.2+ only, no public access, no ACLs,
# versioned.
_POSTURE: dict[str, Any] = {
    "enforce_ssl": True,
    "minimum_tls_version": 1.2,
    "block_public_access": s3.BlockPublicAccess.BLOCK_ALL,
    "object_ownership": s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
    "versioned": True,
}


def _base_rules(noncurrent_version_expiration: Duration) -> list[s3.LifecycleRule]:
    return [
        s3.LifecycleRule(
            id="AbortIncompleteUploads", abort_incomplete_multipart_upload_after=Duration.days(7)
        ),
        s3.LifecycleRule(
            id="ExpireNoncurrentVersions",
            noncurrent_version_expiration=noncurrent_version_expiration,
        ),
    ]


class AccessLogsBucket(Construct):
    """The target of the other buckets' server access logs.

    S3 server access log delivery supports only SSE-S3 on the target bucket, so this bucket
    uses S3-managed keys; it does not log itself (that would log its own log writes).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        bucket_name: str | None = None,
        removal_policy: RemovalPolicy,
        expiration: Duration,
        noncurrent_version_expiration: Duration,
    ) -> None:
        super().__init__(scope, construct_id)
        self.bucket = s3.Bucket(
            self,
            "Bucket",
            bucket_name=bucket_name,
            encryption=s3.BucketEncryption.S3_MANAGED,
            **_POSTURE,
            lifecycle_rules=[
                *_base_rules(noncurrent_version_expiration),
                s3.LifecycleRule(id="ExpireAccessLogs", expiration=expiration),
            ],
            removal_policy=removal_policy,
        )
        Validations.of(self.bucket.node.find_child("Resource")).acknowledge(
            Acknowledgment(
                id="AwsSolutions-S1",
                reason="This is the server access log target; logging it to itself would "
                "record its own log deliveries in a loop.",
            ),
            Acknowledgment(
                id="NIST.800.53.R5-S3BucketLoggingEnabled",
                reason="This is the server access log target; logging it to itself would "
                "record its own log deliveries in a loop.",
            ),
            Acknowledgment(
                id="NIST.800.53.R5-S3DefaultEncryptionKMS",
                reason="S3 server access log delivery supports only SSE-S3 on the target "
                "bucket; SSE-KMS would make delivery fail.",
            ),
            _REPLICATION_ACK,
        )


class SecureBucket(Construct):
    """A data bucket: SSE-KMS with a bucket key, TLS 1.2+ only, all public access blocked,
    ACLs disabled, versioned, server access logs to `access_logs_bucket`, lifecycle rules."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        bucket_name: str | None = None,
        encryption_key: kms.IKey,
        access_logs_bucket: s3.IBucket,
        access_logs_prefix: str,
        removal_policy: RemovalPolicy,
        noncurrent_version_expiration: Duration,
        lifecycle_rules: Sequence[s3.LifecycleRule] = (),
    ) -> None:
        super().__init__(scope, construct_id)
        self.bucket = s3.Bucket(
            self,
            "Bucket",
            bucket_name=bucket_name,
            encryption=s3.BucketEncryption.KMS,
            encryption_key=encryption_key,
            bucket_key_enabled=True,
            **_POSTURE,
            server_access_logs_bucket=access_logs_bucket,
            server_access_logs_prefix=access_logs_prefix,
            lifecycle_rules=[*_base_rules(noncurrent_version_expiration), *lifecycle_rules],
            removal_policy=removal_policy,
        )
        Validations.of(self.bucket.node.find_child("Resource")).acknowledge(_REPLICATION_ACK)
