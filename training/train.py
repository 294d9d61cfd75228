"""The training entry point, `python -m training.train [ARGS]`: alone, under torchrun, on SageMaker.

Metrics go to stdout as JSON lines (rank 0 only), one object per event: `start`, `train`
(`train_loss`, `lr`, `grad_norm`, `tokens_per_s`), `val` (`val_loss`, `val_perplexity`),
`checkpoint`, `model`, `stopped`. Human-readable logs go to stderr.

Exit codes: 0 done, 2 bad arguments or data, 143 stopped by SIGTERM after writing a checkpoint
(non-zero so that a Kubernetes Job or torchrun retries and resumes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from kiln.contract import TrainerEnv
from training import checkpoint, sagemaker
from training.artifact import TARBALL, ArtifactError, save_model_dir, write_tarball
from training.config import PRESETS, ConfigError, ModelConfig
from training.data import (
    DEFAULT_SUFFIXES,
    BlockStream,
    Corpus,
    DataError,
    open_source,
    validation_blocks,
)
from training.model import LlamaModel, lm_loss
from training.storage import StorageError, is_s3, open_store
from training.tokenizer import ByteTokenizer

log = logging.getLogger("training")

CHECKPOINT_DIR_ENV = TrainerEnv.CHECKPOINT_DIR
OUTPUT_DIR_ENV = TrainerEnv.OUTPUT_DIR
JOB_NAME_ENV = TrainerEnv.JOB_NAME
EXIT_BAD_INPUT = 2
EXIT_SIGTERM = 128 + signal.SIGTERM

# Model-shape flags that override the preset's fields.
SHAPE_FLAGS = {
    "hidden_size": int,
    "intermediate_size": int,
    "num_layers": int,
    "num_heads": int,
    "num_kv_heads": int,
    "head_dim": int,
    "max_seq_len": int,
    "rope_theta": float,
}


class TrainError(ValueError):
    """A run that cannot proceed as asked; the message says what to change."""


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train kiln's Llama-architecture model. On SageMaker (`... train`) the "
        "hyperparameters are these flags without the leading dashes.",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        help="directory or s3:// prefix of text shards "
        "(default: the SageMaker train channel, else the Python standard library)",
    )
    d.add_argument(
        "--val-data",
        help="separate validation directory or s3:// prefix "
        "(default: the SageMaker validation channel, else held out from --data)",
    )
    d.add_argument(
        "--file-suffixes",
        default=",".join(DEFAULT_SUFFIXES),
        help="comma-separated file name endings to read; '*' reads every file",
    )
    d.add_argument(
        "--val-fraction",
        type=float,
        default=0.02,
        help="share of the data held out for validation (0 disables validation)",
    )
    d.add_argument(
        "--segment-bytes",
        type=_positive(int),
        default=1 << 20,
        help="shards are split into segments of this size (the unit of the split)",
    )
    d.add_argument(
        "--window-bytes",
        type=_positive(int),
        default=16 << 20,
        help="text shuffled together in memory at a time",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=sorted(PRESETS), default="small", help="size preset")
    for name, kind in SHAPE_FLAGS.items():
        m.add_argument(
            f"--{name.replace('_', '-')}", type=_positive(kind), help="overrides the preset"
        )
    m.add_argument("--tie-embeddings", type=_bool, help="true/false; overrides the preset")
    m.add_argument(
        "--ops",
        choices=("kiln", "reference"),
        default="kiln",
        help="kiln's fused kernels (reference fallback) or the pure-PyTorch references",
    )
    m.add_argument("--compile", type=_bool, default=False, help="torch.compile the model")
    t = p.add_argument_group("optimization")
    t.add_argument("--seq-len", type=_positive(int), default=256)
    t.add_argument(
        "--micro-batch-size",
        type=_positive(int),
        default=16,
        help="sequences per process per forward pass",
    )
    t.add_argument(
        "--grad-accum", type=_positive(int), default=1, help="micro-batches per optimizer step"
    )
    t.add_argument("--max-steps", type=_positive(int), default=600)
    t.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop (and save the model) after this wall time; 0 = no limit",
    )
    t.add_argument("--lr", type=_positive(float), default=2e-3)
    t.add_argument(
        "--min-lr-ratio", type=float, default=0.1, help="the cosine schedule ends at lr * this"
    )
    t.add_argument("--warmup-steps", type=_non_negative_int, default=50)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--beta1", type=float, default=0.9)
    t.add_argument("--beta2", type=float, default=0.95)
    t.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 = off")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: bf16 autocast on GPUs that support it, fp32 on CPU",
    )
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    t.add_argument(
        "--threads",
        type=_non_negative_int,
        default=0,
        help="torch CPU threads per process; 0 = torch's default",
    )
    e = p.add_argument_group("evaluation, checkpoints, output")
    e.add_argument(
        "--eval-every",
        type=_non_negative_int,
        default=100,
        help="steps between validations (0: only at the end)",
    )
    e.add_argument(
        "--val-blocks",
        type=_positive(int),
        default=64,
        help="validation sequences evaluated each time",
    )
    e.add_argument("--log-every", type=_positive(int), default=10)
    e.add_argument(
        "--checkpoint-dir",
        help=f"local path or s3:// prefix (default: ${CHECKPOINT_DIR_ENV}, "
        "/opt/ml/checkpoints on SageMaker, else no checkpoints)",
    )
    e.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=200,
        help="steps between checkpoints (0: only on SIGTERM and at the end)",
    )
    e.add_argument("--keep-checkpoints", type=_positive(int), default=2)
    e.add_argument(
        "--resume",
        type=_bool,
        default=True,
        help="continue from the newest checkpoint in --checkpoint-dir if there is one",
    )
    e.add_argument(
        "--output-dir",
        help=f"where model.tar.gz goes: local path or s3:// prefix (default: "
        f"${OUTPUT_DIR_ENV}, else runs/<job-name>); on SageMaker the model files go "
        "to /opt/ml/model and SageMaker packs them",
    )
    e.add_argument(
        "--save-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the exported weights",
    )
    e.add_argument(
        "--job-name",
        help=f"run name (default: ${JOB_NAME_ENV}, the SageMaker job name, else kiln-local)",
    )
    return p


def parse_args(
    argv: Sequence[str], sm: sagemaker.SageMakerEnv | None = None, environ: Any = os.environ
) -> argparse.Namespace:
    """Parses the flags and fills the defaults that come from the environment."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    try:
        args.model_config = model_config(args)
    except ConfigError as err:
        parser.error(f"model: {err}")
    if args.seq_len > args.model_config.max_seq_len:
        parser.error(
            f"--seq-len {args.seq_len} exceeds the model's max_seq_len "
            f"{args.model_config.max_seq_len} (raise --max-seq-len)"
        )
    if args.model_config.vocab_size < ByteTokenizer().vocab_size:
        parser.error(f"the model's vocab_size must be >= {ByteTokenizer().vocab_size}")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not 0 <= args.min_lr_ratio <= 1:
        parser.error(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.warmup_steps > args.max_steps:
        parser.error(f"--warmup-steps {args.warmup_steps} exceeds --max-steps {args.max_steps}")
    for flag in ("weight_decay", "grad_clip", "max_minutes"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0")
    for flag in ("beta1", "beta2"):
        if not 0 <= getattr(args, flag) < 1:
            parser.error(f"--{flag} must be in [0, 1)")
    suffixes = [s.strip() for s in args.file_suffixes.split(",") if s.strip()]
    args.suffixes = () if suffixes == ["*"] else tuple(suffixes)
    if sm is not None:
        args.data = args.data or (str(sm.train_channel) if sm.train_channel else None)
        if args.data is None:
            parser.error(f"SageMaker job without a 'train' channel (channels: {list(sm.channels)})")
        args.val_data = args.val_data or (str(sm.val_channel) if sm.val_channel else None)
        args.checkpoint_dir = args.checkpoint_dir or str(sm.checkpoint_dir)
    args.job_name = (
        args.job_name or environ.get(JOB_NAME_ENV) or (sm.job_name if sm else None) or "kiln-local"
    )
    args.checkpoint_dir = args.checkpoint_dir or environ.get(CHECKPOINT_DIR_ENV) or None
    args.output_dir = args.output_dir or environ.get(OUTPUT_DIR_ENV) or f"runs/{args.job_name}"
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    overrides = {k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None}
    if args.tie_embeddings is not None:
        overrides["tie_embeddings"] = args.tie_embeddings
    return dataclasses.replace(PRESETS[args.model], **overrides)


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _Schedule:
    """A picklable LR lambda (LambdaLR saves callable objects' state; it cannot save closures)."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        return lr_lambda(step, warmup=self.warmup, total=self.total, min_ratio=self.min_ratio)


class Metrics:
    """JSON lines on stdout from rank 0; SageMaker metric definitions match `"name": value`."""

    def __init__(self, enabled: bool, job: str) -> None:
        self.enabled, self.job = enabled, job

    def emit(self, event: str, **fields: Any) -> None:
        if self.enabled:
            record = {"event": event, "job": self.job, **fields}
            print(json.dumps(record), flush=True)


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[dict[str, bool]]:
    flag = {"stop": False}

    def handler(signum: int, frame: FrameType | None) -> None:
        # Only a flag here: the step in flight finishes, then every rank checkpoints together.
        flag["stop"] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


class Trainer:
    def __init__(self, args: argparse.Namespace, sm: sagemaker.SageMakerEnv | None = None) -> None:
        self.args, self.sm = args, sm
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.metrics = Metrics(self.rank == 0, args.job_name)

    # -- setup --------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        want = self.args.device
        if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise TrainError("--device cuda, but no CUDA device is available")
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def _init_distributed(self) -> None:
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(
                backend=backend, device_id=self.device if backend == "nccl" else None
            )

    def _bf16(self) -> bool:
        if self.args.precision == "bf16":
            return True
        if self.args.precision == "fp32":
            return False
        return self.device.type == "cuda" and torch.cuda.is_bf16_supported()

    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = self._device()
        self._init_distributed()
        try:
            return self._run()
        finally:
            if self.world > 1 and dist.is_initialized():
                dist.destroy_process_group()

    def _run(self) -> int:
        args, cfg = self.args, self.args.model_config
        tok = ByteTokenizer()
        source = open_source(args.data, args.suffixes)
        val_source = open_source(args.val_data, args.suffixes) if args.val_data else None
        corpus = Corpus.build(
            source,
            segment_bytes=args.segment_bytes,
            val_fraction=args.val_fraction,
            val_source=val_source,
        )
        stream = BlockStream(
            corpus, seq_len=args.seq_len, seed=args.seed, window_bytes=args.window_bytes
        )
        val = validation_blocks(corpus, seq_len=args.seq_len, max_blocks=args.val_blocks)

        torch.manual_seed(args.seed)  # identical initial weights on every rank
        base = LlamaModel(cfg, ops=args.ops).to(self.device)
        model = cast(nn.Module, torch.compile(base)) if args.compile else base
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # No buffer changes during training (the RoPE table is a constant): skip the
            # per-step broadcast of buffers.
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=ids, broadcast_buffers=False
            )
        decay = [p for p in base.parameters() if p.dim() >= 2]
        no_decay = [p for p in base.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": args.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=args.lr,
            betas=(args.beta1, args.beta2),
            fused=self.device.type == "cuda",
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _Schedule(args.warmup_steps, args.max_steps, args.min_lr_ratio)
        )

        store = open_store(args.checkpoint_dir) if args.checkpoint_dir else None
        step, tokens_seen = 0, 0
        if store is not None and args.resume and (found := checkpoint.latest(store)):
            state = checkpoint.load(store, found[1])
            if state["model_config"] != cfg.to_dict():
                raise TrainError(
                    f"the checkpoint in {store.describe(found[1])} is of another model "
                    f"({state['model_config']}); pass --resume false or another --checkpoint-dir"
                )
            base.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            stream.load_state_dict(state["data"])
            step, tokens_seen = int(state["step"]), int(state["tokens"])
            rngs = state["rng"]
            if len(rngs) == self.world:
                checkpoint.set_rng_state(rngs[self.rank])
            self.metrics.emit("resume", step=step, checkpoint=store.describe(found[1]))

        bf16 = self._bf16()
        global_batch = args.micro_batch_size * args.grad_accum * self.world
        self.metrics.emit(
            "start",
            step=step,
            world_size=self.world,
            device=str(self.device),
            precision="bf16" if bf16 else "fp32",
            ops=args.ops,
            kernels_compiled=_kernels_compiled(args.ops),
            parameters=sum(p.numel() for p in base.parameters()),
            model=cfg.to_dict(),
            data=source.describe(),
            train_segments=len(corpus.train),
            val_segments=len(corpus.val),
            train_tokens=corpus.train_tokens,
            global_batch_sequences=global_batch,
            tokens_per_step=global_batch * args.seq_len,
        )

        def autocast() -> contextlib.AbstractContextManager[Any]:
            if not bf16:
                return contextlib.nullcontext()
            return torch.autocast(self.device.type, dtype=torch.bfloat16)

        def evaluate() -> None:
            if val.shape[0] == 0:
                return
            model.eval()
            mine = val[self.rank :: self.world]
            total = 0.0
            with torch.no_grad(), autocast():
                for i in range(0, mine.shape[0], args.micro_batch_size):
                    b = mine[i : i + args.micro_batch_size].to(self.device)
                    total += lm_loss(model(b[:, :-1]), b[:, 1:]).item() * b.shape[0]
            model.train()
            loss_sum, count = self._all_reduce([total, float(mine.shape[0])])
            loss = loss_sum / count
            self.metrics.emit("val", step=step, val_loss=loss, val_perplexity=math.exp(loss))

        def save_checkpoint() -> None:
            if store is None:
                return
            rng = checkpoint.rng_state()
            rngs: list[Any] = [None] * self.world
            if self.world > 1:
                dist.all_gather_object(rngs, rng)
            else:
                rngs = [rng]
            if self.rank == 0:
                where = checkpoint.save(
                    store,
                    step,
                    {
                        "model": base.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "data": stream.state_dict(),
                        "step": step,
                        "tokens": tokens_seen,
                        "rng": rngs,
                        "model_config": cfg.to_dict(),
                        "world_size": self.world,
                    },
                    keep=args.keep_checkpoints,
                )
                self.metrics.emit("checkpoint", step=step, path=where)
            if self.world > 1:
                dist.barrier()  # nobody exits (or is killed) before the checkpoint is whole

        started = time.monotonic()
        last_time, last_tokens = started, tokens_seen
        micro, accum = args.micro_batch_size, args.grad_accum
        stopped_by: str | None = None
        model.train()
        with _sigterm_flag() as flag:
            while step < args.max_steps:
                blocks = stream.next_blocks(global_batch)
                loss_total = 0.0
                for a in range(accum):
                    start = (a * self.world + self.rank) * micro
                    b = blocks[start : start + micro].to(self.device, non_blocking=True)
                    sync = a == accum - 1 or self.world == 1
                    ctx = contextlib.nullcontext() if sync else model.no_sync()  # type: ignore[operator]
                    with ctx, autocast():
                        loss = lm_loss(model(b[:, :-1]), b[:, 1:]) / accum
                    with ctx:
                        loss.backward()
                    loss_total += loss.item()
                if args.grad_clip > 0:
                    grad_norm = float(nn.utils.clip_grad_norm_(base.parameters(), args.grad_clip))
                else:
                    grad_norm = float("nan")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += global_batch * args.seq_len
                out_of_time = args.max_minutes > 0 and (
                    time.monotonic() - started > args.max_minutes * 60
                )
                loss_sum, stop, timeout = self._all_reduce(
                    [loss_total, float(flag["stop"]), float(out_of_time)]
                )
                if step % args.log_every == 0 or step == args.max_steps or stop or timeout:
                    now = time.monotonic()
                    self.metrics.emit(
                        "train",
                        step=step,
                        train_loss=loss_sum / self.world,
                        lr=scheduler.get_last_lr()[0],
                        grad_norm=grad_norm,
                        tokens=tokens_seen,
                        tokens_per_s=(tokens_seen - last_tokens) / max(now - last_time, 1e-9),
                        elapsed_s=round(now - started, 3),
                    )
                    last_time, last_tokens = now, tokens_seen
                if stop:
                    stopped_by = "SIGTERM"
                    break
                if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
                    evaluate()
                if args.checkpoint_every and step % args.checkpoint_every == 0:
                    save_checkpoint()
                if timeout:
                    stopped_by = "max-minutes"
                    break
        stream.close()

        if stopped_by == "SIGTERM":
            save_checkpoint()
            self.metrics.emit("stopped", step=step, reason="SIGTERM")
            return EXIT_SIGTERM
        evaluate()
        if not (args.checkpoint_every and step % args.checkpoint_every == 0):
            save_checkpoint()  # a restarted finished job goes straight to the export
        if self.rank == 0:
            self._export(base, tok, step, tokens_seen)
        if self.world > 1:
            dist.barrier()
        return 0

    def _export(self, model: LlamaModel, tok: ByteTokenizer, step: int, tokens: int) -> None:
        args = self.args
        info = {"job_name": args.job_name, "step": step, "tokens": tokens, "seed": args.seed}
        if self.sm is not None:
            # SageMaker packs /opt/ml/model into model.tar.gz itself.
            out = save_model_dir(
                model, tok, self.sm.model_dir, dtype=args.save_dtype, training=info
            )
            self.metrics.emit("model", step=step, path=str(out))
            return
        if is_s3(args.output_dir):
            with tempfile.TemporaryDirectory() as tmp:
                save_model_dir(
                    model, tok, Path(tmp) / "model", dtype=args.save_dtype, training=info
                )
                tarball = write_tarball(Path(tmp) / "model", Path(tmp) / TARBALL)
                store = open_store(args.output_dir)
                store.put_file(tarball, TARBALL)
                self.metrics.emit("model", step=step, path=store.describe(TARBALL))
            return
        out = Path(args.output_dir)
        save_model_dir(model, tok, out / "model", dtype=args.save_dtype, training=info)
        tarball = write_tarball(out / "model", out / TARBALL)
        self.metrics.emit("model", step=step, path=str(tarball), model_dir=str(out / "model"))


def _kernels_compiled(ops: str) -> bool:
    if ops != "kiln":
        return False
    from kernels import ops as kernel_ops

    return bool(kernel_ops.HAVE_EXTENSION)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    sm = None
    if argv[:1] == ["train"]:  # SageMaker runs `<entrypoint> train`
        argv = argv[1:]
    if sagemaker.detected():
        try:
            sm = sagemaker.load()
        except sagemaker.SageMakerError as err:
            print(f"training: error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        argv = sagemaker.hyperparameter_args(sm.hyperparameters) + argv
    try:
        args = parse_args(argv, sm)
    except SystemExit as exit_:
        if sm is not None and exit_.code:
            sagemaker.write_failure(sm, "bad hyperparameters: see the job's log")
        raise
    if sm is not None and "LOCAL_RANK" not in os.environ:
        gpus = sm.num_gpus if sm.num_gpus is not None else torch.cuda.device_count()
        command = sagemaker.torchrun_command(sm, gpus)
        if command is not None:
            sys.stdout.flush()
            os.execv(command[0], command)
    try:
        return Trainer(args, sm).run()
    except (DataError, StorageError, ConfigError, ArtifactError, TrainError) as err:
        log.error("%s", err)
        print(f"training: error: {err}", file=sys.stderr)
        if sm is not None:
            sagemaker.write_failure(sm, str(err))
        return EXIT_BAD_INPUT
    except BaseException as err:
        if sm is not None and not isinstance(err, KeyboardInterrupt):
            sagemaker.write_failure(sm, f"{type(err).__name__}: {err}")
        raise


if __name__ == "__main__":
    sys.exit(main())
