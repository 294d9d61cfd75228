"""Training speed and memory against what a team would otherwise run: `python -m training.bench`.

Three measurements, each variant in a fresh child process (its own memory high-water mark, no
model of another variant resident), printed as one table of ratios:

1. Speed: a fine-tuning step (forward, backward, AdamW) on a SmolLM2-360M-shaped model (random
   weights from `transformers`, its 49152-token vocabulary) under bf16 autocast where the CPU has
   bf16 instructions: kiln eager (fused loss, and for comparison the loss from full logits) and
   kiln under torch.compile, against `transformers`' `LlamaForCausalLM` step on the same batch.
2. Memory: the peak of that step with a 128k vocabulary (Llama-3.2-1B's width and vocabulary;
   fewer layers, so that its weights and AdamW states fit this machine): the process's resident
   high-water mark during one step above what it held before (weights and optimizer states).
3. FSDP vs DDP: 2 processes under torchrun (gloo), training's own strategies
   (`training.parallel`): step time and, per process, peak memory and the bytes of parameters,
   gradients and optimizer states it holds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.parallel import compile_blocks

SMOLLM2_360M = {
    "hidden_size": 960,
    "intermediate_size": 2560,
    "num_hidden_layers": 32,
    "num_attention_heads": 15,
    "num_key_value_heads": 5,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
LLAMA_32_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
SHAPES = {"smollm2-360m": SMOLLM2_360M, "llama-3.2-1b": LLAMA_32_1B}

# name: (implementation, torch.compile, fused loss)
VARIANTS: dict[str, tuple[str, bool, bool]] = {
    "transformers": ("transformers", False, False),
    "kiln eager, logits loss": ("kiln", False, False),
    "kiln eager": ("kiln", False, True),
    "kiln compiled": ("kiln", True, True),
}
IGNORE = -100


# ------------------------------------------------------------------------------------------------
# the models and their steps


def hf_config(shape: str, layers: int | None) -> Any:
    from transformers import LlamaConfig

    fields = dict(SHAPES[shape])
    if layers:
        fields["num_hidden_layers"] = layers
    return LlamaConfig(**fields, attn_implementation="sdpa")


def build(impl: str, shape: str, layers: int | None) -> torch.nn.Module:
    """The model of `impl`, the same random weights for both (transformers' initialization)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config(shape, layers))
    if impl == "transformers":
        return hf.train()
    from modeling import hf as hf_names
    from modeling.model import LlamaModel
    from modeling.rope import rope_table

    cfg = hf_names.config_from_hf(hf.config.to_dict(), max_seq_len=4096)
    theirs = hf.state_dict()
    with torch.device("meta"):
        model = LlamaModel(cfg)
    state = {
        name: torch.cat([theirs[s] for s in sources])
        for name, sources in hf_names.tensor_sources(cfg).items()
    }
    del hf, theirs
    model.load_state_dict(state, assign=True)
    model.rope = rope_table(cfg)  # a buffer outside the state dict
    return model.train()


def make_step(
    impl: str, compiled: bool, fused: bool, model: torch.nn.Module, batch: torch.Tensor, bf16: bool
) -> Callable[[], float]:
    """One optimizer step on `batch` [B, T]: the loss of predicting each next token."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    targets = F.pad(batch[:, 1:], (0, 1), value=IGNORE)  # transformers shifts its labels alike
    fn: Any = model
    if compiled and impl == "transformers":
        fn = torch.compile(model)
    elif compiled:
        compile_blocks(model)  # as training's --compile does

    def loss() -> torch.Tensor:
        if impl == "transformers":
            return fn(input_ids=batch, labels=batch).loss  # type: ignore[no-any-return]
        if fused:
            return fn(batch, targets=targets)  # type: ignore[no-any-return]
        logits = fn(batch)
        return F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
        )

    def step() -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            value = loss()
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(value.detach())

    return step


def bf16_available() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


# ------------------------------------------------------------------------------------------------
# memory of this process


def _status(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024 if match else 0


def _settle() -> None:
    """Hands freed heap back to the OS, so the resident size counts only live memory."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM (the resident high-water mark) to VmRSS.
    Path("/proc/self/clear_refs").write_text("5")


# ------------------------------------------------------------------------------------------------
# the child processes


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One variant, alone in this process: warm-up steps, then timed steps, or one measured step."""
    impl, compiled, fused = VARIANTS[args.variant]
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = build(impl, args.shape, args.layers)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(
        0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq_len), generator=gen
    )  # type: ignore[call-overload]
    step = make_step(impl, compiled, fused, model, batch, args.bf16)
    start = time.perf_counter()
    first = step()
    warm_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    out: dict[str, Any] = {"variant": args.variant, "first_loss": first, "warmup_s": warm_s}
    if args.measure == "memory":
        _settle()
        before = _status("VmRSS")
        _reset_peak()
        step()
        out["peak_delta"] = _status("VmHWM") - before
        out["resident_before"] = before
        return out
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    out["step_s"] = statistics.median(times)
    out["tokens"] = args.batch * args.seq_len
    return out


def run_child(extra: list[str], threads: int) -> dict[str, Any]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads) if threads else env.get("OMP_NUM_THREADS", "")
    if not env["OMP_NUM_THREADS"]:
        del env["OMP_NUM_THREADS"]
    proc = subprocess.run(
        [sys.executable, "-m", "training.bench", "--worker", *extra],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {extra} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def dist_worker(args: argparse.Namespace) -> None:
    """Under torchrun: training's DDP or FSDP strategy on one model, timed steps, then this
    rank's peak memory and its parameter, gradient and optimizer bytes (rank 0 prints all)."""
    from training.parallel import DataParallel, Distributed, FullyShard

    torch.set_num_threads(1)
    dist = Distributed.from_env("cpu")
    dist.init()
    model = build("kiln", args.shape, args.layers)
    bf16 = args.bf16
    strategy = FullyShard(dist, bf16=bf16) if args.strategy == "fsdp" else DataParallel(dist)
    wrapped = strategy.wrap(model)
    gen = torch.Generator().manual_seed(1 + dist.rank)
    vocab = SHAPES[args.shape]["vocab_size"]
    batch = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen)
    targets = F.pad(batch[:, 1:], (0, 1), value=IGNORE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    # FSDP computes in bf16 through its mixed-precision policy; DDP through autocast.
    autocast = bf16 and args.strategy == "ddp"

    def step() -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = wrapped(batch, targets=targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    _settle()
    before = _status("VmRSS")
    _reset_peak()
    times = []
    for _ in range(args.steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _status("VmHWM")

    def local_bytes(t: torch.Tensor) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t
        return int(local.numel() * local.element_size())

    params = list(model.parameters())
    param_bytes = sum(local_bytes(p) for p in params)
    grad_bytes = param_bytes  # a step's gradients: one per parameter, the same layout
    optim_bytes = sum(local_bytes(v) for s in opt.state.values() for v in s.values() if v.dim() > 0)
    mine = {
        "step_s": statistics.median(times),
        "peak": peak,
        "peak_delta": peak - before,
        "state_bytes": param_bytes + grad_bytes + optim_bytes,
    }
    everyone = dist.all_gather_object(mine)
    if dist.is_main:
        print(json.dumps(everyone))
    dist.close()


def run_dist(strategy: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(29500 + os.getpid() % 1000),
        "-m", "training.bench", "--dist-worker", "--strategy", strategy,
        "--shape", "smollm2-360m", "--layers", str(args.dist_layers),
        "--batch", str(args.dist_batch), "--seq-len", str(args.seq_len),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
        *(["--bf16"] if args.bf16 else []),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {strategy} failed:\n{proc.stderr[-3000:]}")
    result: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------------------------------------
# the table


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="sequences per step (speed)")
    p.add_argument("--layers", type=int, default=0, help="speed model's layers; 0: the shape's")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compiles) first")
    p.add_argument("--memory-layers", type=int, default=2, help="128k-vocab model's layers")
    p.add_argument("--memory-seq-len", type=int, default=512)
    p.add_argument("--memory-batch", type=int, default=4)
    p.add_argument("--dist-layers", type=int, default=4, help="FSDP/DDP model's layers")
    p.add_argument("--dist-batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument(
        "--only", default="speed,memory,dist", help="comma-separated: speed, memory, dist"
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    # the child processes' own flags
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dist-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default="smollm2-360m", help=argparse.SUPPRESS
    )
    p.add_argument("--measure", choices=("speed", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--strategy", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.dist_worker:
        dist_worker(args)
        return 0

    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_available())
    parts = set(args.only.split(","))
    common = ["--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    common += ["--warmup", str(args.warmup), *(["--bf16"] if bf16 else [])]
    import transformers

    from kernels import ops as kernel_ops

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}, "
        f"threads {args.threads or torch.get_num_threads()}, "
        f"kiln kernels compiled: {kernel_ops.HAVE_EXTENSION}, load average at start "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows: list[tuple[str, str, str]] = []
    started = time.perf_counter()
    if "speed" in parts:
        layers = args.layers or SMOLLM2_360M["num_hidden_layers"]
        print(f"speed: SmolLM2-360M shape ({layers} layers), batch {args.batch} x {args.seq_len}")
        speed: dict[str, dict[str, Any]] = {}
        for name in VARIANTS:
            if args.no_compile and VARIANTS[name][1]:
                continue
            speed[name] = r = run_child(
                [*common, "--variant", name, "--measure", "speed", "--shape", "smollm2-360m",
                 "--batch", str(args.batch), "--layers", str(args.layers)],
                args.threads,
            )  # fmt: skip
            print(
                f"  {name:<26} {r['step_s'] * 1e3:9.0f} ms/step  {r['tokens'] / r['step_s']:8.1f} "
                f"tokens/s  first loss {r['first_loss']:.4f}  (warm-up {r['warmup_s']:.1f} s, "
                f"load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
        base = speed["transformers"]
        for name, r in speed.items():
            if name == "transformers":
                continue
            rows.append(
                (
                    f"tokens/s, {name} / transformers",
                    f"{base['step_s'] / r['step_s']:.2f}x",
                    ">= 1.5x" if name in ("kiln eager", "kiln compiled") else "",
                )
            )
    if "memory" in parts:
        print(
            f"memory: Llama-3.2-1B width and vocabulary ({args.memory_layers} layers), batch "
            f"{args.memory_batch} x {args.memory_seq_len}"
        )
        mem: dict[str, dict[str, Any]] = {}
        for name in ("transformers", "kiln eager"):
            mem[name] = r = run_child(
                [*common, "--variant", name, "--measure", "memory", "--shape", "llama-3.2-1b",
                 "--layers", str(args.memory_layers), "--batch", str(args.memory_batch),
                 "--seq-len", str(args.memory_seq_len), "--warmup", "1"],
                args.threads,
            )  # fmt: skip
            print(
                f"  {name:<26} step peak {gib(r['peak_delta'])} above {gib(r['resident_before'])}"
                f" resident (weights, AdamW states)",
                flush=True,
            )
        ratio = mem["kiln eager"]["peak_delta"] / mem["transformers"]["peak_delta"]
        rows.append(
            ("step peak memory at 128k vocab, kiln / transformers", f"{ratio:.2f}x", "<= 0.6x")
        )
        total = (mem["kiln eager"]["peak_delta"] + mem["kiln eager"]["resident_before"]) / (
            mem["transformers"]["peak_delta"] + mem["transformers"]["resident_before"]
        )
        rows.append(
            ("process peak (with weights, AdamW states), kiln / transformers", f"{total:.2f}x", "")
        )
    if "dist" in parts:
        print(
            f"dist: SmolLM2-360M shape ({args.dist_layers} layers), 2 processes (gloo), batch "
            f"{args.dist_batch} x {args.seq_len} per process"
        )
        d = {s: run_dist(s, args) for s in ("ddp", "fsdp")}
        for s, ranks in d.items():
            for i, r in enumerate(ranks):
                print(
                    f"  {s} rank {i}: {r['step_s'] * 1e3:7.0f} ms/step, peak {gib(r['peak'])}, "
                    f"params+grads+AdamW {gib(r['state_bytes'])}"
                )
        step = max(r["step_s"] for r in d["fsdp"]) / max(r["step_s"] for r in d["ddp"])
        peak = max(r["peak"] for r in d["fsdp"]) / max(r["peak"] for r in d["ddp"])
        state = max(r["state_bytes"] for r in d["fsdp"]) / max(r["state_bytes"] for r in d["ddp"])
        rows.append(("step time, FSDP / DDP (2 processes)", f"{step:.2f}x", ""))
        rows.append(("peak memory per process, FSDP / DDP", f"{peak:.2f}x", ""))
        rows.append(("params+grads+AdamW bytes per process, FSDP / DDP", f"{state:.2f}x", "~0.5x"))
    print()
    print("| measure | ratio | target |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    print(
        f"\n{time.perf_counter() - started:.0f} s; load average now "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
