"""A new user's first hour, scripted: a fresh clone, the README's two set-up commands (their
cheapest stand-ins: what `make` would run), `kiln local` on a tiny budget, `kiln envs`, one
configuration mistake and one AWS command without credentials. Every step asserts on what the
person reads."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KILN = Path(sys.executable).parent / "kiln"


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tracked files only, as `git clone` gives them: no .venv, node_modules or cdk.out."""
    target = tmp_path_factory.mktemp("clone") / "kiln"
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def user_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A shell with no AWS credentials anywhere, and its own temporary folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(tmp / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        TMPDIR=str(tmp),
        **extra,
    )
    return env


def kiln(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The installed `kiln` entry point, run as a person runs it from the checkout."""
    return subprocess.run(
        [str(KILN), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_readmes_two_commands_install_what_they_run(clone: Path) -> None:
    readme = (clone / "README.md").read_text()
    setup = readme.split("## Set-up: two commands", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in setup.strip().splitlines()]
    assert commands == ["make synth", "make test"]
    # What `make` would run in the fresh clone (a dry run: nothing is installed here).
    synth = subprocess.run(
        ["make", "-n", "synth"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout
    assert "-m venv .venv" in synth and "install" in synth and "-e '.[infra]'" in synth
    assert "npm ci" in synth and "npx cdk synth --quiet -c env=dev" in synth
    assert "Supply a stack id" in synth  # ... the CLI's idle line is filtered out
    test = subprocess.run(
        ["make", "-n", "test"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout
    assert "-e '.[infra,ml,dev,tracking]'" in test and "./kernels" in test and "-m pytest" in test
    # Installs are not silent: pip shows its progress, each step says what it installs.
    assert "pip install -q -e" not in synth + test
    assert "== installing the infrastructure packages" in synth


def test_make_help_lists_every_target_the_docs_name(clone: Path) -> None:
    shown = subprocess.run(
        ["make", "help"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout
    docs = [clone / "README.md", *clone.glob("*/README.md"), clone / "docs" / "kiln-cli.md"]
    named = {t for doc in docs for t in re.findall(r"`make ([a-z][a-z-]+)", doc.read_text())}
    assert {"synth", "test", "install-infra", "install-dev"} <= named
    missing = sorted(t for t in named if f"make {t} " not in shown)
    assert not missing, f"make help does not list {missing}:\n{shown}"


def test_kiln_local_on_a_tiny_budget(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="kiln local trains and serves a model")
    done = kiln(
        "local",
        "--minutes",
        "0.3",
        "--max-steps",
        "20",
        "--max-new-tokens",
        "12",
        "--prompt",
        "def fibonacci(n):",
        env=user_env(tmp_path),
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "Traceback" not in out + done.stderr
    lines = out.splitlines()
    assert lines[0].startswith("training the tiny model on the Python standard library for 0.3 min")
    # Progress as it trains (a line every 10 s when not a terminal, and the first at once).
    assert re.search(r"step \d+/\d+ \(\d+%\) \| loss \d\.\d{3} \| [\d,]+ tok/s \| .* ETA", out)
    assert re.search(r"trained \d+ steps in \d+s; packaged model.tar.gz", out)
    assert "--- answer 1 of 1, to 'def fibonacci(n):'" in out
    answer = out.split("--- answer 1 of 1", 1)[1].splitlines()[1]
    assert answer.startswith("  def fibonacci(n):")
    assert "\ufffd" not in out and "<|" not in out  # whole characters, no special tokens
    assert re.search(r"validation loss: \d\.\d{3} nats/byte", out)
    assert lines[-1] == (
        "server stopped (exit 0); temporary files removed "
        "(pass --work-dir DIR to keep the model and logs)"
    )
    # Neither the run's folder nor the server's unpacked model is left behind.
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("kiln-")]


def test_kiln_envs_then_one_mistake(tmp_path: Path) -> None:
    env = user_env(tmp_path)
    listed = kiln("envs", env=env)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["environment", "tier", "region", "account", "zones"]
    assert [row.split()[0] for row in rows[:3]] == ["dev", "staging", "prod"]
    assert "differs" in listed.stdout
    # The mistake a new user makes first: a region typed by hand.
    configs = tmp_path / "config"
    shutil.copytree(REPO / "config", configs)
    staging = configs / "staging.yaml"
    region = re.search(r"^region: (\S+)", staging.read_text(), re.M)
    assert region is not None
    staging.write_text(staging.read_text().replace(region.group(0), "region: us-east-one"))
    broken = kiln("envs", "--config-dir", str(configs), env=env)
    assert broken.returncode == 1
    assert "staging.yaml: invalid configuration:" in broken.stderr
    assert (
        "region: 'us-east-one' is not valid: an AWS region is written like us-east-1 or "
        "eu-west-2" in broken.stderr
    )
    assert "pattern" not in broken.stderr and "Traceback" not in broken.stderr
    assert "1 of 3 environment files are invalid" in broken.stderr


def test_an_aws_command_without_credentials_says_how_to_sign_in(tmp_path: Path) -> None:
    done = kiln("status", "--env", "dev", env=user_env(tmp_path), timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("kiln status: no AWS credentials found: sign in (`aws sso login")
    assert "Traceback" not in done.stderr and done.stdout == ""
    # A profile named but not configured: what is wrong and what to do, once.
    named = kiln("status", "--env", "dev", env=user_env(tmp_path, AWS_PROFILE="myteam"))
    assert named.returncode == 1
    assert named.stderr.count("kiln status:") == 1
    assert "the AWS profile 'myteam'" in named.stderr and "aws configure sso" in named.stderr
