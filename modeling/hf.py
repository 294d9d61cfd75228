"""Hugging Face's `config.json` and tensor names for the families kiln runs (Llama 2/3/3.x, Mistral,
Qwen2/2.5), translated to and from `ModelConfig`; every other architecture is refused by name.

All three are one architecture here: pre-norm decoder, RMSNorm, SwiGLU MLP, grouped-query
attention, rotate-half RoPE. They differ in what `ModelConfig` carries: biases (Qwen2 always has
q/k/v biases; Llama's `attention_bias` adds q/k/v/o biases), the RoPE variant (`rope_scaling`),
a sliding window (Mistral v0.1; Qwen2 with `use_sliding_window`), which kiln serves only where
the window covers the whole context, so attention is plain causal attention anyway.
"""

from __future__ import annotations

from typing import Any

from modeling.config import ROPE_SCALINGS, ConfigError, ModelConfig, RopeScaling

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# transformers' defaults for a config.json that leaves the context out.
DEFAULT_CONTEXT = {"llama": 2048, "mistral": 131072, "qwen2": 32768}
# Tensors some checkpoints carry that are not weights (old Llama conversions saved RoPE's
# frequencies); skipped at load.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _problem(field: str, value: Any, why: str) -> str:
    return f"unsupported {field} {value!r} ({why})"


def rope_fields(raw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The RoPE block and the key it is under: transformers 5 writes `rope_parameters` (with
    `rope_theta` inside), released checkpoints `rope_scaling` (null for plain RoPE) and a
    top-level `rope_theta`."""
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(raw.get(key), dict):
            return key, dict(raw[key])
    return "rope_scaling", {}


def config_from_hf(raw: dict[str, Any], *, max_seq_len: int | None = None) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face `config.json`; ConfigError naming the first field kiln
    cannot serve, in one line. `max_seq_len` caps the context (the KV cache is allocated for it);
    by default it is the model's `max_position_embeddings`."""
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            _problem("model_type", model_type, f"kiln serves {', '.join(ARCHITECTURES)}")
        )
    problems = []
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        if k not in raw
    ]
    if "num_attention_heads" not in raw:
        missing.append("num_attention_heads")
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}")
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(_problem("hidden_act", raw["hidden_act"], "kiln's MLP is SwiGLU: silu"))
    if raw.get("mlp_bias"):
        problems.append(_problem("mlp_bias", raw["mlp_bias"], "kiln's MLP has no biases"))
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", raw["quantization_config"])
        problems.append(
            _problem("quantization_config", method, "kiln loads bfloat16, float16 or float32")
        )
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(
            _problem(
                "partial_rotary_factor", raw["partial_rotary_factor"], "kiln rotates every dim"
            )
        )
    if model_type == "mistral" and raw.get("attention_bias"):
        problems.append(_problem("attention_bias", True, "Mistral has no attention biases"))

    rope_key, rope = rope_fields(raw)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    context = int(raw.get("max_position_embeddings") or DEFAULT_CONTEXT[str(model_type)])
    if max_seq_len is not None and max_seq_len > context:
        raise ConfigError(
            f"a context of {max_seq_len} tokens is longer than max_position_embeddings ({context})"
        )
    served = max_seq_len or context
    scaling = None
    if rope_type not in ("default", *ROPE_SCALINGS):
        problems.append(
            _problem(
                f"{rope_key}.rope_type",
                rope_type,
                f"kiln implements default, {', '.join(ROPE_SCALINGS)}",
            )
        )
    elif rope_type != "default":
        try:
            scaling = RopeScaling(
                type=rope_type,
                factor=float(rope["factor"]),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings") or 0
                ),
                max_position_embeddings=context,
            )
        except (KeyError, ValueError, TypeError) as err:
            problems.append(f"{rope_key} {rope!r}: {err}")

    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types") or []
    odd_layers = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if odd_layers:
        problems.append(_problem("layer_types", odd_layers, "kiln runs full causal attention"))
    if model_type == "qwen2":
        # Qwen2 has a window only with use_sliding_window, on the layers layer_types names
        # (by default those from max_window_layers on), as transformers' Qwen2Config reads it.
        if layer_types:
            sliding_layers = "sliding_attention" in layer_types
        else:
            layers = int(raw["num_hidden_layers"])
            sliding_layers = int(raw.get("max_window_layers", 28)) < layers
        windowed = bool(raw.get("use_sliding_window")) and sliding_layers
    else:
        windowed = model_type == "mistral"
    if windowed and window is not None and int(window) < served:
        problems.append(
            f"unsupported sliding_window {window} (shorter than the {served}-token context: "
            "kiln attends to the whole context; serve it with a context of at most "
            f"{window} tokens or use a model without a sliding window)"
        )
    if problems:
        raise ConfigError("; ".join(problems))

    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        max_seq_len=served,
        rope_theta=rope_theta,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        initializer_range=float(raw.get("initializer_range", 0.02)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        rope_scaling=scaling,
    )


