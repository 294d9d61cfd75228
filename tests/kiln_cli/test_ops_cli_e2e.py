"""The installed `kiln` entry point in its own process against moto's server on 127.0.0.1:
status, train, invoke and deploy-model's missing-artifact message, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from tests.kiln_cli.support import (
    ACCOUNT,
    ARTIFACT,
    REGION,
    create_buckets,
    create_endpoint,
    create_rollback_alarms,
    deploy_stacks,
    put_object,
)

pytestmark = pytest.mark.usefixtures("stack_outputs")

KILN = Path(sys.executable).parent / "kiln"


@pytest.fixture
def moto_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    environment = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield url
    finally:
        urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"))
        server.stop()


def kiln(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KILN), *argv], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )


@pytest.mark.skipif(not KILN.exists(), reason="the kiln entry point is not installed")
def test_kiln_commands_in_a_subprocess(moto_server: str) -> None:
    deploy_stacks()
    create_buckets()
    put_object(f"s3://kiln-dev-curated-{ACCOUNT}-{REGION}/train/shard-0.txt")
    put_object(ARTIFACT)
    create_endpoint("kiln-dev-llm", ARTIFACT, "v1")
    create_rollback_alarms("kiln-dev-llm")

    started = kiln("train", "--env", "dev", "--on", "sagemaker", "--", "--max-steps", "10")
    assert started.returncode == 0, started.stderr
    job = started.stdout.splitlines()[0].removeprefix("started SageMaker training job ")

    shown = kiln("status", "--env", "dev")
    assert shown.returncode == 0, shown.stderr
    assert "kiln-dev-serving        CREATE_COMPLETE" in shown.stdout
    assert f"  model            {ARTIFACT}\n" in shown.stdout
    assert f"  {job}  Completed" in shown.stdout

    answer = {"generated_text": "a kiln fires clay", "finish_reason": "eos", "usage": {}}
    results = {"results": [{"Body": json.dumps(answer), "ContentType": "application/json"}]}
    urllib.request.urlopen(
        urllib.request.Request(
            f"{moto_server}/moto-api/static/sagemaker/endpoint-results",
            data=json.dumps(results).encode(),
            method="POST",
        )
    )
    invoked = kiln("invoke", "--env", "dev", "--prompt", "what is a kiln?")
    assert (invoked.returncode, invoked.stdout) == (0, "a kiln fires clay\n"), invoked.stderr

    missing = ARTIFACT.replace("job-1", "job-404")
    deployed = kiln("deploy-model", "--env", "dev", "--artifact", missing)
    assert deployed.returncode == 1
    assert deployed.stderr.startswith(
        f"kiln deploy-model: artifact not found: there is no object {missing}."
    )
    assert "Traceback" not in deployed.stderr

    nothing = kiln("status", "--env", "staging")  # not deployed is a state, not an error
    assert nothing.returncode == 0, nothing.stderr
    assert "  kiln-staging-serving        not deployed\n" in nothing.stdout
    assert "  status           serving stack not deployed\n" in nothing.stdout
