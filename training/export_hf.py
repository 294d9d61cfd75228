"""Converts a kiln model directory to the Hugging Face Llama format, and back (`--from-hf`).

`python -m training.export_hf MODEL_DIR OUT_DIR` writes `config.json` (LlamaConfig),
`generation_config.json`, `model.safetensors` with Hugging Face's names, and `kiln_tokenizer.json`
(our byte-level tokenizer, under a name that Hugging Face's tokenizer loaders do not claim).
`transformers.LlamaForCausalLM.from_pretrained(OUT_DIR)` then gives the same logits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from modeling.artifact import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    read_config,
    save_model_dir,
)
from modeling.config import ModelConfig
from modeling.model import LlamaModel
from modeling.tokenizer import TOKENIZER_FILE, ByteTokenizer

HF_TOKENIZER_FILE = "kiln_tokenizer.json"


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """kiln tensor names and fused layouts -> Hugging Face LlamaForCausalLM's."""
    q, kv, inter = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    out = {"model.embed_tokens.weight": state["embed_tokens.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "attn.qkv_proj.weight"]
        gate_up = state[src + "mlp.gate_up_proj.weight"]
        out |= {
            dst + "self_attn.q_proj.weight": qkv[:q],
            dst + "self_attn.k_proj.weight": qkv[q : q + kv],
            dst + "self_attn.v_proj.weight": qkv[q + kv :],
            dst + "self_attn.o_proj.weight": state[src + "attn.o_proj.weight"],
            dst + "mlp.gate_proj.weight": gate_up[:inter],
            dst + "mlp.up_proj.weight": gate_up[inter:],
            dst + "mlp.down_proj.weight": state[src + "mlp.down_proj.weight"],
            dst + "input_layernorm.weight": state[src + "attn_norm.weight"],
            dst + "post_attention_layernorm.weight": state[src + "mlp_norm.weight"],
        }
    out["model.norm.weight"] = state["norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face LlamaForCausalLM tensor names -> kiln's (q/k/v and gate/up fused)."""
    out = {"embed_tokens.weight": state["model.embed_tokens.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = [state[f"{src}self_attn.{n}_proj.weight"] for n in "qkv"]
        out |= {
            dst + "attn.qkv_proj.weight": torch.cat(attn),
            dst + "attn.o_proj.weight": state[src + "self_attn.o_proj.weight"],
            dst + "mlp.gate_up_proj.weight": torch.cat(
                [state[src + "mlp.gate_proj.weight"], state[src + "mlp.up_proj.weight"]]
            ),
            dst + "mlp.down_proj.weight": state[src + "mlp.down_proj.weight"],
            dst + "attn_norm.weight": state[src + "input_layernorm.weight"],
            dst + "mlp_norm.weight": state[src + "post_attention_layernorm.weight"],
        }
    out["norm.weight"] = state["model.norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def hf_config(cfg: ModelConfig, tok: ByteTokenizer, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        # Older transformers read rope_theta, newer ones rope_parameters: write both.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def export(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Writes the Hugging Face form of the kiln model in `model_dir` into `out_dir`."""
    src, out = Path(model_dir), Path(out_dir)
    cfg, raw = read_config(src)
    tok = ByteTokenizer.load(src)
    state = load_file(str(src / raw.get("weights", WEIGHTS_FILE)))
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state(state, cfg), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    dtype = str(raw.get("dtype", "float32"))
    (out / CONFIG_FILE).write_text(json.dumps(hf_config(cfg, tok, dtype), indent=2) + "\n")
    generation = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    shutil.copyfile(src / TOKENIZER_FILE, out / HF_TOKENIZER_FILE)
    return out


def _hf_weights(src: Path) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    if index.is_file():  # sharded checkpoints name each tensor's file in the index
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state |= load_file(str(src / name))
        return state
    if not (src / WEIGHTS_FILE).is_file():
        raise ArtifactError(f"{src} has neither {WEIGHTS_FILE} nor model.safetensors.index.json")
    return load_file(str(src / WEIGHTS_FILE))


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Writes a kiln model directory from a Hugging Face Llama directory (safetensors weights)."""
    src = Path(hf_dir)
    raw = json.loads((src / CONFIG_FILE).read_text())
    problems = []
    if raw.get("model_type") != "llama":
        problems.append(f"model_type is {raw.get('model_type')!r}, not 'llama'")
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {raw['hidden_act']!r} (kiln's MLP is SwiGLU)")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        problems.append("biases (kiln's Llama has none)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope!r} (kiln implements the default RoPE only)")
    if problems:
        raise ArtifactError(f"{src / CONFIG_FILE}: unsupported: " + "; ".join(problems))
    heads = raw["num_attention_heads"]
    cfg = ModelConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        max_seq_len=raw.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        initializer_range=raw.get("initializer_range", 0.02),
    )
    model = LlamaModel(cfg, ops="reference")
    model.load_state_dict({k: v.float() for k, v in from_hf_state(_hf_weights(src), cfg).items()})
    tok_file = src / HF_TOKENIZER_FILE
    tok = ByteTokenizer.from_dict(json.loads(tok_file.read_text())) if tok_file.is_file() else None
    if tok is None:
        # A Hugging Face tokenizer is not byte-level: the weights convert, the vocabulary does not.
        raise ArtifactError(
            f"{tok_file} is missing: only kiln-trained models carry a byte tokenizer"
        )
    return save_model_dir(
        model, tok, out_dir, dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export_hf", description=__doc__)
    parser.add_argument("model_dir", help="a kiln model directory (or, with --from-hf, an HF one)")
    parser.add_argument("out_dir", help="where to write the converted model")
    parser.add_argument(
        "--from-hf", action="store_true", help="convert a Hugging Face Llama directory to kiln's"
    )
    args = parser.parse_args(argv)
    try:
        out = (
            import_hf(args.model_dir, args.out_dir)
            if args.from_hf
            else export(args.model_dir, args.out_dir)
        )
    except (ArtifactError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"export_hf: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
