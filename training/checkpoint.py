"""Atomic training checkpoints in a local directory or S3 prefix, with a `latest.json` pointer.

A checkpoint is `step-NNNNNNNN/state.pt` (model, optimizer, scheduler, data position, every rank's
RNG states). Locally it is written into a temporary directory that is renamed into place; on S3
its object is uploaded whole. Either way `latest.json` is replaced only afterwards, so a reader
(a resumed run) never sees a half-written checkpoint, even when the writer is killed mid-write.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from training.storage import LocalStore, Store

LATEST = "latest.json"
STATE = "state.pt"
STEP_DIR = re.compile(r"step-(\d{8})")


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(store: Store, step: int, state: dict[str, Any], *, keep: int = 2) -> str:
    """Writes `state` as the checkpoint of `step`, points latest.json at it, prunes old ones."""
    name = step_dir(step)
    if isinstance(store, LocalStore):
        store.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=store.root))
        try:
            with open(tmp / STATE, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            final = store.root / name
            if final.exists():  # a rerun of the same step: the new one replaces it whole
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        with tempfile.TemporaryDirectory() as d:
            local = Path(d) / STATE
            torch.save(state, local)
            store.put_file(local, f"{name}/{STATE}")
    return commit(store, step, keep=keep)


def commit(store: Store, step: int, *, keep: int) -> str:
    """Points latest.json at the (whole) checkpoint of `step` and prunes older ones."""
    name = step_dir(step)
    store.write_bytes(LATEST, json.dumps({"step": step, "dir": name}).encode() + b"\n")
    _prune(store, keep=keep, current=name)
    return store.describe(name)


def _prune(store: Store, *, keep: int, current: str) -> None:
    if keep < 1:
        return
    steps = sorted(d for d in store.list_dirs() if STEP_DIR.fullmatch(d))
    for old in steps[:-keep]:
        if old != current:
            store.delete_dir(old)


def latest(store: Store) -> tuple[int, str] | None:
    """(step, directory name) of the newest complete checkpoint, or None."""
    if not store.exists(LATEST):
        return None
    info = json.loads(store.read_bytes(LATEST))
    return int(info["step"]), str(info["dir"])


def load(store: Store, name: str) -> dict[str, Any]:
    if isinstance(store, LocalStore):
        with open(store.root / name / STATE, "rb") as f:
            return dict(torch.load(f, map_location="cpu", weights_only=True))
    data = io.BytesIO(store.read_bytes(f"{name}/{STATE}"))
    return dict(torch.load(data, map_location="cpu", weights_only=True))
