"""The server's entry point (`serve` in the container, `python -m inference.serve` locally).

SageMaker runs `docker run IMAGE serve`: the image's entry point gets `serve` as its first
argument, which is accepted and ignored. Settings come from flags, else environment variables,
else defaults (see `inference/README.md`). Exit codes: 0 after a clean shutdown (SIGTERM drains
in-flight requests first), 1 when the model fails to load, 2 for bad settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from inference.engine import Engine, EngineSettings
from inference.events import EventConfigError, EventPublisher, EventSettings
from inference.model_dir import ModelDirError, prepare_model_dir, unpacked_copy
from inference.schema import MAX_BODY_BYTES
from kiln.contract import SERVER_DRAIN_SECONDS, ServerEnv

if TYPE_CHECKING:
    from inference.app import ServerState

log = logging.getLogger("inference")

EXIT_LOAD_FAILED = 1
EXIT_BAD_SETTINGS = 2
DEFAULT_MODEL_DIR = "/opt/ml/model"
DEFAULT_PORT = 8080
# SageMaker sends SIGKILL 30 s after SIGTERM: drain, then flush events, within that.
DEFAULT_GRACE_S = float(SERVER_DRAIN_SECONDS)


def _env_default(env: Mapping[str, str], name: str, default: Any) -> Any:
    value = env.get(name, "").strip()
    return value if value else default


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A bad environment variable; the message names it and what it takes."""


