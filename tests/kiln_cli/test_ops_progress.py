"""Progress lines of long operations: one per state change, a ticking clock only in a terminal."""

from __future__ import annotations

import io

import pytest

from kiln_cli.operate.aws import OperateError
from kiln_cli.operate.progress import Progress, elapsed, wait_for
from tests.kiln_cli.support import FakeClock


def test_elapsed_is_short() -> None:
    assert [elapsed(s) for s in (0, 59.9, 65, 3599, 3720)] == [
        "0s",
        "59s",
        "1m05s",
        "59m59s",
        "1h02m",
    ]


def _run(tty: bool, states: list[str]) -> tuple[str, str, FakeClock]:
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress(stream, clock=clock, tty=tty)
    remaining = iter(states)
    final = wait_for(
        lambda: (next(remaining), ""),
        ("InService", "Failed"),
        progress=progress,
        subject="endpoint e",
        interval=15,
        timeout=3600,
        hint="kiln status --env dev",
        sleep=clock.sleep,
    )
    return final, stream.getvalue(), clock


def test_outside_a_terminal_only_changes_are_written() -> None:
    final, text, clock = _run(False, ["Updating", "Updating", "Updating", "InService"])
    assert final == "InService"
    assert text.splitlines() == [
        "[    0s] endpoint e: Updating",
        "[   45s] endpoint e: InService",
    ]
    assert "\r" not in text and clock.sleeps == [15, 15, 15]


def test_in_a_terminal_the_clock_ticks_on_one_line() -> None:
    final, text, clock = _run(True, ["Updating", "Updating", "InService"])
    assert final == "InService"
    assert "\r\x1b[K[    1s] endpoint e: Updating" in text
    assert text.endswith("[   30s] endpoint e: InService\n")
    assert clock.sleeps == [1.0] * 30


def test_waiting_gives_up_with_a_hint() -> None:
    clock = FakeClock()
    progress = Progress(io.StringIO(), clock=clock, tty=False)
    with pytest.raises(OperateError, match=r"stopped waiting after 1m00s: job j is still Training"):
        wait_for(
            lambda: ("Training", ""),
            ("Completed",),
            progress=progress,
            subject="job j",
            interval=30,
            timeout=60,
            hint="kiln status --env dev",
            sleep=clock.sleep,
        )


def test_notes_end_their_line_even_in_a_terminal() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress(stream, clock=clock, tty=True)
    progress.update("endpoint e", "Updating")
    progress.note("running npx cdk deploy")  # the CDK's own output follows on the next line
    assert stream.getvalue() == "[    0s] endpoint e: Updating\n[    0s] running npx cdk deploy\n"
