"""The model directory kiln writes is a Hugging Face one: transformers and tokenizers load it, the
byte tokenizer's tokenizer.json gives ByteTokenizer's ids, large models are sharded."""

from __future__ import annotations

import dataclasses
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch

from modeling.artifact import (
    MODEL_FILES,
    ArtifactError,
    load_model_dir,
    model_files,
    save_model_dir,
    write_tarball,
)
from modeling.config import PRESETS
from modeling.model import LlamaModel
from modeling.tokenizer import ByteTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "hello",
    "héllo, wörld ✓ \x00 tab\there",
    "日本語のテキスト 😀 and 🏳️‍🌈",
    "  two leading spaces, and a trailing one ",
    "def f(x):\n    return x  # code\n",
    "",
]


def _model(tie: bool = True, seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    model = LlamaModel(dataclasses.replace(PRESETS["tiny"], tie_embeddings=tie)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def kiln_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("kiln") / "model"
    info = {"job_name": "job-1", "step": 40, "tokens": 5120, "seed": 0}
    return save_model_dir(_model(tie=False), ByteTokenizer(), directory, training=info)


def test_the_layout_is_hugging_faces_with_kilns_metadata_beside_it(kiln_dir: Path) -> None:
    assert model_files(kiln_dir) == sorted(MODEL_FILES)
    config = json.loads((kiln_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["torch_dtype"], config["bos_token_id"], config["eos_token_id"]) == (
        "float32",
        257,
        258,
    )
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False
    generation = json.loads((kiln_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 257, "eos_token_id": 258, "pad_token_id": 256}
    kiln = json.loads((kiln_dir / "kiln.json").read_text())
    assert kiln["format"] == "kiln" and kiln["format_version"] == 2
    assert kiln["training"] == {"job_name": "job-1", "step": 40, "tokens": 5120, "seed": 0}
    from safetensors import safe_open

    with safe_open(str(kiln_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    assert not any("qkv" in n or "gate_up" in n for n in names)  # unfused on disk


def test_transformers_loads_it_with_the_same_logits(kiln_dir: Path) -> None:
    model, _ = load_model_dir(kiln_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(kiln_dir).eval()
    ids = torch.randint(0, 259, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_the_byte_tokenizer_json_gives_byte_tokenizers_ids(kiln_dir: Path) -> None:
    from tokenizers import Tokenizer

    ours = ByteTokenizer()
    assert isinstance(load_tokenizer(kiln_dir), ByteTokenizer)
    rust = Tokenizer.from_file(str(kiln_dir / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(kiln_dir)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (257, 258, 256)
    for text in TEXTS:
        assert rust.encode(text, add_special_tokens=False).ids == ours.encode(text), text
        assert auto(text).input_ids == ours.encode(text, add_bos=True), text
        assert auto(text, add_special_tokens=False).input_ids == ours.encode(text)
        ids = ours.encode(text, add_bos=True, add_eos=True)
        assert auto.decode(ids, skip_special_tokens=True) == ours.decode(ids) == text
        assert auto.decode(ids) == ours.decode(ids, skip_special=False)
    # Any bytes, cut characters and invalid UTF-8 included, decode to the same replacement
    # characters.
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(256) for _ in range(rng.randrange(1, 10))]
        assert auto.decode(ids) == rust.decode(ids) == ours.decode(ids), ids


def test_extra_specials_are_added_tokens(tmp_path: Path) -> None:
    tok = ByteTokenizer(["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>"])
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, ByteTokenizer) and back.special_tokens == tok.special_tokens
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto.convert_tokens_to_ids("<|user|>") == 259 and len(auto) == 260


def test_large_models_are_sharded_with_an_index(tmp_path: Path) -> None:
    model = _model(tie=True, seed=3)
    out = save_model_dir(
        model, ByteTokenizer(), tmp_path / "m", dtype="bfloat16", max_shard_bytes=40_000
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    assert all((out / s).stat().st_mode & 0o777 == 0o644 for s in shards)

    back, _ = load_model_dir(out)
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t.to(torch.bfloat16)), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    exact, _ = load_model_dir(out, dtype=torch.float32)
    ids = torch.randint(0, 259, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, exact(ids), rtol=1e-5, atol=1e-5)

    tarball = write_tarball(out, tmp_path / "model.tar.gz")
    with tarfile.open(tarball) as tar:
        assert sorted(tar.getnames()) == model_files(out)
    assert "model.safetensors.index.json" in model_files(out)

    # Saving again unsharded leaves no stale shards behind.
    save_model_dir(model, ByteTokenizer(), out)
    assert model_files(out) == sorted(MODEL_FILES)


def test_directories_kiln_cannot_read_say_why(tmp_path: Path, kiln_dir: Path) -> None:
    with pytest.raises(ArtifactError, match=r"config\.json is missing"):
        load_model_dir(tmp_path)
    bins = tmp_path / "bins"
    bins.mkdir()
    (bins / "config.json").write_text((kiln_dir / "config.json").read_text())
    (bins / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ArtifactError, match="kiln reads safetensors only"):
        load_model_dir(bins)
    (bins / "config.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(ArtifactError, match="no model_type"):
        load_model_dir(bins)
