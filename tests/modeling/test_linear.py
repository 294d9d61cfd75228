"""Projection implementations: each form computes x @ W.T (+ b); decode forms stay invariant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modeling.linear import PanelLinear, RowLinear, dense_linear


def test_every_form_adds_a_bias_and_decode_forms_stay_batch_invariant() -> None:
    """No kiln model has biases yet; Qwen2's qkv does, and it needs only `bias=True` here."""
    from kernels import ops

    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(40, 96)
    x = torch.randn(9, 40, generator=gen)
    with torch.inference_mode():
        want = linear(x)
        torch.testing.assert_close(dense_linear(linear, x), want)
        row = RowLinear(linear.weight, [2, 8, 32], linear.bias)
        torch.testing.assert_close(row(x), want)
        assert RowLinear(linear.weight, [8], linear.bias).check_invariance()
        if not ops.HAVE_CPU_DECODE_OPS:
            pytest.skip(f"kiln kernels not built: {ops.UNAVAILABLE_REASON}")
        for reuse in (True, False):
            panel = PanelLinear(linear.weight, 16, ops, reuse_output=reuse, bias=linear.bias)
            torch.testing.assert_close(panel(x), want, rtol=1e-5, atol=1e-5)
            assert panel.check_invariance()
