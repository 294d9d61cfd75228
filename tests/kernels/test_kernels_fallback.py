"""Without the compiled extension, kernels.ops runs the references and says so once in the log."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the kernel tests need torch (the `ml` extra)")

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import logging
    import torch
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
    from kernels import ops, reference as ref
    assert not ops.HAVE_EXTENSION, ops.LIBRARY_PATH
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    out, res = ops.fused_add_rms_norm(x, r, w, 1e-6)
    xi, ri = x.clone(), r.clone()
    ops.fused_add_rms_norm_(xi, ri, w, 1e-6)
    torch.testing.assert_close((xi, ri), (out, res))
    y = ops.silu_and_mul(torch.randn(2, 6, requires_grad=True))
    y.sum().backward()  # the references are differentiable
    print("OK")
    """
)


def test_reference_fallback_logs_once() -> None:
    env = dict(os.environ, KILN_KERNELS_DISABLE="1", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("OK")
    notes = [line for line in done.stderr.splitlines() if "pure-PyTorch reference" in line]
    assert len(notes) == 1, done.stderr
    assert "KILN_KERNELS_DISABLE" in notes[0]


def test_a_stale_build_is_named_and_not_used(kops: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A library built from older sources (an op of today's schema missing) is not the extension:
    the references run and the reason says which ops are missing and how to rebuild."""
    from kernels import ops

    monkeypatch.setattr(ops, "OP_NAMES", (*ops.OP_NAMES, "an_op_from_the_future"))
    path, reason = ops._load()
    assert path is None
    assert "stale build without an_op_from_the_future" in reason and "make kernels" in reason
