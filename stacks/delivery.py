"""The delivery stack: a CDK Pipeline that tests, then deploys dev -> staging -> prod."""

from __future__ import annotations

import shlex
from collections.abc import Callable

from aws_cdk import Duration, Environment, RemovalPolicy, Stack, pipelines
from aws_cdk import aws_codebuild as codebuild
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct

from kiln import naming
from kiln.contract import model_package_group
from kiln.settings import DeliverySettings, Settings
from platform_constructs.kms import PlatformKey
from platform_constructs.nag import acknowledge_generated_policies
from platform_constructs.secure_bucket import AccessLogsBucket, SecureBucket

# CodeBuild's standard image: Python 3.11 through pyenv, Node, make, g++.
BUILD_ENVIRONMENT = codebuild.BuildEnvironment(
    build_image=codebuild.LinuxBuildImage.STANDARD_7_0,
    compute_type=codebuild.ComputeType.LARGE,
)


# Where the synth step writes what `kiln models resolve` found approved per environment.
APPROVED_MODELS_FILE = "approved-models.json"


def registry_read_statement(stack: Stack, environments: list[Settings]) -> iam.PolicyStatement:
    """Reading the registry groups the environments serve from (list, describe versions)."""
    resources = []
    for settings in environments:
        account = settings.registry.account or settings.account or stack.account
        for model in settings.registry.models:
            group = model_package_group(settings.project, model)
            prefix = f"arn:aws:sagemaker:{settings.region}:{account}"
            resources += [
                f"{prefix}:model-package-group/{group}",
                f"{prefix}:model-package/{group}/*",
            ]
    return iam.PolicyStatement(
        actions=[
            "sagemaker:ListModelPackages",
            "sagemaker:DescribeModelPackage",
            "sagemaker:DescribeModelPackageGroup",
        ],
        resources=sorted(set(resources)),
    )


class DeliveryStack(Stack):
    """The pipeline: source from the repository connection, a synth step that runs the
    README's test command, finds each environment's latest approved model version
    (`kiln models resolve`) and runs `cdk synth` with it, then one deployment per environment
    in order, a manual approval before those listed, and a `kiln invoke` smoke test after each that
    serves a model. Attributes: `pipeline`, `stages` (name -> stage)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        delivery: DeliverySettings,
        environments: list[Settings],
        make_stage: Callable[[Construct, Settings], object],
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            env=Environment(account=delivery.account, region=delivery.region),
            stack_name="kiln-delivery",
            description="kiln: delivery pipeline (test, then dev -> staging -> prod)",
            termination_protection=True,
            tags={"project": "kiln", "environment": "delivery"},
        )
        key = PlatformKey(
            self,
            "ArtifactsKey",
            alias="alias/kiln/delivery/artifacts",
            description="kiln delivery: encrypts pipeline artifacts",
            removal_policy=RemovalPolicy.RETAIN,
        ).key
        access_logs = AccessLogsBucket(
            self,
            "AccessLogs",
            removal_policy=RemovalPolicy.RETAIN,
            expiration=Duration.days(365),
            noncurrent_version_expiration=Duration.days(30),
        ).bucket
        self.artifacts = SecureBucket(
            self,
            "Artifacts",
            encryption_key=key,
            access_logs_bucket=access_logs,
            access_logs_prefix="artifacts/",
            removal_policy=RemovalPolicy.RETAIN,
            noncurrent_version_expiration=Duration.days(30),
            lifecycle_rules=[
                s3.LifecycleRule(id="ExpireOldArtifacts", expiration=Duration.days(90))
            ],
        ).bucket
        source = pipelines.CodePipelineSource.connection(
            delivery.repository, delivery.branch, connection_arn=str(delivery.connection_arn)
        )
        self.pipeline = pipelines.CodePipeline(
            self,
            "Pipeline",
            pipeline_name="kiln-delivery",
            synth=pipelines.CodeBuildStep(
                "TestAndSynth",
                input=source,
                commands=[
                    "pyenv global 3.11 || true",
                    "make test",
                    # Each environment serves the latest version approved for it: promotion
                    # is an approval in the registry, not an edit of config.
                    f".venv/bin/kiln models resolve --environments "
                    f"{','.join(delivery.environments)} --out {APPROVED_MODELS_FILE}",
                    f"npx cdk synth -c env=pipeline -c approvedModels={APPROVED_MODELS_FILE}",
                ],
                primary_output_directory="cdk.out",
                role_policy_statements=[registry_read_statement(self, environments)],
            ),
            synth_code_build_defaults=pipelines.CodeBuildOptions(
                build_environment=BUILD_ENVIRONMENT
            ),
            artifact_bucket=self.artifacts,
            docker_enabled_for_synth=False,
        )
        self.stages: dict[str, object] = {}
        for settings in environments:
            stage = make_stage(self, settings)
            self.stages[settings.name] = stage
            pre = (
                [pipelines.ManualApprovalStep(f"Approve{settings.name.title()}")]
                if settings.name in delivery.manual_approval_before
                else []
            )
            post = []
            if settings.serving.model_artifact is not None:
                endpoint = naming.endpoint_name(settings)
                post.append(
                    pipelines.CodeBuildStep(
                        f"Smoke{settings.name.title()}",
                        input=source,
                        build_environment=BUILD_ENVIRONMENT,
                        commands=[
                            "make install-infra",
                            # Quoted for the shell: a prompt may hold quotes, $ or backticks.
                            f".venv/bin/kiln invoke --env {settings.name} --max-new-tokens 16 "
                            f"--prompt {shlex.quote(delivery.smoke_prompt)}",
                        ],
                        role_policy_statements=[
                            iam.PolicyStatement(
                                actions=["sagemaker:InvokeEndpoint"],
                                resources=[
                                    f"arn:aws:sagemaker:{settings.region}:"
                                    f"{settings.account or self.account}:endpoint/{endpoint}"
                                ],
                            ),
                            iam.PolicyStatement(
                                actions=["cloudformation:DescribeStacks"],
                                resources=[
                                    f"arn:aws:cloudformation:{settings.region}:"
                                    f"{settings.account or self.account}:stack/"
                                    f"{naming.prefix(settings)}-*/*"
                                ],
                            ),
                        ],
                    )
                )
            self.pipeline.add_stage(stage, pre=pre, post=post)  # type: ignore[arg-type]
        # Built now (not lazily at synth) so its generated roles can be acknowledged.
        self.pipeline.build_pipeline()
        acknowledge_generated_policies(self.pipeline, "CDK Pipelines")
