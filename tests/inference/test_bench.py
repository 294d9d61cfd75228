"""The serving benchmark, smoke-tested on the tiny shape: it builds the model, runs kiln in each
weight dtype (each in its own process, with its memory line) and ctranslate2 where installed,
and prints the table with the bandwidth share at concurrency 1. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ops = pytest.importorskip("kernels.ops")

from inference import bench  # noqa: E402


@pytest.mark.skipif(not ops.HAVE_CPU_DECODE_OPS, reason="needs kiln's compiled CPU kernels")
def test_bench_runs_on_the_tiny_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--shape", "tiny", "--cache", str(tmp_path), "--new-tokens", "3"]
    args += ["--concurrency", "1,2", "--threads", "1", "--json", str(tmp_path / "out.json")]
    args += ["--ct2-batches", "1", "--ct2-compute", "int8", "--dtypes", "bfloat16,int8"]
    if importlib.util.find_spec("ctranslate2") is None:
        args.append("--no-ctranslate2")
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "memory read bandwidth:" in out
    assert "| kiln | int8 | 1 |" in out and "| kiln | bfloat16 | 2 |" in out
    assert "| transformers generate() | float32 | 1 |" in out
    assert "memory at start, int8: weights" in out
    results = json.loads((tmp_path / "out.json").read_text())
    rows = results["tiny"]["rows"]
    weights = {r["setting"]: r["weight_bytes"] for r in rows if r["system"] == "kiln"}
    assert weights["int8"] < weights["bfloat16"]
    if "--no-ctranslate2" not in args:
        assert "| ctranslate2 | int8 | 1 |" in out


def test_shapes_carry_the_released_vocabularies() -> None:
    assert bench.SHAPES["llama-3.2-1b"]["vocab_size"] == 128256
    assert bench.SHAPES["smollm2-360m"]["vocab_size"] == 49152
