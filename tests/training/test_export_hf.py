"""Hugging Face conversion: transformers loads the export and computes the same logits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from modeling.artifact import load_model_dir, save_model_dir
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


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_loads_the_export_with_identical_logits(tmp_path: Path, tie: bool) -> None:
    model = _trained_looking(tie)
    save_model_dir(model, ByteTokenizer(), tmp_path / "kiln")
    assert export_hf.main([str(tmp_path / "kiln"), str(tmp_path / "hf")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings is tie
    ids = torch.randint(0, 259, (2, 40))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (257, 258)
    assert (tmp_path / "hf" / export_hf.HF_TOKENIZER_FILE).is_file()


def test_round_trip_from_hugging_face_is_exact(tmp_path: Path) -> None:
    model = _trained_looking(tie=False)
    save_model_dir(model, ByteTokenizer(), tmp_path / "kiln")
    export_hf.export(tmp_path / "kiln", tmp_path / "hf")
    assert export_hf.main(["--from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back, tok = load_model_dir(tmp_path / "back")
    assert back.config == model.config and tok.vocab_size == 259
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_unsupported_hugging_face_models_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_model_dir(_trained_looking(tie=True), ByteTokenizer(), tmp_path / "kiln")
    export_hf.export(tmp_path / "kiln", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config |= {"attention_bias": True, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert export_hf.main(["--from-hf", str(tmp_path / "hf"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "biases" in err and "rope scaling" in err
    assert export_hf.main([str(tmp_path / "missing"), str(tmp_path / "y")]) == 2
    assert "not a kiln model directory" in capsys.readouterr().err
