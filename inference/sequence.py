"""One request inside the engine: its parameters, its progress, and what a step reports of it."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from inference.detokenizer import Detokenizer


class FinishReason(enum.StrEnum):
    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos"  # the model ended the sequence
    STOP = "stop"  # a stop string was generated
    TIMEOUT = "timeout"  # the request's deadline passed
    CANCELLED = "cancelled"  # the client went away
    SHUTDOWN = "shutdown"  # the engine stopped first
    ERROR = "error"  # the engine failed on this request


# How a sequence ends with an answer; the other reasons are errors.
COMPLETED = frozenset({FinishReason.LENGTH, FinishReason.EOS, FinishReason.STOP})


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: validated by the caller (`inference.schema`)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends on one; it is left out of the text


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. Fields past `stream` belong to the engine thread."""

    prompt: list[int]
    params: SamplingParams
    deadline: float  # time.monotonic() after which the request is retired with TIMEOUT
    # Anything the caller wants back in its notify callback (the HTTP layer's handle).
    context: Any = None
    # Whether the caller wants each token's text as it comes; otherwise only the end is
    # notified, which spares the event loop a wake-up per step.
    stream: bool = False
    id: int = field(default_factory=itertools.count().__next__)
    tokens: list[int] = field(default_factory=list)  # generated, end-of-sequence left out
    # The KV cache (`inference.blocks`): the blocks of its positions, the digests of its full
    # blocks (for the prefix cache) and how many of those are registered there.
    blocks: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    registered: int = 0
    computed: int = 0  # leading tokens (prompt, then generated) whose keys and values are cached
    # While prefilling: the tokens to compute before its next token is sampled (the prompt, or
    # after a preemption the prompt and what it had generated); 0 once it decodes.
    target: int = 0
    running: bool = False  # holds blocks (admitted and not preempted or ended)
    prefilled_tokens: int = 0  # tokens this sequence's prefills computed, recomputes included
    cached_tokens: int = 0  # tokens taken from the prefix cache instead
    preemptions: int = 0
    generator: torch.Generator | None = None
    finish: FinishReason | None = None
    admitted_at: float | None = None
    first_token_at: float | None = None
    detokenizer: Detokenizer | None = None  # set when the engine accepts the sequence

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt + self.tokens

    @property
    def position(self) -> int:
        """Where the last generated token goes in the cache (it is not there yet)."""
        return len(self.prompt) + len(self.tokens) - 1

    @property
    def completion_tokens(self) -> int:
        """Tokens the model generated, the end-of-sequence token included."""
        return len(self.tokens) + (1 if self.finish is FinishReason.EOS else 0)

    @property
    def text(self) -> str:
        """The generated text (a stop string left out); whole once the sequence finished."""
        return self.detokenizer.text if self.detokenizer is not None else ""


@dataclass(frozen=True, slots=True)
class Update:
    """What one step did to one sequence: the token it generated and the text that became safe
    to show with it, and the sequence's end if it ended (with the text held back until then)."""

    sequence: Sequence
    token: int | None  # None when the step generated nothing to show (an end alone, EOS)
    text: str = ""
    finish: FinishReason | None = None
    tail: str = ""  # at a completed end: text held back until then (a stop string's start)