def _env_flag(env: Mapping[str, str], name: str) -> bool | None:
    """A boolean variable (1/true/yes/on, 0/false/no/off, any case); None when unset."""
    value = env.get(name, "").strip().lower()
    if not value:
        return None
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise SettingsError(
        f"{name}={env[name]!r}: expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}"
    )


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serve", description="kiln's model server (SageMaker container contract)"
    )

    def positive_int(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
        return value

    def non_negative_int(text: str) -> int:
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
        return value

    def positive_float(text: str) -> float:
        value = float(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    def port(text: str) -> int:
        value = int(text)
        if not 0 <= value < 65536:
            raise argparse.ArgumentTypeError(f"must be a TCP port (0-65535), got {value}")
        return value

    p.add_argument(
        "--model-dir",
        default=_env_default(env, "SM_MODEL_DIR", DEFAULT_MODEL_DIR),
        help="a Hugging Face model directory (config.json, safetensors weights or shards, "
        "tokenizer.json; Llama, Mistral, Qwen2 families), one in its only subdirectory, a "
        "model.tar.gz of one, or a directory holding model.tar.gz (default: $SM_MODEL_DIR or "
        "/opt/ml/model)",
    )
    p.add_argument(
        "--host",
        default=_env_default(env, ServerEnv.HOST, "0.0.0.0"),
        help="address to bind (default: 0.0.0.0, the container's network)",
    )
    p.add_argument(
        "--port",
        type=port,
        default=_env_default(env, "SAGEMAKER_BIND_TO_PORT", DEFAULT_PORT),
        help="port (default: $SAGEMAKER_BIND_TO_PORT or 8080; 0 picks a free one)",
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=_env_default(env, ServerEnv.MAX_BATCH, 32),
        help="sequences running together (default: $KILN_MAX_BATCH or 32)",
    )
    p.add_argument(
        "--max-queue",
        type=non_negative_int,
        default=_env_default(env, ServerEnv.MAX_QUEUE, 64),
        help="requests waiting to run before 503s (default: $KILN_MAX_QUEUE or 64)",
    )
    p.add_argument(
        "--request-timeout",
        type=positive_float,
        default=_env_default(env, ServerEnv.REQUEST_TIMEOUT_S, 60.0),
        help="seconds a request may take, queue included, before a 504 "
        "(default: $KILN_REQUEST_TIMEOUT_S or 60, SageMaker's own limit)",
    )
    p.add_argument(
        "--graceful-timeout",
        type=positive_float,
        default=_env_default(env, ServerEnv.GRACEFUL_TIMEOUT_S, DEFAULT_GRACE_S),
        help="seconds SIGTERM waits for in-flight requests (default: $KILN_GRACEFUL_TIMEOUT_S "
        f"or {SERVER_DRAIN_SECONDS}; then events flush; SageMaker kills 30 s after SIGTERM)",
    )
    p.add_argument(
        "--max-seq-len",
        type=positive_int,
        default=_env_default(env, ServerEnv.MAX_SEQ_LEN, None),
        help="context served, prompt and answer together (default: $KILN_MAX_SEQ_LEN, else "
        "the model's max_position_embeddings)",
    )
    p.add_argument(
        "--kv-cache-gib",
        type=positive_float,
        default=_env_default(env, ServerEnv.KV_CACHE_GIB, None),
        help="memory of the paged KV cache, in GiB; it must hold one sequence of --max-seq-len "
        "at least (default: $KILN_KV_CACHE_GIB, else room for --max-batch sequences of "
        "--max-seq-len, at most half the memory available once the weights are loaded)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=positive_int,
        default=_env_default(env, ServerEnv.PREFILL_CHUNK, 512),
        help="prompt tokens prefilled per engine step, between decode steps: a long prompt is "
        "prefilled in chunks while running streams keep decoding (default: "
        "$KILN_PREFILL_CHUNK or 512)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=_env_default(env, ServerEnv.MAX_NEW_TOKENS, None),
        help="upper bound on a request's max_new_tokens (default: $KILN_MAX_NEW_TOKENS, else "
        "what the model's context leaves)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=_env_default(env, ServerEnv.THREADS, None),
        help="CPU threads (default: $KILN_THREADS, else the CPUs this process may use: its "
        "affinity, capped by its cgroup's CPU quota)",
    )
    p.add_argument(
        "--weight-dtype",
        choices=("auto", "float32", "bfloat16", "int8"),
        default=_env_default(env, ServerEnv.WEIGHT_DTYPE, "auto"),
        help="the weights as served: float32, bfloat16, or int8 on CPU (per-output-channel "
        "weight-only quantization at load); on a GPU float32 or bfloat16, auto keeping the "
        "checkpoint's; on CPU auto serves a bfloat16 checkpoint as bfloat16, others as float32 "
        "(default: $KILN_WEIGHT_DTYPE or auto)",
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=_env_flag(env, ServerEnv.CUDA_GRAPHS),
        help="decode steps through fixed per-batch-size buffers, each captured once as a CUDA "
        "graph and replayed (default: $KILN_CUDA_GRAPHS, else on with --device cuda; on CPU "
        "the flag runs the same buffers uncaptured, for testing)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=_env_default(env, ServerEnv.DEVICE, "auto"),
        help="where the model runs (default: $KILN_DEVICE or auto: cuda when available)",
    )
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=_env_default(env, ServerEnv.LOG_LEVEL, "info"),
    )
    p.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per HTTP request (uvicorn's access log; off by default)",
    )
    return p


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when a signal starts the drain (/ping turns 503)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._kiln_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._kiln_state.draining:
            log.info("signal %s: draining in-flight requests, then exiting", sig)
        self._kiln_state.draining = True
        super().handle_exit(sig, frame)


def _absorb_signal(sig: int, frame: FrameType | None) -> None:
    """Installed around uvicorn: it re-raises the signal it drained on, and that must not kill
    the process after a clean drain (SIGTERM is a normal stop here, so the exit code is 0)."""


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        args_list = args_list[1:]
    try:
        parser = build_parser(env)
    except SettingsError as err:
        print(f"serve: error: {err}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        model_dir = prepare_model_dir(Path(args.model_dir))
    except ModelDirError as err:
        log.error("model load failed: %s", err)
        return EXIT_LOAD_FAILED
    try:
        return _serve(args, model_dir, env)
    finally:
        copy = unpacked_copy(model_dir, Path(args.model_dir))
        if copy is not None:
            # A tarball unpacked for this run: nothing else will ever read it.
            shutil.rmtree(copy, ignore_errors=True)


def _serve(args: argparse.Namespace, model_dir: Path, env: Mapping[str, str]) -> int:
    try:
        event_settings = EventSettings.from_env(env, default_model_version=model_dir.name)
    except EventConfigError as err:
        log.error("bad event settings: %s", err)
        return EXIT_BAD_SETTINGS

    # Imported late: torch and the model code load in a second, after the argument checks.
    from inference.app import ServerSettings, create_app

    engine = Engine(
        model_dir,
        EngineSettings(
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            device=args.device,
            threads=args.threads,
            max_seq_len=args.max_seq_len,
            kv_cache_gib=args.kv_cache_gib,
            prefill_chunk=args.prefill_chunk,
            weight_dtype=args.weight_dtype,
            cuda_graphs=args.cuda_graphs,
        ),
    )
    events = EventPublisher(event_settings)
    holder: dict[str, _Server] = {}

    def on_engine_failure(err: BaseException) -> None:
        # From the engine thread: uvicorn's loop polls should_exit.
        if "server" in holder:
            holder["server"].should_exit = True

    app = create_app(
        engine,
        settings=ServerSettings(
            request_timeout_s=args.request_timeout,
            max_body_bytes=MAX_BODY_BYTES,
            max_new_tokens=args.max_new_tokens,
            # A chat completion's `model` when the request names none.
            model_name=event_settings.model_version,
        ),
        events=events,
        on_engine_failure=on_engine_failure,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        lifespan="on",
        log_config=None,
        access_log=args.access_log,
        timeout_graceful_shutdown=args.graceful_timeout,
        # A last line of defence against connection floods; requests past the engine's
        # queue get the app's own 503 long before this.
        limit_concurrency=4 * (args.max_batch + args.max_queue) + 64,
        timeout_keep_alive=75,  # longer than SageMaker's front end keeps idle connections
    )
    server = _Server(config, app.state.kiln)
    holder["server"] = server
    previous = {sig: signal.signal(sig, _absorb_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if engine.error is not None:
        return EXIT_LOAD_FAILED
    if not server.started:
        log.error("the server did not start (port %s in use?)", args.port)
        return EXIT_LOAD_FAILED
    log.info("stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
