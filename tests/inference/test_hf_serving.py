"""Hugging Face model directories served: greedy text equal to transformers' `generate()` for the
plain and the chat shape, alone and among 32 concurrent requests; the chat completion's shapes,
whole and streamed; a model.tar.gz of a sharded directory.

The models are small random-weight Llama-3-style and Qwen2-style ones built with transformers
(`tests/modeling/hf_models.py`), each with a byte-level BPE trained here and its chat template.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from inference.model_dir import ModelDirError, prepare_model_dir, unpacked_copy
from tests.inference.support import Reply, Server, invoke, request, start_server
from tests.modeling.hf_models import build, hf_model

transformers = pytest.importorskip("transformers")

MAX_NEW = 12
# Below this gap between the two best logits, float32 summation order may pick either token:
# kiln and transformers agree on logits to ~1e-5 (tests/modeling/test_families.py).
NEAR_TIE = 1e-4

PROMPTS = [
    "The quick brown fox",
    "def main():\n",
    "Servers stream text",
    "Le café est",
    "The kiln fires clay into",
    "日本語の",
    "piece by piece.",
    "Grüße aus",
]
CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Tell me about the kiln."}],
    [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What does the potter shape?"},
    ],
    [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Say something in French: café"},
    ],
    [{"role": "user", "content": "def main():"}],
]


@dataclass
class Served:
    """A family's server, and transformers' model and tokenizer on the same directory."""

    name: str
    directory: Path
    server: Server
    model: Any
    tokenizer: Any


def _tarball(directory: Path, out: Path) -> Path:
    """model.tar.gz holding the directory under its own name (as `tar czf x.tgz DIR/` packs)."""
    with tarfile.open(out, "w:gz") as tar:
        tar.add(directory, arcname=directory.name)
    return out


@pytest.fixture(scope="module", params=["llama-3.2-1b", "qwen2.5-0.5b"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    name = request.param
    root = tmp_path_factory.mktemp(name)
    if name.startswith("qwen"):
        # Sharded, and served from a tarball that holds it in a subdirectory.
        directory = build(name, root / name, max_shard_size="200KB")
        assert (directory / "model.safetensors.index.json").is_file()
        target: Path = _tarball(directory, root / "model.tar.gz")
    else:
        directory = target = build(name, root / name)
    server = start_server(target, root / "server.log", timeout=120)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    yield Served(name, directory, server, hf_model(directory), tokenizer)
    assert server.stop() == 0, server.log()


# -- transformers' answers ------------------------------------------------------------------------


@dataclass
class Expected:
    prompt_ids: list[int]
    ids: list[int]  # generated, end-of-sequence included (as completion_tokens counts)
    gaps: list[float]  # the top-2 logit gap of each step
    text: str
    eos: set[int]


def generate(served: Served, prompt_ids: list[int]) -> Expected:
    """Greedy `generate()` on the directory's own transformers model."""
    eos = served.model.generation_config.eos_token_id
    with torch.no_grad():
        out = served.model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=eos[0] if isinstance(eos, list) else eos,
        )
    ids = out.sequences[0, len(prompt_ids) :].tolist()
    gaps = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
    text = served.tokenizer.decode(ids, skip_special_tokens=True)
    return Expected(prompt_ids, ids, gaps, text, set(eos if isinstance(eos, list) else [eos]))


def plain_expected(served: Served, prompt: str) -> Expected:
    return generate(served, served.tokenizer(prompt)["input_ids"])


def chat_expected(served: Served, messages: list[dict[str, str]]) -> Expected:
    ids = served.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return generate(served, list(ids))


def assert_same(want: Expected, text: str, usage: dict[str, int], ids: list[int] | None) -> None:
    """kiln's answer is transformers' (up to a near tie, where either token is right). `ids`
    are kiln's streamed token ids (the end-of-sequence one is not streamed); None for chat."""
    assert usage["prompt_tokens"] == len(want.prompt_ids)  # the same prompt tokens
    ended = bool(want.ids) and want.ids[-1] in want.eos
    want_ids = want.ids[:-1] if ended else want.ids
    same = text == want.text and usage["completion_tokens"] == len(want.ids)
    if ids is not None:
        first = next(
            (i for i, (a, b) in enumerate(zip(ids, want_ids, strict=False)) if a != b), None
        )
        if first is None and len(ids) == len(want_ids):
            assert same, f"same tokens {ids}, but kiln {text!r} != transformers {want.text!r}"
            return
        at = first if first is not None else min(len(ids), len(want_ids))
        assert want.gaps[at] < NEAR_TIE, (
            f"kiln {ids} != transformers {want.ids} from token {at}; gaps {want.gaps}"
        )
    elif not same:
        assert min(want.gaps) < NEAR_TIE, (
            f"kiln {text!r} != transformers {want.text!r} ({want.ids}); gaps {want.gaps}"
        )


