"""Training throughput on this machine: kiln's kernels vs the reference ops, eager and compiled.

`python -m training.bench` times full training steps (forward, backward, AdamW) of one model on
one batch with each op set, in interleaved rounds so that a burst of other work on a shared
machine hits every candidate alike, and prints tokens/s and the ratios to eager reference ops.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from modeling.config import PRESETS
from modeling.model import LlamaModel, lm_loss

CANDIDATES = {
    "reference, eager": ("reference", False),
    "reference, torch.compile": ("reference", True),
    "kiln kernels, eager": ("kiln", False),
    "kiln kernels, torch.compile": ("kiln", True),
}


def make_step(
    ops: str, compiled: bool, args: argparse.Namespace
) -> tuple[Callable[[], float], LlamaModel]:
    cfg = dataclasses.replace(PRESETS[args.model], max_seq_len=max(args.seq_len, 16))
    torch.manual_seed(0)
    model = LlamaModel(cfg, ops=ops)  # type: ignore[arg-type]
    fn: Any = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 259, (args.batch, args.seq_len + 1), generator=gen)
    bf16 = args.precision == "bf16"

    def step() -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            loss = lm_loss(fn(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__)
    p.add_argument("--model", choices=sorted(PRESETS), default="small")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--steps", type=int, default=4, help="timed steps per candidate per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compiles) first")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from kernels import ops as kernel_ops

    names = [n for n in CANDIDATES if not (args.no_compile and CANDIDATES[n][1])]
    tokens = args.batch * args.seq_len
    print(
        f"model {args.model} ({PRESETS[args.model].num_parameters() / 1e6:.2f} M parameters), "
        f"batch {args.batch} x {args.seq_len} = {tokens} tokens/step, {args.precision}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"kernels compiled: {kernel_ops.HAVE_EXTENSION}, load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    steps: dict[str, Callable[[], float]] = {}
    first_loss: dict[str, float] = {}
    for name in names:
        ops, compiled = CANDIDATES[name]
        start = time.perf_counter()
        step, _ = make_step(ops, compiled, args)
        first_loss[name] = step()
        for _ in range(args.warmup - 1):
            step()
        steps[name] = step
        print(f"  warmed up {name:<28} in {time.perf_counter() - start:6.1f} s")
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in tqdm(range(args.rounds), desc="rounds", unit="round"):
        for name in names:  # interleaved: load from other tenants spreads over all candidates
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["reference, eager"])
    print()
    print("| candidate | ms/step (median) | min | tokens/s | vs reference eager |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        med = statistics.median(times[name])
        print(
            f"| {name} | {med * 1e3:.1f} | {min(times[name]) * 1e3:.1f} | "
            f"{tokens / med:,.0f} | {base / med:.2f}x |"
        )
    spread = max(abs(first_loss[n] - first_loss[names[0]]) for n in names)
    print(
        f"\nfirst-step losses agree within {spread:.2e}; load average now {os.getloadavg()[0]:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
