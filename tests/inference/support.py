"""Helpers of the server tests: a deterministic tiny model, a server process, an HTTP client."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modeling.artifact import save_model_dir
from modeling.config import PRESETS, ModelConfig
from modeling.model import LlamaModel
from modeling.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[2]

# The "tiny" preset with a longer context, so one request can outlast a short deadline.
TINY = ModelConfig(**{**PRESETS["tiny"].to_dict(), "max_seq_len": 2048})

# Wide enough that a decode step reads ~20 MB of weights: a few ms per token on any CPU, so a
# 2000-token request surely outlasts a half-second deadline (the tiny model makes 2000 tokens in
# 0.3 s on a fast core) while an 8-token one still ends in tens of ms.
SLOW = ModelConfig(
    **{
        **TINY.to_dict(),
        "hidden_size": 384,
        "intermediate_size": 1024,
        "num_layers": 6,
        "num_heads": 6,
        "num_kv_heads": 2,
        "head_dim": 64,
    }
)


def write_model(directory: Path, cfg: ModelConfig = TINY, seed: int = 0) -> Path:
    """A model directory as training writes it, with seeded random weights."""
    torch.manual_seed(seed)
    model = LlamaModel(cfg, ops="reference")
    # Larger weights than the initializer's make the logits' top-2 gaps wide, so greedy
    # outputs vary with the prompt instead of repeating one byte.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
        # EOS's (tied) output row at zero scores 0, far below the best of ~320 random rows, so
        # greedy requests always run to max_new_tokens (the deadline tests need long ones).
        model.embed_tokens.weight[ByteTokenizer().eos_id] = 0.0
    return save_model_dir(model, ByteTokenizer(), directory)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        data = self.json()
        assert set(data) == {"error"}, data
        return dict(data["error"])

    def sse(self) -> list[tuple[str, Any]]:
        """(event name, parsed data) of each server-sent event."""
        events = []
        for block in self.body.decode().split("\n\n"):
            if not block.strip():
                continue
            name, data = "message", []
            for line in block.split("\n"):
                key, _, value = line.partition(": ")
                if key == "event":
                    name = value
                elif key == "data":
                    data.append(value)
            events.append((name, json.loads("\n".join(data))))
        return events


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


def invoke(
    port: int,
    inputs: Any,
    stream: bool = False,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
    **parameters: Any,
) -> Reply:
    body = json.dumps({"inputs": inputs, "parameters": parameters}).encode()
    hdrs = {"Content-Type": "application/json"}
    if stream:
        hdrs["Accept"] = "text/event-stream"
    hdrs.update(headers or {})
    return request(port, "POST", "/invocations", body, hdrs, timeout)


@dataclass
class Server:
    """A `python -m inference.serve` child process on a loopback port."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "SAGEMAKER_", "SM_"))}
    env["PYTHONPATH"] = str(REPO)
    # One thread: the machines are shared, and an OpenMP team waiting on a descheduled thread
    # makes each step tens of times slower.
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def start_server(
    model_dir: Path,
    log_path: Path,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
    timeout: float = 60.0,
) -> Server:
    """Starts the server on a free port (the OS picks it) and waits for /ping to say ready."""
    full_env = server_env(env)
    cmd = [
        sys.executable, "-m", "inference.serve",
        "--model-dir", str(model_dir),
        "--host", "127.0.0.1",
        "--port", "0",
        "--threads", "1",
        *(args or []),
    ]  # fmt: skip
    log_file = log_path.open("wb")
    process = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log_file, stderr=log_file)
    log_file.close()
    deadline = time.monotonic() + timeout
    port = 0
    while not port:
        match = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log_path.read_text())
        if match:
            port = int(match.group(1))
        elif process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"server did not start:\n{log_path.read_text()}")
        else:
            time.sleep(0.05)
    server = Server(process, port, log_path, full_env)
    while wait:
        try:
            if request(port, "GET", "/ping", timeout=5).status == 200:
                break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"server never became ready:\n{server.log()}")
        time.sleep(0.05)
    return server
