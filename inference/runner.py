"""The model runner: loads a model directory into the KV-cache decoder, runs a step's forward
passes (prefills, then one decode over the running sequences) and samples their tokens."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from inference import sampling
from inference.decoder import Decoder
from inference.scheduler import ScheduledStep
from inference.sequence import Sequence
from modeling.artifact import load_model_dir, read_config
from modeling.chat import ChatTemplate, ChatTemplateError
from modeling.config import ModelConfig
from modeling.served import load_served, packed_by_module, resolve_weight_dtype
from modeling.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model directory that cannot be served; the message names the file at fault."""


def read_model_files(
    model_dir: Path, max_seq_len: int | None = None
) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    """The config, what else the directory says (`modeling.artifact.read_config`) and the
    tokenizer, after checking that the weights open, naming the bad file."""
    cfg, info = read_config(model_dir, max_seq_len=max_seq_len)  # ArtifactError names the file
    tokenizer_file = model_dir / TOKENIZER_FILE
    try:
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{tokenizer_file}: {type(err).__name__}: {err}") from err
    for name in info["weights"]:
        weights = model_dir / name
        try:
            with safe_open(str(weights), framework="pt") as f:
                names = set(f.keys())
        except Exception as err:
            raise ModelLoadError(f"{weights}: {type(err).__name__}: {err}") from err
        if not names:
            raise ModelLoadError(f"{weights} holds no tensors")
    return cfg, info, tokenizer


@dataclass(slots=True)
class RunnerOutput:
    """The tokens a step sampled, in order (a prefilled sequence's first token before the decode
    step's), and the sequences whose forward failed."""

    sampled: list[tuple[Sequence, int]] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)


