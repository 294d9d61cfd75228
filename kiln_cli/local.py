"""`kiln local`: the whole loop on one machine, no AWS account: train, package, serve, ask.

It trains a small model on the CPU for a bounded time on the default corpus (the Python
standard library's sources), packages `model.tar.gz`, starts the inference server on it on a
loopback port, sends prompts, prints the answers and the figures (validation loss, training
tokens/s, request latency), and stops everything cleanly. Training and serving run as
subprocesses, so this module (and `import kiln`) never loads torch.

`--model` names a training preset, or a model you bring: a Hugging Face model directory (Llama,
Mistral, Qwen2 families) or a model.tar.gz of one, which is served and asked without training.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.contract import ServerEnv

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = ("def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, item):")


@dataclass
class LocalRun:
    """What one `kiln local` produced."""

    work_dir: Path
    model_dir: Path | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    answers: list[tuple[str, str, float]] = field(default_factory=list)  # prompt, text, s
    server_exit_code: int | None = None

    @property
    def final_val_loss(self) -> float | None:
        losses = [m["val_loss"] for m in self.metrics if "val_loss" in m]
        return float(losses[-1]) if losses else None

    @property
    def tokens_per_s(self) -> float | None:
        rates = [m["tokens_per_s"] for m in self.metrics if "tokens_per_s" in m]
        return float(sorted(rates)[len(rates) // 2]) if rates else None


class LocalError(RuntimeError):
    """A step of the local loop failed; the message says which and why."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    # The local loop talks to no Kafka: events are off unless asked for explicitly.
    env.pop(ServerEnv.EVENTS_CLUSTER_ARN, None)
    env.pop(ServerEnv.EVENTS_BOOTSTRAP, None)
    return env


def train(
    run: LocalRun, *, minutes: float, max_steps: int, model: str, say: Callable[[str], None]
) -> None:
    """Trains on the default corpus; collects the JSON-lines metrics; finds the model dir."""
    output = run.work_dir / "run"
    command = [
        sys.executable,
        "-m",
        "training.train",
        "--model",
        model,
        "--max-steps",
        str(max_steps),
        "--max-minutes",
        str(minutes),
        "--output-dir",
        str(output),
        "--checkpoint-dir",
        str(run.work_dir / "checkpoints"),
        "--job-name",
        "kiln-local",
        "--threads",
        "1",
        # A short run: warm up over its first tenth, evaluate five times along the way.
        "--warmup-steps",
        str(max(1, max_steps // 10)),
        "--eval-every",
        str(max(1, max_steps // 5)),
        "--checkpoint-every",
        str(max_steps),
    ]
    say(f"training ({model} model, at most {max_steps} steps or {minutes:g} min)")
    started = time.monotonic()
    with subprocess.Popen(
        command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        assert process.stdout is not None
        tail: list[str] = []
        for line in process.stdout:
            tail = [*tail[-20:], line.rstrip()]
            try:
                metric = json.loads(line)
            except ValueError:
                continue
            if isinstance(metric, dict):
                run.metrics.append(metric)
                if "val_loss" in metric:
                    say(
                        f"  step {metric.get('step')}: validation loss {metric['val_loss']:.3f} "
                        f"({time.monotonic() - started:.0f} s)"
                    )
        code = process.wait()
    if code != 0:
        lines = "\n".join(tail)
        raise LocalError(f"training failed (exit {code}):\n{lines}")
    run.model_dir = output / "model"
    if not (run.model_dir / "config.json").exists() or not (output / "model.tar.gz").exists():
        raise LocalError(f"training finished but wrote no model under {output}")
    say(f"packaged {output / 'model.tar.gz'}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def serve_and_ask(
    run: LocalRun,
    *,
    prompts: Sequence[str],
    max_new_tokens: int,
    say: Callable[[str], None],
    startup_timeout: float = 120.0,
) -> None:
    """Starts the server on a loopback port, asks each prompt, then stops it with SIGTERM."""
    assert run.model_dir is not None
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (run.work_dir / "server.log").open("w")
    command = [
        sys.executable,
        "-m",
        "inference.serve",
        "--model-dir",
        str(run.model_dir),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    server = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        say(f"serving on {base}")
        deadline = time.monotonic() + startup_timeout
        while True:
            if server.poll() is not None:
                raise LocalError(
                    f"the server exited ({server.returncode}) while starting; "
                    f"see {run.work_dir / 'server.log'}"
                )
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise LocalError(f"the server was not ready after {startup_timeout:.0f} s")
            time.sleep(0.25)
        for prompt in prompts:
            started = time.monotonic()
            answer = _post(
                f"{base}/invocations",
                {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}},
                timeout=120,
            )
            run.answers.append((prompt, str(answer["generated_text"]), time.monotonic() - started))
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        run.server_exit_code = server.returncode
        log.close()


def report(run: LocalRun, say: Callable[[str], None]) -> None:
    for prompt, text, seconds in run.answers:
        say(f"\n--- {prompt!r} ({seconds * 1000:.0f} ms)\n{prompt}{text}")
    say("")
    if run.final_val_loss is not None:
        say(f"validation loss: {run.final_val_loss:.3f} nats/byte")
    if run.tokens_per_s is not None:
        say(f"training: {run.tokens_per_s:,.0f} tokens/s")
    if run.answers:
        latencies = sorted(s for _, _, s in run.answers)
        median_ms = latencies[len(latencies) // 2] * 1000
        say(f"requests: {len(latencies)}, median latency {median_ms:.0f} ms")
    say(f"server stopped (exit {run.server_exit_code}); files in {run.work_dir}")


def brought_model(value: str) -> Path | None:
    """The model directory (or model.tar.gz) `--model` names; None for a training preset."""
    path = Path(value).expanduser()
    if path.is_dir() or (path.is_file() and path.name.endswith(".tar.gz")):
        return path
    if os.sep in value or value.startswith(("~", ".")) or value.endswith(".tar.gz"):
        raise LocalError(
            f"--model {value}: no such model directory or model.tar.gz (a preset name has no slash)"
        )
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--minutes", type=float, default=3.0, help="training wall-time cap (default: %(default)s)"
    )
    parser.add_argument(
        "--max-steps", type=int, default=300, help="training steps at most (default: %(default)s)"
    )
    parser.add_argument(
        "--model",
        default="tiny",
        help="training preset, or a Hugging Face model directory (or model.tar.gz) to serve "
        "instead of training one (default: %(default)s)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        help="a prompt to send (repeatable; default: three Python openings)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--work-dir", type=Path, help="where to keep the run (default: a temp dir)")


def run_command(args: argparse.Namespace) -> int:
    """The `kiln local` command."""
    if args.minutes <= 0 or args.max_steps <= 0:
        print("kiln local: --minutes and --max-steps must be positive", file=sys.stderr)
        return 2
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="kiln-local-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    run = LocalRun(work_dir=work_dir)

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        brought = brought_model(args.model)
        if brought is None:
            train(run, minutes=args.minutes, max_steps=args.max_steps, model=args.model, say=say)
        else:
            run.model_dir = brought
            say(f"serving {brought} (no training)")
        serve_and_ask(
            run,
            prompts=args.prompts or DEFAULT_PROMPTS,
            max_new_tokens=args.max_new_tokens,
            say=say,
        )
    except LocalError as err:
        print(f"kiln local: {err}", file=sys.stderr)
        return 1
    report(run, say)
    return 0 if run.server_exit_code == 0 else 1
