"""Training speed and memory against what a team would otherwise run: `python -m training.bench`.

Three measurements in child processes, printed as one table of ratios:

1. Speed: a fine-tuning step (forward, backward, AdamW) on a SmolLM2-360M-shaped model (random
   weights from `transformers`, its 49152-token vocabulary) under bf16 autocast where the CPU has
   bf16 instructions: kiln eager (fused loss, and for comparison the loss from full logits) and
   kiln under torch.compile, against `transformers`' `LlamaForCausalLM` step on the same batch.
   The variants run in one process, their timed steps interleaved round by round (kiln's share
   one model, its blocks' compiled forms switched on and off), so that a change in the machine's
   load during the run weighs on all of them alike; `--separate` runs one process per model
   instead, in `--rounds` alternating rounds (for a model two of which do not fit the memory).
2. Memory: the peak of that step with a 128k vocabulary (Llama-3.2-1B's width and vocabulary;
   fewer layers, so that its weights and AdamW states fit this machine), each variant alone in a
   fresh process: the process's resident high-water mark during one step above what it held
   before (weights and optimizer states). `--profile-memory` also prints where the peak is, from
   torch.profiler's allocation events (the allocator's live bytes, by the op that allocated).
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


class CompiledBlocks:
    """A kiln model's blocks compiled in place (as training's --compile does), switchable: the
    eager and compiled variants step the same model, interleaved."""

    def __init__(self, model: torch.nn.Module) -> None:
        compile_blocks(model)
        self.blocks = list(model.layers)
        # nn.Module.compile keeps the compiled forward in `_compiled_call_impl`; None is eager.
        self.compiled = [b._compiled_call_impl for b in self.blocks]

    def use(self, on: bool) -> None:
        for block, impl in zip(self.blocks, self.compiled, strict=True):
            block._compiled_call_impl = impl if on else None


def make_step(
    impl: str,
    compiled: bool,
    fused: bool,
    model: torch.nn.Module,
    batch: torch.Tensor,
    bf16: bool,
    *,
    opt: torch.optim.Optimizer | None = None,
    blocks: CompiledBlocks | None = None,
) -> Callable[[], float]:
    """One optimizer step on `batch` [B, T]: the loss of predicting each next token. Variants
    of one model share its optimizer `opt` and (kiln) its `blocks`' compiled forms."""
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    targets = F.pad(batch[:, 1:], (0, 1), value=IGNORE)  # transformers shifts its labels alike
    fn: Any = model
    if compiled and impl == "transformers":
        fn = torch.compile(model)
    elif compiled and blocks is None:
        blocks = CompiledBlocks(model)

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
        if blocks is not None:
            blocks.use(compiled)
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
    """Speed: the variants named (separated by |), each warmed up, then `steps` rounds of one
    timed step each, interleaved (the order rotated every round); kiln's variants share one
    model. Memory: one variant, warmed up, then one measured step."""
    names = args.variant.split("|")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variant: {unknown} not among {sorted(VARIANTS)}")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(
        0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq_len), generator=gen
    )  # type: ignore[call-overload]
    models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
    blocks: CompiledBlocks | None = None
    steps: dict[str, Callable[[], float]] = {}
    for name in names:
        impl, compiled, fused = VARIANTS[name]
        if impl not in models:
            model = build(impl, args.shape, args.layers)
            models[impl] = (model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True))
        model, opt = models[impl]
        # Compiled before any kiln step is made: the eager ones switch the compiled forms off.
        if (
            impl == "kiln"
            and blocks is None
            and any(VARIANTS[n][:2] == ("kiln", True) for n in names)
        ):
            blocks = CompiledBlocks(model)
        steps[name] = make_step(
            impl, compiled, fused, model, batch, args.bf16, opt=opt,
            blocks=blocks if impl == "kiln" else None,
        )  # fmt: skip
    out: dict[str, Any] = {}
    for name, step in steps.items():
        start = time.perf_counter()
        first = step()
        warm_s = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            step()
        out[name] = {"first_loss": first, "warmup_s": warm_s}
    if args.measure == "memory":
        (name,) = names
        if args.profile_memory:
            out[name]["profile"] = profile_peak(steps[name])
        _settle()
        before = _status("VmRSS")
        _reset_peak()
        steps[name]()
        out[name]["peak_delta"] = _status("VmHWM") - before
        out[name]["resident_before"] = before
        return out
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.steps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    for name in names:
        out[name]["step_s"] = statistics.median(times[name])
        out[name]["steps_s"] = times[name]
        out[name]["tokens"] = args.batch * args.seq_len
    return out


