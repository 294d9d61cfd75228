"""One environment's AWS view for the operating commands: clients, stack outputs, errors as advice.

Every resource name and ARN the commands use comes from the deployed stacks' outputs
(CloudFormation DescribeStacks), never from a guess. An AWS failure a user can fix becomes an
`OperateError` whose message says what to change; boto3 is imported only when a command runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kiln import naming
from kiln.config import CONFIG_DIR
from kiln.contract import Component, StackOutput
from kiln.settings import Settings

# Error codes AWS uses for one condition, across services.
ACCESS_DENIED = frozenset(
    {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "403", "Forbidden"}
)
EXPIRED = frozenset({"ExpiredToken", "ExpiredTokenException", "RequestExpired"})
BAD_CREDENTIALS = frozenset(
    {
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "InvalidSignatureException",
        "AuthFailure",
        "InvalidAccessKeyId",
    }
)
THROTTLED = frozenset(
    {"Throttling", "ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded"}
)
# IAM action prefixes that differ from the service's signing name.
_IAM_PREFIX = {"monitoring": "cloudwatch"}
_SIGN_IN = (
    "sign in (`aws sso login --profile <name>`, then `export AWS_PROFILE=<name>`), or set "
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where an instance or task role applies"
)


class OperateError(Exception):
    """A failure the user can act on; `exit_code` is the command's exit status (2: bad input)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class AwsError(OperateError):
    """An AWS call that failed; `code` and `aws_message` are AWS's own, `action` the IAM action."""

    def __init__(self, message: str, *, code: str, aws_message: str, action: str) -> None:
        super().__init__(message)
        self.code = code
        self.aws_message = aws_message
        self.action = action


def cdk_stack_id(settings: Settings, component: Component) -> str:
    """The CDK CLI's selector of a stack: its path in the app (`dev/Serving`), not its name.

    The CLI matches stacks inside a Stage by hierarchical id only; `kiln-dev-serving` matches
    nothing.
    """
    return f"{settings.name}/{component.construct_id}"


def deploy_hint(settings: Settings, component: Component, config_dir: Path = CONFIG_DIR) -> str:
    context = "" if config_dir == CONFIG_DIR else f" -c configDir={config_dir}"
    return f"npx cdk deploy {cdk_stack_id(settings, component)} -c env={settings.name}{context}"


def explain(err: BaseException, *, action: str, region: str) -> AwsError | None:
    """The advice for a botocore failure, or None when `err` is not one."""
    from botocore import exceptions  # type: ignore[import-untyped]

    def advice(message: str, code: str = "", aws_message: str = "") -> AwsError:
        return AwsError(message, code=code, aws_message=aws_message or str(err), action=action)

    if isinstance(err, exceptions.ProfileNotFound):
        profile = err.kwargs.get("profile", "?")
        return advice(
            f"the AWS profile {profile!r} (from AWS_PROFILE or AWS_DEFAULT_PROFILE) is not in "
            f"~/.aws/config: create it (`aws configure sso --profile {profile}`), or point "
            "AWS_PROFILE at one that exists (`aws configure list-profiles`), or unset it to "
            "use your default credentials.",
            "ProfileNotFound",
        )
    if isinstance(err, exceptions.NoCredentialsError):
        return advice(f"no AWS credentials found: {_SIGN_IN}.", "NoCredentials")
    if isinstance(err, exceptions.PartialCredentialsError):
        return advice(f"incomplete AWS credentials ({err}): {_SIGN_IN}.", "PartialCredentials")
    if isinstance(
        err,
        exceptions.TokenRetrievalError
        | exceptions.SSOTokenLoadError
        | exceptions.UnauthorizedSSOTokenError,
    ):
        return advice(
            "your AWS SSO session has expired or was never started: run `aws sso login` "
            "(with the profile in AWS_PROFILE) and retry.",
            "ExpiredToken",
        )
    if isinstance(err, exceptions.CredentialRetrievalError):
        return advice(f"AWS credentials could not be loaded ({err}): {_SIGN_IN}.", "NoCredentials")
    if isinstance(err, exceptions.EndpointConnectionError | exceptions.ConnectTimeoutError):
        return advice(
            f"cannot reach AWS ({err}): check the network and any proxy (HTTPS_PROXY), and that "
            f"region {region} is right.",
            "EndpointConnection",
        )
    if isinstance(err, exceptions.ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", "")) or str(
            err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        )
        message = str(error.get("Message", "")) or code
        if code in EXPIRED:
            return advice(
                "your AWS credentials have expired: refresh them (`aws sso login`, or new "
                "temporary keys) and retry.",
                code,
                message,
            )
        if code in BAD_CREDENTIALS:
            return advice(
                f"AWS rejected your credentials ({code}): they are wrong, revoked, or for "
                "another partition; check AWS_PROFILE or AWS_ACCESS_KEY_ID.",
                code,
                message,
            )
        if code in ACCESS_DENIED:
            return advice(
                f"access denied: your identity may not call {action}"
                f"{': ' + message if message not in ('', code, 'Forbidden') else ''}. "
                f"Add {action} to your role's policy, or use a role that has it.",
                code,
                message,
            )
        if code in THROTTLED:
            return advice(
                f"AWS throttled {action} even after retries: wait a minute and run it again.",
                code,
                message,
            )
        return advice(
            f"{action} failed: {code}: {message}. If the message does not say what to change, "
            f"`aws sts get-caller-identity --region {region}` checks your credentials.",
            code,
            message,
        )
    if isinstance(err, exceptions.BotoCoreError):
        return advice(
            f"{action} failed: {err}. `aws sts get-caller-identity --region {region}` checks "
            "your AWS configuration and credentials.",
            type(err).__name__,
        )
    return None


