"""docs/model-registry.md's notebook example, run as written against moto: the SageMaker Python
SDK (sagemaker-core) lists kiln's registry versions, approves one as `kiln models approve` does,
and launches a training run with kiln's image; `kiln models` then sees the approval."""

from __future__ import annotations

import re

import pytest
from moto import mock_aws

from kiln import registry
from kiln_cli.operate.models import Registry
from tests.kiln_cli.support import ACCOUNT, ARTIFACT, NEW_ARTIFACT, REGION, client, make_aws
from tests.support import REPO


def notebook_example() -> str:
    text = (REPO / "docs" / "model-registry.md").read_text()
    match = re.search(r"<!-- notebook-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/model-registry.md lost its notebook example"
    return match.group(1)


@mock_aws
def test_the_documented_notebook_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    client("sagemaker").create_model_package_group(ModelPackageGroupName="kiln-llm")
    image = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/serving:1"
    for artifact, loss in ((ARTIFACT, 1.9), (NEW_ARTIFACT, 1.7)):
        run = registry.RunRecord("kiln-dev-train-1", artifact, "s3://c/train/", 600, 1000, loss)
        registry.register(run, registry.Target("kiln-llm", image), client("sagemaker"))
    namespace = {
        "REGION": REGION,
        "NOW": "2025-12-03T10:00:00Z",
        "TRAINING_ROLE_ARN": f"arn:aws:iam::{ACCOUNT}:role/kiln-dev-training",
        "TRAINING_IMAGE": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/training:1",
        "SERVING_IMAGE": image,
        "CURATED_BUCKET": f"kiln-dev-curated-{ACCOUNT}-{REGION}",
        "ARTIFACTS_BUCKET": f"kiln-dev-artifacts-{ACCOUNT}-{REGION}",
    }
    exec(compile(notebook_example(), "docs/model-registry.md", "exec"), namespace)

    printed = capsys.readouterr().out
    assert printed.startswith(
        f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/kiln-llm/2 PendingManualApproval 1.7"
    )
    # The tool reads the notebook's approval as its own.
    version = Registry(make_aws("dev")).latest_approved("llm", "dev")
    assert version is not None and version.ref == "kiln-llm/2"
    assert version.approvals["dev"].endswith(": notebook eval passed")
    assert version.metadata["val_loss"] == "1.7"  # the run's record survived the approval
    job = client("sagemaker").describe_training_job(TrainingJobName="kiln-dev-notebook-1")
    assert job["AlgorithmSpecification"]["TrainingImage"] == namespace["TRAINING_IMAGE"]
    assert job["HyperParameters"] == {"model": "small", "max_steps": "600"}
