"""Finding the model: an unpacked model.tar.gz (SageMaker's /opt/ml/model) or the tarball.

A model is a Hugging Face model directory (config.json, safetensors weights or shards with their
index, tokenizer files, a chat template). It may sit at the top of the directory or the tarball,
or in its one subdirectory (`tar czf model.tar.gz Llama-3.2-1B/` packs it so).
"""

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


def _model_root(directory: Path) -> Path | None:
    """`directory` if config.json is at its top, else its only subdirectory if it is there."""
    if (directory / CONFIG_FILE).is_file():
        return directory
    subdirs = [p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and (subdirs[0] / CONFIG_FILE).is_file():
        return subdirs[0]
    return None


def _contents(directory: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    return str(names[:10]) if names else "nothing"


def prepare_model_dir(path: Path) -> Path:
    """The directory to load: `path` itself (or its one subdirectory holding the model), or a
    temporary copy of its model.tar.gz unpacked.

    SageMaker unpacks the artifact into /opt/ml/model before the container starts; a local run
    may point at the training output instead, which holds the tarball.
    """
    if path.is_file() and path.name.endswith(".tar.gz"):
        tarball = path
    elif not path.is_dir():
        raise ModelDirError(f"{path} does not exist or is not a directory")
    elif (root := _model_root(path)) is not None:
        return root
    elif (path / TARBALL).is_file():
        tarball = path / TARBALL
    else:
        raise ModelDirError(
            f"{path} holds neither {CONFIG_FILE} (an unpacked model) nor {TARBALL}; it has "
            f"{_contents(path)}"
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
    root = _model_root(target)
    if root is None:
        contents = _contents(target)
        shutil.rmtree(target, ignore_errors=True)
        raise ModelDirError(
            f"{tarball} holds no {CONFIG_FILE} at its top or in its one directory; it has "
            f"{contents}"
        )
    return root


def unpacked_copy(prepared: Path, given: Path) -> Path | None:
    """The temporary directory `prepare_model_dir(given)` unpacked `prepared` into (the caller
    removes it), or None when `prepared` is `given` itself or its subdirectory."""
    if prepared == given or prepared.parent == given:
        return None
    for candidate in (prepared, prepared.parent):
        if candidate.name.startswith(UNPACKED_PREFIX) and candidate.parent == Path(
            tempfile.gettempdir()
        ):
            return candidate
    return None
