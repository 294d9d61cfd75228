"""`training.export_hf` is a copy now: kiln writes Hugging Face directories, and kiln's first format
is rewritten in that layout with the same weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modeling.artifact import MODEL_FILES, load_model_dir, save_model_dir
from modeling.config import PRESETS
from modeling.model import LlamaModel
from modeling.tokenizer import ByteTokenizer
from training import export_hf

transformers = pytest.importorskip("transformers")


def _trained_looking(tie: bool) -> LlamaModel:
    torch.manual_seed(1)
    model = LlamaModel(dataclasses.replace(PRESETS["tiny"], tie_embeddings=tie, rope_theta=5e4))
    with torch.no_grad():  # norms away from 1, so a swapped norm weight would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def write_legacy_dir(model: LlamaModel, directory: Path, dtype: str = "float32") -> Path:
    """A model directory in kiln's first format: kiln's fused tensor names, its own config and
    tokenizer JSON."""
    directory.mkdir(parents=True)
    tok = ByteTokenizer()
    tensors = {
        k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()
    }
    save_file(tensors, str(directory / "model.safetensors"))
    config = {
        "format": "kiln-llama",
        "format_version": 1,
        "model": model.config.to_dict(),
        "dtype": dtype,
        "weights": "model.safetensors",
        "tokenizer": "tokenizer.json",
        "special_tokens": tok.special_tokens,
        "training": {"job_name": "old", "step": 7},
    }
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.json").write_text(json.dumps(tok.to_dict()))
    return directory


@pytest.mark.parametrize("tie", [True, False])
def test_export_copies_and_transformers_gives_identical_logits(tmp_path: Path, tie: bool) -> None:
    model = _trained_looking(tie)
    save_model_dir(model, ByteTokenizer(), tmp_path / "kiln")
    assert export_hf.main([str(tmp_path / "kiln"), str(tmp_path / "hf")]) == 0
    for name in MODEL_FILES:
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "kiln" / name).read_bytes()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings is tie
    ids = torch.randint(0, 259, (2, 40))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (257, 258)


def test_a_directory_of_kilns_first_format_loads_and_exports_to_the_new_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _trained_looking(tie=False)
    old = write_legacy_dir(model, tmp_path / "old")
    loaded, tok = load_model_dir(old)
    assert isinstance(tok, ByteTokenizer) and loaded.config == model.config
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name

    assert export_hf.main([str(old), str(tmp_path / "new")]) == 0
    assert "kiln model directories are Hugging Face model directories" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(MODEL_FILES)
    kiln = json.loads((tmp_path / "new" / "kiln.json").read_text())
    assert kiln["training"] == {"job_name": "old", "step": 7}
    back, _ = load_model_dir(tmp_path / "new")
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "new").eval()
    ids = torch.randint(0, 259, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_from_hf_checks_and_copies_and_refusals_name_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_model_dir(_trained_looking(tie=True), ByteTokenizer(), tmp_path / "kiln")
    assert export_hf.main(["--from-hf", str(tmp_path / "kiln"), str(tmp_path / "copy")]) == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "kiln" / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (tmp_path / "kiln" / "config.json").write_text(json.dumps(config))
    assert export_hf.main(["--from-hf", str(tmp_path / "kiln"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json: unsupported hidden_act 'gelu'" in err
    assert export_hf.main([str(tmp_path / "missing"), str(tmp_path / "y")]) == 2
    assert "not a model directory" in capsys.readouterr().err
