"""The operating commands' AWS layer: stack outputs, identity, and AWS errors turned into advice."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    SSOTokenLoadError,
)
from botocore.stub import Stubber
from moto import mock_aws

from kiln.config import load_settings
from kiln.contract import Component, Outputs, StackOutput
from kiln_cli.cli import main
from kiln_cli.operate.aws import Aws, AwsError, OperateError, cdk_stack_id, explain, parse_s3_uri
from tests.kiln_cli.support import REGION, deploy_stacks, make_aws, no_credentials

pytestmark = pytest.mark.usefixtures("stack_outputs")


def client_error(code: str, message: str = "", status: int = 400) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "DescribeStacks",
    )


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (NoCredentialsError(), "no AWS credentials found: sign in (`aws sso login"),
        (SSOTokenLoadError(error_msg="expired"), "SSO session has expired"),
        (
            client_error("ExpiredToken", "The security token included in the request is expired"),
            "your AWS credentials have expired",
        ),
        (client_error("InvalidClientTokenId", "bad"), "AWS rejected your credentials"),
        (
            client_error("AccessDenied", "User: arn:aws:iam::1:user/x is not authorized", 403),
            "access denied: your identity may not call cloudformation:DescribeStacks: User: arn",
        ),
        (client_error("ThrottlingException", "Rate exceeded"), "throttled"),
        (
            EndpointConnectionError(endpoint_url="https://cloudformation.us-east-1.amazonaws.com"),
            "cannot reach AWS",
        ),
        (
            client_error("SomethingElse", "odd"),
            "cloudformation:DescribeStacks failed: SomethingElse: odd",
        ),
    ],
)
def test_aws_errors_become_advice(err: Exception, expected: str) -> None:
    advice = explain(err, action="cloudformation:DescribeStacks", region=REGION)
    assert advice is not None and expected in str(advice)


def test_errors_that_are_not_aws_pass_through() -> None:
    assert explain(ValueError("x"), action="a:B", region=REGION) is None


def test_iam_actions_are_named_after_the_iam_prefix() -> None:
    kwargs = {"region_name": REGION, "aws_access_key_id": "a", "aws_secret_access_key": "b"}
    assert Aws.action(boto3.client("cloudwatch", **kwargs), "describe_alarm_history") == (
        "cloudwatch:DescribeAlarmHistory"
    )
    assert Aws.action(boto3.client("sagemaker-runtime", **kwargs), "invoke_endpoint") == (
        "sagemaker:InvokeEndpoint"
    )


def test_cdk_selects_stage_stacks_by_path() -> None:
    assert cdk_stack_id(load_settings("dev"), Component.DATA_LAKE) == "dev/DataLake"
    assert cdk_stack_id(load_settings("prod"), Component.SERVING) == "prod/Serving"


@pytest.mark.parametrize("uri", ["s3://bucket", "s3://bucket/", "https://x/y", "s3:///key"])
def test_s3_uris_are_checked(uri: str) -> None:
    with pytest.raises(OperateError) as caught:
        parse_s3_uri(uri)
    assert caught.value.exit_code == 2


@mock_aws
def test_outputs_come_from_describe_stacks() -> None:
    deployed = deploy_stacks(components=(Component.COMPUTE,))
    aws = make_aws()
    subnets = deployed[Component.COMPUTE][Outputs.TRAINING_SUBNET_IDS.key]
    assert aws.output(Outputs.TRAINING_SUBNET_IDS) == subnets
    assert len(subnets.split(",")) == 3 and all(s.startswith("subnet-") for s in subnets.split(","))
    with pytest.raises(OperateError) as caught:
        aws.output(Outputs.ENDPOINT_NAME)
    message = str(caught.value)
    assert "stack kiln-dev-serving is not deployed in us-east-1" in message
    assert "npx cdk deploy dev/Serving -c env=dev" in message
    with pytest.raises(OperateError, match=r"has no output Nope: .*deploy it again"):
        aws.output(StackOutput(Component.COMPUTE, "Nope"))


@mock_aws
def test_other_describe_stacks_failures_are_not_taken_for_a_missing_stack() -> None:
    cloudformation = boto3.client("cloudformation", region_name=REGION)
    stubber = Stubber(cloudformation)
    stubber.add_client_error("describe_stacks", "AccessDenied", "not authorized", 403)
    with stubber:
        aws = make_aws(clients={"cloudformation": cloudformation})
        with pytest.raises(AwsError, match="may not call cloudformation:DescribeStacks"):
            aws.stack(Component.NETWORK)


@mock_aws
def test_credentials_for_another_account_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    text = (Path(__file__).resolve().parents[2] / "config" / "dev.yaml").read_text()
    (config / "dev.yaml").write_text('account: "210987654321"\n' + text)
    aws = Aws(load_settings("dev", config), config_dir=config)
    with pytest.raises(
        OperateError,
        match=r"credentials are for account 123456789012 .* lives in account 210987654321",
    ):
        aws.check_identity()


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--env", "dev"],
        ["invoke", "--env", "dev", "--prompt", "hi"],
        ["deploy-model", "--env", "dev", "--artifact", "s3://bucket/models/m/model.tar.gz"],
        ["train", "--env", "dev", "--on", "sagemaker"],
    ],
)
def test_without_credentials_every_command_says_how_to_sign_in(
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with no_credentials(monkeypatch, tmp_path):
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kiln {argv[0]}: no AWS credentials found")
    assert "Traceback" not in err


def test_an_unknown_environment_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--env", "nope"]) == 2
    assert "no such environment" in capsys.readouterr().err
