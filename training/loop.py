"""The training loop, in layers: `fit` → `train` → `train_step` → `forward_backward`.

`Trainer` builds the run's parts from the parsed flags (data stream, model, parallelism,
optimizer, evaluator, checkpointer, metrics) and drives them. The loop's progress lives in a
`TrainState` that is passed down the layers; nothing reads it through a closure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, cast

import torch
from torch import Tensor

from kiln import registry
from kiln.contract import TrainerEnv
from modeling.artifact import TARBALL, load_model_dir, read_config, save_model_dir, write_tarball
from modeling.config import ModelConfig
from modeling.model import LlamaModel, load_ops
from modeling.rope import rope_table
from modeling.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from training import budget, lora, sagemaker
from training.checkpointer import Checkpointer, ShardedCheckpointer
from training.data import (
    BlockStream,
    Corpus,
    is_records,
    open_source,
    validation_blocks,
)
from training.evaluate import Evaluator
from training.lora import LoraSpec
from training.loss import batch_loss
from training.metrics import Metrics
from training.optim import Schedule, build_optimizer
from training.parallel import Distributed, FullyShard, Precision, Strategy, choose_strategy
from training.records import (
    CHAT_TEMPLATE_FILE,
    Encoder,
    document_end_id,
    read_chat_template,
)
from training.state import TrainError, TrainState
from training.storage import download_dir, is_s3, open_store
from training.tracking import Tracker, open_tracker

ADAPTER_DIR = "adapter"

SIGTERM = "SIGTERM"
MAX_MINUTES = "max-minutes"


class StopSignal:
    """Notes a SIGTERM instead of dying of it: the step in flight finishes, then every rank
    checkpoints together."""

    def __init__(self) -> None:
        self.received = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def __enter__(self) -> StopSignal:
        self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    """One run: its parts, built from the flags, and the loop that drives them."""

    def __init__(
        self, args: argparse.Namespace, dist: Distributed, sm: sagemaker.SageMakerEnv | None = None
    ) -> None:
        self.args, self.dist, self.sm = args, dist, sm
        # MLflow, where a tracking URI is given: opened by fit(), once the run is built.
        self.tracker: Tracker | None = None
        self.metrics = Metrics(dist.is_main, args.job_name, args.progress_every)
        torch.manual_seed(args.seed)  # identical initial weights (and adapters) on every rank
        # `model` holds the weights (what the optimizer, checkpoints and export see); `wrapped`
        # is what runs: compiled and/or spread over the ranks by the parallelism.
        self.init_dir: Path | None = None
        self.chat_template: str | None = None
        self.tokenizer: Tokenizer
        self.lora = (
            LoraSpec.parse(args.lora_rank, args.lora_alpha, args.lora_targets)
            if (args.lora_rank)
            else None
        )
        gib = getattr(args, "device_memory_gib", None)
        self.device_memory = int(gib * 2**30) if gib else None
        # FSDP over several ranks from a checkpoint: rank 0 alone reads the weights; the others
        # build the model on the meta device (no memory) and receive their shards from rank 0
        # once the model is sharded (`_broadcast_from_rank0`). `--strategy auto` is resolved
        # first, from the model's shape, so that it loads this way too when it picks FSDP.
        self.strategy = args.strategy
        if args.init_from:
            self.init_dir = self._fetch_model(args.init_from)
            if self.strategy == "auto" and dist.world > 1:
                self.strategy = self._resolve_auto(read_config(self.init_dir)[0])
        self.rank0_load = bool(args.init_from) and dist.world > 1 and self.strategy == "fsdp"
        self._rank0_state: dict[str, Tensor] | None = None
        if args.init_from:
            assert self.init_dir is not None
            if self.rank0_load and not dist.is_main:
                cfg, _ = read_config(self.init_dir)
                load_ops(args.ops)  # imported outside the meta-device context
                with torch.device("meta"):
                    self.model = LlamaModel(cfg, ops=args.ops)
                self.tokenizer = load_tokenizer(self.init_dir)
            else:
                self.model, self.tokenizer = load_model_dir(
                    self.init_dir, ops=args.ops, dtype=torch.float32
                )
            self.model.train()
            self.chat_template = read_chat_template(self.init_dir, self.tokenizer)
            args.model_config = self.model.config
        else:
            self.model = LlamaModel(args.model_config, ops=args.ops)
            self.tokenizer = ByteTokenizer()
        cfg = args.model_config
        if args.seq_len > cfg.max_seq_len:
            raise TrainError(
                f"--seq-len {args.seq_len} exceeds the model's context of {cfg.max_seq_len} tokens"
            )
        if self.lora is not None:
            lora.attach(self.model, self.lora)
        if self.rank0_load and dist.is_main:
            # The full weights (and adapters) to send; fully_shard keeps only this rank's shard.
            self._rank0_state = {k: v.detach() for k, v in self.model.state_dict().items()}
        if not (self.rank0_load and not dist.is_main):
            self.model.to(dist.device)

        self.source = open_source(args.data, args.suffixes)
        val_source = open_source(args.val_data, args.suffixes) if args.val_data else None
        self.corpus = Corpus.build(
            self.source,
            segment_bytes=args.segment_bytes,
            val_fraction=args.val_fraction,
            val_source=val_source,
        )
        # Bytes with kiln's tokenizer: the exact, listing-derived layout; anything else (another
        # tokenizer, or records) is tokenized a window at a time.
        records = any(is_records(s.shard) for s in self.corpus.train + self.corpus.val)
        exact = isinstance(self.tokenizer, ByteTokenizer) and not records
        encoder = None if exact else Encoder(self.tokenizer, self.chat_template)
        self.stream = BlockStream(
            self.corpus,
            seq_len=args.seq_len,
            seed=args.seed,
            window_bytes=args.window_bytes,
            encoder=encoder,
        )
        val = validation_blocks(
            self.corpus, seq_len=args.seq_len, max_blocks=args.val_blocks, encoder=encoder
        )

        self.precision = Precision.choose(args.precision, dist.device)
        on, off = lora.trainable(list(self.model.parameters()))
        self.parallel: Strategy = choose_strategy(
            self.strategy,
            dist,
            trainable=on,
            frozen=off,
            bf16=self.precision.bf16,
            activation_checkpointing=args.activation_checkpointing,
            memory=self.device_memory,
        )
        sharded = isinstance(self.parallel, FullyShard)
        # LoRA under bf16 autocast: the frozen base is stored in bf16 (half its memory), the
        # adapters and their optimizer states in float32. Not under FSDP, which shards a block's
        # parameters as one flat group of one dtype (it computes in bf16 anyway).
        self.frozen_dtype = torch.float32
        if self.lora is not None and self.precision.bf16 and not sharded:
            self.frozen_dtype = torch.bfloat16
            lora.store_frozen(self.model, self.frozen_dtype)
        # FSDP computes in bf16 through its mixed-precision policy, not autocast.
        self.autocast = Precision(False, dist.device.type) if sharded else self.precision
        self.wrapped = self.parallel.wrap(self.model, compile=args.compile)
        if self.rank0_load:
            self._broadcast_from_rank0()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(self.model, args, dist.device)

        # --pack-mask document: documents end with this id (bos/eos as the stream packs them).
        self.document_end = (
            document_end_id(self.tokenizer) if args.pack_mask == "document" else None
        )
        self.evaluator = Evaluator(
            val,
            batch_size=args.micro_batch_size,
            every=args.eval_every,
            dist=dist,
            precision=self.autocast,
            document_end=self.document_end,
        )
        fmt = args.checkpoint_format
        if fmt == "auto":
            fmt = "sharded" if sharded else "full"
        if fmt == "full" and sharded:
            raise TrainError(
                "--checkpoint-format full cannot hold FSDP's sharded weights: pass "
                "--checkpoint-format sharded (or auto)"
            )
        self.checkpoint_format = fmt
        kind = ShardedCheckpointer if fmt == "sharded" else Checkpointer
        self.checkpointer: Checkpointer = kind.at(
            args.checkpoint_dir,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            model_config=cfg.to_dict(),
            dist=dist,
            interval=args.checkpoint_every,
            keep=args.keep_checkpoints,
        )
        self.global_batch = args.micro_batch_size * args.grad_accum * dist.world
        self.tokens_per_step = self.global_batch * args.seq_len
        # --max-steps, or fewer once a time budget has planned the run (`training.budget`).
        self.total_steps = args.max_steps
        self.planned = False
        self.planned_evaluations = 0
        self.validated_at: int | None = None
        self.last_val_loss: float | None = None
        self.artifact: str | None = None  # where export() put model.tar.gz
        # Checked before training, so that a run asked to register does not learn at its end
        # that it cannot.
        self.registry_target = registry.Target.from_environment(
            getattr(args, "model_package_group", None)
        )

    def _broadcast_from_rank0(self) -> None:
        """Fills every rank's shards from rank 0's full weights (a collective): the meta ranks'
        storage is allocated for their shards alone, then each tensor is broadcast and sliced."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        if not self.dist.is_main:
            self.model.to_empty(device=self.dist.device)
        self.model.rope = rope_table(self.args.model_config).to(self.dist.device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.model, self._rank0_state or {}, options=options)
        self._rank0_state = None

    def _resolve_auto(self, cfg: ModelConfig) -> str:
        """What `--strategy auto` picks for this model (with its adapters), decided from a
        meta-device copy: no memory, no draws from the random generator."""
        load_ops(self.args.ops)  # imported outside the meta-device context
        with torch.device("meta"):
            probe = LlamaModel(cfg, ops=self.args.ops)
            if self.lora is not None:
                lora.attach(probe, self.lora)
        on, off = lora.trainable(list(probe.parameters()))
        return choose_strategy(
            "auto", self.dist, trainable=on, frozen=off, bf16=False, memory=self.device_memory
        ).name

    def _fetch_model(self, location: str) -> Path:
        """A local copy of --init-from (an S3 prefix is downloaded into a temporary directory)."""
        if not is_s3(location):
            return Path(location)
        self._tmp = tempfile.TemporaryDirectory(prefix="kiln-init-")
        return download_dir(open_store(location), "", Path(self._tmp.name))

    # -- the layers ---------------------------------------------------------------------------

    def fit(self) -> str | None:
        """Resumes when a checkpoint exists, trains, validates, checkpoints and exports the model.
        Returns what stopped training early ("SIGTERM": checkpointed, not exported), or None.
        A tracked run ends FINISHED, KILLED (SIGTERM) or FAILED (an exception)."""
        args = self.args
        # Rank 0 only; mlflow is imported only when a tracking URI is given.
        self.tracker = self.metrics.tracker = open_tracker(
            getattr(args, "tracking_uri", None),
            experiment=getattr(args, "experiment", None),
            run_name=args.job_name,
            enabled=self.dist.is_main,
            log_model=getattr(args, "track_model", True),
        )
        if self.tracker is None:
            return self._fit()
        self.tracker.log_hyperparameters(vars(args))
        try:
            stopped_by = self._fit()
        except BaseException:
            self.tracker.close("FAILED")
            raise
        self.tracker.close("KILLED" if stopped_by == SIGTERM else "FINISHED")
        return stopped_by

    def _fit(self) -> str | None:
        state = TrainState(data=self.stream)
        if self.args.resume and (where := self.checkpointer.load(state)):
            self.metrics.resume(state, where)
        self.metrics.emit("start", **self.describe(state))
        try:
            stopped_by = self.train(state)
        finally:
            self.stream.close()
        if stopped_by == SIGTERM:
            self.save_checkpoint(state)
            self.metrics.stopped(state, SIGTERM)
            return stopped_by
        if self.validated_at != state.step:  # the clock may stop a run right after one
            self.validate(state)
        if not self.checkpointer.due(state.step):
            self.save_checkpoint(state)  # a restarted finished job goes straight to the export
        self.export(state)
        self.dist.barrier()
        if self.dist.is_main:
            self.register(state)
        return stopped_by

    def train(self, state: TrainState) -> str | None:
        """Steps until the total (--max-steps, or what fits in --max-minutes with
        --fit-to-minutes), logging, validating and checkpointing on their intervals.
        Returns SIGTERM or MAX_MINUTES when one of those ended it first, else None."""
        args = self.args
        self.metrics.start_clock(state)
        deadline = self.metrics.started + args.max_minutes * 60 if args.max_minutes > 0 else None
        clock = budget.StepClock(state.step) if deadline and args.fit_to_minutes else None
        self.wrapped.train()
        with StopSignal() as sigterm:
            while state.step < self.total_steps:
                loss, grad_norm = self.train_step(state)
                now = time.monotonic()
                out_of_time = deadline is not None and now > deadline
                # One collective per step: the loss summed over ranks, and whether any rank was
                # signalled or ran out of time (so that all of them stop at the same step).
                loss_sum, stop, timeout = self.dist.all_reduce(
                    [loss, float(sigterm.received), float(out_of_time)]
                )
                evaluate = self.evaluation_due(state.step)  # before a new plan moves them
                if clock is not None and deadline is not None:
                    clock.tick(state.step, now)
                    if state.step == clock.calibration_step or (self.planned and evaluate):
                        self.plan(state, clock, deadline, now)
                last = state.step >= self.total_steps
                if (
                    state.step % args.log_every == 0
                    or last
                    or stop
                    or timeout
                    or self.metrics.overdue()
                ):
                    self.metrics.train(
                        state,
                        loss=loss_sum / self.dist.world,
                        lr=float(self.scheduler.get_last_lr()[0]),
                        grad_norm=grad_norm,
                        total_steps=self.total_steps,
                        deadline=deadline,
                        final=bool(last or stop or timeout),
                    )
                if stop:
                    return SIGTERM
                if evaluate and not last:
                    self.validate(state)  # the last step's validation comes after the loop
                    self.planned_evaluations += int(self.planned)
                if self.checkpointer.due(state.step):
                    self.save_checkpoint(state)
                if timeout:
                    return MAX_MINUTES
        return None

    def evaluation_due(self, step: int) -> bool:
        """--eval-every; in a planned run, the next of the four evaluations along the way when
        the step reaches its fifth of the planned total (a new plan moves the ones to come; the
        fifth is the final one, after the loop)."""
        if not self.planned:
            return self.evaluator.due(step)
        done = self.planned_evaluations
        return done < budget.EVALUATIONS - 1 and step * budget.EVALUATIONS >= (
            self.total_steps * (done + 1)
        )

    def plan(self, state: TrainState, clock: budget.StepClock, deadline: float, now: float) -> None:
        """Sizes the run to the time left (`training.budget`), from rank 0's clock on every rank:
        the total steps (the evaluations follow it) and, the first time, the warm-up."""
        rate = clock.seconds_per_step(state.step, now) or 0.0
        evals_left = budget.EVALUATIONS - 1 - self.planned_evaluations
        # A validation is a forward pass (a third of a step) over --val-blocks sequences.
        eval_cost = self.evaluator.blocks.shape[0] / max(1, self.global_batch) / 3
        total = budget.plan_total(
            step=state.step,
            seconds_per_step=rate,
            seconds_left=deadline - now,
            max_steps=self.args.max_steps,
            eval_cost_steps=eval_cost,
            evals_left=max(0, evals_left),
        )
        (total_f,) = self.dist.all_reduce([float(total) if self.dist.is_main else 0.0])
        total = int(total_f)
        schedule = cast(Schedule, self.scheduler.lr_lambdas[0])  # one object for all groups
        plan = budget.first_plan(total)
        if not self.planned:
            schedule.warmup = min(plan.warmup_steps, total - 1)
            self.planned = True
        schedule.total = total
        self.total_steps = total
        self.metrics.emit(
            "plan",
            step=state.step,
            total_steps=total,
            warmup_steps=schedule.warmup,
            eval_every=plan.eval_every,
            seconds_per_step=round(rate, 4),
        )

    def train_step(self, state: TrainState) -> tuple[float, float]:
        """One optimizer step on the next global batch; returns this rank's loss and the
        gradient norm before clipping (NaN when clipping is off)."""
        blocks = state.data.next_blocks(self.global_batch)
        loss = self.forward_backward(blocks)
        if self.args.grad_clip > 0:
            grad_norm = self.parallel.clip_grad_norm(self.trainable, self.args.grad_clip)
        else:
            grad_norm = float("nan")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += self.tokens_per_step
        return loss, grad_norm

    def forward_backward(self, blocks: Tensor) -> float:
        """Forward and backward over this rank's micro-batches of the global batch `blocks`,
        gradients accumulated (and synchronised across ranks on the last); returns the loss."""
        micro, accum = self.args.micro_batch_size, self.args.grad_accum
        total = 0.0
        for a in range(accum):
            # Micro-batch a of rank r is the global batch's slice a * world + r: the same
            # sequences meet in each optimizer step whatever the split between accumulation
            # and ranks.
            start = (a * self.dist.world + self.dist.rank) * micro
            b = blocks[start : start + micro].to(self.dist.device, non_blocking=True)
            with self.parallel.accumulating(self.wrapped, last=a == accum - 1):
                with self.autocast.autocast():
                    loss = batch_loss(self.wrapped, b, document_end=self.document_end) / accum
                loss.backward()
            total += loss.item()
        return total

    # -- what the loop calls beside the step --------------------------------------------------

    def validate(self, state: TrainState) -> None:
        loss = self.evaluator.evaluate(self.wrapped)
        self.validated_at = state.step
        if loss is not None:
            self.last_val_loss = loss
            self.metrics.val(state, loss)

    def register(self, state: TrainState) -> None:
        """Registers the exported model as a registry version pending approval, when a group
        is named; a failure raises RegistrationError (a TrainError) saying what to fix."""
        target = self.registry_target
        if target is None:
            return
        args = self.args
        artifact = os.environ.get(TrainerEnv.MODEL_ARTIFACT) if self.sm else self.artifact
        if not artifact:
            raise registry.RegistrationError(
                f"registering in {target.group} needs the S3 URI SageMaker writes the model "
                f"to: set ${TrainerEnv.MODEL_ARTIFACT} (`kiln train` sets it)"
            )
        run = registry.RunRecord(
            job=args.job_name,
            artifact=artifact,
            data=os.environ.get(TrainerEnv.DATA_URI) or str(args.data),
            steps=state.step,
            tokens=state.tokens,
            val_loss=self.last_val_loss,
            hyperparameters=registry.hyperparameters(vars(args), getattr(args, "defaults", {})),
        )
        try:
            import boto3

            client = boto3.client("sagemaker", region_name=registry.region_of(target.group))
        except Exception as err:  # no region configured, most often
            raise registry.RegistrationError(
                f"cannot create a SageMaker client to register in {target.group}: {err}; set "
                "AWS_REGION (or name the group by ARN), or unset the group to skip registration"
            ) from err
        arn = registry.register(run, target, client)
        self.metrics.emit("registered", step=state.step, model_package=arn, group=target.group)

    def save_checkpoint(self, state: TrainState) -> None:
        where = self.checkpointer.save(state)
        if where is not None:
            self.metrics.checkpoint(state, where)

    def describe(self, state: TrainState) -> dict[str, Any]:
        """The `start` event's fields: the run's shape, where its data is, what it starts from."""
        args = self.args
        return {
            "step": state.step,
            "world_size": self.dist.world,
            "device": str(self.dist.device),
            "precision": self.precision.name,
            "ops": args.ops,
            "kernels_compiled": _kernels_compiled(args.ops),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "trainable_parameters": sum(p.numel() for p in self.trainable),
            "strategy": self.parallel.name,
            "activation_checkpointing": bool(args.activation_checkpointing),
            "pack_mask": args.pack_mask,
            "checkpoint_format": self.checkpoint_format,
            "weights_loaded_by": "rank 0, broadcast" if self.rank0_load else "every rank",
            "init_from": args.init_from,
            "lora": None
            if self.lora is None
            else {**dataclasses.asdict(self.lora), "frozen_dtype": str(self.frozen_dtype)[6:]},
            "tokenizer": type(self.tokenizer).__name__,
            "model": args.model_config.to_dict(),
            "data": self.source.describe(),
            "train_segments": len(self.corpus.train),
            "val_segments": len(self.corpus.val),
            "train_tokens": self.corpus.train_tokens,
            "global_batch_sequences": self.global_batch,
            "tokens_per_step": self.tokens_per_step,
        }

    def export(self, state: TrainState) -> None:
        """Writes the model directory (and model.tar.gz) the inference server loads: the
        weights gathered from every rank (a collective), written by rank 0; with LoRA the
        adapters merged in, and kept alone in `adapter/` beside it."""
        weights = self.full_state_dict()
        if not self.dist.is_main:
            return
        args, step, cfg = self.args, state.step, self.args.model_config
        adapter: dict[str, Tensor] = {}
        if self.lora is not None:
            weights, adapter = lora.merge(weights, cfg, self.lora)
        model = plain_model(cfg, weights)
        info = {"job_name": args.job_name, "step": step, "tokens": state.tokens, "seed": args.seed}
        if args.init_from:
            info["init_from"] = args.init_from
        dtype = self.save_dtype()

        def write(directory: Path) -> None:
            save_model_dir(model, self.tokenizer, directory, dtype=dtype, training=info)
            if self.init_dir and (self.init_dir / CHAT_TEMPLATE_FILE).is_file():
                shutil.copyfile(self.init_dir / CHAT_TEMPLATE_FILE, directory / CHAT_TEMPLATE_FILE)
            if self.tracker is not None:
                self.tracker.log_model(directory)

        def write_adapter(directory: Path) -> Path | None:
            if self.lora is None:
                return None
            return lora.save_adapter(adapter, self.lora, directory, base=args.init_from)

        if self.sm is not None:
            # SageMaker packs /opt/ml/model into model.tar.gz itself.
            write(self.sm.model_dir)
            extra = write_adapter(self.sm.output_data_dir / ADAPTER_DIR)
            self.metrics.emit("model", step=step, path=str(self.sm.model_dir), **_adapter(extra))
            return
        if is_s3(args.output_dir):
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / "model"
                write(local)
                store = open_store(args.output_dir)
                fields: dict[str, str] = {}
                model_format = getattr(args, "model_format", "tarball")
                if model_format in ("directory", "both"):
                    # Uncompressed: the prefix `<output>/model/` is served as it is (S3Prefix
                    # model data): no tar on upload, no untar on each instance start.
                    for f in sorted(p for p in local.rglob("*") if p.is_file()):
                        store.put_file(f, f"model/{f.relative_to(local).as_posix()}")
                    fields["model_dir"] = store.describe("model/")
                if model_format != "directory":
                    store.put_file(write_tarball(local, Path(tmp) / TARBALL), TARBALL)
                if (extra := write_adapter(Path(tmp) / ADAPTER_DIR)) is not None:
                    for f in sorted(extra.iterdir()):
                        store.put_file(f, f"{ADAPTER_DIR}/{f.name}")
                    fields["adapter"] = store.describe(ADAPTER_DIR)
                path = (
                    fields["model_dir"] if model_format == "directory" else store.describe(TARBALL)
                )
                self.artifact = path
                self.metrics.emit("model", step=step, path=path, **fields)
            return
        out = Path(args.output_dir)
        write(out / "model")
        tarball = write_tarball(out / "model", out / TARBALL)
        self.artifact = str(tarball)
        extra = write_adapter(out / ADAPTER_DIR)
        self.metrics.emit(
            "model", step=step, path=str(tarball), model_dir=str(out / "model"), **_adapter(extra)
        )

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model's weights on rank 0 (gathered from the shards under FSDP)."""
        if isinstance(self.parallel, FullyShard):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return dict(get_model_state_dict(self.model, options=options))
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def save_dtype(self) -> str:
        """--save-dtype, else the dtype --init-from's weights are stored in, else float32."""
        if self.args.save_dtype:
            return str(self.args.save_dtype)
        if self.init_dir is not None:
            _, info = read_config(self.init_dir)
            if info.get("dtype") in ("bfloat16", "float16"):
                return str(info["dtype"])
        return "float32"


def _adapter(path: Path | None) -> dict[str, str]:
    return {} if path is None else {"adapter": str(path)}


def plain_model(cfg: ModelConfig, weights: dict[str, Tensor]) -> LlamaModel:
    """A bare model holding `weights` (no copy): what `save_model_dir` writes out."""
    with torch.device("meta"):
        model = LlamaModel(cfg, ops="reference")
    model.load_state_dict({k: v.detach().cpu() for k, v in weights.items()}, assign=True)
    model.rope = rope_table(cfg)  # a buffer outside the state dict
    return model.eval()


def _kernels_compiled(ops: str) -> bool:
    if ops != "kiln":
        return False
    from kernels import ops as kernel_ops

    return bool(kernel_ops.HAVE_EXTENSION)
