"""Overload, deadlines, a broker that is down, SIGTERM drain, and models that cannot load."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from modeling.artifact import model_files
from tests.inference.support import (
    REPO,
    SLOW,
    Reply,
    Server,
    invoke,
    request,
    server_env,
    start_server,
    write_model,
)


@pytest.fixture(scope="module")
def unreachable_broker() -> Iterator[str]:
    """A loopback address that refuses connections: bound (nobody else takes it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def small_server(
    unreachable_broker: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One slot, one queue place, a half-second deadline, and events to a broker that is down.
    Its model is slow per token (SLOW), so long requests outlast the deadline on any machine."""
    model_dir = write_model(tmp_path_factory.mktemp("model") / "slow", SLOW)
    env = {
        "KILN_EVENTS_BOOTSTRAP": unreachable_broker,
        "KILN_EVENTS_AUTH": "plaintext",
        "KILN_EVENTS_TOPIC": "prediction-events",
        "KILN_ALLOW_RAW_TEXT": "true",
    }
    args = ["--max-batch", "1", "--max-queue", "1", "--request-timeout", "0.5"]
    log = tmp_path_factory.mktemp("small") / "server.log"
    srv = start_server(model_dir, log, args=args, env=env)
    yield srv
    assert srv.stop() == 0, srv.log()


def test_a_down_broker_neither_fails_nor_slows_requests(small_server: Server) -> None:
    # The server's own 0.5 s deadline is the clock: a request that waited on Kafka would be
    # answered 504, so a 200 shows nothing waited (no wall-clock bound of the test's own).
    for _ in range(5):
        reply = invoke(small_server.port, "no broker", max_new_tokens=8)
        assert reply.status == 200, reply.body


def test_deadline_gives_504_and_frees_the_slot(small_server: Server) -> None:
    t0 = time.monotonic()
    reply = invoke(small_server.port, "forever", max_new_tokens=2000)
    elapsed = time.monotonic() - t0
    assert reply.status == 504, reply.body
    assert reply.error["code"] == "deadline_exceeded"
    assert elapsed < 3.0
    # The only slot is free again: the next request runs at once.
    assert invoke(small_server.port, "next", max_new_tokens=4).status == 200


def test_deadline_mid_stream_ends_with_an_error_event(small_server: Server) -> None:
    reply = invoke(small_server.port, "forever", stream=True, max_new_tokens=2000)
    assert reply.status == 200  # the stream had started
    name, data = reply.sse()[-1]
    assert name == "error"
    assert data["error"]["code"] == "deadline_exceeded"
    assert invoke(small_server.port, "next", max_new_tokens=4).status == 200


def test_full_queue_gives_503_with_retry_after(small_server: Server) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        replies = list(
            pool.map(
                lambda i: invoke(small_server.port, f"crowd {i}", max_new_tokens=2000), range(6)
            )
        )
    statuses = sorted(r.status for r in replies)
    # One runs and one waits (both hit the deadline); the rest are turned away at once.
    assert statuses.count(503) >= 3, statuses
    assert set(statuses) <= {503, 504}, statuses
    for reply in replies:
        if reply.status == 503:
            assert reply.headers["retry-after"] == "1"
            assert reply.error["code"] == "overloaded"
    assert invoke(small_server.port, "after the crowd", max_new_tokens=4).status == 200


def test_sigterm_drains_in_flight_requests_then_exits_0(model_dir: Path, tmp_path: Path) -> None:
    srv = start_server(model_dir, tmp_path / "server.log", args=["--graceful-timeout", "20"])
    streams = []
    for i in range(4):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        body = json.dumps({"inputs": f"drain {i}", "parameters": {"max_new_tokens": 600}})
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        conn.request("POST", "/invocations", body, headers)
        streams.append(conn)
    # A stream's headers come with its first token: then the request is in flight.
    responses = [conn.getresponse() for conn in streams]
    srv.process.send_signal(signal.SIGTERM)
    bodies = [response.read() for response in responses]
    for conn in streams:
        conn.close()
    assert srv.process.wait(30) == 0, srv.log()
    for response, body in zip(responses, bodies, strict=True):
        assert response.status == 200
        final = Reply(200, {}, body).sse()[-1][1]
        assert final["finish_reason"] == "length", final
        assert final["usage"]["completion_tokens"] == 600
    assert "draining in-flight requests" in srv.log()
    with pytest.raises(OSError):
        request(srv.port, "GET", "/ping", timeout=2)


def run_serve(model_dir: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "inference.serve", "--model-dir", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--threads", "1"]
    return subprocess.run(
        cmd, cwd=REPO, env=server_env(), capture_output=True, text=True, timeout=timeout
    )


def corrupt(kind: str, good: Path, target: Path) -> Path:
    target.mkdir()
    for name in model_files(good):
        (target / name).write_bytes((good / name).read_bytes())
    if kind == "truncated weights":
        data = (target / "model.safetensors").read_bytes()
        (target / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "config not JSON":
        (target / "config.json").write_text("{ not json")
    elif kind == "shapes disagree":
        config = json.loads((target / "config.json").read_text())
        config["hidden_size"] = 128
        (target / "config.json").write_text(json.dumps(config))
    elif kind == "no tokenizer":
        (target / "tokenizer.json").unlink()
    return target


@pytest.mark.parametrize(
    ("kind", "mentions"),
    [
        ("truncated weights", "model.safetensors"),
        ("config not JSON", "config.json is not valid JSON"),
        ("shapes disagree", "model.safetensors: model.embed_tokens.weight is (320, 64) where"),
        ("no tokenizer", "tokenizer.json"),
    ],
)
def test_a_corrupt_model_exits_non_zero_with_a_clear_line(
    model_dir: Path, tmp_path: Path, kind: str, mentions: str
) -> None:
    result = run_serve(corrupt(kind, model_dir, tmp_path / "bad"))
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if "model load failed" in line]
    assert lines, result.stderr
    assert mentions in lines[0], lines[0]


def test_a_missing_model_directory_exits_non_zero(tmp_path: Path) -> None:
    result = run_serve(tmp_path / "nothing-here")
    assert result.returncode == 1
    assert "model load failed" in result.stderr and "does not exist" in result.stderr
