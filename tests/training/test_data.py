"""The data stream: a stable split, seeded shuffles, exact resume, S3 reads, clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import torch
from moto import mock_aws

from modeling.tokenizer import ByteTokenizer
from tests.training.support import write_corpus
from training.data import (
    BlockStream,
    Corpus,
    DataError,
    LocalSource,
    S3Source,
    open_source,
    stdlib_dir,
    validation_blocks,
)


def _corpus(root: Path, **kw: object) -> Corpus:
    return Corpus.build(LocalSource(root), segment_bytes=2048, val_fraction=0.1, **kw)  # type: ignore[arg-type]


def test_split_is_disjoint_stable_and_covers_everything(corpus: Path) -> None:
    c = _corpus(corpus)
    train = {(s.shard.key, s.index) for s in c.train}
    val = {(s.shard.key, s.index) for s in c.val}
    assert train and val and not train & val
    assert len(val) == round(len(train | val) * 0.1)
    total = sum(p.stat().st_size for p in corpus.iterdir())
    assert sum(s.end - s.start for s in c.train + c.val) == total
    # The split depends on names only: another listing of the same files gives the same split.
    assert {(s.shard.key, s.index) for s in _corpus(corpus).val} == val


def test_blocks_pack_documents_with_bos_and_eos(corpus: Path) -> None:
    tok = ByteTokenizer()
    stream = BlockStream(_corpus(corpus), seq_len=64, seed=0, window_bytes=1 << 20)
    blocks = stream.next_blocks(700)  # most of an epoch: a dozen documents
    stream.close()
    assert blocks.shape == (700, 65) and blocks.dtype == torch.int64
    assert (blocks == tok.bos_id).sum() > 0 and (blocks == tok.eos_id).sum() > 0
    assert int(blocks.max()) <= tok.eos_id


def test_shuffle_is_seeded(corpus: Path) -> None:
    def first(seed: int) -> torch.Tensor:
        s = BlockStream(_corpus(corpus), seq_len=32, seed=seed, window_bytes=8192)
        try:
            return s.next_blocks(16)
        finally:
            s.close()

    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))


def test_resumed_stream_yields_the_same_blocks_across_windows_and_epochs(corpus: Path) -> None:
    c = _corpus(corpus)
    ref = BlockStream(c, seq_len=32, seed=3, window_bytes=4096)
    expected = ref.next_blocks(5000)  # several windows and more than one epoch
    assert ref.state_dict()["epoch"] >= 1
    ref.close()
    s = BlockStream(c, seq_len=32, seed=3, window_bytes=4096)
    got = [s.next_blocks(7)]
    for cut in (7, 900, 2500):
        state = s.state_dict()
        s.close()
        s = BlockStream(c, seq_len=32, seed=3, window_bytes=4096)
        s.load_state_dict(state)
        got.append(s.next_blocks({7: 893, 900: 1600, 2500: 2500}[cut]))
    s.close()
    assert torch.equal(torch.cat(got), expected)


def test_validation_blocks_are_fixed(corpus: Path) -> None:
    c = _corpus(corpus)
    a = validation_blocks(c, seq_len=32, max_blocks=8)
    b = validation_blocks(_corpus(corpus), seq_len=32, max_blocks=8)
    assert a.shape == (8, 33) and torch.equal(a, b)


def test_separate_validation_source(tmp_path: Path) -> None:
    train = write_corpus(tmp_path / "train", files=3)
    val = write_corpus(tmp_path / "val", files=1, seed=9)
    c = _corpus(train, val_source=LocalSource(val))
    assert all(s.shard.key.startswith("shard-") for s in c.val)
    assert len(c.train) == len(_corpus(train, val_source=LocalSource(val)).train)
    assert sum(s.end - s.start for s in c.train) == sum(p.stat().st_size for p in train.iterdir())


def test_default_source_is_the_standard_library() -> None:
    src = open_source(None)
    assert src.describe() == str(stdlib_dir())
    shards = src.list_shards()
    keys = {s.key for s in shards}
    assert "os.py" in keys and "json/decoder.py" in keys
    assert all(k.endswith(".py") and "site-packages/" not in k for k in keys)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "does not exist"),
        ("file", "is not a directory"),
        ("empty", "no text files"),
        ("empty_files", "are all empty"),
        ("wrong_suffix", "no text files"),
    ],
)
def test_unusable_directories_say_why(tmp_path: Path, setup: str, message: str) -> None:
    root = tmp_path / "data"
    if setup == "file":
        root.write_text("x")
    elif setup != "missing":
        root.mkdir()
    if setup == "empty_files":
        (root / "a.txt").write_text("")
    if setup == "wrong_suffix":
        (root / "a.parquet").write_bytes(b"PAR1")
        (root / ".hidden.txt").write_text("hidden")
    with pytest.raises(DataError, match=message):
        Corpus.build(LocalSource(root))


def test_too_little_text_for_a_split_or_a_block(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.txt").write_text("tiny")
    with pytest.raises(DataError, match="too few to hold out a validation split"):
        Corpus.build(LocalSource(root))
    c = Corpus.build(LocalSource(root), val_fraction=0)
    with pytest.raises(DataError, match="too little training text"):
        BlockStream(c, seq_len=32, seed=0)


@pytest.fixture
def s3() -> Iterator[object]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="curated")
        yield client


def test_s3_prefix_reads_like_a_directory(s3: object, corpus: Path) -> None:
    for p in sorted(corpus.iterdir()):
        s3.put_object(Bucket="curated", Key=f"text/v1/{p.name}", Body=p.read_bytes())  # type: ignore[attr-defined]
    s3.put_object(Bucket="curated", Key="text/v1/_manifest.json", Body=b"{}")  # type: ignore[attr-defined]
    s3.put_object(Bucket="curated", Key="text/v10/other.txt", Body=b"not ours")  # type: ignore[attr-defined]
    remote = Corpus.build(S3Source("s3://curated/text/v1"), segment_bytes=2048, val_fraction=0.1)
    local = _corpus(corpus)
    assert [s.shard.key for s in remote.train] == [s.shard.key for s in local.train]
    a = BlockStream(remote, seq_len=32, seed=0, window_bytes=8192)
    b = BlockStream(local, seq_len=32, seed=0, window_bytes=8192)
    try:
        assert torch.equal(a.next_blocks(300), b.next_blocks(300))
    finally:
        a.close()
        b.close()


def test_s3_errors_are_data_errors(s3: object) -> None:
    with pytest.raises(DataError, match="no text files"):
        Corpus.build(S3Source("s3://curated/nothing-here/"))
    with pytest.raises(DataError, match="cannot list s3://missing-bucket/x"):
        Corpus.build(S3Source("s3://missing-bucket/x"))