class ModelRunner:
    """The forward passes through the `Decoder` and the choice of each next token."""

    def __init__(
        self,
        model_dir: Path,
        *,
        slots: int,
        device: str = "auto",
        prefill_chunk: int = 512,
        threads: int | None = None,
        max_seq_len: int | None = None,
        weight_dtype: str = "auto",
    ) -> None:
        self.model_dir = model_dir
        # auto | float32 | bfloat16 | int8: the weights as served on CPU (`modeling.served`).
        self.weight_dtype = weight_dtype
        self.memory: dict[str, int] = {}
        # Caps a model's context below its max_position_embeddings (the KV cache is sized by it).
        self.max_seq_len_cap = max_seq_len
        self.slots = slots
        self.device_name = device
        # Prompts are prefilled in chunks of this many tokens: bounds the attention scratch memory.
        self.prefill_chunk = prefill_chunk
        self.threads = threads
        self.decoder: Decoder | None = None
        self.tokenizer: Tokenizer | None = None
        # The model's chat template (None without one), or why it cannot be used.
        self.chat_template: ChatTemplate | None = None
        self.chat_template_error: str | None = None
        self.max_seq_len = 0
        self.vocab_size = 0
        self.model_info: dict[str, Any] = {}
        self.batch_invariant: bool | None = None
        self.steps = 0  # decode steps run

    # -- loading ---------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        name = self.device_name
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(name)

    def load(self, warmup: bool = True) -> None:
        started = time.monotonic()
        if self.threads:
            torch.set_num_threads(self.threads)
        device = self._device()
        cfg, raw, tokenizer = read_model_files(self.model_dir, self.max_seq_len_cap)
        served = self._served_dtype(device, raw["dtype"])
        # float32 activations on CPU (bit-exact batching); the saved dtype on GPUs, where
        # bf16/fp16 halve the memory traffic of decode.
        saved = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(raw["dtype"] or "")
        dtype = saved if device.type == "cuda" and saved is not None else torch.float32
        with torch.inference_mode():
            if served is not None:
                # CPU: the matrices packed as served, from the mapped files (modeling.served).
                model, packed, _ = load_served(
                    self.model_dir, served, max_seq_len=self.max_seq_len_cap
                )
                self.decoder = Decoder(
                    model,
                    slots=self.slots,
                    device=device,
                    dtype=dtype,
                    packed=packed_by_module(model, packed),
                )
            else:
                model, _ = load_model_dir(self.model_dir, max_seq_len=self.max_seq_len_cap)
                self.decoder = Decoder(model, slots=self.slots, device=device, dtype=dtype)
        del model
        self.tokenizer = tokenizer
        try:
            self.chat_template = ChatTemplate.load(self.model_dir)
        except ChatTemplateError as err:
            # The model still serves plain prompts; messages requests say why they cannot.
            self.chat_template_error = str(err)
            log.warning("chat requests will be refused: %s", err)
        self.max_seq_len = cfg.max_seq_len
        self.vocab_size = cfg.vocab_size
        self.model_info = {
            "config": cfg.to_dict(),
            "model_type": raw["model_type"],
            "dtype": str(dtype).removeprefix("torch."),
            "weight_dtype": served or str(dtype).removeprefix("torch."),
            "device": str(device),
            "training": raw.get("training", {}),
        }
        with torch.inference_mode():
            self.batch_invariant = self.decoder.check_invariance()
        if not self.batch_invariant:
            log.warning(
                "decode projections are not batch-invariant on this device: greedy output may "
                "differ in the last bits between a request alone and in a batch"
            )
        if warmup:
            self._warm_up()
        self.memory = memory_figures(self.decoder)
        log.info("memory: %s", memory_line(self.memory, self.model_info["weight_dtype"]))
        log.info(
            "model loaded from %s in %.2f s: %d layers, hidden %d, %s on %s, %d slots, "
            "KV cache %.1f MiB",
            self.model_dir,
            time.monotonic() - started,
            cfg.num_layers,
            cfg.hidden_size,
            self.model_info["dtype"],
            device,
            self.slots,
            self.decoder.cache_bytes() / 2**20,
        )

    def _served_dtype(self, device: torch.device, stored: str | None) -> str | None:
        """The packed weight dtype on CPU with kiln's kernels; None for the plain model (GPU, no
        kernels), which serves float32 or bfloat16/int8 not at all (ModelLoadError says why)."""
        try:
            served = resolve_weight_dtype(self.weight_dtype, stored)
        except ValueError as err:
            raise ModelLoadError(str(err)) from err
        from kernels import ops

        if device.type == "cpu" and ops.HAVE_CPU_DECODE_OPS:
            return served
        if self.weight_dtype in ("bfloat16", "int8") and device.type == "cpu":
            raise ModelLoadError(
                f"--weight-dtype {self.weight_dtype} needs kiln's CPU kernels, which are not "
                f"loaded: {ops.UNAVAILABLE_REASON}"
            )
        if self.weight_dtype == "int8":
            raise ModelLoadError(f"--weight-dtype int8 is served on CPU only, not {device}")
        return None

    def _warm_up(self) -> None:
        """Runs every code path once: prefill, decode at each padded row count, sampling."""
        assert self.decoder is not None
        with torch.inference_mode():
            prompt = torch.zeros(min(16, self.max_seq_len - 2), dtype=torch.long)
            logits = self.decoder.prefill(0, prompt)
            slots = self.slots
            for rows in sorted({1, slots, *(r for r in self.decoder.buckets if r <= slots)}):
                logits = self.decoder.decode(list(range(rows)), [len(prompt)] * rows, [0] * rows)
            sampling.greedy(logits)
            gens = [torch.Generator().manual_seed(0) for _ in range(rows)]
            sampling.sample(
                logits,
                temperatures=[1.0] * rows,
                top_ks=[5] * rows,
                top_ps=[0.9] * rows,
                generators=gens,
            )

    # -- a step ----------------------------------------------------------------------------------

    def run(self, step: ScheduledStep) -> RunnerOutput:
        """Prefills the admitted sequences (a failure fails that one), then one decode step for
        the running ones (a failure, a bug or memory, fails them all, not the server)."""
        assert self.decoder is not None
        out = RunnerOutput()
        for seq in step.prefill:
            try:
                token = self._prefill(seq)
            except Exception:
                log.exception("prefill failed for request %d", seq.id)
                out.failed.append(seq)
                continue
            out.sampled.append((seq, token))
        if step.decode:
            running = step.decode
            try:
                logits = self.decoder.decode(
                    [s.slot for s in running],
                    [s.position for s in running],
                    [s.tokens[-1] for s in running],
                )
                tokens = self._choose(running, logits)
            except Exception:
                log.exception("decode step failed; failing %d requests", len(running))
                out.failed.extend(running)
            else:
                self.steps += 1
                out.sampled.extend(zip(running, tokens, strict=True))
        return out

    def _prefill(self, seq: Sequence) -> int:
        assert self.decoder is not None
        chunk = self.prefill_chunk
        ids = torch.tensor(seq.prompt, dtype=torch.long)
        for start in range(0, len(seq.prompt), chunk):
            logits = self.decoder.prefill(seq.slot, ids[start : start + chunk], start)
        if seq.params.temperature > 0:
            seed = seq.params.seed
            if seed is None:
                seed = int.from_bytes(os.urandom(8), "little") >> 1
            seq.generator = torch.Generator().manual_seed(seed)
        token = self._choose([seq], logits.unsqueeze(0))[0]
        seq.first_token_at = time.monotonic()
        return token

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        greedy_rows = [i for i, s in enumerate(seqs) if s.params.temperature == 0]
        if len(greedy_rows) == len(seqs):
            return sampling.greedy(logits)
        tokens = [0] * len(seqs)
        if greedy_rows:
            for i, t in zip(greedy_rows, sampling.greedy(logits[greedy_rows]), strict=True):
                tokens[i] = t
        sampled_rows = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
        picked = sampling.sample(
            logits[sampled_rows],
            temperatures=[seqs[i].params.temperature for i in sampled_rows],
            top_ks=[seqs[i].params.top_k for i in sampled_rows],
            top_ps=[seqs[i].params.top_p for i in sampled_rows],
            generators=[seqs[i].generator for i in sampled_rows],  # type: ignore[misc]
        )
        for i, t in zip(sampled_rows, picked, strict=True):
            tokens[i] = t
        return tokens


def process_memory() -> dict[str, int]:
    """This process's resident memory now and at its peak (VmRSS, VmHWM), in bytes (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def memory_figures(decoder: Decoder) -> dict[str, int]:
    """Weights as served, the KV cache, and the process's resident memory, in bytes."""
    proc = process_memory()
    return {
        "weights": decoder.weight_bytes(),
        "kv_cache": decoder.cache_bytes(),
        "rss": proc.get("VmRSS", 0),
        "peak_rss": proc.get("VmHWM", 0),
    }


def memory_line(m: dict[str, int], weight_dtype: str) -> str:
    """One line: weights (their dtype), KV cache, RSS now and at peak, in MiB."""
    mib = 2**20
    return (
        f"weights {m['weights'] / mib:.1f} MiB ({weight_dtype}), KV cache "
        f"{m['kv_cache'] / mib:.1f} MiB, RSS {m['rss'] / mib:.1f} MiB, peak RSS "
        f"{m['peak_rss'] / mib:.1f} MiB"
    )
