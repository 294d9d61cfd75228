"""Directories teams bring (Llama 2/3/3.x, Mistral, Qwen2/2.5) load into kiln's one model and give
transformers' own classes' logits, through the training forward and the serving decoder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from inference.decoder import Decoder
from modeling.artifact import ArtifactError, load_model_dir, save_model_dir, write_tarball
from modeling.linear import row_buckets
from modeling.model import LlamaModel
from modeling.rope import rope_table
from modeling.tokenizer import HFTokenizer
from tests.modeling.hf_models import CLASSES, FAMILIES, build, hf_model, legacy_rope_config

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")
# float32 everywhere; the differences are summation order (~5e-6 at logits of magnitude ~4).
TOL = 5e-5


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build(name, root / name) for name in FAMILIES}


def _ids(vocab: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def _serve(model: LlamaModel, ids: torch.Tensor, prompt: int, kind: str) -> torch.Tensor:
    """Logits of positions prompt-1.. through the decoder: a prefill, then one decode per token
    (in slot 2 of 4, so the padded backend attends over idle slots too)."""
    buckets = None if kind == "kernel" else row_buckets(4)
    with torch.inference_mode():
        dec = Decoder(model, slots=4, device=CPU, dtype=torch.float32, buckets=buckets)
        rows = [dec.prefill(2, ids[0, :prompt])]
        for p in range(prompt, ids.shape[1]):
            rows.append(dec.decode([2], [p], [int(ids[0, p])])[0])
    return torch.stack(rows)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_equal_transformers_in_training_prefill_and_decode(
    built: dict[str, Path], name: str
) -> None:
    family = FAMILIES[name]
    hf = hf_model(built[name])
    assert type(hf).__name__ == CLASSES[family.model_type]
    model, tokenizer = load_model_dir(built[name])
    assert isinstance(tokenizer, HFTokenizer)
    ids = _ids(model.config.vocab_size, 48)
    with torch.no_grad():
        want = hf(ids).logits[0]
        trained = model(ids)[0]
    train_diff = (trained - want).abs().max().item()
    serve_diff = 0.0
    for kind in ("kernel", "padded"):
        model, _ = load_model_dir(built[name])
        served = _serve(model, ids, 40, kind)
        serve_diff = max(serve_diff, (served - want[39:]).abs().max().item())
    print(f"{name} ({CLASSES[family.model_type]}): max |logit diff| training {train_diff:.1e}, "
          f"serving {serve_diff:.1e}")  # fmt: skip
    assert train_diff < TOL and serve_diff < TOL


@pytest.mark.parametrize(("name", "length"), [("llama-3.2-1b", 700), ("llama-2-7b-dynamic", 1024)])
def test_long_positions_match_and_the_rope_variant_matters(
    built: dict[str, Path], name: str, length: int
) -> None:
    """llama3 RoPE past its original context; dynamic RoPE up to max_position_embeddings (the
    most kiln serves), where transformers' NTK scaling has not begun."""
    hf = hf_model(built[name])
    model, _ = load_model_dir(built[name])
    assert length <= model.config.max_seq_len
    ids = _ids(model.config.vocab_size, length)
    with torch.no_grad():
        want = hf(ids).logits[0]
        torch.testing.assert_close(model(ids)[0], want, rtol=0, atol=TOL)
        plain = dataclasses.replace(model.config, rope_scaling=None)
        model.rope = rope_table(plain)
        off = (model(ids)[0] - want).abs().max().item()
    if name.endswith("dynamic"):
        assert off < TOL  # the same frequencies within the context, by construction
    else:
        assert off > 0.1  # the scaling is in effect, and kiln computes it


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-2-7b-linear", "qwen2.5-0.5b"])
def test_released_checkpoints_config_form_loads_the_same(tmp_path: Path, name: str) -> None:
    """`rope_scaling` and a top-level `rope_theta` (released config.json files) read as
    transformers 5's `rope_parameters` do."""
    directory = build(name, tmp_path / name)
    legacy_rope_config(directory)
    assert "rope_parameters" not in json.loads((directory / "config.json").read_text())
    hf = hf_model(directory)
    model, _ = load_model_dir(directory)
    ids = _ids(model.config.vocab_size, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=TOL)