def model_type(cfg: ModelConfig) -> str:
    """The family a config is written as: Qwen2 for q/k/v biases alone, else Llama."""
    return "qwen2" if cfg.qkv_bias and not cfg.o_bias else "llama"


def config_to_hf(
    cfg: ModelConfig,
    *,
    dtype: str,
    bos_token_id: int | None,
    eos_token_id: int | list[int] | None,
    pad_token_id: int | None,
) -> dict[str, Any]:
    """The `config.json` that `transformers` (`AutoModelForCausalLM`), vLLM and LMI read."""
    kind = model_type(cfg)
    rope: dict[str, Any] = {"rope_type": "default"}
    context = cfg.max_seq_len
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": s.type, "factor": s.factor}
        if s.type == "llama3":
            rope |= {
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }
        if s.type == "dynamic":  # NTK scaling starts past the original context
            context = max(context, s.max_position_embeddings)
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": context,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "silu",
        # transformers 5 reads rope_parameters; released checkpoints, older transformers and
        # vLLM read rope_theta and rope_scaling. Both say the same.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else rope,
        "rope_parameters": {**rope, "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if kind == "llama":
        config |= {"attention_bias": cfg.qkv_bias, "mlp_bias": False}
    else:
        config |= {
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": cfg.num_layers,
        }
    return config


def tensor_sources(cfg: ModelConfig) -> dict[str, list[str]]:
    """Each kiln parameter and the Hugging Face tensors stacked (along rows) to make it:
    q, k and v into `qkv_proj`, gate and up into `gate_up_proj`, the rest one to one."""
    out = {"embed_tokens.weight": ["model.embed_tokens.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out[dst + "attn.qkv_proj.weight"] = [f"{src}self_attn.{n}_proj.weight" for n in "qkv"]
        if cfg.qkv_bias:
            out[dst + "attn.qkv_proj.bias"] = [f"{src}self_attn.{n}_proj.bias" for n in "qkv"]
        out[dst + "attn.o_proj.weight"] = [src + "self_attn.o_proj.weight"]
        if cfg.o_bias:
            out[dst + "attn.o_proj.bias"] = [src + "self_attn.o_proj.bias"]
        out[dst + "mlp.gate_up_proj.weight"] = [
            src + "mlp.gate_proj.weight",
            src + "mlp.up_proj.weight",
        ]
        out[dst + "mlp.down_proj.weight"] = [src + "mlp.down_proj.weight"]
        out[dst + "attn_norm.weight"] = [src + "input_layernorm.weight"]
        out[dst + "mlp_norm.weight"] = [src + "post_attention_layernorm.weight"]
    out["norm.weight"] = ["model.norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ["lm_head.weight"]
    return out


def part_rows(cfg: ModelConfig, hf_name: str) -> int | None:
    """Rows of a fused part (q, k, v, gate, up); None for a tensor that is not a part."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for suffix, rows in (
        ("self_attn.q_proj", q),
        ("self_attn.k_proj", kv),
        ("self_attn.v_proj", kv),
        ("mlp.gate_proj", cfg.intermediate_size),
        ("mlp.up_proj", cfg.intermediate_size),
    ):
        if hf_name.endswith((suffix + ".weight", suffix + ".bias")):
            return rows
    return None


def to_hf_tensors(state: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """kiln's state dict as Hugging Face's tensors: fused projections split (views)."""
    out = {}
    for name, sources in tensor_sources(cfg).items():
        tensor, start = state[name], 0
        for hf_name in sources:
            rows = part_rows(cfg, hf_name) if len(sources) > 1 else tensor.shape[0]
            assert rows is not None, hf_name
            out[hf_name] = tensor[start : start + rows]
            start += rows
    return out
