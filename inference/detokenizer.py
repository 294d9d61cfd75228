"""Per-sequence output processing: generated tokens become text deltas, stop strings and ends.

Each sequence owns a `Detokenizer`. It decides how the sequence ends (an end-of-sequence id, its
token budget, a stop string), decodes through the tokenizer's interface alone (any tokenizer, not
only byte-level ones), and gives out text only when it is safe to show: whole characters, and
never the first characters of what may become a stop string (those wait until they cannot be
one). The deltas add up to the final text exactly, streamed or not.
"""

from __future__ import annotations

from inference.sequence import FinishReason, Sequence, Update
from modeling.tokenizer import IncrementalDecoder, Tokenizer


class Detokenizer:
    """One sequence's tokens in, `Update`s out; `text` is the whole text once it has ended."""

    def __init__(self, tokenizer: Tokenizer, sequence: Sequence) -> None:
        self.sequence = sequence
        self.eos_ids = tokenizer.eos_ids
        self.stops = sequence.params.stop
        self.max_new_tokens = sequence.params.max_new_tokens
        self.decoder = IncrementalDecoder(tokenizer, sequence.prompt)
        # Without a stream or stop strings nobody looks at the text before the end: decode once.
        self.incremental = sequence.stream or bool(self.stops)
        # Unstreamed, only the last characters can still begin a stop string.
        self._keep = max((len(s) for s in self.stops), default=1) - 1
        self._parts: list[str] = []  # text given out (or, unstreamed, known not to be a stop)
        self._pending = ""  # decoded text not given out yet
        self.text = ""

    def add(self, token: int) -> Update | None:
        """Takes the sequence's next token; returns what to report of it (None: nothing)."""
        seq = self.sequence
        if token in self.eos_ids:
            return self._complete(FinishReason.EOS, None, "")
        seq.tokens.append(token)
        if not self.incremental:
            self.decoder.append(token)
        elif new := self.decoder.push(token):
            searched = len(self._pending)
            self._pending += new
            cut = self._find_stop(searched)
            if cut >= 0:
                text = self._release(min(cut, self._safe_end()))
                self._pending = self._pending[: cut - len(text)]
                return self._complete(FinishReason.STOP, token, text)
            text = self._release(self._safe_end())
            if len(seq.tokens) >= self.max_new_tokens:
                return self._complete(FinishReason.LENGTH, token, text)
            return Update(seq, token, text) if seq.stream else None
        if len(seq.tokens) >= self.max_new_tokens:
            return self._complete(FinishReason.LENGTH, token, "")
        return Update(seq, token) if seq.stream else None

    def end(self, reason: FinishReason) -> Update:
        """Ends the sequence for a reason found elsewhere (deadline, cancel, failure)."""
        self.sequence.finish = reason
        self.text = "".join(self._parts) + self._pending
        return Update(self.sequence, None, finish=reason)

    def _complete(self, reason: FinishReason, token: int | None, text: str) -> Update:
        if reason is not FinishReason.STOP:
            # What waited for more bytes is final now (as U+FFFD where a character is cut).
            searched = len(self._pending)
            self._pending += self.decoder.flush()
            cut = self._find_stop(searched)
            if cut >= 0:
                reason, self._pending = FinishReason.STOP, self._pending[:cut]
        self.sequence.finish = reason
        tail, self._pending = self._pending, ""
        self.text = "".join(self._parts) + tail
        return Update(self.sequence, token, text, reason, tail)

    def _find_stop(self, searched: int) -> int:
        """Where the earliest stop string in the pending text starts (-1: none). Text before
        `searched` held none; an occurrence may start there and end in the new text."""
        cut = -1
        for stop in self.stops:
            at = self._pending.find(stop, max(0, searched - len(stop) + 1))
            if at >= 0 and (cut < 0 or at < cut):
                cut = at
        return cut

    def _safe_end(self) -> int:
        """How much pending text cannot be the start of a stop string."""
        pending = self._pending
        if not self.sequence.stream:
            return max(0, len(pending) - self._keep)
        held = 0
        for stop in self.stops:
            for n in range(min(len(stop), len(pending)), held, -1):
                if pending.endswith(stop[:n]):
                    held = n
                    break
        return len(pending) - held

    def _release(self, end: int) -> str:
        text, self._pending = self._pending[:end], self._pending[end:]
        if text:
            self._parts.append(text)
        return text
