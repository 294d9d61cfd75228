"""The Messages API's answers: a chat completion, or its chunks as server-sent events.

The shapes are OpenAI's chat completions (what LMI answers a `messages` request with): a
`chat.completion` object whose `choices[0].message.content` is the text; streamed, one
`chat.completion.chunk` opening the assistant's message (`delta: {"role": "assistant",
"content": ""}`), one per text delta (`delta: {"content": ...}`), one with an empty delta and
the `finish_reason`, a `usage` chunk without choices when `stream_options.include_usage` asks,
then `data: [DONE]`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from inference.sequence import FinishReason, Sequence

# OpenAI's finish reasons: the model's own end and a stop string are both "stop".
FINISH_REASONS = {
    FinishReason.EOS: "stop",
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
}
DONE = b"data: [DONE]\n\n"


def usage(seq: Sequence) -> dict[str, int]:
    completion = seq.completion_tokens
    return {
        "prompt_tokens": len(seq.prompt),
        "completion_tokens": completion,
        "total_tokens": len(seq.prompt) + completion,
    }


@dataclass(frozen=True)
class ChatAnswer:
    """What every object of one answer shares: its id, creation time and model name."""

    request_id: str
    model: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return f"chatcmpl-{self.request_id}"

    def completion(self, seq: Sequence) -> dict[str, Any]:
        """The whole answer (`object: chat.completion`)."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": seq.text},
                    "logprobs": None,
                    "finish_reason": FINISH_REASONS.get(seq.finish or FinishReason.LENGTH),
                }
            ],
            "usage": usage(seq),
        }

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def chunk(self, delta: dict[str, str], finish: FinishReason | None = None) -> dict[str, Any]:
        """One streamed piece: a delta of the message, or (with `finish`) its end."""
        reason = FINISH_REASONS.get(finish) if finish is not None else None
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return self._chunk([choice])

    def usage_chunk(self, seq: Sequence) -> dict[str, Any]:
        return self._chunk([], usage=usage(seq))
