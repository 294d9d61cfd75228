"""The memory plan: shapes match the trainer's presets and released models' parameter counts,
FSDP divides the states by the world size, checkpointing shrinks activations, auto picks DDP
when a replica fits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kiln.gpu_instances import lookup
from kiln.memory_plan import SHAPES, PlanError, plan, resolve_shape, trainer_settings
from modeling.config import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_trainer_presets_shapes_and_parameter_counts(name: str) -> None:
    cfg, shape = PRESETS[name], SHAPES[name]
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
        assert getattr(shape, field) == getattr(cfg, field), field
    assert (shape.num_kv_heads, shape.head_dim) == (cfg.num_kv_heads, cfg.head_dim)
    assert shape.tie_embeddings == cfg.tie_embeddings
    assert shape.parameters == cfg.num_parameters()


def test_released_shapes_have_their_published_sizes() -> None:
    assert SHAPES["llama-3-8b"].parameters == 8_030_261_248
    assert SHAPES["llama-3-70b"].parameters == 70_553_706_496
    assert SHAPES["llama-3.2-1b"].parameters == 1_235_814_400


def test_fsdp_shards_states_and_auto_picks_ddp_when_a_replica_fits() -> None:
    p5 = lookup("p5.48xlarge")
    small = plan(SHAPES["llama-3.2-1b"], p5, world=8, micro_batch=4, seq_len=2048)
    assert small.strategy == "ddp" and small.fits
    big = plan(SHAPES["llama-3-8b"], p5, world=8, micro_batch=1, seq_len=4096)
    assert big.strategy == "fsdp" and big.fits
    ddp = plan(SHAPES["llama-3-8b"], p5, world=8, micro_batch=1, seq_len=4096, strategy="ddp")
    assert not ddp.fits
    for part in ("weights", "gradients", "optimizer"):
        assert getattr(big, part) * 8 == pytest.approx(getattr(ddp, part), rel=1e-6)
    ac = plan(
        SHAPES["llama-3-8b"],
        p5,
        world=8,
        micro_batch=1,
        seq_len=4096,
        activation_checkpointing=True,
    )
    assert ac.activations < big.activations / 3
    lora = plan(SHAPES["llama-3-8b"], p5, world=8, micro_batch=1, seq_len=4096, lora_rank=16)
    assert lora.optimizer < ddp.optimizer / 100


def test_a_directory_and_the_trainer_flags(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, '
        '"intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, '
        '"num_key_value_heads": 8, "tie_word_embeddings": false}'
    )
    assert (
        dataclasses.replace(resolve_shape(str(tmp_path)), name="llama-3-8b") == SHAPES["llama-3-8b"]
    )
    with pytest.raises(PlanError, match="neither a known shape"):
        resolve_shape(str(tmp_path / "nowhere"))
    got = trainer_settings(
        ["--micro-batch-size", "2", "--lora-rank=8", "--lora-targets", "all-linear"]
    )
    assert (got["micro_batch"], got["seq_len"], got["lora_rank"], len(got["lora_targets"])) == (
        2, 256, 8, 7,
    )  # fmt: skip


def test_a_directory_written_by_transformers_and_an_s3_one(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    # Qwen2-0.5B's shape: biased q/k/v, tied embeddings, head_dim from hidden / heads.
    transformers.Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ).save_pretrained(tmp_path)
    shape = resolve_shape(str(tmp_path))
    assert (shape.qkv_bias, shape.tie_embeddings, shape.head_dim) == (True, True, 64)
    assert shape.parameters == 494_032_768  # Qwen2.5-0.5B's published count
    read: list[str] = []

    def read_s3(uri: str) -> bytes:
        read.append(uri)
        return (tmp_path / "config.json").read_bytes()

    assert dataclasses.replace(
        resolve_shape("s3://models/qwen/", read_s3=read_s3), name=str(tmp_path)
    ) == dataclasses.replace(shape, name=str(tmp_path))
    assert read == ["s3://models/qwen/config.json"]
    with pytest.raises(PlanError, match="reading a model from S3 needs AWS access"):
        resolve_shape("s3://models/qwen")
    with pytest.raises(PlanError, match=r"s3://m/x/config.json is not JSON"):
        resolve_shape("s3://m/x", read_s3=lambda uri: b"\xff")
    with pytest.raises(PlanError, match="lacks a Llama-family field"):
        resolve_shape("s3://m/x", read_s3=lambda uri: b'{"model_type": "bert"}')
