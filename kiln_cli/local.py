"""`kiln local`: the whole loop on one machine, no AWS account: train, package, serve, ask.

It trains a small model on the CPU for a time budget on the default corpus (the Python
standard library's sources), sizing the run to the budget (the trainer's `--fit-to-minutes`),
packages `model.tar.gz`, starts the inference server on it on a loopback port, sends prompts,
prints the answers and the figures (validation loss, training tokens/s, request latency), and
stops everything cleanly. Training shows a progress bar (step/total, loss, tokens/s, ETA) in a
terminal, a line every few seconds elsewhere. Training and serving run as subprocesses, so this
module (and `import kiln`) never loads torch.

`--model` names a training preset, or a model you bring: a Hugging Face model directory (Llama,
Mistral, Qwen2 families) or a model.tar.gz of one, which is served and asked without training.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
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
# The trainer's size presets (`modeling.config.PRESETS`; the operator tool does not import the
# model code, a test keeps the two lists equal).
PRESETS = ("tiny", "small", "base", "1b")
DEFAULT_PRESET = "tiny"
# The server's --weight-dtype choices (`modeling.served.WEIGHT_DTYPES`; a test keeps them equal).
WEIGHT_DTYPES = ("auto", "float32", "bfloat16", "int8")
# Seconds between progress lines when the output is not a terminal (a log, a pipe, a test).
PROGRESS_EVERY_S = 10.0


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


class _Progress:
    """Training progress from the trainer's metrics: a tqdm bar in a terminal, else a line every
    PROGRESS_EVERY_S seconds (the same numbers the trainer's JSON `train` events carry)."""

    def __init__(self, say: Callable[[str], None], total: int | None, interactive: bool) -> None:
        self.say = say
        # The user's --max-steps until the trainer's plan says how many fit in the minutes (its
        # events carry the cap in force before that, a placeholder when no --max-steps was given).
        self.total = total
        self.interactive = interactive
        self.bar: Any = None  # made once the total is known
        self._last_line = float("-inf")

    def _make_bar(self, total: int | None) -> Any:
        from tqdm import tqdm  # type: ignore[import-untyped]

        return tqdm(
            total=total,
            desc="training",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n}/{total_fmt} steps "
            "[{elapsed}<{remaining}{postfix}]",
        )

    def note(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            self.say(line)

    def update(self, metric: dict[str, Any]) -> None:
        event = metric.get("event")
        if event == "plan":
            self.total = metric["total_steps"]
            if self.bar is not None:
                self.bar.total = self.total
                self.bar.refresh()
        if event != "train":
            return
        metric = {**metric, "total_steps": self.total}
        if self.interactive:
            if self.bar is None and self.total:
                self.bar = self._make_bar(self.total)
            if self.bar is not None:
                self.bar.set_postfix_str(
                    f"loss {metric['train_loss']:.3f}, {metric['tokens_per_s']:,.0f} tok/s",
                    refresh=False,
                )
                self.bar.update(metric["step"] - self.bar.n)
            return
        now = time.monotonic()
        if now - self._last_line >= PROGRESS_EVERY_S:
            self._last_line = now
            self.say(f"  {_progress_line(metric)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds}s" if seconds < 60 else f"{seconds // 60}m{seconds % 60:02d}s"


def _progress_line(metric: dict[str, Any]) -> str:
    """The trainer's progress line (`training.metrics.progress_line`) from a `train` event."""
    step, total = metric["step"], metric.get("total_steps")
    parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
    parts.append(f"loss {metric['train_loss']:.3f}")
    parts.append(f"{metric['tokens_per_s']:,.0f} tok/s")
    parts.append(f"{_duration(metric['elapsed_s'])} elapsed")
    if metric.get("eta_s") is not None:
        parts.append(f"ETA {_duration(metric['eta_s'])}")
    return " | ".join(parts)


def train(
    run: LocalRun,
    *,
    minutes: float,
    max_steps: int | None,
    model: str,
    say: Callable[[str], None],
    seed: int = 0,
    interactive: bool = False,
) -> None:
    """Trains on the default corpus for `minutes` (at most `max_steps` steps), sized to the
    budget; collects the JSON-lines metrics; finds the model dir."""
    output = run.work_dir / "run"
    command = [
        sys.executable,
        "-m",
        "training.train",
        "--model",
        model,
        # The budget sizes the run: steps, warm-up and evaluations follow from the minutes.
        "--max-minutes",
        str(minutes),
        "--fit-to-minutes",
        "true",
        "--max-steps",
        str(max_steps or 1_000_000),
        # Replaced by 5% of the planned steps once the first steps are timed.
        "--warmup-steps",
        str(min(50, max_steps or 50)),
        "--output-dir",
        str(output),
        "--checkpoint-dir",
        str(run.work_dir / "checkpoints"),
        "--checkpoint-every",
        "0",
        "--job-name",
        "kiln-local",
        "--seed",
        str(seed),
        "--threads",
        str(_threads()),
        "--log-every",
        "5",
        "--progress-every",
        "0",
    ]
    cap = f", at most {max_steps} steps" if max_steps else ""
    say(f"training the {model} model on the Python standard library for {minutes:g} min{cap}")
    started = time.monotonic()
    log_path = run.work_dir / "train.log"
    progress = _Progress(say, max_steps, interactive)
    try:
        with (
            log_path.open("w") as log,
            subprocess.Popen(
                command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=log, text=True
            ) as process,
        ):
            assert process.stdout is not None
            try:
                _follow(process, run, progress, started)
            except BaseException:
                process.terminate()  # SIGTERM: the trainer finishes its step and exits
                raise
            code = process.wait()
    finally:
        progress.close()
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise LocalError(f"training failed (exit {code}); the end of its log:\n{tail}")
    run.model_dir = output / "model"
    if not (run.model_dir / "config.json").exists() or not (output / "model.tar.gz").exists():
        raise LocalError(f"training finished but wrote no model under {output}")
    steps = max((m.get("step", 0) for m in run.metrics), default=0)
    say(f"trained {steps} steps in {_duration(time.monotonic() - started)}; packaged model.tar.gz")


def _follow(
    process: subprocess.Popen[str], run: LocalRun, progress: _Progress, started: float
) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        try:
            metric = json.loads(line)
        except ValueError:
            continue
        if not isinstance(metric, dict):
            continue
        run.metrics.append(metric)
        progress.update(metric)
        if "val_loss" in metric:
            progress.note(
                f"  validation loss {metric['val_loss']:.3f} at step {metric.get('step')}"
            )


def _terminal() -> bool:
    """Whether stderr is a terminal wide enough for a progress bar."""
    try:
        return sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns >= 40
    except (OSError, ValueError):
        return False


def _threads() -> int:
    """Torch threads for training: the cores, leaving one to this process and the system."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


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
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    weight_dtype: str | None = None,
) -> None:
    """Starts the server on a loopback port, asks each prompt, then stops it with SIGTERM.
    `weight_dtype` goes to the server's --weight-dtype (None: the server's default)."""
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
    if weight_dtype is not None:
        command += ["--weight-dtype", weight_dtype]
    server = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        say(f"serving on {base}")
        deadline = time.monotonic() + startup_timeout
        while True:
            if server.poll() is not None:
                log.flush()
                tail = "\n".join(
                    (run.work_dir / "server.log").read_text(errors="replace").splitlines()[-10:]
                )
                raise LocalError(
                    f"the server exited ({server.returncode}) while starting; the end of its "
                    f"log:\n{tail}"
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
        log.flush()
        memory = _memory_line((run.work_dir / "server.log").read_text(errors="replace"))
        if memory:
            say(f"server {memory}")
        parameters: dict[str, Any] = {"max_new_tokens": max_new_tokens}
        if temperature > 0:
            parameters.update(temperature=temperature, top_k=top_k, seed=seed)
        for prompt in prompts:
            started = time.monotonic()
            answer = _post(
                f"{base}/invocations",
                {
                    "inputs": prompt,
                    "parameters": {k: v for k, v in parameters.items() if v is not None},
                },
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


def _memory_line(server_log: str) -> str | None:
    """The server's `memory: weights ... MiB (dtype), KV cache ...` line, from `memory:` on."""
    for line in server_log.splitlines():
        at = line.find("memory: weights ")
        if at >= 0:
            return line[at:].strip()
    return None


def show_answer(prompt: str, text: str) -> str:
    """The prompt and its continuation as one indented text, as a person reads code; an answer
    of whitespace alone is said so, control characters are shown escaped."""
    if not text.strip():
        return f"  {prompt.rstrip()}\n  (the model answered only whitespace: {text!r})"
    visible = "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)
    return "\n".join(f"  {line}".rstrip() for line in (prompt + visible).rstrip().split("\n"))


def report(run: LocalRun, say: Callable[[str], None], *, kept: bool = True) -> None:
    for number, (prompt, text, seconds) in enumerate(run.answers, 1):
        say(f"\n--- answer {number} of {len(run.answers)}, to {prompt!r} ({seconds * 1000:.0f} ms)")
        say(show_answer(prompt, text))
    say("")
    if run.final_val_loss is not None:
        say(
            f"validation loss: {run.final_val_loss:.3f} nats/byte "
            f"({run.final_val_loss / math.log(2):.2f} bits/byte; guessing bytes at random: "
            f"{math.log(256):.2f} nats/byte)"
        )
    if run.tokens_per_s is not None:
        say(f"training: {run.tokens_per_s:,.0f} tokens/s")
    if run.answers:
        latencies = sorted(s for _, _, s in run.answers)
        median_ms = latencies[len(latencies) // 2] * 1000
        say(f"requests: {len(latencies)}, median latency {median_ms:.0f} ms")
    where = (
        f"files in {run.work_dir}"
        if kept
        else "temporary files removed (pass --work-dir DIR to keep the model and logs)"
    )
    say(f"server stopped (exit {run.server_exit_code}); {where}")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0 (greedy) and 100, got {text}")
    return value


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


def _model(text: str) -> str:
    """`--model`: a preset by name, else a model directory or model.tar.gz that is there."""
    if text in PRESETS:
        return text
    try:
        brought = brought_model(text)
    except LocalError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--model ")) from None
    if brought is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory or "
            "model.tar.gz"
        )
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--minutes",
        type=_positive_float,
        default=3.0,
        help="training time; the run's steps, warm-up and evaluations are sized to it "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-steps",
        type=_positive_int,
        help="stop training after this many steps even if time is left "
        "(default: as many as fit in --minutes)",
    )
    parser.add_argument(
        "--model",
        type=_model,
        default=DEFAULT_PRESET,
        metavar="PRESET|DIR",
        help=f"model size preset to train ({', '.join(PRESETS)}), or a Hugging Face model "
        "directory (Llama, Mistral, Qwen2 families) or model.tar.gz to serve instead of "
        "training one (default: %(default)s)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        help="a prompt to send (repeatable; default: three Python openings)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=64,
        help="tokens generated per answer; a trained preset's tokens are bytes "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--temperature",
        type=_temperature,
        default=0.8,
        help="sampling temperature; 0 is greedy, which a small model tends to loop in "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--top-k",
        type=_positive_int,
        default=40,
        help="sample among this many most likely tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds training and sampling: the same seed gives the same model and answers "
        "on the same machine (default: %(default)s)",
    )
    parser.add_argument(
        "--weight-dtype",
        choices=WEIGHT_DTYPES,
        help="the weights as the server holds them: float32, bfloat16, or int8 (per-channel, "
        "weight-only, quantized at load; CPU); auto serves a bfloat16 checkpoint as bfloat16, "
        "others as float32 (default: the server's, $KILN_WEIGHT_DTYPE or auto)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="keep the run (model.tar.gz, logs) here (default: a temporary directory, "
        "removed at the end)",
    )


def missing_workload_packages() -> list[str]:
    """The training and serving packages `kiln local` needs that this Python lacks."""
    names = ("torch", "safetensors", "uvicorn", "tqdm", "tokenizers", "jinja2")
    return [name for name in names if not _importable(name)]


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def run_command(args: argparse.Namespace) -> int:
    """The `kiln local` command."""
    missing = missing_workload_packages()
    if missing:
        print(
            f"kiln local: this environment lacks the training and serving packages "
            f"({', '.join(missing)}): `make synth` installs only the infrastructure side. "
            "Run `make install-dev` (or `make test`, which installs it too), then "
            "`.venv/bin/kiln local` again.",
            file=sys.stderr,
        )
        return 2
    temporary = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="kiln-local-")) if temporary else args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    run = LocalRun(work_dir=work_dir)

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        brought = brought_model(args.model)
        if brought is None:
            train(
                run,
                minutes=args.minutes,
                max_steps=args.max_steps,
                model=args.model,
                say=say,
                seed=args.seed,
                interactive=_terminal(),
            )
        else:
            run.model_dir = brought
            say(f"serving {brought} (no training)")
        serve_and_ask(
            run,
            prompts=args.prompts or DEFAULT_PROMPTS,
            max_new_tokens=args.max_new_tokens,
            say=say,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            weight_dtype=args.weight_dtype,
        )
        report(run, say, kept=not temporary)
        return 0 if run.server_exit_code == 0 else 1
    except LocalError as err:
        print(f"kiln local: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # The terminal's Ctrl-C reached the trainer and the server too; each stops on it.
        print("\nkiln local: interrupted; training and the server are stopped", file=sys.stderr)
        return 130
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
