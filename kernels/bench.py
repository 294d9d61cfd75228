"""Benchmark of the kiln ops against torch eager, torch.compile and a same-traffic copy, in one run.

    python -m kernels.bench                 # every op, shapes [1|64|2048, 4096], fp32 and bf16
    python -m kernels.bench --ops fused_add_rms_norm_ --no-compile
    python -m kernels.bench --alloc         # allocating vs `out` forms, glibc vs tcmalloc

Each figure is the best of five timed batches (this machine is shared); ratios compare figures of
the same run. `probe` is a tensor copy that moves the bytes the op must move at least (reads plus
writes), so `bw/probe` is the fraction of the copy's bandwidth that the op reaches.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import ops, reference

EPS = 1e-6
HIDDEN = 4096
ROWS = (1, 64, 2048)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEAD = 128  # rotary: 32 query heads and 8 key heads of 128 per token (hidden 4096, GQA)
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def best_time(fn: Callable[[], object], budget: float) -> float:
    """Seconds per call: the best of five batches sized to take about budget/5 each."""
    for _ in range(3):
        fn()
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt >= budget / 20 or n >= 1 << 20:
            break
        n *= 4
    n = max(1, int(n * (budget / 5) / max(dt, 1e-9)))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def probe(nbytes: int) -> Callable[[], object]:
    """A copy reading nbytes/2 and writing nbytes/2."""
    half = max(1, nbytes // 2)
    src = torch.ones(half, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


@dataclass
class Case:
    shape: str
    dtype: str
    nbytes: int
    ours: Callable[[], object]
    eager: Callable[[], object]
    compiled: Callable[[], object] | None
    times: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# the ops, each as (ours, eager, compile-able eager) over fresh inputs


def eager_fused_inplace(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> None:
    r.add_(x)
    x.copy_(F.rms_norm(r, (r.shape[-1],), w, EPS))


def cases_fused_inplace(rows: int, dt: torch.dtype, compiled: Callable | None) -> tuple:
    x, r, w = (
        torch.randn(rows, HIDDEN, dtype=dt),
        torch.randn(rows, HIDDEN, dtype=dt),
        torch.randn(HIDDEN, dtype=dt),
    )
    op = torch.ops.kiln.fused_add_rms_norm_.default
    nbytes = 4 * x.numel() * x.element_size()
    return (
        nbytes,
        lambda: op(x, r, w, EPS),
        lambda: eager_fused_inplace(x, r, w),
        (lambda: compiled(x, r, w)) if compiled else None,
    )


def eager_fused_train(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> tuple:
    z = x + r
    return F.rms_norm(z, (z.shape[-1],), w, EPS), z


def cases_fused_train(rows: int, dt: torch.dtype, compiled: Callable | None) -> tuple:
    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dt).requires_grad_()

    x, r, w = leaf(rows, HIDDEN), leaf(rows, HIDDEN), leaf(HIDDEN)
    g1, g2 = torch.randn(rows, HIDDEN, dtype=dt), torch.randn(rows, HIDDEN, dtype=dt)

    def step(fwd: Callable) -> Callable[[], object]:
        def run() -> object:
            out, z = fwd(x, r, w)
            return torch.autograd.grad([out, z], [x, r, w], [g1, g2])

        return run

    ours = torch.ops.kiln.fused_add_rms_norm.default
    # forward reads x, r and writes out, z; backward reads g_out, g_res, z and writes grad_z
    nbytes = 8 * x.numel() * x.element_size()
    return (
        nbytes,
        step(lambda a, b, c: ours(a, b, c, EPS)),
        step(eager_fused_train),
        step(compiled) if compiled else None,
    )


def eager_silu_out(x: torch.Tensor, out: torch.Tensor) -> None:
    d = x.shape[-1] // 2
    torch.mul(F.silu(x[..., :d]), x[..., d:], out=out)


def cases_silu(rows: int, dt: torch.dtype, compiled: Callable | None) -> tuple:
    x = torch.randn(rows, 2 * HIDDEN, dtype=dt)
    out = torch.empty(rows, HIDDEN, dtype=dt)
    op = torch.ops.kiln.silu_and_mul_out.default
    nbytes = 3 * out.numel() * out.element_size()
    return (
        nbytes,
        lambda: op(x, out),
        lambda: eager_silu_out(x, out),
        (lambda: compiled(x, out)) if compiled else None,
    )


def eager_rotary_inplace(
    pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cache: torch.Tensor
) -> None:
    half = cache.shape[-1] // 2
    cs = cache[pos].unsqueeze(-2)
    cos, sin = cs[..., :half], cs[..., half:]
    for t in (q, k):
        x1, x2 = t[..., :half], t[..., half:]
        t.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))


def cases_rotary(rows: int, dt: torch.dtype, compiled: Callable | None) -> tuple:
    q = torch.randn(rows, HIDDEN // HEAD, HEAD, dtype=dt)
    k = torch.randn(rows, HIDDEN // HEAD // 4, HEAD, dtype=dt)
    cache = reference.rope_cache(4096, HEAD, dtype=dt)
    pos = torch.randint(0, 4096, (rows,))
    op = torch.ops.kiln.rotary_embedding_.default
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
    return (
        nbytes,
        lambda: op(pos, q, k, cache, True),
        lambda: eager_rotary_inplace(pos, q, k, cache),
        (lambda: compiled(pos, q, k, cache)) if compiled else None,
    )


def eager_int8_linear(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x @ wq.to(x.dtype).t()) * scale.to(x.dtype)


def cases_int8(rows: int, dt: torch.dtype, compiled: Callable | None) -> tuple:
    x = torch.randn(rows, HIDDEN, dtype=dt)
    wq, scale = reference.quantize_int8(torch.randn(HIDDEN, HIDDEN))
    out = torch.empty(rows, HIDDEN, dtype=dt)
    op = torch.ops.kiln.int8_linear_out.default
    nbytes = wq.numel() + 2 * x.numel() * x.element_size()
    return (
        nbytes,
        lambda: op(x, wq, scale, None, out),
        lambda: eager_int8_linear(x, wq, scale),
        (lambda: compiled(x, wq, scale)) if compiled else None,
    )


def cases_linear_dense(rows: int, dt: torch.dtype) -> Callable[[], object]:
    """What int8 replaces: F.linear with the weights in the activation dtype."""
    x = torch.randn(rows, HIDDEN, dtype=dt)
    w = torch.randn(HIDDEN, HIDDEN, dtype=dt)
    return lambda: F.linear(x, w)


OPS: dict[str, tuple[str, Callable, Callable | None, tuple[int, ...]]] = {
    "fused_add_rms_norm_": (
        "fused_add_rms_norm_ (in place: residual += x; x = rms_norm(residual) * w); bytes 4*N",
        cases_fused_inplace,
        eager_fused_inplace,
        ROWS,
    ),
    "fused_add_rms_norm_train": (
        "fused_add_rms_norm forward+backward (grads of x, residual, w); bytes 8*N",
        cases_fused_train,
        eager_fused_train,
        ROWS,
    ),
    "silu_and_mul_out": (
        "silu_and_mul_out (x [rows, 2*4096] -> out [rows, 4096]); bytes 3*N",
        cases_silu,
        eager_silu_out,
        ROWS,
    ),
    "rotary_embedding_": (
        "rotary_embedding_ (in place; q 32x128, k 8x128 heads per row, neox); bytes 2*(q+k)",
        cases_rotary,
        eager_rotary_inplace,
        ROWS,
    ),
    "int8_linear_out": (
        "int8_linear_out (x [rows, 4096] @ int8 [4096, 4096]); bytes weights + x + out;"
        " eager/compile = dequantize + matmul",
        cases_int8,
        eager_int8_linear,
        (1, 64),
    ),
}


def fmt_us(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e6:9.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:6.2f}"


def run_op(name: str, use_compile: bool, budget: float, isas: list[str]) -> None:
    title, make, eager_fn, rows_list = OPS[name]
    compiled = torch.compile(eager_fn, fullgraph=True) if use_compile else None
    second_isa = "avx2" if "avx2" in isas and isas[0] != "avx2" else None
    print(f"\n## {title}")
    head = (
        f"{'shape':<12}{'dtype':<6}{'ours_us':>9} {f'{second_isa}_us' if second_isa else '':>9} "
        f"{'eager_us':>9} {'compile_us':>10} {'probe_us':>9} {'ours_GB/s':>9} {'probe_GB/s':>10} "
        f"{'bw/probe':>8} {'x_eager':>8} {'x_compile':>9}"
        + (f" {second_isa + '/' + isas[0]:>12}" if second_isa else "")
        + (f" {'fp_linear_us':>12}" if name == "int8_linear_out" else "")
    )
    print(head)
    for rows in rows_list:
        for dname, dt in DTYPES.items():
            nbytes, ours, eager, comp = make(rows, dt, compiled)
            t_ours = best_time(ours, budget)
            t_isa = None
            if second_isa:
                with ops.use_cpu_isa(second_isa):
                    t_isa = best_time(ours, budget)
            t_eager = best_time(eager, budget)
            t_comp = best_time(comp, budget) if comp else None
            t_probe = best_time(probe(nbytes), budget)
            line = (
                f"{f'[{rows}, {HIDDEN}]':<12}{dname:<6}{fmt_us(t_ours)} {fmt_us(t_isa) if t_isa else '':>9} "
                f"{fmt_us(t_eager)} {fmt_us(t_comp):>10} {fmt_us(t_probe)} "
                f"{nbytes / t_ours / 1e9:9.1f} {nbytes / t_probe / 1e9:10.1f} "
                f"{ratio(t_probe, t_ours):>8} {ratio(t_eager, t_ours):>8} {ratio(t_comp, t_ours):>9}"
            )
            if second_isa:
                line += f" {ratio(t_isa, t_ours):>12}"
            if name == "int8_linear_out":
                line += f" {fmt_us(best_time(cases_linear_dense(rows, dt), budget)):>12}"
            print(line, flush=True)


def run_alloc(budget: float) -> None:
    """The allocating functional form against the `out` form: the gap is the allocator's cost."""
    rows, dt = 2048, torch.float32
    x, r, w = (
        torch.randn(rows, HIDDEN, dtype=dt),
        torch.randn(rows, HIDDEN, dtype=dt),
        torch.randn(HIDDEN, dtype=dt),
    )
    out = torch.empty_like(x)
    functional = torch.ops.kiln.fused_add_rms_norm.default
    into = torch.ops.kiln.fused_add_rms_norm_out.default
    rn = torch.ops.kiln.rms_norm.default
    rn_out = torch.ops.kiln.rms_norm_out.default
    t_f = best_time(lambda: functional(x, r, w, EPS), budget)
    t_o = best_time(lambda: into(x, r, w, EPS, out), budget)
    t_rf = best_time(lambda: rn(x, w, EPS), budget)
    t_ro = best_time(lambda: rn_out(x, w, EPS, out), budget)
    t_eager = best_time(lambda: F.rms_norm(x, (HIDDEN,), w, EPS), budget)
    preload = os.environ.get("LD_PRELOAD", "") or "glibc malloc"
    print(
        f"[2048, 4096] fp32, allocator {preload}: fused_add_rms_norm {t_f * 1e6:.0f} us "
        f"(out form {t_o * 1e6:.0f} us, x{t_f / t_o:.2f}); rms_norm {t_rf * 1e6:.0f} us "
        f"(out form {t_ro * 1e6:.0f} us, x{t_rf / t_ro:.2f}); eager F.rms_norm {t_eager * 1e6:.0f} us",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", nargs="*", choices=sorted(OPS), default=list(OPS))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--budget", type=float, default=0.25, help="seconds per measurement")
    parser.add_argument("--alloc", action="store_true", help="only the allocator comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if not ops.HAVE_EXTENSION:
        print(f"kiln kernels are not built: {ops.UNAVAILABLE_REASON}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    isas = ops.cpu_isas()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU variant {ops.cpu_isa()} "
        f"(available: {', '.join(isas)}), allocator {os.environ.get('LD_PRELOAD') or 'glibc malloc'}"
    )
    if args.alloc:
        run_alloc(args.budget)
        if "tcmalloc" not in os.environ.get("LD_PRELOAD", "") and Path(TCMALLOC).exists():
            env = dict(os.environ, LD_PRELOAD=TCMALLOC)
            cmd = [sys.executable, "-m", "kernels.bench", "--alloc", "--budget", str(args.budget)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            print(out.strip().splitlines()[-1])
        return 0
    with torch.inference_mode(False):
        for name in args.ops:
            run_op(name, not args.no_compile, args.budget, isas)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
