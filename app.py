"""CDK entry point: `-c env=<name>|all` picks environments (one Stage each); `-c env=pipeline`
builds the delivery pipeline instead."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aws_cdk import App, Aspects, Validations
from cdk_nag import (
    AwsSolutionsChecks,
    NIST80053R5Checks,
    WriteNagSuppressionsToCloudFormationAspect,
)
from constructs import Construct

from kiln.config import (
    CONFIG_DIR,
    PIPELINE_SELECTOR,
    ConfigError,
    load_delivery,
    load_settings,
    read_approved_models,
    resolve_environments,
    with_model_artifact,
    with_serving_engine,
)
from kiln.settings import Settings
from stacks.delivery import DeliveryStack
from stacks.stage import KilnStage

ROOT = Path(__file__).resolve().parent


def cdk_json_context() -> dict[str, Any]:
    """The `context` of cdk.json. `cdk synth` passes it to the app; `python app.py` and
    tests do not, so the app loads it itself and both judge the same template."""
    context: dict[str, Any] = json.loads((ROOT / "cdk.json").read_text())["context"]
    return context


def build_app(context: Mapping[str, Any] | None = None, outdir: str | None = None) -> App:
    """The app with every selected environment's stage and the cdk-nag gates registered.

    `context` overrides cdk.json's (as `-c key=value` does). Raises ConfigError for bad config.
    """
    app = App(context={**cdk_json_context(), **(context or {})}, outdir=outdir)
    # `-c configDir=...` lets a fork keep its environment files elsewhere.
    config_dir = Path(app.node.try_get_context("configDir") or CONFIG_DIR)
    selector = str(app.node.try_get_context("env"))
    if selector == PIPELINE_SELECTOR:
        add_pipeline(app, config_dir)
    else:
        # `-c modelArtifact=s3://.../model.tar.gz` (or an uncompressed model's prefix,
        # `s3://.../model/`) rolls that model out (one environment); with `-c modelPackage=<arn>`
        # it is that registry version's artifact; `-c servingEngine=lmi` serves it with the LMI
        # container instead of kiln's.
        artifact = app.node.try_get_context("modelArtifact")
        package = app.node.try_get_context("modelPackage")
        # `-c inferenceSpecification=lmi`: the version's additional specification to serve.
        specification = app.node.try_get_context("inferenceSpecification")
        engine = app.node.try_get_context("servingEngine")
        names = resolve_environments(selector, config_dir)
        if (artifact or package) and len(names) != 1:
            raise ConfigError(
                "-c modelArtifact/-c modelPackage apply to one environment; pick it with "
                "-c env=<name>"
            )
        if package and not artifact:
            raise ConfigError(
                "-c modelPackage needs -c modelArtifact=<the package's artifact> "
                "(`kiln deploy-model --model-package` passes both)"
            )
        for name in names:
            settings = load_settings(name, config_dir)
            if engine:
                settings = with_serving_engine(settings, str(engine))
            if artifact:
                source = "-c modelPackage/-c modelArtifact" if package else "-c modelArtifact"
                settings = with_model_artifact(
                    settings,
                    str(artifact),
                    source,
                    str(package) if package else None,
                    str(specification) if specification else None,
                )
            add_stage(app, settings)
    # Any unacknowledged finding fails synth; acknowledgements sit on their resources.
    Validations.of(app).add_plugins(AwsSolutionsChecks(app), NIST80053R5Checks(app))
    return app


def add_stage(scope: Construct, settings: Settings) -> KilnStage:
    """One environment's stage, with its acknowledgements copied into the templates."""
    stage = KilnStage(scope, settings=settings)
    # Aspects stop at a Stage boundary, so each stage gets its own: it copies every
    # acknowledgement, with its reason, into the template's Metadata for auditors.
    Aspects.of(stage).add(WriteNagSuppressionsToCloudFormationAspect())
    return stage


def add_pipeline(app: App, config_dir: Path) -> DeliveryStack:
    """`-c env=pipeline`: the delivery stack, its stages inside (config/delivery.yaml)."""
    delivery = load_delivery(config_dir)
    if not delivery.enabled:
        raise ConfigError(
            "config/delivery.yaml: enabled is false; set it to true (with connection_arn) to "
            "synthesize the delivery pipeline"
        )
    # `-c approvedModels=<file>`: what `kiln models resolve` found approved per environment
    # (the pipeline's synth step writes it first); an environment it names serves that version.
    approved_file = app.node.try_get_context("approvedModels")
    approved = read_approved_models(Path(approved_file)) if approved_file else {}
    environments = []
    for name in delivery.environments:
        settings = load_settings(name, config_dir)
        if name in approved:
            settings = with_model_artifact(
                settings,
                approved[name]["model_artifact"],
                f"{approved_file} ({name})",
                approved[name]["model_package"],
                approved[name].get("inference_specification"),
            )
        environments.append(settings)
    stack = DeliveryStack(
        app,
        "Delivery",
        delivery=delivery,
        environments=environments,
        make_stage=add_stage,
    )
    Aspects.of(stack).add(WriteNagSuppressionsToCloudFormationAspect())
    return stack


def main() -> int:
    try:
        app = build_app()
    except ConfigError as err:
        print(f"kiln: synth stopped, the configuration needs a fix.\n{err}", file=sys.stderr)
        return 1
    app.synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
