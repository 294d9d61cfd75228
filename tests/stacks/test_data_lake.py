"""The data lake stack's posture, as synthesized for every environment."""

from __future__ import annotations

import pytest
from aws_cdk.assertions import Match, Template

from kiln.contract import CHECKPOINTS_PREFIX
from kiln.settings import Settings
from tests.support import ENVIRONMENTS, Synthesis

ZONES = ("Raw", "Curated", "Artifacts", "Capture")


@pytest.fixture(params=ENVIRONMENTS)
def env(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def data_lake(synthesis: Synthesis, env: str) -> Template:
    return Template.from_json(synthesis.stack(env, "data-lake").template)


def zone_bucket(synthesis: Synthesis, env: str, zone: str) -> dict:
    buckets = synthesis.stack(env, "data-lake").resources_of_type("AWS::S3::Bucket")
    (bucket,) = [b for key, b in buckets.items() if key.startswith(f"{zone}Bucket")]
    return bucket


def rules(bucket: dict) -> dict[str, dict]:
    return {r["Id"]: r for r in bucket["Properties"]["LifecycleConfiguration"]["Rules"]}


def test_zone_buckets_are_kms_encrypted_with_the_lake_key_and_bucket_keys(
    synthesis: Synthesis, env: str
) -> None:
    for zone in ZONES:
        props = zone_bucket(synthesis, env, zone)["Properties"]
        (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        assert rule["BucketKeyEnabled"] is True
        assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
        key = rule["ServerSideEncryptionByDefault"]["KMSMasterKeyID"]["Fn::GetAtt"][0]
        assert key.startswith("DataLakeKey")


def test_every_bucket_is_private_versioned_and_owner_enforced(
    synthesis: Synthesis, env: str
) -> None:
    buckets = synthesis.stack(env, "data-lake").resources_of_type("AWS::S3::Bucket")
    assert len(buckets) == 5
    for bucket in buckets.values():
        props = bucket["Properties"]
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }
        assert props["VersioningConfiguration"] == {"Status": "Enabled"}
        assert props["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]


def test_every_bucket_denies_plain_http_and_old_tls(synthesis: Synthesis, env: str) -> None:
    stack = synthesis.stack(env, "data-lake")
    policies = stack.resources_of_type("AWS::S3::BucketPolicy")
    assert len(policies) == 5
    for policy in policies.values():
        denies = [
            s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"
        ]
        conditions = [s["Condition"] for s in denies]
        assert {"Bool": {"aws:SecureTransport": "false"}} in conditions
        assert {"NumericLessThan": {"s3:TlsVersion": 1.2}} in conditions


def test_zone_buckets_log_to_the_access_log_bucket_under_their_prefix(
    synthesis: Synthesis, env: str
) -> None:
    for zone in ZONES:
        logging = zone_bucket(synthesis, env, zone)["Properties"]["LoggingConfiguration"]
        assert logging["DestinationBucketName"]["Ref"].startswith("AccessLogsBucket")
        assert logging["LogFilePrefix"] == f"{zone.lower()}/"


def test_access_log_bucket_uses_sse_s3_and_expires_logs(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    buckets = synthesis.stack(env, "data-lake").resources_of_type("AWS::S3::Bucket")
    (logs,) = [b for key, b in buckets.items() if key.startswith("AccessLogsBucket")]
    (rule,) = logs["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}
    expected = settings_by_env[env].data_lake.access_logs_expiration_days
    assert rules(logs)["ExpireAccessLogs"]["ExpirationInDays"] == expected


def test_lifecycle_rules_follow_config(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    lake = settings_by_env[env].data_lake
    for zone in ZONES:
        zone_rules = rules(zone_bucket(synthesis, env, zone))
        assert zone_rules["AbortIncompleteUploads"]["AbortIncompleteMultipartUpload"] == {
            "DaysAfterInitiation": 7
        }
        assert zone_rules["ExpireNoncurrentVersions"]["NoncurrentVersionExpiration"] == {
            "NoncurrentDays": lake.noncurrent_version_expiration_days
        }
    raw = rules(zone_bucket(synthesis, env, "Raw"))
    assert raw["RawToInfrequentAccess"]["Transitions"] == [
        {
            "StorageClass": "STANDARD_IA",
            "TransitionInDays": lake.raw_transition_to_infrequent_access_days,
        }
    ]
    if lake.raw_expiration_days is None:
        assert "ExpireRaw" not in raw
    else:
        assert raw["ExpireRaw"]["ExpirationInDays"] == lake.raw_expiration_days
    checkpoints = rules(zone_bucket(synthesis, env, "Artifacts"))["ExpireCheckpoints"]
    assert checkpoints["Prefix"] == CHECKPOINTS_PREFIX
    assert checkpoints["ExpirationInDays"] == lake.checkpoint_expiration_days
    capture = rules(zone_bucket(synthesis, env, "Capture"))["ExpireCapture"]
    assert capture["ExpirationInDays"] == lake.capture_expiration_days


def test_removal_policy_follows_config(
    synthesis: Synthesis, settings_by_env: dict[str, Settings], env: str
) -> None:
    expected = "Retain" if settings_by_env[env].removal_policy == "retain" else "Delete"
    stack = synthesis.stack(env, "data-lake")
    stores = stack.resources_of_type("AWS::S3::Bucket", "AWS::KMS::Key")
    assert len(stores) == 6
    for resource in stores.values():
        assert resource["DeletionPolicy"] == expected
        assert resource["UpdateReplacePolicy"] == expected


def test_lake_key_rotates_and_outputs_name_the_buckets(synthesis: Synthesis, env: str) -> None:
    template = data_lake(synthesis, env)
    template.has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True})
    template.has_resource_properties(
        "AWS::KMS::Alias", {"AliasName": f"alias/kiln/{env}/data-lake"}
    )
    for zone in ZONES:
        template.has_output(f"{zone}BucketName", {"Value": {"Ref": Match.string_like_regexp(zone)}})
    template.has_output("DataLakeKeyArn", Match.any_value())
