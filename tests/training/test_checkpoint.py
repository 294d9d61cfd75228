"""Checkpoints: written whole or not at all, found through latest.json, pruned, on disk or S3."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import torch
from moto import mock_aws

from training import checkpoint
from training.storage import LocalStore, S3Store, StorageError, open_store, parse_s3


def _state(step: int) -> dict[str, object]:
    return {"step": step, "w": torch.full((3,), float(step)), "rng": checkpoint.rng_state()}


def test_local_save_load_latest_and_prune(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "ck")
    assert checkpoint.latest(store) is None
    for step in (10, 20, 30):
        checkpoint.save(store, step, _state(step), keep=2)
    assert checkpoint.latest(store) == (30, "step-00000030")
    assert store.list_dirs() == ["step-00000020", "step-00000030"]
    state = checkpoint.load(store, "step-00000030")
    assert state["step"] == 30 and torch.equal(state["w"], torch.full((3,), 30.0))
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]


def test_a_killed_writer_leaves_the_previous_checkpoint_current(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "ck")
    checkpoint.save(store, 5, _state(5))
    # What a writer killed mid-save leaves: a temporary directory with a partial file.
    partial = tmp_path / "ck" / ".step-00000010.tmp-abc"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"\x80\x02partial")
    assert checkpoint.latest(store) == (5, "step-00000005")
    assert checkpoint.load(store, "step-00000005")["step"] == 5


def test_rng_states_round_trip() -> None:
    saved = checkpoint.rng_state()
    first = (random.random(), torch.rand(3))
    checkpoint.set_rng_state(saved)
    again = (random.random(), torch.rand(3))
    assert first[0] == again[0] and torch.equal(first[1], again[1])


@pytest.fixture
def bucket() -> Iterator[str]:
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="artifacts")
        yield "artifacts"


def test_s3_checkpoints(bucket: str) -> None:
    store = S3Store(f"s3://{bucket}/checkpoints/run-1")
    for step in (1, 2, 3):
        checkpoint.save(store, step, _state(step), keep=2)
    assert checkpoint.latest(store) == (3, "step-00000003")
    assert store.list_dirs() == ["step-00000002", "step-00000003"]
    assert checkpoint.load(store, "step-00000003")["step"] == 3


def test_locations_are_validated() -> None:
    assert parse_s3("s3://b") == ("b", "")
    assert parse_s3("s3://b/p/q") == ("b", "p/q/")
    with pytest.raises(StorageError, match="not an S3 URI"):
        parse_s3("s3:///nobucket")
    with pytest.raises(StorageError, match="only s3:// URIs and local paths"):
        open_store("gs://bucket/x")