# -- kiln's answers ----------------------------------------------------------------------------


def ask_plain(served: Served, prompt: str) -> tuple[str, dict[str, int], list[int]]:
    """Streamed, to see the token ids too; the streamed text is checked against the result."""
    reply = invoke(served.server.port, prompt, stream=True, max_new_tokens=MAX_NEW)
    assert reply.status == 200, reply.body
    events = reply.sse()
    result = events[-1][1]
    ids = [e["token"]["id"] for _, e in events[:-1] if e["token"]["id"] is not None]
    assert "".join(e["token"]["text"] for _, e in events[:-1]) == result["generated_text"]
    return result["generated_text"], result["usage"], ids


def chat(port: int, body: dict[str, Any], stream: bool = False) -> Reply:
    return request(
        port,
        "POST",
        "/invocations",
        json.dumps({**body, "stream": stream}).encode(),
        {"Content-Type": "application/json"},
    )


def ask_chat(served: Served, messages: list[dict[str, str]]) -> tuple[str, dict[str, int]]:
    body = {"messages": messages, "max_tokens": MAX_NEW, "temperature": 0}
    reply = chat(served.server.port, body)
    assert reply.status == 200, reply.body
    answer = reply.json()
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    return choice["message"]["content"], answer["usage"]


# -- the tests -------------------------------------------------------------------------------------


def test_greedy_plain_and_chat_equal_transformers_generate(served: Served) -> None:
    for prompt in PROMPTS:
        text, usage, ids = ask_plain(served, prompt)
        assert_same(plain_expected(served, prompt), text, usage, ids)
    for messages in CONVERSATIONS:
        text, usage = ask_chat(served, messages)
        assert_same(chat_expected(served, messages), text, usage, None)


def test_greedy_among_32_concurrent_requests_equals_transformers(served: Served) -> None:
    jobs: list[tuple[str, Any]] = []
    for i in range(32):
        if i % 2:
            jobs.append(("chat", CONVERSATIONS[i % len(CONVERSATIONS)]))
        else:
            jobs.append(("plain", PROMPTS[i % len(PROMPTS)] + " " * (i // 16)))

    def ask(job: tuple[str, Any]) -> tuple[str, dict[str, int], list[int] | None]:
        kind, what = job
        if kind == "chat":
            return (*ask_chat(served, what), None)
        return ask_plain(served, what)

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, jobs))
    for (kind, what), (text, usage, ids) in zip(jobs, answers, strict=True):
        want = chat_expected(served, what) if kind == "chat" else plain_expected(served, what)
        assert_same(want, text, usage, ids)


def test_streamed_chat_is_chunks_that_add_up_to_the_whole_answer(served: Served) -> None:
    body = {
        "messages": CONVERSATIONS[1],
        "max_tokens": MAX_NEW,
        "temperature": 0,
        "model": "my-model",
        "stream_options": {"include_usage": True},
    }
    whole = chat(served.server.port, body).json()
    reply = chat(served.server.port, body, stream=True)
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in reply.body.decode().split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]"
    chunks = [json.loads(b.removeprefix("data: ")) for b in blocks[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["model"] for c in chunks} == {"my-model"} and whole["model"] == "my-model"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *deltas, end, usage = chunks[1:]
    assert all(c["choices"][0]["finish_reason"] is None for c in deltas)
    assert all(c["choices"][0]["delta"]["content"] for c in deltas)  # no empty pieces
    content = "".join(c["choices"][0]["delta"]["content"] for c in deltas)
    assert content == whole["choices"][0]["message"]["content"]
    assert end["choices"][0]["delta"] == {}
    assert end["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert whole["object"] == "chat.completion" and whole["choices"][0]["index"] == 0


def test_a_stop_string_ends_a_chat_answer_and_is_left_out(served: Served) -> None:
    body = {"messages": CONVERSATIONS[0], "max_tokens": MAX_NEW, "temperature": 0}
    full = chat(served.server.port, body).json()["choices"][0]["message"]["content"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    if not stop.strip():
        pytest.skip(f"no usable stop string in {full!r}")
    for stream in (False, True):
        reply = chat(served.server.port, {**body, "stop": [stop]}, stream=stream)
        if stream:
            chunks = [json.loads(b[6:]) for b in reply.body.decode().split("\n\n")[:-2] if b]
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            answer = reply.json()["choices"][0]
            text, finish = answer["message"]["content"], answer["finish_reason"]
        assert finish == "stop" and text == full[: full.index(stop)]


BAD_CHAT_FIELDS: list[tuple[dict[str, Any], str, str]] = [
    ({"messages": "hi"}, "messages", "valid list"),
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "'user'"),
    ({"messages": [{"role": "user"}]}, "messages.0.content", "is required"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "valid string"),
    (
        {"messages": [{"role": "user", "content": "x", "mood": "happy"}]},
        "messages.0.mood",
        "unknown field 'messages.0.mood'",
    ),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"max_tokens": 5000}, "max_tokens", "more than the"),
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"stop": [""]}, "stop", "1 to 128 characters"),
    ({"stream": "yes"}, "stream", "valid boolean"),
    ({"n": 2}, "n", "less than or equal to 1"),
    ({"stream_options": {"usage": True}}, "stream_options.usage", "unknown field"),
    ({"inputs": "x"}, "inputs", "unknown field 'inputs'"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
]