def test_bfloat16_weights_stay_bfloat16_and_shards_load(tmp_path: Path) -> None:
    directory = build("qwen2.5-7b", tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="150KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _ = load_model_dir(directory)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # no float32 copy
    exact, _ = load_model_dir(directory, dtype=torch.float32)
    hf = hf_model(directory, dtype=torch.float32)
    ids = _ids(exact.config.vocab_size, 32)
    with torch.no_grad():
        torch.testing.assert_close(exact(ids), hf(ids).logits, rtol=0, atol=TOL)


def test_a_loaded_model_saves_back_as_its_family(tmp_path: Path) -> None:
    """A Qwen2 model through kiln (fine-tuning's path) is written as Qwen2, sharded when asked,
    with its tokenizer, chat template and EOS ids; transformers loads it with the same logits."""
    source = build("qwen2.5-0.5b", tmp_path / "src")
    model, tokenizer = load_model_dir(source)
    assert isinstance(tokenizer, HFTokenizer)
    out = save_model_dir(model, tokenizer, tmp_path / "out", max_shard_bytes=60_000)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("qwen2", ["Qwen2ForCausalLM"])
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert (
        saved["chat_template"]
        == json.loads((source / "tokenizer_config.json").read_text())["chat_template"]
    )
    generation = json.loads((out / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == sorted(tokenizer.eos_ids)
    ids = _ids(model.config.vocab_size, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            hf_model(out)(ids).logits, hf_model(source)(ids).logits, rtol=0, atol=TOL
        )
    tarball = write_tarball(out, tmp_path / "model.tar.gz")
    import tarfile

    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {*shards, "model.safetensors.index.json", "config.json", "kiln.json"} <= names


# -- tokenizers and end-of-sequence ids --------------------------------------------------------

TEXTS = ["The quick brown fox", " leading space, café.", "日本語 😀 and\nnew lines\t tabs"]


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-2-7b", "qwen2.5-0.5b"])
def test_the_tokenizer_is_the_one_transformers_runs(built: dict[str, Path], name: str) -> None:
    _, tokenizer = load_model_dir(built[name])
    assert isinstance(tokenizer, HFTokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(built[name])
    for text in TEXTS:
        ids = tokenizer.encode(text, add_bos=True)
        assert ids == theirs(text).input_ids, text  # BOS exactly where transformers adds it
        decoded = tokenizer.decode(ids)
        assert decoded == theirs.decode(ids, skip_special_tokens=True)
        # SentencePiece-style decoding drops the space its pre-tokenizer put before the text,
        # and with it a leading space of the text's own, in transformers as here.
        assert decoded == (text.lstrip(" ") if name == "llama-2-7b" else text)
    generation = json.loads((built[name] / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert tokenizer.eos_ids == set(eos if isinstance(eos, list) else [eos])
    if name.startswith("qwen"):
        assert tokenizer.bos_id is None and len(tokenizer.eos_ids) == 2
    elif name == "llama-3.2-1b":
        assert len(tokenizer.eos_ids) == 2  # <|end_of_text|> and <|eot_id|>


def test_byte_fallback_covers_what_the_vocabulary_lacks(built: dict[str, Path]) -> None:
    _, tokenizer = load_model_dir(built["llama-2-7b"])
    assert isinstance(tokenizer, HFTokenizer)
    ids = tokenizer.encode("日本")
    pieces = [tokenizer.tokenizer.id_to_token(i) for i in ids]
    assert sum(p.startswith("<0x") for p in pieces) == 6  # two 3-byte characters
    assert tokenizer.decode(ids) == "日本"


# -- what is refused ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("llama-2-7b", {"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
        ("llama-2-7b", {"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ("llama-2-7b", {"mlp_bias": True}, "unsupported mlp_bias True"),
        (
            "llama-2-7b",
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "unsupported rope_parameters.rope_type 'yarn'",
        ),
        (
            "llama-2-7b",
            {"rope_parameters": None, "rope_scaling": {"type": "su", "factor": 2.0}},
            "unsupported rope_scaling.rope_type 'su'",
        ),
        (
            "llama-2-7b",
            {"quantization_config": {"quant_method": "awq"}},
            "unsupported quantization_config 'awq'",
        ),
        ("mistral-7b", {"sliding_window": 256}, "unsupported sliding_window 256"),
        (
            "qwen2.5-0.5b",
            {
                "use_sliding_window": True,
                "sliding_window": 256,
                "layer_types": ["full_attention", "sliding_attention"],
            },
            "unsupported sliding_window 256",
        ),
    ],
)
def test_unsupported_models_are_refused_in_one_line_naming_the_field(
    built: dict[str, Path], tmp_path: Path, name: str, edit: dict[str, object], message: str
) -> None:
    directory = tmp_path / name
    directory.mkdir()
    for f in built[name].iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    config = json.loads((directory / "config.json").read_text()) | edit
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError) as err:
        load_model_dir(directory)
    text = str(err.value)
    assert text.startswith(f"{directory / 'config.json'}: ") and message in text
    assert "\n" not in text


def test_a_sliding_window_that_covers_the_context_is_served(tmp_path: Path) -> None:
    """Mistral v0.1's window (4096 of 32768, here 256 of 2048) is refused at the full context
    and served when the context is capped at the window, where it changes nothing."""
    directory = build("mistral-7b", tmp_path / "v01", sliding_window=256)
    with pytest.raises(ArtifactError, match="at most 256 tokens"):
        load_model_dir(directory)
    model, _ = load_model_dir(directory, max_seq_len=256)
    assert model.config.max_seq_len == 256
    ids = _ids(model.config.vocab_size, 256)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(directory)(ids).logits, rtol=0, atol=TOL)


def test_missing_or_misshapen_tensors_name_the_file(built: dict[str, Path], tmp_path: Path) -> None:
    directory = tmp_path / "m"
    directory.mkdir()
    for f in built["llama-2-7b"].iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    with pytest.raises(ArtifactError, match=r"model\.safetensors: the tensors do not match"):
        load_model_dir(directory)
    (directory / "config.json").write_text(json.dumps(config | {"intermediate_size": 300}))
    with pytest.raises(
        ArtifactError,
        match=r"gate_proj\.weight, .*up_proj\.weight are \(344, 128\), \(344, 128\) where",
    ):
        load_model_dir(directory)


def test_qwen2_windows_count_only_on_the_layers_that_have_them(tmp_path: Path) -> None:
    """use_sliding_window with every layer below max_window_layers: no layer has a window, in
    transformers as here, so the model serves at its full context."""
    directory = build(
        "qwen2.5-0.5b",
        tmp_path / "q",
        use_sliding_window=True,
        sliding_window=256,
        max_window_layers=2,
    )
    model, _ = load_model_dir(directory)
    assert model.config.max_seq_len == 2048
    ids = _ids(model.config.vocab_size, 300)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(directory)(ids).logits, rtol=0, atol=TOL)


def test_a_chat_template_saved_beside_the_config_is_kept(tmp_path: Path) -> None:
    """transformers 5's save_pretrained writes chat_template.jinja; kiln reads it as the
    tokenizer's template and writes it back."""
    directory = build("qwen2.5-0.5b", tmp_path / "src")
    saved = transformers.AutoTokenizer.from_pretrained(directory)
    saved.save_pretrained(tmp_path / "tok")
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        (directory / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    assert "chat_template" not in json.loads((directory / "tokenizer_config.json").read_text())
    model, tokenizer = load_model_dir(directory)
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.config["chat_template"] == (directory / "chat_template.jinja").read_text()
    out = save_model_dir(model, tokenizer, tmp_path / "out")
    again = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(messages, tokenize=False) == saved.apply_chat_template(
        messages, tokenize=False
    )
