"""Progress of long operations: one line per state change with the elapsed time, and waiting."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection
from typing import TextIO

from kiln_cli.operate.aws import OperateError


def elapsed(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class Progress:
    """Writes `[  3m05s] subject: state (detail)` when a state changes.

    In a terminal the last line's clock keeps ticking while nothing changes; elsewhere (CI
    logs, pipes) only changes are written, so logs hold no spinner noise.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.start = clock()
        self.tty = self.stream.isatty() if tty is None else tty
        self._last: tuple[str, str] | None = None
        self._open = False  # a terminal line that the ticker may still rewrite

    def _line(self, text: str) -> str:
        return f"[{elapsed(self.clock() - self.start):>6}] {text}"

    def _write(self, text: str, *, keep_open: bool) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False
        self.stream.write(self._line(text))
        # Only a state line stays open (for the ticker); anything else may print after a note.
        if self.tty and keep_open:
            self._open = True
        else:
            self.stream.write("\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A whole line in any case (a step begins or ends; other output may follow)."""
        self._last = None
        self._write(text, keep_open=False)

    def update(self, subject: str, state: str, detail: str = "") -> None:
        """Writes the state when it differs from the last one written for `subject`."""
        text = f"{subject}: {state}" + (f" ({detail})" if detail else "")
        if self._last == (subject, text):
            self.tick()
            return
        self._last = (subject, text)
        self._write(text, keep_open=True)

    def tick(self) -> None:
        """In a terminal, rewrites the open line with the current elapsed time."""
        if self.tty and self._open and self._last is not None:
            self.stream.write("\r\033[K" + self._line(self._last[1]))
            self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def wait_for(
    poll: Callable[[], tuple[str, str]],
    done: Collection[str],
    *,
    progress: Progress,
    subject: str,
    interval: float,
    timeout: float,
    hint: str,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Polls `() -> (state, detail)` until the state is in `done`, writing each change.

    Gives up after `timeout` seconds with an error naming the state and `hint` (how to keep
    following it); the operation itself goes on in AWS.
    """
    started = progress.clock()
    while True:
        state, detail = poll()
        progress.update(subject, state, detail)
        if state in done:
            progress.close()
            return state
        if progress.clock() - started >= timeout:
            progress.close()
            raise OperateError(
                f"stopped waiting after {elapsed(timeout)}: {subject} is still {state}; "
                f"it goes on in AWS ({hint})."
            )
        # Short sleeps let a terminal's clock tick between polls.
        deadline = progress.clock() + interval
        while (left := deadline - progress.clock()) > 0:
            sleep(min(left, 1.0) if progress.tty else left)
            progress.tick()
