"""Fine-tuning a Hugging Face directory: records rendered with its chat template and trained on
the assistant's tokens alone (the mask checked against transformers' own), text tokenized with
its tokenizer, packing, and `--init-from` end to end (local and S3) writing the same format."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import torch
from moto import mock_aws

from modeling.artifact import load_model_dir
from modeling.tokenizer import ByteTokenizer, load_tokenizer
from tests.modeling import hf_models
from tests.training.support import TINY, parse_events, write_corpus
from training import train
from training.data import inputs_targets, pack
from training.records import IGNORE, Encoder, Piece, read_chat_template

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does a kiln do?"},
    {"role": "assistant", "content": "The kiln fires clay."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Pots come out hard and bright."},
]
# The families' templates with the assistant's part marked for transformers'
# `return_assistant_tokens_mask` (what it needs to mask; kiln finds the turns without it).
TAGGED = {
    "llama-3.2-1b": hf_models.LLAMA3_CHAT_TEMPLATE.replace(
        "+ message['content'] + '<|eot_id|>' }}",
        "}}{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|eot_id|>' }}{% endif %}",
    ),
    "llama-2-7b": hf_models.LLAMA2_CHAT_TEMPLATE.replace(
        "{{ ' ' + message['content'] + eos_token }}",
        "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}",
    ),
}
TOKENIZERS = {"llama-3.2-1b": hf_models.llama3_tokenizer, "llama-2-7b": hf_models.llama2_tokenizer}


@pytest.mark.parametrize("family", sorted(TAGGED))
def test_chat_records_train_exactly_the_tokens_transformers_marks_as_the_assistants(
    family: str, tmp_path: Path
) -> None:
    import transformers

    TOKENIZERS[family](tmp_path)
    tok = load_tokenizer(tmp_path)
    encoder = Encoder(tok, read_chat_template(tmp_path, tok))
    piece = encoder.record(json.dumps({"messages": CONVERSATION}))
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        CONVERSATION,
        chat_template=TAGGED[family],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert piece.ids == list(reference["input_ids"])
    assert piece.trained == [bool(m) for m in reference["assistant_masks"]]
    trained = tok.decode([i for i, t in zip(piece.ids, piece.trained or [], strict=True) if t])
    assert "The kiln fires clay." in trained and "Pots come out hard and bright." in trained
    assert "kiln do?" not in trained and "Be brief" not in trained


def test_prompt_completion_masks_the_prompt_and_trains_the_completion_and_its_end() -> None:
    tok = ByteTokenizer()
    piece = Encoder(tok).record('{"prompt": "2+2=", "completion": "4"}')
    assert piece.ids == [tok.bos_id, *b"2+2=", *b"4", tok.eos_id]
    assert piece.labels() == [IGNORE] * 5 + [ord("4"), tok.eos_id]
    # One block of seq_len + 1 = 10: inputs and next-token targets after the shift.
    blocks = pack([piece], 10, pad_id=tok.pad_id)
    inputs, targets = inputs_targets(blocks)
    assert inputs.tolist() == [[tok.bos_id, *b"2+2=4", tok.eos_id, tok.pad_id, tok.pad_id]]
    assert targets.tolist() == [[IGNORE] * 4 + [ord("4"), tok.eos_id] + [IGNORE] * 3]


def test_packing_keeps_records_whole_pads_cuts_long_ones_and_runs_text_on() -> None:
    rec = Piece([1, 2, 3], [False, True, True], record=True)
    text = Piece([7, 8, 9, 10, 11])
    long = Piece(list(range(20, 30)), [True] * 10, record=True)
    blocks = pack([rec, rec, text, long], 4, pad_id=0)
    assert blocks[:, 0].tolist() == [
        [1, 2, 3, 0],  # the second record does not fit the rest: padded
        [1, 2, 3, 7],  # text runs on across blocks
        [8, 9, 10, 11],
        [20, 21, 22, 23],  # a record longer than a block is cut to one
    ]
    assert blocks[:, 1].tolist() == [
        [IGNORE, 2, 3, IGNORE],
        [IGNORE, 2, 3, 7],
        [8, 9, 10, 11],
        [20, 21, 22, 23],
    ]
    # A record at the end is kept, padded; text's partial block is not.
    assert pack([rec], 4, pad_id=0)[:, 0].tolist() == [[1, 2, 3, 0]]
    assert pack([text], 4, pad_id=0).shape[0] == 1


def _data(root: Path) -> Path:
    write_corpus(root, files=4, sentences=60)
    lines = [
        json.dumps({"messages": CONVERSATION}),
        json.dumps({"prompt": "The potter shapes", "completion": " the clay on a wheel."}),
    ] * 40
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
    return root


FINE_TUNE = [
    *TINY[2:],  # no --model: the directory's
    "--seq-len", "48",
    "--max-steps", "3",
    "--val-fraction", "0.2",
    "--segment-bytes", "4096",
    "--lr", "1e-3",
]  # fmt: skip


def test_init_from_a_hugging_face_directory_fine_tunes_it_and_writes_the_same_format(
    tmp_path: Path, clean_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    import transformers

    base = hf_models.build("llama-3.2-1b", tmp_path / "base")
    out = tmp_path / "out"
    args = ["--init-from", str(base), "--data", str(_data(tmp_path / "data"))]
    assert train.main([*FINE_TUNE, *args, "--output-dir", str(out), "--eval-every", "3"]) == 0
    events = parse_events(capsys.readouterr().out)
    start = next(e for e in events if e["event"] == "start")
    assert start["tokenizer"] == "HFTokenizer" and start["init_from"] == str(base)
    losses = [float(e["train_loss"]) for e in events if e["event"] == "train"]  # type: ignore[arg-type]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    assert any(e["event"] == "val" for e in events)
    # The tokenizer and chat template travel; transformers loads what was written.
    written, given = (json.loads((d / "tokenizer.json").read_text()) for d in (out / "model", base))
    assert written == given
    config = json.loads((out / "model" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == hf_models.LLAMA3_CHAT_TEMPLATE
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    model, _ = load_model_dir(out / "model")
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    before, _ = load_model_dir(base)
    assert not torch.equal(before.embed_tokens.weight, model.embed_tokens.weight)  # trained


def test_init_from_and_data_on_s3(
    tmp_path: Path, clean_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    base = hf_models.build("qwen2.5-0.5b", tmp_path / "base")
    data = _data(tmp_path / "data")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="artifacts")
        for root, prefix in ((base, "models/base"), (data, "curated/chat")):
            for p in sorted(root.iterdir()):
                s3.put_object(Bucket="artifacts", Key=f"{prefix}/{p.name}", Body=p.read_bytes())
        argv = [
            *FINE_TUNE,
            "--max-steps", "2",
            "--init-from", "s3://artifacts/models/base",
            "--data", "s3://artifacts/curated/chat/",
            "--output-dir", str(tmp_path / "out"),
        ]  # fmt: skip
        assert train.main(argv) == 0
    events = parse_events(capsys.readouterr().out)
    assert [e["step"] for e in events if e["event"] == "model"] == [2]
    model, tok = load_model_dir(tmp_path / "out" / "model")
    assert model.config.qkv_bias and tok.bos_id is None  # Qwen2: biases, no BOS