def test_bad_chat_fields_are_400s_naming_them(served: Served) -> None:
    if served.name.startswith("qwen"):
        pytest.skip("one family is enough")
    for body, field, mentions in BAD_CHAT_FIELDS:
        full = {"messages": [{"role": "user", "content": "hi"}], **body}
        reply = request(
            served.server.port,
            "POST",
            "/invocations",
            json.dumps(full).encode(),
            {"Content-Type": "application/json"},
        )
        assert reply.status == 400, reply.body
        assert reply.error["field"] == field, reply.error
        assert mentions in reply.error["message"], reply.error
    # The server carries on.
    assert ask_chat(served, CONVERSATIONS[0])[1]["completion_tokens"] >= 1


def test_an_empty_prompt_starts_from_bos_or_is_a_400(served: Served) -> None:
    """Llama's BOS begins an empty prompt (as its tokenizer encodes ""); Qwen2 names none, so an
    empty prompt has nothing to continue and the client is told so."""
    reply = invoke(served.server.port, "", max_new_tokens=4)
    start = served.tokenizer("").input_ids  # what transformers' tokenizer makes of ""
    if start:
        assert reply.status == 200, reply.body
        assert reply.json()["usage"]["prompt_tokens"] == len(start)
    else:
        assert reply.status == 400, reply.body
        assert reply.error["field"] == "inputs", reply.error
        assert "no start token" in reply.error["message"], reply.error


def test_a_template_that_refuses_the_messages_is_a_400(tmp_path: Path) -> None:
    """A template's own raise_exception (roles must alternate, ...) reaches the client."""
    from modeling.chat import ChatTemplate, ChatTemplateError

    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
        "{% endif %}{{ messages[0]['content'] }}"
    )
    assert template.render([{"role": "user", "content": "x"}]) == "x"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        template.render([{"role": "assistant", "content": "x"}])


# -- the model directory -----------------------------------------------------------------------


def test_model_dirs_and_tarballs_in_the_hugging_face_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "config.json").write_text("{}")
    assert prepare_model_dir(flat) == flat
    # /opt/ml/model holding the model in its one subdirectory (an uncompressed S3 prefix).
    outer = tmp_path / "outer"
    (outer / "Llama-3.2-1B").mkdir(parents=True)
    (outer / "Llama-3.2-1B" / "config.json").write_text("{}")
    (outer / "Llama-3.2-1B" / "model-00001-of-00002.safetensors").write_text("")
    assert prepare_model_dir(outer) == outer / "Llama-3.2-1B"
    assert unpacked_copy(prepare_model_dir(outer), outer) is None  # the user's own: kept
    tarball = _tarball(outer / "Llama-3.2-1B", tmp_path / "m.tar.gz")
    unpacked = prepare_model_dir(tarball)
    assert unpacked.name == "Llama-3.2-1B"
    assert (unpacked / "model-00001-of-00002.safetensors").is_file()
    # The temporary directory the server removes when it stops: the subdirectory's parent.
    assert unpacked_copy(unpacked, tarball) == unpacked.parent
    assert unpacked.parent.name.startswith("kiln-model-")
    flat_tarball = tmp_path / "flat.tar.gz"
    with tarfile.open(flat_tarball, "w:gz") as tar:
        tar.add(flat / "config.json", arcname="config.json")
    flat_copy = prepare_model_dir(flat_tarball)
    assert unpacked_copy(flat_copy, flat_tarball) == flat_copy
    for copy in (unpacked.parent, flat_copy):
        shutil.rmtree(copy)
    assert list(temporary.iterdir()) == []
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    with pytest.raises(ModelDirError, match=r"neither config\.json .* nor model\.tar\.gz"):
        prepare_model_dir(empty)
    with pytest.raises(ModelDirError, match=r"holds no config\.json"):
        prepare_model_dir(_tarball(empty, tmp_path / "e.tar.gz"))
    # A tarball that holds no model leaves no temporary directory behind.
    assert list(temporary.iterdir()) == []
