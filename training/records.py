"""Token ids and loss targets of training text and of JSONL records, with the model's tokenizer.

A record is one JSON object per line: `{"messages": [{"role", "content"}, ...]}`, rendered with
the model's chat template, or `{"prompt": ..., "completion": ...}`. Only the assistant turns (the
completion) are trained on: every other token's target is `IGNORE` (-100, what
`F.cross_entropy` skips). The assistant spans of a conversation are found by rendering it one
turn at a time, as Hugging Face's `apply_chat_template` renders it: turn i's text is what
rendering messages[: i + 1] adds to messages[:i] rendered with the generation prompt (so the
header a model is prompted with is not trained on, and what ends the turn is). The whole text is
then tokenized at once and a token is a target when it starts inside an assistant span, so the
ids are exactly those of tokenizing the rendered conversation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from modeling.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

IGNORE = -100
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class RecordError(ValueError):
    """A record that cannot be trained on; the message says which and why."""


@dataclass(frozen=True)
class Piece:
    """The ids of one document or record and which of them are targets (None: all)."""

    ids: list[int]
    trained: list[bool] | None = None
    record: bool = False  # a record is kept whole in a block; text is packed across blocks

    def labels(self) -> list[int]:
        if self.trained is None:
            return list(self.ids)
        return [i if t else IGNORE for i, t in zip(self.ids, self.trained, strict=True)]


def read_chat_template(directory: str | Path, tokenizer: Tokenizer) -> str | None:
    """The model's chat template: `chat_template.jinja` (what transformers 5 writes) or the
    `chat_template` of tokenizer_config.json."""
    path = Path(directory) / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text()
    config = getattr(tokenizer, "config", {}) or {}
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Encoder:
    """Turns text and records into `Piece`s with one tokenizer (and its chat template)."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_id = tokenizer.bos_id
        self.eos_id = document_end_id(tokenizer)
        pad = getattr(tokenizer, "pad_id", None)
        self.pad_id = int(pad) if pad is not None else self.eos_id

    # -- plain text --------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return list(text.encode("utf-8"))
        return self.tokenizer.encode(text)

    def text(self, text: str, *, first: bool, last: bool) -> Piece:
        """A document's part: bos before a document's first part, end-of-text after its last."""
        ids = self.encode(text)
        if first and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if last:
            ids.append(self.eos_id)
        return Piece(ids)

    # -- records -----------------------------------------------------------------------------

    def record(self, line: str) -> Piece:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(f"not JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise RecordError("a record must be a JSON object")
        if "messages" in obj:
            return self.chat(obj["messages"])
        if "prompt" in obj and "completion" in obj:
            return self.completion(obj["prompt"], obj["completion"])
        raise RecordError(
            f'a record needs "messages" or "prompt" and "completion"; it has {sorted(obj)}'
        )

    def completion(self, prompt: Any, completion: Any) -> Piece:
        """bos + prompt + completion + end-of-text, the completion and its end trained."""
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise RecordError('"prompt" and "completion" must be strings')
        text = prompt + completion
        ids, trained = self.spans(text, [(len(prompt), len(text))])
        if self.bos_id is not None:
            ids, trained = [self.bos_id, *ids], [False, *trained]
        return Piece([*ids, self.eos_id], [*trained, True], record=True)

    def chat(self, messages: Any) -> Piece:
        """The conversation as the chat template renders it, assistant turns trained."""
        if not isinstance(messages, list) or not messages:
            raise RecordError('"messages" must be a non-empty list')
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RecordError('every message needs a "role" and a "content"')
            if not isinstance(m.get("content"), str):
                raise RecordError('every message needs a "role" and a "content" string')
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError("a conversation without an assistant message has nothing to train")
        text, spans = self.render(messages)
        ids, trained = self.spans(text, spans)
        return Piece(ids, trained, record=True)

    def render(self, messages: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns."""
        full = self._render(messages, generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], generation_prompt=True)
            upto = self._render(messages[: i + 1], generation_prompt=False)
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise RecordError(
                    "the chat template does not render a conversation turn by turn (a turn's "
                    "text changes with what follows it): its assistant turns cannot be found"
                )
            spans.append((len(prompt), len(upto)))
        return full, spans

    def spans(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        """`text`'s ids, each marked trained when its first character lies in one of `spans`."""
        if isinstance(self.tokenizer, ByteTokenizer):  # bytes: tokenize piecewise, exactly
            ids: list[int] = []
            trained: list[bool] = []
            at = 0
            for start, end in [*spans, (len(text), len(text))]:
                for part, flag in ((text[at:start], False), (text[start:end], True)):
                    b = list(part.encode("utf-8"))
                    ids += b
                    trained += [flag] * len(b)
                at = end
            return ids, trained
        if not isinstance(self.tokenizer, HFTokenizer):
            raise RecordError(f"cannot find token offsets with {type(self.tokenizer).__name__}")
        enc = self.tokenizer.tokenizer.encode(text, add_special_tokens=False)
        starts = [s for s, _ in enc.offsets]
        return list(enc.ids), [any(a <= s < b for a, b in spans) for s in starts]

    # -- the template --------------------------------------------------------------------------

    @cached_property
    def _template(self) -> Any:
        if self.chat_template is None:
            raise RecordError(
                '"messages" records need the model\'s chat template (chat_template in '
                "tokenizer_config.json or chat_template.jinja); this model has none: use "
                '"prompt"/"completion" records'
            )
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # As transformers compiles chat templates.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(
            x, ensure_ascii=False, indent=indent
        )

        def raise_exception(message: str) -> None:
            raise RecordError(f"the chat template refused the conversation: {message}")

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def _render(self, messages: Sequence[dict[str, Any]], *, generation_prompt: bool) -> str:
        config = getattr(self.tokenizer, "config", {}) or {}
        specials = {
            k: _token_text(config.get(k))
            for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        return str(
            self._template.render(
                messages=list(messages), add_generation_prompt=generation_prompt, **specials
            )
        )


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def document_end_id(tokenizer: Tokenizer) -> int:
    """The id that ends a document: the byte tokenizer's eos, a Hugging Face tokenizer's
    `eos_token`, else the smallest of its end-of-sequence ids."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.eos_id
    config = getattr(tokenizer, "config", {}) or {}
    name = _token_text(config.get("eos_token"))
    if isinstance(tokenizer, HFTokenizer) and name:
        found = tokenizer.tokenizer.token_to_id(name)
        if found is not None:
            return int(found)
    if not tokenizer.eos_ids:
        raise RecordError("the tokenizer names no end-of-sequence token")
    return min(tokenizer.eos_ids)
