"""The model runner: loads a model directory into the KV-cache decoder (its paged cache sized by a
memory budget), runs a step's forward passes (prefill chunks, then one decode over the running
sequences) and samples their tokens."""

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
from inference.graphs import attention_shared_bytes, shared_memory_per_block
from inference.scheduler import Chunk, ScheduledStep
from inference.sequence import Sequence
from inference.threads import available_cpus
from modeling.artifact import load_model_dir, read_config
from modeling.attention import KVCache
from modeling.chat import ChatTemplate, ChatTemplateError
from modeling.config import ModelConfig
from modeling.served import (
    load_served,
    load_to_device,
    packed_by_module,
    resolve_weight_dtype,
    returning_scratch_to_the_os,
)
from modeling.tokenizer import (
    NOT_A_START,
    TOKENIZER_FILE,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    never_generated,
    utf8_pending,
)

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
        kv_cache_gib: float | None = None,
        block_size: int = 16,
        weight_dtype: str = "auto",
        cuda_graphs: bool | None = None,
    ) -> None:
        self.model_dir = model_dir
        # Decode through fixed per-batch-size buffers, captured as CUDA graphs on a GPU
        # (`inference.graphs`). None: on for CUDA, off on CPU (there True runs the same buffers
        # without capture: the path the CPU tests check, slower than serving's default).
        self.cuda_graphs = cuda_graphs
        self.graphs_captured = False
        # The KV cache's size; None: what `slots` sequences of max_seq_len need, at most half
        # the memory left once the weights are loaded.
        self.kv_cache_gib = kv_cache_gib
        self.block_size = block_size
        self.cache_blocks = 0
        # auto | float32 | bfloat16 | int8: the weights as served on CPU (`modeling.served`).
        self.weight_dtype = weight_dtype
        self.memory: dict[str, int] = {}
        # Caps a model's context below its max_position_embeddings (the KV cache is sized by it).
        self.max_seq_len_cap = max_seq_len
        self.slots = slots
        self.device_name = device
        # At most this many prompt tokens per forward pass (the scheduler plans chunks no longer).
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
        # Ids no choice may pick: a byte-level model's start and padding tokens and unused ids
        # (`modeling.tokenizer.never_generated`; none for a Hugging Face model).
        self.banned = torch.empty(0, dtype=torch.long)
        # Byte-level models choose only bytes that keep the text valid UTF-8 (else U+FFFD).
        self.utf8_bytes = False
        self._not_a_start = torch.empty(0, dtype=torch.long)

    # -- loading ---------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        name = self.device_name
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(name)

    def load(self, warmup: bool = True) -> None:
        started = time.monotonic()
        # Default: the CPUs this process may use (affinity, cgroup quota), not the machine's.
        torch.set_num_threads(self.threads or available_cpus())
        device = self._device()
        cfg, raw, tokenizer = read_model_files(self.model_dir, self.max_seq_len_cap)
        served = self._served_dtype(device, raw["dtype"])
        dtype = self._activation_dtype(device, raw["dtype"])
        graphs = self._fixed_buffers(device, cfg.max_seq_len)
        if device.type == "cuda":
            # The context first (its host memory is not the weights'), then the peaks from here.
            torch.cuda.mem_get_info(device)
            torch.cuda.reset_peak_memory_stats(device)
        before = process_memory().get("VmRSS", 0)
        with torch.inference_mode():
            if served is not None:
                # CPU: the matrices packed as served, from the mapped files (modeling.served).
                model, packed_weights, _ = load_served(
                    self.model_dir, served, max_seq_len=self.max_seq_len_cap
                )
                packed = packed_by_module(model, packed_weights)
            elif device.type != "cpu":
                # A GPU: tensor by tensor from the mapped files onto the device in the served
                # dtype; the host never holds the model (modeling.served.load_to_device).
                model, _ = load_to_device(
                    self.model_dir, device, dtype, max_seq_len=self.max_seq_len_cap
                )
                packed = None
            else:
                model, _ = load_model_dir(self.model_dir, max_seq_len=self.max_seq_len_cap)
                packed = None
            # Sized once the weights are loaded: what memory is left is known then.
            self.cache_blocks = self._cache_blocks(cfg, device, dtype)
            self.decoder = Decoder(
                model,
                slots=self.slots,
                device=device,
                dtype=dtype,
                blocks=self.cache_blocks,
                block_size=self.block_size,
                packed=packed,
                graphs=graphs,
            )
        del model
        self.tokenizer = tokenizer
        self.banned = torch.tensor(never_generated(tokenizer, cfg.vocab_size), dtype=torch.long)
        self.utf8_bytes = isinstance(tokenizer, ByteTokenizer)
        self._not_a_start = torch.tensor(NOT_A_START, dtype=torch.long, device=device)
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
            "cuda_graphs": False,  # decode steps captured (below)
            "training": raw.get("training", {}),
        }
        # The check's outputs at each row count (the head's: [rows, vocab] float32) and the
        # warm-up's logits would stay in malloc's heap, fragmented, resident and free (49 MiB for
        # a 128k vocabulary at 32 rows, measured), and the peak would carry both: large blocks
        # are mapped and unmapped on their own here, and what is free is trimmed after.
        with returning_scratch_to_the_os():
            with torch.inference_mode():
                self.batch_invariant = self.decoder.check_invariance()
            if warmup:
                self._warm_up()
        if not self.batch_invariant:
            log.warning(
                "decode projections are not batch-invariant on this device: greedy output may "
                "differ in the last bits between a request alone and in a batch"
            )
        if graphs:
            # After check_invariance (it may replace the projections the graphs call).
            with torch.inference_mode():
                self.graphs_captured = self.decoder.capture_graphs()
            self.model_info["cuda_graphs"] = self.graphs_captured
        self.memory = memory_figures(self.decoder, rss_before_weights=before)
        log.info("memory: %s", memory_line(self.memory, self.model_info["weight_dtype"]))
        log.info(
            "model loaded from %s in %.2f s: %d layers, hidden %d, %s on %s, batch %d, "
            "KV cache %.1f MiB (%d blocks of %d tokens: %d tokens, %.1f sequences of %d)",
            self.model_dir,
            time.monotonic() - started,
            cfg.num_layers,
            cfg.hidden_size,
            self.model_info["dtype"],
            device,
            self.slots,
            self.decoder.cache_bytes() / 2**20,
            self.cache_blocks,
            self.block_size,
            self.cache_blocks * self.block_size,
            self.cache_blocks * self.block_size / cfg.max_seq_len,
            cfg.max_seq_len,
        )

    def _cache_blocks(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> int:
        """Blocks of the KV cache: the budget given, else what `slots` sequences of max_seq_len
        need, capped at half the memory available now (the weights are loaded); at least one
        max_seq_len sequence's worth, or a ModelLoadError saying what to change."""
        per_block = KVCache.block_bytes(cfg, self.block_size, dtype)
        per_seq = -(-cfg.max_seq_len // self.block_size)
        if self.kv_cache_gib is not None:
            blocks = int(self.kv_cache_gib * 2**30 // per_block)
            source = f"--kv-cache-gib {self.kv_cache_gib:g}"
        else:
            available = available_memory(device)
            blocks = min(self.slots * per_seq, int(available // 2 // per_block))
            source = f"half the {available / 2**30:.1f} GiB of memory available"
        if blocks < per_seq:
            need = per_seq * per_block / 2**30
            raise ModelLoadError(
                f"the KV cache ({source}) holds {blocks * self.block_size} tokens, fewer than "
                f"one sequence of the context served ({cfg.max_seq_len} tokens, {need:.3f} GiB): "
                "raise --kv-cache-gib (KILN_KV_CACHE_GIB) or lower --max-seq-len"
            )
        return blocks

    def _activation_dtype(self, device: torch.device, stored: str | None) -> torch.dtype:
        """float32 activations on CPU (the packed weights widen to it, bit-exact batching). On
        a GPU the weights' own dtype, where bf16/fp16 halve the memory traffic of decode: the
        saved one for auto, else the one asked for."""
        if device.type != "cuda":
            return torch.float32
        if self.weight_dtype == "auto":
            saved = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(stored or "")
            return torch.float32 if saved is None else saved
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.weight_dtype]

    def _fixed_buffers(self, device: torch.device, max_seq_len: int) -> bool:
        """Whether decode runs through fixed buffers (and CUDA graphs on a GPU): the flag, by
        default on for CUDA. It needs kiln's paged attention kernel for the device and, on a
        GPU, room in a thread block's shared memory for a full-length sequence's scores (the
        captured step's tables are full-length). Where either is missing, asked for: a
        ModelLoadError saying what to change; by default: off, with a warning."""
        from kernels import ops

        wanted = device.type == "cuda" if self.cuda_graphs is None else self.cuda_graphs
        if not wanted:
            return False
        kernel = ops.HAVE_CUDA_KERNELS if device.type == "cuda" else ops.HAVE_CPU_DECODE_OPS
        if not kernel:
            reason = "kiln's paged attention kernel is missing: " + (
                ops.UNAVAILABLE_REASON or "the extension was built without CUDA kernels"
            )
            fix = "build the kernels"
        elif device.type == "cuda" and not self._scores_fit(device, max_seq_len):
            need = attention_shared_bytes(max_seq_len, self.block_size)
            have = shared_memory_per_block(device)
            longest = (have // 4 - 32) // self.block_size * self.block_size
            reason = (
                f"the paged attention kernel holds a sequence's scores in shared memory: a "
                f"context of {max_seq_len} needs {need // 1024} KiB, {device} has "
                f"{have // 1024} KiB per block"
            )
            fix = f"lower --max-seq-len to {longest} or less"
        else:
            if device.type != "cuda":
                log.info("--cuda-graphs on %s: decode runs the fixed buffers, uncaptured", device)
            return True
        if self.cuda_graphs:
            raise ModelLoadError(f"--cuda-graphs: {reason} ({fix}, or pass --no-cuda-graphs)")
        log.warning("decode CUDA graphs off: %s (%s to capture them)", reason, fix)
        return False

    def _scores_fit(self, device: torch.device, max_seq_len: int) -> bool:
        need = attention_shared_bytes(max_seq_len, self.block_size)
        return need <= shared_memory_per_block(device)

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
            raise ModelLoadError(
                f"--weight-dtype int8 is served on CPU only, not {device}: pass --weight-dtype "
                "bfloat16 (or auto, float32) on a GPU, or --device cpu for int8"
            )
        return None

    def _warm_up(self) -> None:
        """Runs every code path once: prefill, decode at each padded row count, sampling."""
        assert self.decoder is not None
        with torch.inference_mode():
            prompt = torch.zeros(min(16, self.max_seq_len - 2), dtype=torch.long)
            table = list(range(-(-(len(prompt) + 1) // self.block_size)))
            logits = self.decoder.prefill(table, prompt)
            slots = self.slots
            for rows in sorted({1, slots, *(r for r in self.decoder.buckets if r <= slots)}):
                logits = self.decoder.decode([table] * rows, [len(prompt)] * rows, [0] * rows)
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
        """Prefills this step's chunks (a failure fails that sequence), then one decode step for
        the decoding ones (a failure, a bug or memory, fails them all, not the server)."""
        assert self.decoder is not None
        out = RunnerOutput()
        for chunk in step.prefill:
            seq = chunk.sequence
            if seq in out.failed:
                continue
            try:
                token = self._prefill(chunk)
            except Exception:
                log.exception("prefill failed for request %d", seq.id)
                out.failed.append(seq)
                continue
            if token is not None:
                out.sampled.append((seq, token))
        if step.decode:
            running = step.decode
            try:
                logits = self.decoder.decode(
                    [s.blocks for s in running],
                    [s.position for s in running],
                    [s.tokens[-1] for s in running],
                )
                tokens = self._choose(running, logits)
            except Exception:
                log.exception("decode step failed; failing %d requests", len(running))
                out.failed.extend(running)
            else:
                self.steps += 1
                for seq in running:
                    seq.computed = seq.position + 1
                out.sampled.extend(zip(running, tokens, strict=True))
        return out

    def _prefill(self, chunk: Chunk) -> int | None:
        """Computes a chunk; at the sequence's last, returns its next token."""
        assert self.decoder is not None
        seq, step = chunk.sequence, self.prefill_chunk
        ids = torch.tensor(seq.all_tokens[chunk.start : chunk.end], dtype=torch.long)
        for start in range(0, len(ids), step):
            at = chunk.start + start
            logits = self.decoder.prefill(seq.blocks, ids[start : start + step], at)
        seq.computed = chunk.end
        seq.prefilled_tokens += chunk.end - chunk.start
        if not chunk.last:
            return None
        seq.target = 0
        if seq.params.temperature > 0 and seq.generator is None:
            seed = seq.params.seed
            if seed is None:
                seed = int.from_bytes(os.urandom(8), "little") >> 1
            seq.generator = torch.Generator().manual_seed(seed)
        token = self._choose([seq], logits.unsqueeze(0))[0]
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        return token

    def _keep_utf8(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Masks, row by row, the bytes that would make the text invalid UTF-8: a continuation
        byte where a character starts, anything else (the end included) inside a character."""
        for row, seq in zip(logits, seqs, strict=True):
            tail = (seq.prompt[-4:] + seq.tokens[-4:])[-4:]
            pending = utf8_pending(tail)
            if pending is None:
                row.index_fill_(0, self._not_a_start, float("-inf"))
            else:
                low, high = pending
                row[:low] = float("-inf")
                row[high + 1 :] = float("-inf")

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        if self.banned.numel():
            # The decoder hands out fresh logits each step: masking them in place is safe.
            logits.index_fill_(-1, self.banned.to(logits.device), float("-inf"))
        if self.utf8_bytes:
            self._keep_utf8(seqs, logits)
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


def available_memory(device: torch.device) -> int:
    """Bytes of memory free for the KV cache on `device` now: on CPU the host's available
    memory, or less where the container's cgroup limit leaves less."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # cgroup v2: a container's limit and what it uses now
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            return max(0, min(host, int(limit) - used))
    except (OSError, ValueError):
        pass
    return host


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


def memory_figures(decoder: Decoder, rss_before_weights: int = 0) -> dict[str, int]:
    """Weights as served, the KV cache, and the process's resident memory (now, at its peak, and
    before the weights were loaded), in bytes; on a GPU also its memory allocated now and at its
    peak since the load began (`torch.cuda.max_memory_allocated`)."""
    proc = process_memory()
    out = {
        "weights": decoder.weight_bytes(),
        "kv_cache": decoder.cache_bytes(),
        "rss": proc.get("VmRSS", 0),
        "peak_rss": proc.get("VmHWM", 0),
        "rss_before_weights": rss_before_weights,
    }
    if decoder.device.type == "cuda":
        out["gpu_allocated"] = torch.cuda.memory_allocated(decoder.device)
        out["gpu_peak"] = torch.cuda.max_memory_allocated(decoder.device)
    return out


# The bound on peak memory: 1.1 x the weights as served + the KV cache + this.
BOUND_SLACK = 300 * 2**20


def memory_bound(m: dict[str, int]) -> tuple[str, int, int]:
    """What the bound applies to, its measure and the bound: 1.1 x weights + KV cache + 300 MiB
    against the GPU's peak allocation where the model is on a GPU (the weights and cache live
    there; the host holds the process and about one tensor while loading), else the peak RSS."""
    bound = int(1.1 * m["weights"] + m["kv_cache"] + BOUND_SLACK)
    if "gpu_peak" in m:
        return "GPU peak allocated", m["gpu_peak"], bound
    return "peak RSS", m["peak_rss"], bound


def memory_line(m: dict[str, int], weight_dtype: str) -> str:
    """One line: weights (their dtype), KV cache, on a GPU its peak allocation, RSS now and at
    peak, in MiB; then the bound, within or over."""
    mib = 2**20
    gpu = "gpu_peak" in m
    where = " on the GPU" if gpu else ""
    line = (
        f"weights {m['weights'] / mib:.1f} MiB ({weight_dtype}){where}, KV cache "
        f"{m['kv_cache'] / mib:.1f} MiB{where}, "
    )
    if gpu:
        line += (
            f"GPU allocated {m['gpu_allocated'] / mib:.1f} MiB, peak "
            f"{m['gpu_peak'] / mib:.1f} MiB; host "
        )
    line += f"RSS {m['rss'] / mib:.1f} MiB, peak RSS {m['peak_rss'] / mib:.1f} MiB"
    if m.get("rss_before_weights"):
        line += f" ({m['rss_before_weights'] / mib:.1f} MiB before the weights)"
    what, measured, bound = memory_bound(m)
    over = (measured - bound) / mib
    verdict = "within" if over <= 0 else f"over by {over:.1f} MiB:"
    return (
        f"{line}; {what} {verdict} 1.1 x weights + KV cache + {BOUND_SLACK // mib} MiB = "
        f"{bound / mib:.1f} MiB"
    )
