"""The SageMaker training contract: /opt/ml paths, SM_* variables, hyperparameters, torchrun.

SageMaker starts the image as `<entrypoint> train`. Without the sagemaker-training toolkit in the
image no SM_* variables are set, so everything is read from the /opt/ml tree as well:
`input/config/hyperparameters.json`, `input/config/resourceconfig.json`, the channels under
`input/data/<channel>`; the model goes to `model/` (SageMaker tars it into model.tar.gz),
checkpoints to `checkpoints/` (synced to S3 when the job sets a checkpoint URI) and the reason
for a failure to `output/failure`. `KILN_SAGEMAKER_ROOT` moves the tree (tests use a temporary one).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT_ENV = "KILN_SAGEMAKER_ROOT"
DEFAULT_ROOT = "/opt/ml"
TRAIN_CHANNELS = ("train", "training")
VAL_CHANNELS = ("validation", "val", "valid")
MASTER_PORT = 29500  # any free port on the first host; SageMaker hosts reach each other freely


class SageMakerError(ValueError):
    """A SageMaker environment the trainer cannot use; the message says what is wrong."""


@dataclass(frozen=True)
class SageMakerEnv:
    root: Path
    hyperparameters: dict[str, Any]
    channels: dict[str, Path]
    model_dir: Path
    output_data_dir: Path
    checkpoint_dir: Path
    hosts: list[str]
    current_host: str
    job_name: str | None
    num_gpus: int | None = None

    @property
    def failure_file(self) -> Path:
        return self.root / "output" / "failure"

    @property
    def train_channel(self) -> Path | None:
        for name in TRAIN_CHANNELS:
            if name in self.channels:
                return self.channels[name]
        others = [c for c in self.channels if c not in VAL_CHANNELS]
        return self.channels[others[0]] if len(others) == 1 else None

    @property
    def val_channel(self) -> Path | None:
        return next((self.channels[n] for n in VAL_CHANNELS if n in self.channels), None)


def root(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get(ROOT_ENV, DEFAULT_ROOT))


def detected(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this runs as a SageMaker training job (SM_* variables or the /opt/ml tree)."""
    if "SM_MODEL_DIR" in environ or "SM_TRAINING_ENV" in environ:
        return True
    return (root(environ) / "input" / "config" / "hyperparameters.json").is_file()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise SageMakerError(f"{path} is not valid JSON: {err}") from err


def _decode(value: Any) -> Any:
    # The SageMaker SDK JSON-encodes each value ('"tiny"', '0.001'); the console does not ('tiny').
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        return decoded if isinstance(decoded, str | int | float | bool) else value
    return value


def load(environ: Mapping[str, str] = os.environ) -> SageMakerEnv:
    base = root(environ)
    config = base / "input" / "config"
    if "SM_HPS" in environ:
        try:
            hps = json.loads(environ["SM_HPS"])
        except json.JSONDecodeError as err:
            raise SageMakerError(f"SM_HPS is not valid JSON: {err}") from err
    else:
        hps = _read_json(config / "hyperparameters.json") or {}
    if not isinstance(hps, dict):
        raise SageMakerError(f"hyperparameters must be a JSON object, got {type(hps).__name__}")
    channels: dict[str, Path] = {}
    if "SM_CHANNELS" in environ:
        for name in json.loads(environ["SM_CHANNELS"]):
            channels[name] = Path(
                environ.get(f"SM_CHANNEL_{name.upper()}", base / "input" / "data" / name)
            )
    elif (base / "input" / "data").is_dir():
        for d in sorted((base / "input" / "data").iterdir()):
            # SageMaker also writes <channel>-manifest files beside pipe-mode channels.
            if d.is_dir():
                channels[d.name] = d
    resources = _read_json(config / "resourceconfig.json") or {}
    hosts = json.loads(environ["SM_HOSTS"]) if "SM_HOSTS" in environ else resources.get("hosts", [])
    current = environ.get("SM_CURRENT_HOST") or resources.get("current_host", "")
    gpus = environ.get("SM_NUM_GPUS")
    return SageMakerEnv(
        root=base,
        hyperparameters={k: _decode(v) for k, v in hps.items() if not k.startswith("sagemaker_")},
        channels=channels,
        model_dir=Path(environ.get("SM_MODEL_DIR", base / "model")),
        output_data_dir=Path(environ.get("SM_OUTPUT_DATA_DIR", base / "output" / "data")),
        checkpoint_dir=base / "checkpoints",
        hosts=list(hosts) or ([current] if current else []),
        current_host=current,
        job_name=environ.get("TRAINING_JOB_NAME"),
        num_gpus=int(gpus) if gpus else None,
    )


def hyperparameter_args(hps: Mapping[str, Any]) -> list[str]:
    """{"max_steps": 10, "compile": True} -> ["--max-steps", "10", "--compile", "true"]."""
    args = []
    for key, value in hps.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args += [f"--{key.replace('_', '-')}", text]
    return args


def torchrun_command(env: SageMakerEnv, gpus: int) -> list[str] | None:
    """The torchrun command that runs one process per GPU on every host, or None for one process.

    SageMaker runs one container per host and no launcher of its own for a custom image, so the
    first process re-executes itself under torchrun with a static rendezvous on the first host.
    """
    nodes = max(1, len(env.hosts))
    per_node = max(1, gpus)
    if nodes * per_node == 1:
        return None
    if env.current_host not in env.hosts:
        raise SageMakerError(f"current host {env.current_host!r} is not among hosts {env.hosts}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--nproc_per_node={per_node}",
        f"--node_rank={env.hosts.index(env.current_host)}",
        f"--master_addr={env.hosts[0]}",
        f"--master_port={MASTER_PORT}",
        "-m",
        "training.train",
        "train",
    ]


def write_failure(env: SageMakerEnv, message: str) -> None:
    """SageMaker shows this file's text as the job's FailureReason."""
    try:
        env.failure_file.parent.mkdir(parents=True, exist_ok=True)
        env.failure_file.write_text(message[:1000] + "\n")
    except OSError:
        pass  # the reason still reaches the log; a read-only tree must not mask the real error
