"""The model: kiln's kernels agree with the reference ops, shapes and sizes follow the config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from modeling.config import PRESETS, ConfigError, ModelConfig
from modeling.model import LlamaModel, lm_loss

TINY = PRESETS["tiny"]


def _pair(cfg: ModelConfig) -> tuple[LlamaModel, LlamaModel]:
    torch.manual_seed(0)
    ours = LlamaModel(cfg, ops="kiln")
    ref = LlamaModel(cfg, ops="reference")
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("tie", [True, False])
def test_kernels_match_reference_forward_and_backward(tie: bool) -> None:
    ours, ref = _pair(dataclasses.replace(TINY, tie_embeddings=tie))
    ids = torch.randint(0, 259, (3, 21))
    losses = []
    for model in (ours, ref):
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_parameter_names_and_count_follow_the_config() -> None:
    for tie in (True, False):
        cfg = dataclasses.replace(TINY, tie_embeddings=tie)
        model = LlamaModel(cfg)
        names = set(model.state_dict())
        assert ("lm_head.weight" in names) is not tie
        assert "layers.1.attn.qkv_proj.weight" in names
        assert all(".bias" not in n for n in names)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    qkv = LlamaModel(TINY).layers[0].attn.qkv_proj.weight
    assert qkv.shape == ((TINY.num_heads + 2 * TINY.num_kv_heads) * TINY.head_dim, TINY.hidden_size)


def test_causal_a_later_token_never_changes_earlier_logits() -> None:
    model = LlamaModel(TINY).eval()
    ids = torch.randint(0, 259, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 259
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :-1], model(changed)[:, :-1])


def test_bf16_autocast_runs_and_stays_close() -> None:
    model = LlamaModel(TINY).eval()
    ids = torch.randint(0, 259, (2, 16))
    with torch.no_grad():
        full = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(ids)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1


def test_too_long_a_sequence_is_refused() -> None:
    model = LlamaModel(dataclasses.replace(TINY, max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_heads": 6, "num_kv_heads": 4}, "multiple of num_kv_heads"),
        ({"head_dim": 15}, "head_dim must be even"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps must be > 0"),
    ],
)
def test_bad_configs_say_what_is_wrong(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(TINY, **fields)
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({"hidden": 3})


def test_the_model_compiles_as_one_graph_forward_and_backward() -> None:
    """torch.compile(fullgraph=True) over the whole model (aot_eager: dynamo and AOT autograd; the
    training benchmark runs inductor)."""
    torch._dynamo.reset()
    ours, _ = _pair(TINY)
    ids = torch.randint(0, 259, (2, 17))
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, ours):
        ours.zero_grad()
        loss = lm_loss(fn(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in ours.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
