"""Finding the model: an unpacked model.tar.gz (SageMaker's /opt/ml/model) or the tarball."""

from __future__ import annotations

import logging
import shutil
import tarfile
import tempfile
from pathlib import Path

from modeling.artifact import CONFIG_FILE, TARBALL

log = logging.getLogger(__name__)
UNPACKED_PREFIX = "kiln-model-"


class ModelDirError(RuntimeError):
    """The model directory is missing or holds neither a model nor a model.tar.gz."""


def prepare_model_dir(path: Path) -> Path:
    """The directory to load: `path` itself, or a temporary copy of its model.tar.gz unpacked.

    SageMaker unpacks the artifact into /opt/ml/model before the container starts; a local run
    may point at the training output instead, which holds the tarball.
    """
    if path.is_file() and path.name.endswith(".tar.gz"):
        tarball = path
    elif not path.is_dir():
        raise ModelDirError(f"{path} does not exist or is not a directory")
    elif (path / CONFIG_FILE).is_file():
        return path
    elif (path / TARBALL).is_file():
        tarball = path / TARBALL
    else:
        contents = sorted(p.name for p in path.iterdir())[:10]
        raise ModelDirError(
            f"{path} holds neither {CONFIG_FILE} (an unpacked model) nor {TARBALL}; it has "
            f"{contents or 'nothing'}"
        )
    target = Path(tempfile.mkdtemp(prefix=UNPACKED_PREFIX))
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            # The "data" filter refuses absolute paths, links out of the target and devices.
            tar.extractall(target, filter="data")
    except (tarfile.TarError, OSError, EOFError) as err:
        shutil.rmtree(target, ignore_errors=True)
        raise ModelDirError(f"{tarball} could not be unpacked: {err}") from err
    log.info("unpacked %s into %s", tarball, target)
    return target


def is_unpacked_copy(prepared: Path, given: Path) -> bool:
    """Whether `prepare_model_dir(given)` unpacked a temporary copy (the caller removes it)."""
    return prepared != given and prepared.name.startswith(UNPACKED_PREFIX)
