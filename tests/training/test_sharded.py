"""FSDP2 under torchrun (two processes, gloo) and sharded checkpoints: FSDP's steps equal one
process's, a resume on the same world size follows the uninterrupted run bit for bit, and a
resume on another world size (2 -> 1, 1 -> 2) follows it within 1e-4, and a SIGTERM to torchrun
still leaves a whole checkpoint that resumes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.support import TINY, Run, parse_events, weights

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


def test_sigterm_to_torchrun_checkpoints_every_shard_and_resumes_exactly(
    corpus: Path, tmp_path: Path, run_trainer: Callable[..., Run], clean_env: dict[str, str]
) -> None:
    """What a pod's SIGTERM does (kubelet signals torchrun, PID 1, which forwards it to the
    workers): the step in flight ends, every rank writes its shard, `latest.json` names the
    whole checkpoint, and a resume follows the uninterrupted run bit for bit."""
    steps = 40  # the signal lands at step 3: every later step is a margin for a fast machine
    # Only the SIGTERM checkpoints: whatever `latest.json` names was written by the signal.
    args = [*_two(corpus), "--max-steps", str(steps), "--checkpoint-every", "0"]
    # kiln's pods give torchrun their grace period to wait for the workers (its default is 30 s).
    launcher = [*TORCHRUN[:4], "--shutdown_timeout=115", *TORCHRUN[4:]]
    full = run_trainer([*args, "--output-dir", str(tmp_path / "full")], launcher=launcher)
    assert full.returncode == 0, full.stderr

    ck = tmp_path / "ck"
    resumable = [*args, "--checkpoint-dir", str(ck), "--output-dir", str(tmp_path / "resumed")]
    proc = subprocess.Popen(
        [*launcher, *resumable],
        env=clean_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if '"event": "train"' in line and json.loads(line)["step"] >= 3:
            proc.send_signal(signal.SIGTERM)  # to torchrun, as kubelet does to PID 1
            break
    rest, err = proc.communicate(timeout=120)
    first = Run(proc.returncode, parse_events("".join(lines) + rest), err)
    stopped = int(first.of("stopped")[0]["step"])  # type: ignore[arg-type]
    assert 3 <= stopped < steps, err
    assert first.returncode != 0  # torchrun reports the signal; no model was exported
    assert not first.of("model") and not (tmp_path / "resumed" / "model.tar.gz").exists()

    # `latest.json` names the SIGTERM's checkpoint, whole: both shards, the DCP metadata and
    # rank 0's schedule/data/RNG file, and no partial directory left behind.
    assert first.of("checkpoint")[-1]["step"] == stopped
    name = f"step-{stopped:08d}"
    assert json.loads((ck / "latest.json").read_text()) == {"step": stopped, "dir": name}
    assert sorted(p.name for p in ck.iterdir()) == ["latest.json", name]
    assert {p.name for p in (ck / name).iterdir()} == {
        "__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt",
    }  # fmt: skip

    second = run_trainer(resumable, launcher=launcher)
    assert second.returncode == 0, second.stderr
    assert second.of("resume")[0]["step"] == stopped
    assert sorted(second.losses()) == list(range(stopped + 1, steps + 1))
    assert first.losses() | second.losses() == full.losses()
    a, b = weights(tmp_path / "full" / "model"), weights(tmp_path / "resumed" / "model")
    assert all(a[k].equal(b[k]) for k in a)


def test_fsdp_from_a_checkpoint_loads_it_on_rank_0_and_broadcasts_the_shards(
    corpus: Path, tmp_path: Path, run_trainer: Callable[..., Run]
) -> None:
    from tests.modeling import hf_models

    base = hf_models.build("llama-3.1-8b", tmp_path / "base")
    common = [*TINY[2:], "--init-from", str(base), "--data", str(corpus), "--max-steps", "3",
              "--micro-batch-size", "2", "--output-dir"]  # fmt: skip
    two = run_trainer(
        [*common, str(tmp_path / "o2"), "--strategy", "fsdp", "--checkpoint-dir",
         str(tmp_path / "ck2")],
        launcher=TORCHRUN,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    start = two.of("start")[0]
    assert start["strategy"] == "fsdp" and start["weights_loaded_by"] == "rank 0, broadcast"
    one = run_trainer(
        [*common, str(tmp_path / "o1"), "--grad-accum", "2", "--checkpoint-dir",
         str(tmp_path / "ck1")]
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    assert one.of("start")[0]["weights_loaded_by"] == "every rank"
    # Rank 1 started from nothing (meta tensors): its shards came from rank 0, so the two
    # processes take the steps one process takes from the same checkpoint.
    for step, loss in one.losses().items():
        assert two.losses()[step] == pytest.approx(loss, rel=1e-5)
    a, b = weights(tmp_path / "o1" / "model"), weights(tmp_path / "o2" / "model")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_auto_picking_fsdp_loads_on_rank_0_and_lora_adapters_are_broadcast_with_the_base(
    corpus: Path, tmp_path: Path, run_trainer: Callable[..., Run]
) -> None:
    """`--strategy auto` resolves before the weights are read (a device of 1 MiB cannot hold a
    replica: FSDP), so rank 1 builds on meta and receives the base and rank 0's freshly drawn
    adapters; the two processes then take one process's LoRA steps."""
    from tests.modeling import hf_models

    base = hf_models.build("llama-3.1-8b", tmp_path / "base")
    common = [*TINY[2:], "--init-from", str(base), "--data", str(corpus), "--max-steps", "3",
              "--micro-batch-size", "2", "--lora-rank", "4", "--lora-targets", "all-linear",
              "--lr", "1e-2", "--output-dir"]  # fmt: skip
    two = run_trainer(
        [*common, str(tmp_path / "o2"), "--strategy", "auto", "--device-memory-gib", "0.001",
         "--checkpoint-dir", str(tmp_path / "ck2")],
        launcher=TORCHRUN,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    start = two.of("start")[0]
    assert start["strategy"] == "fsdp" and start["weights_loaded_by"] == "rank 0, broadcast"
    one = run_trainer(
        [*common, str(tmp_path / "o1"), "--grad-accum", "2", "--checkpoint-dir",
         str(tmp_path / "ck1")]
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    for step, loss in one.losses().items():
        assert two.losses()[step] == pytest.approx(loss, rel=1e-5)
    for part, name in (("model", "model.safetensors"), ("adapter", "adapter_model.safetensors")):
        a = load_file(tmp_path / "o1" / part / name)
        b = load_file(tmp_path / "o2" / part / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # The adapters moved (B starts at zero), so the broadcast carried trained state, not zeros.
    assert any(k for k, v in load_file(tmp_path / "o2" / "adapter" / name).items() if v.any())
