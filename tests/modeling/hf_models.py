"""Builders of Hugging Face model directories for tests: real families' configs scaled down, random
weights, tokenizers trained here with `tokenizers`. Nothing is downloaded.

`build(name, directory)` writes the directory of one of `FAMILIES` with `save_pretrained` (what a
team brings); `hf_model(directory)` loads it with `transformers`' own class for comparison. Each
family keeps its original's quirks at a small size: grouped-query ratios, tied or untied
embeddings, `head_dim` unlike hidden/heads, RoPE variants, biases, several end-of-sequence ids,
a byte-level BPE (Llama 3, Qwen2) or a SentencePiece-style BPE with byte fallback (Llama 2,
Mistral), and a chat template.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Local text the tokenizers are trained on: English, code, and some characters of several bytes.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 0\n",
    "Servers stream text to their clients, piece by piece.",
    "The kiln fires clay into pots; the potter shapes the clay on a wheel.",
    "Le café est très bon, merci beaucoup. Grüße aus München!",
    "日本語のテキストも少し。 😀 emoji too.",
] * 20

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] "
    "+ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
LLAMA2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bos_template(bos: str, bos_id: int) -> dict[str, Any]:
    return {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def byte_level_bpe(
    directory: Path,
    *,
    specials: list[str],
    bos: str | None,
    eos: str,
    chat_template: str | None,
    vocab_size: int = 500,
) -> dict[str, int]:
    """A byte-level BPE like Llama 3's and Qwen2's (GPT-2's byte alphabet and split), trained on
    CORPUS, BOS prepended by its post-processor where it has one; writes tokenizer.json and
    tokenizer_config.json into `directory`. Returns the specials' ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    ids = {s: tok.token_to_id(s) for s in specials}
    data = json.loads(tok.to_str())
    if bos is not None:
        data["post_processor"] = _bos_template(bos, ids[bos])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    if chat_template:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return ids


def sentencepiece_bpe(
    directory: Path, *, chat_template: str | None, vocab_size: int = 400
) -> dict[str, int]:
    """A SentencePiece-style BPE like Llama 2's and Mistral's: words marked with "▁" by a
    Metaspace pre-tokenizer (a space prepended to the text), `<0xNN>` byte pieces for what the
    vocabulary lacks (byte_fallback), `<unk>`, `<s>`, `</s>` at 0, 1, 2, BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    # Without CJK and emoji: those must come out of byte fallback.
    tok.train_from_iterator([t for t in CORPUS if t.isascii() or "café" in t], trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    data["model"]["byte_fallback"] = True
    data["post_processor"] = _bos_template("<s>", 1)
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    if chat_template:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return {"<unk>": 0, "<s>": 1, "</s>": 2, "vocab_size": len(vocab)}


def llama3_tokenizer(directory: Path) -> tuple[int, int, list[int]]:
    """Llama 3's specials and chat template; (vocab size, bos, eos ids: end of text and turn)."""
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    ids = byte_level_bpe(
        directory,
        specials=specials,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )
    vocab = _vocab_size(directory)
    return vocab, ids["<|begin_of_text|>"], [ids["<|end_of_text|>"], ids["<|eot_id|>"]]


def qwen2_tokenizer(directory: Path) -> tuple[int, None, list[int]]:
    """Qwen2's: no BOS, ChatML; ends on <|im_end|> and <|endoftext|>."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    ids = byte_level_bpe(
        directory, specials=specials, bos=None, eos="<|im_end|>", chat_template=CHATML_TEMPLATE
    )
    return _vocab_size(directory), None, [ids["<|im_end|>"], ids["<|endoftext|>"]]


def llama2_tokenizer(directory: Path) -> tuple[int, int, list[int]]:
    ids = sentencepiece_bpe(directory, chat_template=LLAMA2_CHAT_TEMPLATE)
    return ids["vocab_size"], ids["<s>"], [ids["</s>"]]


def _vocab_size(directory: Path) -> int:
    from tokenizers import Tokenizer

    return int(Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size())


# ------------------------------------------------------------------------------------------------
# the families


@dataclass(frozen=True)
class Family:
    """A released model's config, scaled down, with the tokenizer kind it ships with."""

    name: str
    model_type: str  # the transformers class family: llama, mistral, qwen2
    config: dict[str, Any]
    tokenizer: Callable[[Path], tuple[int, int | None, list[int]]]
    # Ratios kept from the original, said for the reader.
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "llama-3.2-1b",
            "llama",
            {
                # 2048 hidden, 32 heads of 64, 8 KV heads, 8192 MLP, tied, llama3 RoPE x32.
                "hidden_size": 128,
                "intermediate_size": 512,
                "num_hidden_layers": 2,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": True,
                "max_position_embeddings": 2048,
                "rope_theta": 500000.0,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 32.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    # 8192 in the original; scaled with the context so all three bands occur.
                    "original_max_position_embeddings": 512,
                },
            },
            llama3_tokenizer,
            "GQA 4:1, tied, llama3 rope, two EOS ids",
        ),
        Family(
            "llama-3.1-8b",
            "llama",
            {
                # 4096 hidden, 32 heads of 128, 8 KV heads, 14336 MLP, untied, llama3 RoPE x8.
                "hidden_size": 128,
                "intermediate_size": 448,
                "num_hidden_layers": 2,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
                "max_position_embeddings": 2048,
                "rope_theta": 500000.0,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 256,
                },
            },
            llama3_tokenizer,
            "GQA 4:1, untied, llama3 rope",
        ),
        Family(
            "llama-2-7b",
            "llama",
            {
                # 4096 hidden, 32 heads of 128 (no GQA), 11008 MLP, untied, plain RoPE.
                "hidden_size": 128,
                "intermediate_size": 344,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
                "max_position_embeddings": 1024,
                "rope_theta": 10000.0,
                "rope_scaling": None,
            },
            llama2_tokenizer,
            "multi-head (no GQA), untied, SentencePiece-style tokenizer",
        ),
        Family(
            "llama-2-7b-linear",
            "llama",
            {
                # Llama 2 fine-tuned for a longer context with linear position interpolation.
                "hidden_size": 128,
                "intermediate_size": 344,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
                "max_position_embeddings": 2048,
                "rope_theta": 10000.0,
                "rope_scaling": {"type": "linear", "factor": 4.0},
            },
            llama2_tokenizer,
            "linear rope scaling (legacy `type` key)",
        ),
        Family(
            "llama-2-7b-dynamic",
            "llama",
            {
                "hidden_size": 128,
                "intermediate_size": 344,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
                "max_position_embeddings": 1024,
                "rope_theta": 10000.0,
                "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
            },
            llama2_tokenizer,
            "dynamic (NTK) rope scaling",
        ),
        Family(
            "llama-attention-bias",
            "llama",
            {
                # A Llama derivative with attention_bias: q, k, v and o biases.
                "hidden_size": 96,
                "intermediate_size": 256,
                "num_hidden_layers": 2,
                "num_attention_heads": 6,
                "num_key_value_heads": 2,
                "tie_word_embeddings": False,
                "max_position_embeddings": 1024,
                "attention_bias": True,
            },
            llama3_tokenizer,
            "attention_bias (q/k/v/o biases)",
        ),
        Family(
            "mistral-7b",
            "mistral",
            {
                # v0.3: 4096 hidden, 32 heads of 128, 8 KV heads, 14336 MLP, theta 1e6, no window.
                "hidden_size": 128,
                "intermediate_size": 448,
                "num_hidden_layers": 2,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
                "max_position_embeddings": 2048,
                "rope_theta": 1000000.0,
                "sliding_window": None,
            },
            llama2_tokenizer,
            "GQA 4:1, untied, no sliding window",
        ),
        Family(
            "mistral-nemo",
            "mistral",
            {
                # 5120 hidden, 32 heads of 128 (not 5120 / 32 = 160), 8 KV heads.
                "hidden_size": 160,
                "intermediate_size": 448,
                "num_hidden_layers": 2,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
                "max_position_embeddings": 2048,
                "rope_theta": 1000000.0,
                "sliding_window": None,
            },
            llama2_tokenizer,
            "head_dim 16 where hidden / heads is 20",
        ),
        Family(
            "qwen2.5-0.5b",
            "qwen2",
            {
                # 896 hidden, 14 heads of 64, 2 KV heads, 4864 MLP, tied, theta 1e6, q/k/v bias.
                "hidden_size": 112,
                "intermediate_size": 608,
                "num_hidden_layers": 2,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": True,
                "max_position_embeddings": 2048,
                "rope_theta": 1000000.0,
                "use_sliding_window": False,
                "sliding_window": 2048,
                "max_window_layers": 21,
            },
            qwen2_tokenizer,
            "GQA 7:1, tied, q/k/v biases, no BOS",
        ),
        Family(
            "qwen2.5-7b",
            "qwen2",
            {
                # 3584 hidden, 28 heads of 128, 4 KV heads, 18944 MLP, untied, q/k/v bias.
                "hidden_size": 112,
                "intermediate_size": 592,
                "num_hidden_layers": 2,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False,
                "max_position_embeddings": 2048,
                "rope_theta": 1000000.0,
                "use_sliding_window": False,
                "sliding_window": 131072,
                "max_window_layers": 28,
            },
            qwen2_tokenizer,
            "GQA 7:1, untied, q/k/v biases",
        ),
    ]
}

CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that logits differ widely between tokens, norms away from 1 and
    biases away from 0 (transformers initializes those to exactly 1 and 0, which would hide a
    swapped or dropped one)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)


def build(
    name: str,
    directory: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Writes family `name`'s directory as `save_pretrained` does (safetensors, config.json,
    generation_config.json with its EOS ids) plus its tokenizer files."""
    import transformers

    family = FAMILIES[name]
    directory.mkdir(parents=True, exist_ok=True)
    vocab, bos, eos = family.tokenizer(directory)
    config_class = transformers.AutoConfig.for_model(family.model_type).__class__
    fields = {**family.config, **overrides}
    config = config_class(
        vocab_size=vocab,
        bos_token_id=bos,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        **fields,
    )
    model_class = getattr(transformers, CLASSES[family.model_type])
    torch.manual_seed(seed)
    model = model_class(config).eval()
    randomize(model, seed)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=bos, eos_token_id=eos if len(eos) > 1 else eos[0]
    )
    model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_model(directory: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The directory loaded with transformers' own class (by config.json, as vLLM and LMI do)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def legacy_rope_config(directory: Path) -> None:
    """Rewrites config.json as released checkpoints have it: `rope_scaling` (null for plain RoPE)
    and a top-level `rope_theta`, where transformers 5 writes `rope_parameters`."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    params = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = params.pop("rope_theta", 10000.0)
    config["rope_scaling"] = None if params.get("rope_type", "default") == "default" else params
    path.write_text(json.dumps(config, indent=2))
