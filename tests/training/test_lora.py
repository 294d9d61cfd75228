"""LoRA: adapters trained on a frozen base, optimizer state for the adapters alone, and the output
(adapters merged into a plain model directory) computing the adapted model's logits; the adapters
also written alone in PEFT's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling.artifact import load_model_dir
from modeling.config import PRESETS
from modeling.model import LlamaModel
from tests.modeling import hf_models
from tests.training.support import TINY, write_corpus
from training import lora, train
from training.loop import Trainer, plain_model
from training.parallel import Distributed


def test_merged_weights_compute_the_adapted_models_logits() -> None:
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = LlamaModel(cfg, ops="reference")
    spec = lora.LoraSpec.parse(4, 8.0, "q_proj,v_proj,o_proj,up_proj,down_proj")
    lora.attach(model, spec)
    with torch.no_grad():  # B starts at zero (no change): make the adapters do something
        for name, p in model.named_parameters():
            if ".adapter.B_" in name:
                p.normal_(0, 0.2)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        adapted = model(ids)
        merged_state, peft = lora.merge(model.state_dict(), cfg, spec)
        merged = plain_model(cfg, merged_state)(ids)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, LlamaModel(cfg, ops="reference").eval()(ids), atol=1e-3)
    # PEFT's names and shapes: A [r, in], B [rows of the part, r]; k_proj and gate_proj untouched.
    layer0 = "base_model.model.model.layers.0."
    assert peft[layer0 + "self_attn.q_proj.lora_A.weight"].shape == (4, cfg.hidden_size)
    kv_rows = cfg.num_kv_heads * cfg.head_dim
    assert peft[layer0 + "self_attn.v_proj.lora_B.weight"].shape == (kv_rows, 4)
    assert peft[layer0 + "mlp.up_proj.lora_B.weight"].shape == (cfg.intermediate_size, 4)
    assert not any("k_proj" in k or "gate_proj" in k for k in peft)


def test_lora_fine_tuning_trains_adapters_alone_and_writes_merged_and_adapter_artifacts(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    base = hf_models.build("llama-3.1-8b", tmp_path / "base")
    out = tmp_path / "out"
    argv = [
        *TINY[2:],
        "--init-from", str(base),
        "--data", str(write_corpus(tmp_path / "data", files=4, sentences=60)),
        "--max-steps", "3", "--lr", "1e-2",
        "--lora-rank", "4", "--lora-alpha", "16", "--lora-targets", "all-linear",
        "--output-dir", str(out),
    ]  # fmt: skip
    args = train.parse_args(argv, environ={})
    trainer = Trainer(args, Distributed.from_env("cpu", environ={}))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    assert trainer.fit() is None
    # The optimizer holds state for the adapters alone; the base did not move, the adapters did.
    states = trainer.optimizer.state
    assert {id(p) for p in states} == {id(p) for p in trainer.trainable}
    after = trainer.model.state_dict()
    for name, value in after.items():
        assert torch.equal(value, before[name]) == (".adapter." not in name), name

    ids = torch.tensor([[3, 17, 40, 2, 99, 5]])
    merged, _ = load_model_dir(out / "model", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), trainer.model.eval()(ids), rtol=1e-5, atol=1e-5)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert len(config["target_modules"]) == 7
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 2 * 7 * 2  # A and B, 7 projections, 2 layers


def test_bad_targets_are_refused(clean_env: dict[str, str]) -> None:
    with pytest.raises(SystemExit):
        train.parse_args(["--lora-rank", "4", "--lora-targets", "qkv"], environ={})


def test_under_bf16_the_frozen_base_is_stored_in_bf16_and_the_adapters_train_in_fp32(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    base = hf_models.build("llama-3.1-8b", tmp_path / "base")
    out = tmp_path / "out"
    argv = [
        *TINY[2:],
        "--init-from", str(base),
        "--data", str(write_corpus(tmp_path / "data", files=4, sentences=60)),
        "--max-steps", "4", "--lr", "1e-2", "--precision", "bf16",
        "--lora-rank", "4", "--lora-targets", "q_proj,v_proj,down_proj",
        "--output-dir", str(out),
    ]  # fmt: skip
    args = train.parse_args(argv, environ={})
    fp32_bytes = sum(
        p.numel() * 4 for p in load_model_dir(base, dtype=torch.float32)[0].parameters()
    )
    trainer = Trainer(args, Distributed.from_env("cpu", environ={}))
    params = dict(trainer.model.named_parameters())
    assert {p.dtype for n, p in params.items() if ".adapter." not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in params.items() if ".adapter." in n} == {torch.float32}
    base_bytes = sum(
        p.numel() * p.element_size() for n, p in params.items() if ".adapter." not in n
    )
    assert base_bytes * 2 == fp32_bytes
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.fit() is None
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]) == (".adapter." not in name), name
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    # The export: the bf16 base plus the adapters' deltas, merged in float32 (not rounded to
    # bf16, which would lose them), computing the adapted model's logits.
    ids = torch.tensor([[3, 17, 40, 2, 99, 5]])
    merged, _ = load_model_dir(out / "model", dtype=torch.float32)
    assert merged.layers[0].attn.qkv_proj.weight.dtype == torch.float32
    trainer.model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = trainer.model(ids).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = merged(ids).float()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
