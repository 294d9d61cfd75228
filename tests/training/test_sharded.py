"""FSDP2 under torchrun (two processes, gloo) and sharded checkpoints: FSDP's steps equal one
process's, a resume on the same world size follows the uninterrupted run bit for bit, and a
resume on another world size (2 -> 1, 1 -> 2) follows it within 1e-4."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.training.support import TINY, Run, weights

TORCHRUN = [
    sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
    "-m", "training.train",
]  # fmt: skip
STEPS = 8


def _common(corpus: Path) -> list[str]:
    # Global batch 4 either way: 2 processes x 2 sequences, or 1 process x 2 x 2 accumulated.
    return [
        *TINY, "--data", str(corpus), "--max-steps", str(STEPS), "--micro-batch-size", "2",
        "--checkpoint-format", "sharded", "--checkpoint-every", "4", "--keep-checkpoints", "3",
    ]  # fmt: skip


def _two(corpus: Path) -> list[str]:
    return [*_common(corpus), "--strategy", "fsdp", "--grad-accum", "1"]


def _one(corpus: Path) -> list[str]:
    return [*_common(corpus), "--grad-accum", "2"]


def _rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of a checkpoint directory as it stood after `step` (later ones removed)."""
    shutil.copytree(src, dst)
    for d in dst.iterdir():
        if d.name.startswith("step-") and int(d.name[5:]) > step:
            shutil.rmtree(d)
    (dst / "latest.json").write_text(json.dumps({"step": step, "dir": f"step-{step:08d}"}))
    return dst


def test_fsdp_and_sharded_checkpoints_resume_exactly_and_on_other_world_sizes(
    corpus: Path, tmp_path: Path, run_trainer: Callable[..., Run]
) -> None:
    two = run_trainer(
        [
            *_two(corpus),
            "--checkpoint-dir",
            str(tmp_path / "ck2"),
            "--output-dir",
            str(tmp_path / "o2"),
        ],
        launcher=TORCHRUN,
    )
    assert two.returncode == 0, two.stderr
    start = two.of("start")[0]
    assert start["strategy"] == "fsdp" and start["world_size"] == 2
    assert start["checkpoint_format"] == "sharded"
    # Every rank wrote its shard.
    step4 = tmp_path / "ck2" / "step-00000004"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= {
        p.name for p in step4.iterdir()
    }
    one = run_trainer(
        [
            *_one(corpus),
            "--checkpoint-dir",
            str(tmp_path / "ck1"),
            "--output-dir",
            str(tmp_path / "o1"),
        ]
    )
    assert one.returncode == 0, one.stderr
    assert one.of("start")[0]["strategy"] == "ddp"
    # FSDP over two processes takes the same steps as one process with the same global batch.
    for step, loss in one.losses().items():
        assert two.losses()[step] == pytest.approx(loss, rel=1e-5)

    # Same world size: bit for bit.
    again = run_trainer(
        [*_two(corpus), "--checkpoint-dir", str(_rewind(tmp_path / "ck2", tmp_path / "r22", 4)),
         "--output-dir", str(tmp_path / "o22")],
        launcher=TORCHRUN,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.of("resume")[0]["step"] == 4
    assert again.losses() == {s: v for s, v in two.losses().items() if s > 4}
    a, b = weights(tmp_path / "o2" / "model"), weights(tmp_path / "o22" / "model")
    assert all(a[k].equal(b[k]) for k in a)

    # 2 -> 1 and 1 -> 2 processes: the same run within 1e-4.
    down = run_trainer(
        [*_one(corpus), "--checkpoint-dir", str(_rewind(tmp_path / "ck2", tmp_path / "r21", 4))]
    )
    up = run_trainer(
        [*_two(corpus), "--checkpoint-dir", str(_rewind(tmp_path / "ck1", tmp_path / "r12", 4))],
        launcher=TORCHRUN,
    )
    for resumed, reference in ((down, two), (up, one)):
        assert resumed.returncode == 0, resumed.stderr
        assert resumed.of("resume")[0]["step"] == 4
        assert sorted(resumed.losses()) == list(range(5, STEPS + 1))
        for step, loss in resumed.losses().items():
            assert loss == pytest.approx(reference.losses()[step], abs=1e-4)


def test_sharded_checkpoints_on_s3_resume(
    corpus: Path, clean_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    import boto3
    from moto import mock_aws

    from tests.training.support import parse_events
    from training import train

    argv = [*_one(corpus), "--max-steps", "4", "--checkpoint-every", "2"]
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="artifacts")
        ck = ["--checkpoint-dir", "s3://artifacts/checkpoints/job-1"]
        assert (
            train.main([*argv, "--checkpoint-every", "0", "--checkpoint-dir", "s3://artifacts/x"])
            == 0
        )
        full = {
            e["step"]: e["train_loss"]
            for e in parse_events(capsys.readouterr().out)
            if e["event"] == "train"
        }
        assert train.main([*argv, "--max-steps", "4", *ck]) == 0
        capsys.readouterr()
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="artifacts")["Contents"]}
        assert {
            "checkpoints/job-1/latest.json",
            "checkpoints/job-1/step-00000002/__0_0.distcp",
            "checkpoints/job-1/step-00000002/.metadata",
            "checkpoints/job-1/step-00000002/meta.pt",
        } <= keys
        # Point latest.json back at step 2 and resume: steps 3 and 4 as before, bit for bit.
        s3.put_object(
            Bucket="artifacts",
            Key="checkpoints/job-1/latest.json",
            Body=json.dumps({"step": 2, "dir": "step-00000002"}).encode(),
        )
        assert train.main([*argv, *ck]) == 0
        events = parse_events(capsys.readouterr().out)
    assert [e["step"] for e in events if e["event"] == "resume"] == [2]
    assert {e["step"]: e["train_loss"] for e in events if e["event"] == "train"} == {
        s: v for s, v in full.items() if s > 2
    }