class Aws:
    """An environment's settings, boto3 clients in its region, and its deployed stacks.

    `clients` replaces the client of a service (tests pass botocore-Stubber'd ones). Outputs
    are read once per stack and command.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        config_dir: Path = CONFIG_DIR,
        clients: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.config_dir = config_dir
        self.region = settings.region
        self._clients: dict[str, Any] = dict(clients or {})
        self._stacks: dict[Component, dict[str, Any] | None] = {}
        self.identity_arn: str | None = None

    def client(self, service: str) -> Any:
        if service not in self._clients:
            import boto3  # type: ignore[import-untyped]
            from botocore.config import Config  # type: ignore[import-untyped]

            # Standard retries back off on throttling and transient errors before giving up.
            config = Config(retries={"mode": "standard", "max_attempts": 5})
            self._clients[service] = boto3.client(service, region_name=self.region, config=config)
        return self._clients[service]

    @contextmanager
    def _advised(self, client: Any, operation: str) -> Iterator[None]:
        """Turns a botocore failure inside the block into the `AwsError` that advises on it."""
        try:
            yield
        except Exception as err:
            advice = explain(err, action=self.action(client, operation), region=self.region)
            if advice is None:
                raise
            raise advice from err

    def call(self, service: str, operation: str, **params: Any) -> dict[str, Any]:
        """One API call (`operation` in boto3's snake_case); failures become `AwsError`."""
        client = self.client(service)
        with self._advised(client, operation):
            response: dict[str, Any] = getattr(client, operation)(**params)
        return response

    def pages(self, service: str, operation: str, key: str, **params: Any) -> list[Any]:
        """Every item under `key` across the pages of a paginated call."""
        client = self.client(service)
        items: list[Any] = []
        with self._advised(client, operation):
            for page in client.get_paginator(operation).paginate(**params):
                items.extend(page.get(key, []))
        return items

    @staticmethod
    def action(client: Any, operation: str) -> str:
        """The IAM action of a call, e.g. `sagemaker:CreateTrainingJob`."""
        model = client.meta.service_model
        prefix = model.signing_name or model.endpoint_prefix
        name = client.meta.method_to_api_mapping.get(operation, operation)
        return f"{_IAM_PREFIX.get(prefix, prefix)}:{name}"

    def check_identity(self) -> str:
        """Who the credentials are (and that there are any); refuses another account than
        the one `config/<env>.yaml` names."""
        identity = self.call("sts", "get_caller_identity")
        self.identity_arn = str(identity.get("Arn", ""))
        account = str(identity.get("Account", ""))
        if self.settings.account and account != self.settings.account:
            raise OperateError(
                f"your credentials are for account {account} ({self.identity_arn}), but "
                f"environment {self.settings.name} lives in account {self.settings.account}: "
                "switch profile (AWS_PROFILE) to that account."
            )
        return account

    # --- stacks ---------------------------------------------------------------------------

    def stack_name(self, component: Component) -> str:
        return naming.stack_name(self.settings, component)

    def stack(self, component: Component) -> dict[str, Any] | None:
        """The stack's DescribeStacks record, or None when it is not deployed."""
        if component not in self._stacks:
            try:
                stacks = self.call(
                    "cloudformation", "describe_stacks", StackName=self.stack_name(component)
                )["Stacks"]
            except AwsError as err:
                if err.code == "ValidationError" and "does not exist" in err.aws_message:
                    stacks = []
                else:
                    raise
            self._stacks[component] = stacks[0] if stacks else None
        return self._stacks[component]

    def forget(self, component: Component) -> None:
        """Reads the stack again next time (after a deploy)."""
        self._stacks.pop(component, None)

    def outputs(self, component: Component) -> dict[str, str]:
        stack = self.stack(component)
        if stack is None:
            raise OperateError(
                f"stack {self.stack_name(component)} is not deployed in {self.region}: deploy "
                f"it first (`{deploy_hint(self.settings, component, self.config_dir)}`, or "
                f"`npx cdk deploy --all -c env={self.settings.name}`)."
            )
        return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}

    def output(self, output: StackOutput) -> str:
        """One output of a deployed stack (`Outputs.ENDPOINT_NAME`); OperateError, saying what
        to deploy, when the stack or the output is missing."""
        component, key = output.component, output.key
        outputs = self.outputs(component)
        if key not in outputs:
            stack = self.stack(component) or {}
            raise OperateError(
                f"stack {self.stack_name(component)} ({stack.get('StackStatus', '?')}) has no "
                f"output {key}: it was deployed from an older kiln or its last deploy failed; "
                f"deploy it again (`{deploy_hint(self.settings, component, self.config_dir)}`)."
            )
        return outputs[key]


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key); OperateError (exit 2) for anything else."""
    if not uri.startswith("s3://") or "/" not in uri[5:] or uri.endswith("/"):
        raise OperateError(f"{uri!r} is not an S3 object URI (s3://bucket/key)", exit_code=2)
    bucket, key = uri[5:].split("/", 1)
    if not bucket or not key:
        raise OperateError(f"{uri!r} is not an S3 object URI (s3://bucket/key)", exit_code=2)
    return bucket, key
