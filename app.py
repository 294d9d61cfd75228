"""CDK entry point: `-c env=<name>|all` picks environments; one Stage is built for each."""

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

from kiln.config import (
    CONFIG_DIR,
    ConfigError,
    load_settings,
    resolve_environments,
    with_model_artifact,
)
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
    # `-c modelArtifact=s3://.../model.tar.gz` rolls that model out (one environment at a time).
    artifact = app.node.try_get_context("modelArtifact")
    names = resolve_environments(str(app.node.try_get_context("env")), config_dir)
    if artifact and len(names) != 1:
        raise ConfigError("-c modelArtifact applies to one environment; pick it with -c env=<name>")
    for name in names:
        settings = load_settings(name, config_dir)
        if artifact:
            settings = with_model_artifact(settings, str(artifact))
        stage = KilnStage(app, settings=settings)
        # Aspects stop at a Stage boundary, so each stage gets its own: it copies every
        # acknowledgement, with its reason, into the template's Metadata for auditors.
        Aspects.of(stage).add(WriteNagSuppressionsToCloudFormationAspect())
    # Any unacknowledged finding fails synth; acknowledgements sit on their resources.
    Validations.of(app).add_plugins(AwsSolutionsChecks(app), NIST80053R5Checks(app))
    return app


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
