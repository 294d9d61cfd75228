"""Benchmark of the kiln ops against torch eager, torch.compile and a same-traffic copy, in one run.

    python -m kernels.bench                  # every op, rows 1 / 64 / 2048 of 4096, fp32 and bf16
    python -m kernels.bench --ops fused_add_rms_norm_ --no-compile
    python -m kernels.bench --alloc          # allocating vs `out` forms, glibc malloc vs tcmalloc
    python -m kernels.bench --weight-dtypes 1  # served projections per weight dtype, 1B shape
    python -m kernels.bench --device cuda    # the CUDA kernels (GPU time from CUDA events)

Each time is the best of five batches, the candidates of a row measured in turn (the machines
are shared: the best batch is the least disturbed one, and a burst hits all candidates alike).
Ratios compare times of the same run: x_eager = eager / ours, x_compile = compile / ours,
bw/probe = probe / ours where `probe` is a tensor copy moving the bytes the op must move at least
(its reads plus its writes), i.e. the fraction of copy bandwidth the op reaches; avx2/best = the
AVX2 variant's time over the default variant's. On CUDA a batch is timed with CUDA events
(GPU time, launches included), `probe` is a device-to-device copy, and rows of [2048, 4096]
(16-32 MiB) may stay in a large GPU's L2 cache for the op and the probe alike.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import ops, reference

EPS = 1e-6
HIDDEN = 4096
ROWS = (1, 64, 2048)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEAD = 128  # rotary: 32 query heads and 8 key heads of 128 per row (hidden 4096, GQA)
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"

Fn = Callable[[], object]
# Where the benchmark's tensors live: "cpu" or "cuda" (set by --device).
DEVICE = "cpu"


def _batch_seconds(fn: Fn, n: int) -> float:
    """Seconds for n calls: wall time on CPU; on CUDA the GPU time between two events around the
    batch (the calls only enqueue work)."""
    if DEVICE == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t


def _batch_size(fn: Fn, budget: float) -> int:
    """Calls per batch, so that a batch takes about budget / 5."""
    for _ in range(3):
        fn()
    n, dt = 1, 0.0
    while n < 1 << 20:
        dt = _batch_seconds(fn, n)
        if dt >= budget / 20:
            break
        n *= 4
    return max(1, int(n * (budget / 5) / max(dt, 1e-9)))


def best_times(fns: dict[str, tuple[Fn, str | None]], budget: float) -> dict[str, float]:
    """Seconds per call of each (fn, CPU variant or None): five rounds of one batch of each in
    turn, the best batch of each. Interleaved, a burst of another tenant's work on a shared
    machine lands on all candidates of a round rather than on one candidate's every batch."""

    def run(fn: Fn, isa: str | None, n: int) -> float:
        if not isa:
            return _batch_seconds(fn, n) / n
        previous = ops.cpu_isa()
        ops.set_cpu_isa(isa)
        try:
            return _batch_seconds(fn, n) / n
        finally:
            ops.set_cpu_isa(previous)

    sizes = {}
    for name, (fn, isa) in fns.items():
        if isa:
            with ops.use_cpu_isa(isa):
                sizes[name] = _batch_size(fn, budget)
        else:
            sizes[name] = _batch_size(fn, budget)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(5):
        for name, (fn, isa) in fns.items():
            best[name] = min(best[name], run(fn, isa, sizes[name]))
    return best


def wait_for_quiet(max_wait: float) -> None:
    """Waits (up to max_wait seconds) until the CPUs were >= 90% idle over half a second: on shared
    machines, another tenant's burst turns a 2-thread OpenMP region into a 50x slowdown."""
    if max_wait <= 0 or not Path("/proc/stat").exists():
        return

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, total

    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        idle0, total0 = sample()
        time.sleep(0.5)
        idle1, total1 = sample()
        if total1 > total0 and (idle1 - idle0) / (total1 - total0) >= 0.9:
            return


