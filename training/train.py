"""The training entry point, `python -m training.train [ARGS]`: alone, under torchrun, on SageMaker.

Metrics go to stdout as JSON lines (rank 0 only), one object per event: `start`, `train`
(`train_loss`, `lr`, `grad_norm`, `tokens_per_s`), `val` (`val_loss`, `val_perplexity`),
`checkpoint`, `model`, `registered` (the registry version, when a model package group is
named), `stopped`. Human-readable logs go to stderr.

Exit codes: 0 done, 2 bad arguments or data, 143 stopped by SIGTERM after writing a checkpoint
(non-zero so that a Kubernetes Job or torchrun retries and resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import torch

from kiln import registry
from kiln.contract import TrainerEnv
from modeling.artifact import ArtifactError
from modeling.config import PRESETS, ConfigError, ModelConfig
from modeling.tokenizer import ByteTokenizer
from training import sagemaker, tracking
from training.data import DEFAULT_SUFFIXES, DataError
from training.loop import SIGTERM, Trainer
from training.lora import LoraError, LoraSpec
from training.optim import lr_lambda
from training.parallel import Distributed
from training.state import TrainError
from training.storage import StorageError

__all__ = ["TrainError", "build_parser", "lr_lambda", "main", "parse_args", "run"]

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
    d.add_argument(
        "--pack-mask",
        choices=("causal", "document"),
        default="causal",
        help="attention over a block of packed documents: causal across the whole block, or "
        "document (each document attends within itself only, positions restarting at 0)",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--init-from",
        help="fine-tune the Hugging Face model directory (Llama, Mistral, Qwen2) at this local "
        "path or s3:// prefix, with its tokenizer (--model and the shape flags are ignored)",
    )
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
    a = p.add_argument_group("adapters (LoRA)")
    a.add_argument(
        "--lora-rank",
        type=_non_negative_int,
        default=0,
        help="train low-rank adapters of this rank, the base frozen (0: full fine-tuning)",
    )
    a.add_argument("--lora-alpha", type=_positive(float), help="adapter scale alpha / rank")
    a.add_argument(
        "--lora-targets",
        default="q_proj,k_proj,v_proj,o_proj",
        help="comma-separated projections to adapt (Hugging Face names) or all-linear",
    )
    par = p.add_argument_group("parallelism")
    par.add_argument(
        "--strategy",
        choices=("auto", "ddp", "fsdp"),
        default="auto",
        help="ddp: a replica per process; fsdp: FSDP2, weights, gradients and optimizer states "
        "sharded per block; auto: fsdp when a replica would not fit one device",
    )
    par.add_argument(
        "--device-memory-gib",
        type=_positive(float),
        help="the memory of one device that --strategy auto plans with (default: what the "
        "device reports; on CPU the machine's RAM)",
    )
    par.add_argument(
        "--activation-checkpointing",
        type=_bool,
        default=False,
        help="recompute each block's forward in backward instead of keeping its activations",
    )
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
    t.add_argument(
        "--fit-to-minutes",
        type=_bool,
        default=False,
        help="with --max-minutes: time the first steps, then size the run to end on schedule "
        "within the minutes (steps up to --max-steps, a warm-up of 5%% of them, five "
        "evaluations); replaces --warmup-steps and --eval-every",
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
    e.add_argument(
        "--log-every",
        type=_positive(int),
        default=10,
        help="steps between `train` metrics lines (also written every --progress-every seconds)",
    )
    e.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        help="seconds between progress lines on stderr (step/total, loss, tokens/s, ETA); 0: none",
    )
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
        "--checkpoint-format",
        choices=("auto", "full", "sharded"),
        default="auto",
        help="full: one file written by rank 0; sharded: torch.distributed.checkpoint, every "
        "rank its shard, resumable on another world size; auto: sharded under FSDP",
    )
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
        "--model-format",
        choices=("tarball", "directory", "both"),
        default="tarball",
        help="what goes to an s3:// --output-dir: model.tar.gz, the model directory "
        "uncompressed under model/ (deployable as an S3 prefix, for large models), or both",
    )
    e.add_argument(
        "--save-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the exported weights (default: --init-from's, else float32)",
    )
    e.add_argument(
        "--model-package-group",
        help=f"register the finished run as a version (pending approval) of this SageMaker "
        f"model package group, name or ARN (default: ${TrainerEnv.MODEL_PACKAGE_GROUP}; "
        "neither: no registration)",
    )
    e.add_argument(
        "--job-name",
        help=f"run name (default: ${JOB_NAME_ENV}, the SageMaker job name, else kiln-local)",
    )
    tr = p.add_argument_group("experiment tracking (MLflow, optional)")
    tr.add_argument(
        "--tracking-uri",
        help=f"log parameters, metrics and the model to this MLflow tracking URI (default: "
        f"${tracking.TRACKING_URI_ENV}; unset: no tracking, and mlflow is never imported): "
        "a server URL, a SageMaker MLflow tracking server ARN, or file:///path",
    )
    tr.add_argument(
        "--experiment",
        help=f"MLflow experiment (default: ${tracking.EXPERIMENT_ENV}, else "
        f"{tracking.DEFAULT_EXPERIMENT})",
    )
    tr.add_argument(
        "--track-model",
        type=_bool,
        default=True,
        help="log the exported model directory as the MLflow run's artifacts",
    )
    return p


def parse_args(
    argv: Sequence[str], sm: sagemaker.SageMakerEnv | None = None, environ: Any = os.environ
) -> argparse.Namespace:
    """Parses the flags and fills the defaults that come from the environment."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    # What the registry compares the run's flags with (it records those that differ).
    args.defaults = vars(parser.parse_args([]))
    try:
        args.model_config = model_config(args)
    except ConfigError as err:
        parser.error(f"model: {err}")
    if args.init_from is None and args.seq_len > args.model_config.max_seq_len:
        parser.error(
            f"--seq-len {args.seq_len} exceeds the model's max_seq_len "
            f"{args.model_config.max_seq_len} (raise --max-seq-len)"
        )
    if args.init_from is None and args.model_config.vocab_size < ByteTokenizer().vocab_size:
        parser.error(f"the model's vocab_size must be >= {ByteTokenizer().vocab_size}")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not 0 <= args.min_lr_ratio <= 1:
        parser.error(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.warmup_steps > args.max_steps:
        parser.error(f"--warmup-steps {args.warmup_steps} exceeds --max-steps {args.max_steps}")
    if args.fit_to_minutes and not args.max_minutes:
        parser.error("--fit-to-minutes needs --max-minutes (the time to fit the run into)")
    for flag in ("weight_decay", "grad_clip", "max_minutes", "progress_every"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0")
    for flag in ("beta1", "beta2"):
        if not 0 <= getattr(args, flag) < 1:
            parser.error(f"--{flag} must be in [0, 1)")
    if args.lora_targets and args.lora_rank:
        try:
            LoraSpec.parse(args.lora_rank, args.lora_alpha, args.lora_targets)
        except LoraError as err:
            parser.error(str(err))
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
    args.tracking_uri = args.tracking_uri or environ.get(tracking.TRACKING_URI_ENV) or None
    args.experiment = args.experiment or environ.get(tracking.EXPERIMENT_ENV) or None
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    overrides = {k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None}
    if args.tie_embeddings is not None:
        overrides["tie_embeddings"] = args.tie_embeddings
    return dataclasses.replace(PRESETS[args.model], **overrides)


def run(args: argparse.Namespace, sm: sagemaker.SageMakerEnv | None = None) -> int:
    """Trains as the flags say, in this process (one rank of a torchrun job, or alone)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = Distributed.from_env(args.device)
    dist.init()
    try:
        stopped_by = Trainer(args, dist, sm).fit()
    finally:
        dist.close()
    return EXIT_SIGTERM if stopped_by == SIGTERM else 0


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
        return run(args, sm)
    except (
        DataError,
        StorageError,
        ConfigError,
        ArtifactError,
        TrainError,
        registry.RegistrationError,
    ) as err:
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
