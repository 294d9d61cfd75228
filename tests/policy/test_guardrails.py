"""kiln's own guardrails: green on every synthesized stack, and each proven to fire."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

from kiln.assembly import SynthesizedStack
from kiln.config import load_settings
from kiln.guardrails import (
    check,
    data_stores_retained,
    kms_buckets_use_bucket_keys,
    required_tags,
    termination_protected,
)
from kiln.settings import Settings
from tests.support import Synthesis

PROD = load_settings("prod")
DEV = load_settings("dev")


def stack(resources: dict[str, Any], **changes: Any) -> SynthesizedStack:
    base = SynthesizedStack(
        environment="prod",
        artifact_id="prodProbe",
        stack_name="kiln-prod-probe",
        template={"Resources": copy.deepcopy(resources)},
        termination_protection=True,
        tags={"project": "kiln", "environment": "prod", "owner": PROD.owner},
    )
    return replace(base, **changes)


KMS_BUCKET = {
    "Type": "AWS::S3::Bucket",
    "DeletionPolicy": "Retain",
    "UpdateReplacePolicy": "Retain",
    "Properties": {
        "BucketEncryption": {
            "ServerSideEncryptionConfiguration": [
                {
                    "ServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms"},
                    "BucketKeyEnabled": True,
                }
            ]
        }
    },
}


def test_every_synthesized_stack_passes(
    synthesis: Synthesis, settings_by_env: dict[str, Settings]
) -> None:
    assert len(synthesis.stacks) == 2 * len(settings_by_env)
    violations = [
        str(v) for s in synthesis.stacks for v in check(s, settings_by_env[s.environment])
    ]
    assert not violations, "\n".join(violations)


def test_data_stores_retained() -> None:
    assert data_stores_retained(stack({"B": KMS_BUCKET}), PROD) == []
    deleting = {**KMS_BUCKET, "DeletionPolicy": "Delete"}
    (violation,) = data_stores_retained(stack({"B": deleting}), PROD)
    assert violation.rule == "data-stores-retained" and "DeletionPolicy Delete" in violation.message
    missing = {"Type": "AWS::KMS::Key", "Properties": {}}
    assert len(data_stores_retained(stack({"K": missing}), PROD)) == 2
    # An environment that opted into destroy is not held to it.
    assert data_stores_retained(stack({"K": missing}), DEV) == []


def test_termination_protected() -> None:
    assert termination_protected(stack({}), PROD) == []
    (violation,) = termination_protected(stack({}, termination_protection=False), PROD)
    assert violation.rule == "termination-protected"
    assert termination_protected(stack({}, termination_protection=False), DEV) == []


def test_required_tags() -> None:
    assert required_tags(stack({}), PROD) == []
    wrong = stack({}, tags={"project": "kiln", "environment": "dev"})
    messages = sorted(v.message for v in required_tags(wrong, PROD))
    assert messages == [
        "tag 'environment' is 'dev', expected 'prod'",
        f"tag 'owner' is None, expected {PROD.owner!r}",
    ]


def test_kms_buckets_use_bucket_keys() -> None:
    assert kms_buckets_use_bucket_keys(stack({"B": KMS_BUCKET}), PROD) == []
    no_key = copy.deepcopy(KMS_BUCKET)
    del no_key["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"][0][
        "BucketKeyEnabled"
    ]
    (violation,) = kms_buckets_use_bucket_keys(stack({"B": no_key}), PROD)
    assert violation.resource == "B"
    sse_s3 = {
        "Type": "AWS::S3::Bucket",
        "Properties": {
            "BucketEncryption": {
                "ServerSideEncryptionConfiguration": [
                    {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
                ]
            }
        },
    }
    assert kms_buckets_use_bucket_keys(stack({"L": sse_s3}), PROD) == []


@pytest.mark.parametrize("env", ["dev", "staging", "prod"])
def test_check_runs_every_guardrail(env: str) -> None:
    bad = stack({"B": {"Type": "AWS::S3::Bucket"}}, termination_protection=False, tags={})
    rules = {v.rule for v in check(bad, load_settings(env))}
    expected = {"required-tags"}
    if env != "dev":
        expected |= {"data-stores-retained", "termination-protected"}
    assert rules == expected