def probe(nbytes: int) -> Fn:
    """A copy that reads nbytes / 2 and writes nbytes / 2."""
    src = torch.ones(max(1, nbytes // 2), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


@dataclass
class Case:
    nbytes: int  # the bytes the op must read and write at least
    ours: Fn
    eager: Fn
    compiled: Fn | None


def rand(*shape: int, dt: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, dtype=dt, device=DEVICE).requires_grad_(grad)


# ------------------------------------------------------------------------------------------------
# fused_add_rms_norm_ (decode and inference: in place)


def eager_fused_inplace(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> None:
    r.add_(x)
    x.copy_(F.rms_norm(r, (r.shape[-1],), w, EPS))


def compile_fused_inplace(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What torch.compile can do here: inductor in torch 2.13 fails (KeyError 'buf1') on a graph
    mutating both x and r, so this one updates r in place and returns the output as a new tensor."""
    r.add_(x)
    return F.rms_norm(r, (r.shape[-1],), w, EPS)


def case_fused_inplace(rows: int, dt: torch.dtype, compiled: Callable | None) -> Case:
    x, r, w = rand(rows, HIDDEN, dt=dt), rand(rows, HIDDEN, dt=dt), rand(HIDDEN, dt=dt)
    op = torch.ops.kiln.fused_add_rms_norm_.default
    return Case(
        4 * x.numel() * x.element_size(),  # read x, r; write r, x
        lambda: op(x, r, w, EPS),
        lambda: eager_fused_inplace(x, r, w),
        (lambda: compiled(x, r, w)) if compiled else None,
    )


# ------------------------------------------------------------------------------------------------
# fused_add_rms_norm forward + backward (training)


def eager_fused_train(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> tuple:
    z = x + r
    return F.rms_norm(z, (z.shape[-1],), w, EPS), z


def case_fused_train(rows: int, dt: torch.dtype, compiled: Callable | None) -> Case:
    x, r, w = (
        rand(rows, HIDDEN, dt=dt, grad=True),
        rand(rows, HIDDEN, dt=dt, grad=True),
        rand(HIDDEN, dt=dt, grad=True),
    )
    g_out, g_res = rand(rows, HIDDEN, dt=dt), rand(rows, HIDDEN, dt=dt)

    def step(fwd: Callable) -> Fn:
        def run() -> object:
            out, z = fwd(x, r, w)
            return torch.autograd.grad([out, z], [x, r, w], [g_out, g_res])

        return run

    op = torch.ops.kiln.fused_add_rms_norm.default
    return Case(
        # forward: read x, r, write out, z; backward: read g_out, g_res, z, write grad_z
        8 * x.numel() * x.element_size(),
        step(lambda a, b, c: op(a, b, c, EPS)),
        step(eager_fused_train),
        step(compiled) if compiled else None,
    )


# ------------------------------------------------------------------------------------------------
# silu_and_mul_out


def eager_silu_out(x: torch.Tensor, out: torch.Tensor) -> None:
    d = x.shape[-1] // 2
    torch.mul(F.silu(x[..., :d]), x[..., d:], out=out)


def compile_silu(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def case_silu(rows: int, dt: torch.dtype, compiled: Callable | None) -> Case:
    x, out = rand(rows, 2 * HIDDEN, dt=dt), torch.empty(rows, HIDDEN, dtype=dt, device=DEVICE)
    op = torch.ops.kiln.silu_and_mul_out.default
    return Case(
        3 * out.numel() * out.element_size(),  # read gate and up, write out
        lambda: op(x, out),
        lambda: eager_silu_out(x, out),
        (lambda: compiled(x)) if compiled else None,
    )


# ------------------------------------------------------------------------------------------------
# rotary_embedding_


def eager_rotary_inplace(
    pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cache: torch.Tensor
) -> None:
    half = cache.shape[-1] // 2
    cs = cache[pos].unsqueeze(-2)
    cos, sin = cs[..., :half], cs[..., half:]
    for t in (q, k):
        x1, x2 = t[..., :half], t[..., half:]
        t.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))


def case_rotary(rows: int, dt: torch.dtype, compiled: Callable | None) -> Case:
    q = rand(rows, HIDDEN // HEAD, HEAD, dt=dt)
    k = rand(rows, HIDDEN // HEAD // 4, HEAD, dt=dt)
    cache = reference.rope_cache(4096, HEAD, dtype=dt, device=DEVICE)
    pos = torch.randint(0, 4096, (rows,), device=DEVICE)
    op = torch.ops.kiln.rotary_embedding_.default
    return Case(
        2 * (q.numel() + k.numel()) * q.element_size(),  # read and write q and k
        lambda: op(pos, q, k, cache, True),
        lambda: eager_rotary_inplace(pos, q, k, cache),
        (lambda: compiled(pos, q, k, cache)) if compiled else None,
    )


# ------------------------------------------------------------------------------------------------
# int8_linear_out (decode)


def eager_int8_linear(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x @ wq.to(x.dtype).t()) * scale.to(x.dtype)


def case_int8(rows: int, dt: torch.dtype, compiled: Callable | None) -> Case:
    x, out = rand(rows, HIDDEN, dt=dt), torch.empty(rows, HIDDEN, dtype=dt, device=DEVICE)
    wq, scale = (t.to(DEVICE) for t in reference.quantize_int8(torch.randn(HIDDEN, HIDDEN)))
    op = torch.ops.kiln.int8_linear_out.default
    return Case(
        wq.numel() + 2 * x.numel() * x.element_size(),  # the int8 weights, x and out
        lambda: op(x, wq, scale, None, out),
        lambda: eager_int8_linear(x, wq, scale),
        (lambda: compiled(x, wq, scale)) if compiled else None,
    )


def dense_linear(rows: int, dt: torch.dtype) -> Fn:
    """What the int8 op replaces: F.linear with weights in the activation dtype."""
    x, w = rand(rows, HIDDEN, dt=dt), rand(HIDDEN, HIDDEN, dt=dt)
    return lambda: F.linear(x, w)


@dataclass
class OpBench:
    title: str
    make: Callable[[int, torch.dtype, Callable | None], Case]
    compile_fn: Callable
    rows: tuple[int, ...] = ROWS
    cuda_rows: tuple[int, ...] = ROWS  # on CUDA (int8: prefill too, the tiled kernels)


OPS: dict[str, OpBench] = {
    "fused_add_rms_norm_": OpBench(
        "fused_add_rms_norm_: in place, residual += x; x = rms_norm(residual) * w. bytes 4N. "
        "compile: r in place, new output (see compile_fused_inplace)",
        case_fused_inplace,
        compile_fused_inplace,
    ),
    "fused_add_rms_norm_train": OpBench(
        "fused_add_rms_norm forward + backward (grads of x, residual, weight). bytes 8N",
        case_fused_train,
        eager_fused_train,
    ),
    "silu_and_mul_out": OpBench(
        "silu_and_mul_out: x [rows, 2*4096] -> out [rows, 4096]. bytes 3N (N = out). "
        "compile: functional",
        case_silu,
        compile_silu,
    ),
    "rotary_embedding_": OpBench(
        "rotary_embedding_: in place on q (32x128) and k (8x128) per row, neox. bytes 2(q+k)",
        case_rotary,
        eager_rotary_inplace,
    ),
    "int8_linear_out": OpBench(
        "int8_linear_out: x [rows, 4096] @ int8 W [4096, 4096] * scale. bytes W + x + out. "
        "eager and compile: dequantize + matmul; fp_linear: F.linear with dense weights",
        case_int8,
        eager_int8_linear,
        (1, 64),
        (1, 8, 64, 2048),
    ),
}


def us(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e6:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def run_op(
    name: str,
    use_compile: bool,
    budget: float,
    second_isa: str | None,
    quiet: float,
    dtypes: dict[str, torch.dtype],
) -> None:
    bench = OPS[name]
    compiled = torch.compile(bench.compile_fn, fullgraph=True) if use_compile else None
    columns = [
        "shape",
        "dtype",
        "ours_us",
        "eager_us",
        "compile_us",
        "probe_us",
        "ours_GB/s",
        "probe_GB/s",
        "bw/probe",
        "x_eager",
        "x_compile",
    ]
    if second_isa:
        columns += [f"{second_isa}_us", f"{second_isa}/best"]
    if name == "int8_linear_out":
        columns += ["fp_linear_us", "x_fp_linear"]
    print(f"\n## {bench.title}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for rows in bench.cuda_rows if DEVICE == "cuda" else bench.rows:
        for dname, dt in dtypes.items():
            case = bench.make(rows, dt, compiled)
            if case.compiled:
                case.compiled()  # compile outside the quiet window
            wait_for_quiet(quiet)
            fns: dict[str, tuple[Fn, str | None]] = {
                "ours": (case.ours, None),
                "eager": (case.eager, None),
                "probe": (probe(case.nbytes), None),
            }
            if case.compiled:
                fns["compile"] = (case.compiled, None)
            if second_isa:
                fns["isa"] = (case.ours, second_isa)
            if name == "int8_linear_out":
                fns["fp_linear"] = (dense_linear(rows, dt), None)
            t = best_times(fns, budget)
            t_ours, t_probe, t_comp = t["ours"], t["probe"], t.get("compile")
            cells = [
                f"[{rows}, {HIDDEN}]",
                dname,
                us(t_ours),
                us(t["eager"]),
                us(t_comp),
                us(t_probe),
                f"{case.nbytes / t_ours / 1e9:.1f}",
                f"{case.nbytes / t_probe / 1e9:.1f}",
                ratio(t_probe, t_ours),
                ratio(t["eager"], t_ours),
                ratio(t_comp, t_ours),
            ]
            if second_isa:
                cells += [us(t["isa"]), ratio(t["isa"], t_ours)]
            if name == "int8_linear_out":
                cells += [us(t["fp_linear"]), ratio(t["fp_linear"], t_ours)]
            print("| " + " | ".join(cells) + " |", flush=True)


def run_decode_latency(budget: float) -> None:
    """One decode row through each way of calling the in-place op, against the floor of a call."""
    x, r, w = (rand(1, HIDDEN, dt=torch.float32) for _ in range(3))
    w = w[0]
    small_x, small_r = rand(1, 16, dt=torch.float32), rand(1, 16, dt=torch.float32)
    overload = torch.ops.kiln.fused_add_rms_norm_.default
    add_ = torch.ops.aten.add_.Tensor
    t = best_times(
        {
            "ours": (lambda: overload(x, r, w, EPS), None),
            "aten": (lambda: add_(small_x, small_r), None),
            "method": (lambda: small_x.add_(small_r), None),
        },
        budget,
    )
    rows = [
        ("kiln fused_add_rms_norm_ [1, 4096] fp32, from Python (torch.ops...default)", t["ours"]),
        (
            "kiln fused_add_rms_norm_ [1, 4096] fp32, from C++ through the dispatcher",
            ops.time_decode_call_from_cpp(HIDDEN) * 1e-6,
        ),
        ("floor: torch.ops.aten.add_.Tensor on [1, 16] from Python (any op pays this)", t["aten"]),
        ("floor: Tensor.add_ method on [1, 16] from Python", t["method"]),
    ]
    print("\n## one-row decode call latency")
    print("| call | us |")
    print("|---|---|")
    for label, t in rows:
        print(f"| {label} | {us(t)} |", flush=True)


def loaded_allocator() -> str:
    """tcmalloc when it is mapped into this process (LD_PRELOAD naming a missing file only
    warns), glibc malloc otherwise."""
    maps = Path("/proc/self/maps")
    if maps.exists() and "libtcmalloc" in maps.read_text():
        return "tcmalloc"
    return "glibc malloc"


def _row_invariant(linear: Callable[[torch.Tensor], torch.Tensor], k: int) -> bool:
    """Whether a row's result is bitwise the same at 1, 2, 4, 8 and 32 rows."""
    probe = torch.randn(1, k)
    alone = linear(probe)[0]
    for rows in (2, 4, 8, 32):
        batch = torch.randn(rows, k)
        batch[rows // 2] = probe[0]
        if not torch.equal(linear(batch)[rows // 2], alone):
            return False
    return True


def _panel_case(n: int, k: int, rows: int, budget: float) -> dict[str, float]:
    w, x = torch.randn(n, k), rand(rows, k, dt=torch.float32)
    panels = ops.pack_panels(w)
    op = torch.ops.kiln.panel_linear.default
    fns: dict[str, tuple[Fn, str | None]] = {
        "ours": (lambda: op(x, panels, n), None),
        "linear": (lambda: F.linear(x, w), None),
    }
    if hasattr(torch.ops, "mkl") and hasattr(torch.ops.mkl, "_mkl_linear"):
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
        fns["packed"] = (lambda: torch.ops.mkl._mkl_linear(x, packed, w, None, rows), None)
    return best_times(fns, budget)


def run_decode_ops(budget: float) -> None:
    """The batch-invariant decode ops against what they replace, float32."""
    print(
        "\n## panel_linear: x [rows, K] @ W.T, float32. mkl_packed: MKL's packed GEMM at this "
        "row count (what inductor uses for float32 linears). invariant: a row's result bitwise "
        "the same at 1, 2, 4, 8 and 32 rows"
    )
    print(
        "| W | rows | ours_us | F.linear_us | mkl_packed_us | x_F.linear | x_mkl_packed "
        "| invariant ours | invariant F.linear |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, k in ((1408, 256), (4096, 4096)):
        w = torch.randn(n, k)
        panels = ops.pack_panels(w)
        ours_inv = _row_invariant(
            lambda x: torch.ops.kiln.panel_linear.default(x, panels, n),  # noqa: B023
            k,
        )
        linear_inv = _row_invariant(lambda x: F.linear(x, w), k)  # noqa: B023
        for rows in (1, 4, 32):
            t = _panel_case(n, k, rows, budget)
            packed = t.get("packed")
            print(
                f"| [{n}, {k}] | {rows} | {us(t['ours'])} | {us(t['linear'])} | {us(packed)} "
                f"| {ratio(t['linear'], t['ours'])} | {ratio(packed, t['ours'])} "
                f"| {'yes' if ours_inv else 'no'} | {'yes' if linear_inv else 'no'} |",
                flush=True,
            )

    print(
        "\n## decode_attention: one query per sequence over its own cache, float32, "
        "32 query / 8 kv heads of 128; matmul: the padded batched-matmul path it replaces"
    )
    print("| batch | length | ours_us | matmul_us | x_matmul |")
    print("|---|---|---|---|---|")
    heads, kv_heads, d, max_len = 32, 8, 128, 1024
    for batch, length in ((1, 128), (8, 128), (32, 128), (32, 512)):
        k_cache = torch.randn(batch, kv_heads, max_len, d)
        v_cache = torch.randn(batch, kv_heads, max_len, d)
        q = torch.randn(batch, heads, d)
        slots = torch.arange(batch)
        lengths = torch.full((batch,), length)
        group = heads // kv_heads
        query = q.view(batch, kv_heads, group, d)
        bias = torch.zeros(batch, 1, 1, length)
        op = torch.ops.kiln.decode_attention.default

        def matmul_path() -> torch.Tensor:
            keys = k_cache[:, :, :length].transpose(-1, -2)  # noqa: B023
            scores = torch.matmul(query, keys).add_(bias)  # noqa: B023
            return torch.matmul(torch.softmax(scores, -1), v_cache[:, :, :length])  # noqa: B023

        t = best_times(
            {
                "ours": (lambda: op(q, k_cache, v_cache, slots, lengths, 1.0), None),  # noqa: B023
                "matmul": (matmul_path, None),
            },
            budget,
        )
        print(
            f"| {batch} | {length} | {us(t['ours'])} | {us(t['matmul'])} "
            f"| {ratio(t['matmul'], t['ours'])} |",
            flush=True,
        )


# The Llama-3.2-1B shape's matrices [out, in] as modeling/served.py packs them (q, k, v stacked;
# gate and up stacked), 16 layers, and its 128,256-token head.
LLAMA_1B_LAYERS = 16
LLAMA_1B_WEIGHTS = {
    "qkv": (3072, 2048),
    "o": (2048, 2048),
    "gate_up": (16384, 2048),
    "down": (2048, 8192),
    "head": (128256, 2048),
}


def read_bandwidth() -> float:
    """Bytes/s of summing a 512 MiB float32 buffer, best of five: the measure inference.bench
    judges decode against (same method, so the shares below compare with its table)."""
    buf = torch.ones(128 * 2**20)
    buf.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


def _weight_case(n: int, k: int, rows: int, budget: float) -> dict[str, tuple[float, int]]:
    """(seconds per call, weight bytes read) of each served weight dtype on one matrix."""
    w, x = torch.randn(n, k), torch.randn(rows, k)
    f32 = ops.pack_panels(w)
    bf16 = ops.pack_panels(w.to(torch.bfloat16))
    q, scale = ops.quantize_int8(w)
    del w  # the 1B head is 1 GB in float32: keep at most one copy alive besides the panels
    i8 = ops.pack_panels(q)
    i8_groups, sums = ops.pack_int8_panels(q)
    del q
    panel = torch.ops.kiln.panel_linear.default
    w8a8 = torch.ops.kiln.w8a8_linear.default
    cases: dict[str, tuple[Fn, int]] = {
        "float32": (lambda: panel(x, f32, n), f32.nbytes),
        "bfloat16": (lambda: panel(x, bf16, n), bf16.nbytes),
        "int8 panels": (lambda: panel(x, i8, n, scale), i8.nbytes + scale.nbytes),
        "int8 w8a8": (
            lambda: w8a8(x, i8_groups, sums, scale, n),
            i8_groups.nbytes + sums.nbytes + scale.nbytes,
        ),
    }
    t = best_times({c: (fn, None) for c, (fn, _) in cases.items()}, budget)
    return {c: (t[c], nbytes) for c, (_, nbytes) in cases.items()}


def run_weight_dtypes(budget: float, rows: int) -> None:
    """The served projections alone, per weight dtype, on the 1B shape's matrices: float32,
    bfloat16 and weight-only int8 panels (panel_linear) and W8A8 (w8a8_linear). Weight bytes
    over time against the machine's read bandwidth: at one row each should be bound by it."""
    bandwidth = read_bandwidth()
    print(
        f"\n## weight dtypes: x [{rows}, K] @ W.T on the Llama-3.2-1B shape's matrices; read "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s (sum of 512 MiB, {torch.get_num_threads()} "
        f"threads), load average {os.getloadavg()[0]:.2f}"
    )
    print("| W [out, in] | weights | us | weight GB/s | x bandwidth |")
    print("|---|---|---|---|---|")
    per_token: dict[str, float] = {}
    token_bytes: dict[str, int] = {}
    for name, (n, k) in LLAMA_1B_WEIGHTS.items():
        count = 1 if name == "head" else LLAMA_1B_LAYERS
        for c, (seconds, nbytes) in _weight_case(n, k, rows, budget).items():
            rate = nbytes / seconds
            print(
                f"| [{n}, {k}] | {c} | {us(seconds)} | {rate / 1e9:.1f} | {rate / bandwidth:.2f} |",
                flush=True,
            )
            per_token[c] = per_token.get(c, 0.0) + count * seconds
            token_bytes[c] = token_bytes.get(c, 0) + count * nbytes
    print(
        f"\nPer token ({LLAMA_1B_LAYERS} layers + head, projections only; x bandwidth = "
        "weight bytes per token / time / bandwidth):"
    )
    print("| weights | ms | x bandwidth |")
    print("|---|---|---|")
    for c, seconds in per_token.items():
        share = token_bytes[c] / seconds / bandwidth
        print(f"| {c} | {seconds * 1e3:.1f} | {share:.2f} |")


def run_alloc(budget: float) -> str:
    """The allocating functional forms against the `out` forms at [2048, 4096] fp32."""
    x, r = rand(2048, HIDDEN, dt=torch.float32), rand(2048, HIDDEN, dt=torch.float32)
    w = rand(HIDDEN, dt=torch.float32)
    out = torch.empty_like(x)
    kiln = torch.ops.kiln
    t = best_times(
        {
            "fused": (lambda: kiln.fused_add_rms_norm.default(x, r, w, EPS), None),
            "fused_out": (lambda: kiln.fused_add_rms_norm_out.default(x, r, w, EPS, out), None),
            "norm": (lambda: kiln.rms_norm.default(x, w, EPS), None),
            "norm_out": (lambda: kiln.rms_norm_out.default(x, w, EPS, out), None),
            "eager": (lambda: F.rms_norm(x, (HIDDEN,), w, EPS), None),
        },
        budget,
    )
    t_fused, t_fused_out, t_norm, t_norm_out = t["fused"], t["fused_out"], t["norm"], t["norm_out"]
    t_eager = t["eager"]
    allocator = loaded_allocator()
    return (
        f"| {allocator} | {us(t_fused)} | {us(t_fused_out)} | {ratio(t_fused, t_fused_out)} | "
        f"{us(t_norm)} | {us(t_norm_out)} | {ratio(t_norm, t_norm_out)} | {us(t_eager)} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ops", nargs="*", choices=[*sorted(OPS), "decode"], default=[*OPS, "decode"]
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the tensors live"
    )
    parser.add_argument(
        "--dtypes",
        nargs="*",
        choices=[*DTYPES, "fp16"],
        default=None,
        help="default: fp32 bf16 (and fp16 on CUDA)",
    )
    parser.add_argument("--budget", type=float, default=0.25, help="seconds per measurement")
    parser.add_argument("--alloc", action="store_true", help="only the allocator comparison")
    parser.add_argument(
        "--weight-dtypes",
        type=int,
        metavar="ROWS",
        default=None,
        help="only the served projections per weight dtype at ROWS rows (1B shape, ~2 GB RAM)",
    )
    parser.add_argument("--alloc-row", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each row, wait up to this many seconds for the CPUs to be idle",
    )
    args = parser.parse_args(argv)
    if not ops.HAVE_EXTENSION:
        print(f"kiln kernels are not built: {ops.UNAVAILABLE_REASON}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        return main_cuda(args)
    if args.alloc_row:  # one row of the allocator table, in a process with LD_PRELOAD set
        print(run_alloc(args.budget))
        return 0
    isas = ops.cpu_isas()
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU variant "
        f"{ops.cpu_isa()} (built and supported: {', '.join(isas)}), "
        f"allocator {loaded_allocator()}, load average {load:.2f}"
    )
    if args.weight_dtypes is not None:
        run_weight_dtypes(args.budget, args.weight_dtypes)
        return 0
    if args.alloc:
        print(
            "\n## per-call allocation: functional (new outputs) vs `out` forms, [2048, 4096] fp32"
        )
        print(
            "| allocator | fused_add_rms_norm_us | fused_add_rms_norm_out_us | ratio "
            "| rms_norm_us | rms_norm_out_us | ratio | eager F.rms_norm_us |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for preload in ("", TCMALLOC):
            if preload and not Path(preload).exists():
                print(f"(no {preload}: apt-get install libtcmalloc-minimal4)")
                continue
            env = dict(os.environ, LD_PRELOAD=preload)
            cmd = [
                sys.executable,
                "-m",
                "kernels.bench",
                "--alloc-row",
                "--budget",
                str(args.budget),
            ]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            print(done.stdout.strip().splitlines()[-1], flush=True)
        return 0
    second = "avx2" if "avx2" in isas and ops.cpu_isa() != "avx2" else None
    dtypes = {k: ALL_DTYPES[k] for k in args.dtypes} if args.dtypes else DTYPES
    for name in args.ops:
        if name in OPS:
            run_op(name, not args.no_compile, args.budget, second, args.quiet_wait, dtypes)
    if "fused_add_rms_norm_" in args.ops:
        run_decode_latency(args.budget)
    if "decode" in args.ops:
        run_decode_ops(args.budget)
    return 0


ALL_DTYPES = {**DTYPES, "fp16": torch.float16}


def main_cuda(args: argparse.Namespace) -> int:
    """The same tables for CUDA tensors: ours vs eager vs torch.compile vs a device copy."""
    global DEVICE
    if not torch.cuda.is_available():
        print("no CUDA device: --device cuda needs a GPU and a CUDA torch", file=sys.stderr)
        return 1
    if not ops.HAVE_CUDA_KERNELS:
        print(
            "the kiln extension was built without CUDA kernels (torch "
            f"{torch.__version__}, CUDA {torch.version.cuda})",
            file=sys.stderr,
        )
        return 1
    DEVICE = "cuda"
    props = torch.cuda.get_device_properties(0)
    print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), {props.name}, "
        f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, compute "
        f"capability {props.major}.{props.minor}; times from CUDA events"
    )
    dtypes = {k: ALL_DTYPES[k] for k in args.dtypes} if args.dtypes else dict(ALL_DTYPES)
    for name in args.ops:
        if name in OPS:
            run_op(name, not args.no_compile, args.budget, None, 0.0, dtypes)
    if "decode" in args.ops:
        print("\n(panel_linear and decode_attention are CPU-only ops: not run on CUDA)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
