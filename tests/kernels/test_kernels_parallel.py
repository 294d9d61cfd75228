"""kiln's CPU thread pool (kernels/csrc/cpu/parallel.h) under the ops that use it: the same
bits at any thread count, with a busy neighbour core, from two Python threads at once, and in a
forked child (which has none of the pool's workers)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the kernel tests need torch (the `ml` extra)")

from kernels import reference as ref  # noqa: E402


def randn(*shape: int, seed: int = 0) -> Any:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def inputs(seed: int) -> dict[str, Any]:
    w = randn(1000, 512, seed=seed)
    q8, scale = ref.quantize_int8(w)
    return {
        "panels": [ref.pack_panels(w), ref.pack_panels(w.bfloat16()), ref.pack_panels(q8)],
        "scale": scale,
        "x": [randn(m, 512, seed=seed + m) for m in (1, 7, 32)],
        "qkv": (
            randn(16, 8, 64, seed=seed + 1),
            randn(16, 2, 256, 64, seed=seed + 2),
            randn(16, 2, 256, 64, seed=seed + 3),
        ),
        "norm": (randn(300, 2048, seed=seed + 4), randn(300, 2048, seed=seed + 5)),
    }


# Made before any test forks: a forked child must not run torch's own OpenMP ops (libgomp's
# pool does not survive fork), only kiln's.
INPUTS = {seed: inputs(seed) for seed in (0, 100)}


def run_ops(kops: Any, seed: int = 0, norm: bool = True) -> list[Any]:
    """panel_linear (float32, bf16, int8; one row and many), decode attention and a fused
    norm, at sizes that split into many chunks; only kiln's ops."""
    a = INPUTS[seed]
    out = []
    for x in a["x"]:
        out.append(kops.panel_linear(x, a["panels"][0], 1000))
        out.append(kops.panel_linear(x, a["panels"][1], 1000))
        out.append(kops.panel_linear(x, a["panels"][2], 1000, a["scale"]))
    q, k, v = a["qkv"]
    lengths = torch.arange(16) * 13 + 40
    out.append(kops.decode_attention(q, k, v, torch.arange(16), lengths, 0.125))
    if not norm:  # its input copies are torch's OpenMP ops
        return out
    x, res = (t.clone() for t in a["norm"])
    kops.fused_add_rms_norm_(x, res, torch.ones(2048), 1e-6)
    out += [x, res]
    return out


def test_results_do_not_depend_on_the_thread_count(kops: Any, threads: None) -> None:
    torch.set_num_threads(1)
    one = run_ops(kops)
    for n in (2, 3, 4, 8):
        torch.set_num_threads(n)
        for a, b in zip(one, run_ops(kops), strict=True):
            assert torch.equal(a, b), f"{n} threads"


def test_results_hold_beside_a_busy_core(kops: Any, threads: None) -> None:
    """A process spinning on this process's first CPU: every chunk still runs, once."""
    torch.set_num_threads(1)
    one = run_ops(kops)
    cpu = min(os.sched_getaffinity(0))
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    busy = subprocess.Popen([sys.executable, "-c", code])
    try:
        torch.set_num_threads(2)
        for _ in range(3):
            for a, b in zip(one, run_ops(kops), strict=True):
                assert torch.equal(a, b)
    finally:
        busy.kill()
        busy.wait()


def test_two_python_threads_at_once(kops: Any, threads: None) -> None:
    """One caller holds the pool; the other runs its ops inline, with the same results."""
    torch.set_num_threads(2)
    expected = [run_ops(kops, seed) for seed in (0, 100)]
    got: dict[int, list[Any]] = {}
    errors: list[BaseException] = []

    def worker(i: int, seed: int) -> None:
        try:
            for _ in range(5):
                got[i] = run_ops(kops, seed)
        except BaseException as err:  # reported below
            errors.append(err)

    ts = [threading.Thread(target=worker, args=(i, s)) for i, s in enumerate((0, 100))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for i in range(2):
        for a, b in zip(expected[i], got[i], strict=True):
            assert torch.equal(a, b)


def _child(queue: Any) -> None:
    from kernels import ops

    torch.set_num_threads(2)
    queue.put([t.tolist() for t in run_ops(ops, norm=False)])


def test_a_forked_child_runs_the_ops(kops: Any, threads: None) -> None:
    """The pool's workers are not in a forked child: its calls run inline, and finish."""
    torch.set_num_threads(2)
    expected = [t.tolist() for t in run_ops(kops, norm=False)]  # the pool has started here
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    result = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert result == expected