def profile_peak(step: Callable[[], float]) -> dict[str, Any]:
    """One step under torch.profiler's memory profiling: the allocator's peak of live bytes
    above the step's start, the op (and its callers) whose allocation reached it, and the
    largest allocations live at that moment with the ops that made them."""
    from torch.profiler import ProfilerActivity, profile

    _settle()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocation = torch._C._profiler._EventType.Allocation
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == allocation:
            events.append(e)
    events.sort(key=lambda e: e.start_time_ns)

    def where(e: Any) -> str:
        names: list[str] = []
        p = e.parent
        while p is not None and len(names) < 4:
            names.append(p.name)
            p = p.parent
        return " < ".join(names)

    first = events[0].extra_fields
    base = first.total_allocated - first.alloc_size
    live: dict[int, tuple[int, str]] = {}
    peak, at, snapshot = 0, "", {}
    for e in events:
        f = e.extra_fields
        if f.alloc_size > 0:
            live[f.ptr] = (f.alloc_size, where(e))
        else:
            live.pop(f.ptr, None)
        if f.total_allocated - base > peak:
            peak, at = f.total_allocated - base, where(e)
            snapshot = dict(live)
    largest = sorted(snapshot.values(), reverse=True)[:8]
    return {"peak": peak, "at": at, "largest": largest}


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
    p.add_argument(
        "--no-logits-loss", action="store_true", help="skip the variant with the unfused loss"
    )
    p.add_argument(
        "--separate",
        action="store_true",
        help="speed: one process per model (kiln's variants still interleaved in theirs), in "
        "--rounds alternating rounds; for models two of which do not fit the memory",
    )
    p.add_argument("--rounds", type=int, default=2, help="with --separate: rounds per model")
    p.add_argument(
        "--profile-memory",
        action="store_true",
        help="memory: also print where each step's peak is (torch.profiler allocations)",
    )
    # the child processes' own flags
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dist-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)  # VARIANTS, separated by |
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
        names = [
            n for n, (impl, compiled, fused) in VARIANTS.items()
            if not (args.no_compile and compiled)
            and not (args.no_logits_loss and impl == "kiln" and not fused)
        ]  # fmt: skip
        speed_args = [*common, "--measure", "speed", "--shape", "smollm2-360m",
                      "--batch", str(args.batch), "--layers", str(args.layers)]  # fmt: skip
        # One process with every variant, or (--separate) one per model, alternating rounds.
        groups = [names]
        if args.separate:
            groups = [
                [n for n in names if VARIANTS[n][0] == impl] for impl in ("transformers", "kiln")
            ]
            groups = [g for g in groups if g] * args.rounds
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        tokens = args.batch * args.seq_len
        for group in groups:
            result = run_child([*speed_args, "--variant", "|".join(group)], args.threads)
            for name in group:
                r = result[name]
                runs[name].append(r)
                print(
                    f"  {name:<26} {r['step_s'] * 1e3:9.0f} ms/step  "
                    f"{r['tokens'] / r['step_s']:8.1f} tokens/s  first loss {r['first_loss']:.4f}"
                    f"  (steps {', '.join(f'{t:.2f}' for t in r['steps_s'])} s; warm-up "
                    f"{r['warmup_s']:.1f} s, load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
        # Each variant's fastest timed step over every round: on a machine others load, the
        # least disturbed one (a step's work is fixed; load only adds to it).
        speed = {n: min(t for r in rs for t in r["steps_s"]) for n, rs in runs.items()}
        print(
            "  fastest steps: "
            + ", ".join(
                f"{n} {t * 1e3:.0f} ms ({tokens / t:.1f} tokens/s)" for n, t in speed.items()
            ),
            flush=True,
        )
        base = speed["transformers"]
        for name, t in speed.items():
            if name == "transformers":
                continue
            rows.append(
                (
                    f"tokens/s, {name} / transformers",
                    f"{base / t:.2f}x",
                    ">= 1.5x" if name in ("kiln eager", "kiln compiled") else "",
                )
            )
        if "kiln compiled" in speed and "kiln eager" in speed:
            ratio = speed["kiln eager"] / speed["kiln compiled"]
            rows.append(
                ("tokens/s, kiln compiled / kiln eager (same model)", f"{ratio:.2f}x", "> 1x")
            )
    if "memory" in parts:
        print(
            f"memory: Llama-3.2-1B width and vocabulary ({args.memory_layers} layers), batch "
            f"{args.memory_batch} x {args.memory_seq_len}"
        )
        mem: dict[str, dict[str, Any]] = {}
        for name in ("transformers", "kiln eager"):
            result = run_child(
                [*common, "--variant", name, "--measure", "memory", "--shape", "llama-3.2-1b",
                 "--layers", str(args.memory_layers), "--batch", str(args.memory_batch),
                 "--seq-len", str(args.memory_seq_len), "--warmup", "1",
                 *(["--profile-memory"] if args.profile_memory else [])],
                args.threads,
            )  # fmt: skip
            mem[name] = r = result[name]
            print(
                f"  {name:<26} step peak {gib(r['peak_delta'])} above {gib(r['resident_before'])}"
                f" resident (weights, AdamW states)",
                flush=True,
            )
            if "profile" in r:
                prof = r["profile"]
                print(
                    f"    allocator peak {gib(prof['peak'])} above the step's start, at "
                    f"{prof['at']}"
                )
                for size, where in prof["largest"]:
                    print(f"      {gib(size):>10} live, allocated in {where}")
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
