"""Decode through fixed, padded per-batch-size buffers (`inference.graphs`), captured as CUDA
graphs on a GPU.

On CPU the same buffers run uncaptured: padded steps give the unpadded step's logits bitwise,
padded rows write only the scratch block, buckets are chosen right, and the engine answers as
without them. The CUDA tests (skipped without a GPU; `make gpu-check` runs them) check that a
captured bf16 step replays bitwise what the same step computes eagerly, and that a served
Hugging Face Llama answers the same with and without graphs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from inference import runner as runner_module
from inference.decoder import Decoder, Table
from inference.engine import EngineSettings, running_engine
from inference.graphs import (
    attention_shared_bytes,
    batch_buckets,
    bucket_for,
    shared_memory_per_block,
)
from inference.runner import ModelLoadError, ModelRunner
from inference.sequence import SamplingParams, Sequence
from modeling.config import ModelConfig
from modeling.model import LlamaModel
from tests.inference.support import TINY, invoke, start_server, write_model

CPU, FP32 = torch.device("cpu"), torch.float32
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CFG = dataclasses.replace(TINY, max_seq_len=128)


def kernels_built() -> None:
    from kernels import ops

    if not ops.HAVE_CPU_DECODE_OPS:
        pytest.skip(f"kiln kernels not built: {ops.UNAVAILABLE_REASON}")


def model(cfg: ModelConfig = CFG, seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    m = LlamaModel(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.3)
    return m


def scattered_tables(dec: Decoder, lengths: list[int], seed: int) -> list[Table]:
    """Block tables covering `lengths` (+ room for 8 more tokens), from shuffled blocks."""
    order = torch.randperm(dec.blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables: list[Table] = []
    for length in lengths:
        n = -(-(length + 8) // dec.block_size)
        tables.append(order[:n])
        order = order[n:]
    return tables


# -- buckets ---------------------------------------------------------------------------------------


def test_batch_buckets_are_powers_of_two_then_multiples_of_eight_up_to_the_batch() -> None:
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    big = batch_buckets(300)
    assert big[:5] == [1, 2, 4, 8, 16] and big[-5:] == [248, 256, 272, 288, 300]
    assert all(b - a <= 16 for a, b in itertools.pairwise(big))
    buckets = batch_buckets(32)
    chosen = {rows: bucket_for(buckets, rows) for rows in range(1, 33)}
    assert [chosen[r] for r in (1, 2, 3, 4, 5, 8, 9, 16, 17, 24, 25, 32)] == [
        1, 2, 4, 4, 8, 8, 16, 16, 24, 24, 32, 32,
    ]  # fmt: skip
    assert all(chosen[r] >= r and chosen[r] in buckets for r in chosen)
    for bad in (0, 33):
        with pytest.raises(ValueError, match=f"a decode step of {bad} rows"):
            bucket_for(buckets, bad)
    with pytest.raises(ValueError, match="at least one row"):
        batch_buckets(0)


def test_a_step_runs_at_the_smallest_bucket_that_holds_it() -> None:
    kernels_built()
    with torch.inference_mode():
        dec = Decoder(model(), slots=8, device=CPU, dtype=FP32, graphs=True)
        graphs = dec.graphs
        assert graphs is not None and graphs.buckets == [1, 2, 4, 8]
        ran: list[int] = []
        forward = graphs.forward
        graphs.forward = lambda buf: ran.append(buf.tokens.shape[0]) or forward(buf)  # type: ignore[func-returns-value]
        for b in range(1, 9):
            dec.prefill(b - 1, torch.arange(4))
            logits = dec.decode(list(range(b)), [4] * b, [1] * b)
            assert logits.shape == (b, CFG.vocab_size)
        assert ran == [1, 2, 4, 4, 8, 8, 8, 8]


# -- bitwise the same as unpadded decode -----------------------------------------------------------


def test_padded_fixed_buffer_decode_is_bitwise_the_unpadded_decode() -> None:
    """Every batch size 1..8 (buckets 1, 2, 4, 8), sequences of different lengths in scattered
    blocks, 6 steps each: the same logits, the same greedy tokens, the same real cache blocks."""
    kernels_built()
    lengths = [5, 17, 33, 2, 40, 16, 9, 61]
    ids = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        plain = Decoder(model(), slots=8, device=CPU, dtype=FP32)
        fixed = Decoder(model(), slots=8, device=CPU, dtype=FP32, graphs=True)
        assert fixed.graphs is not None and plain.graphs is None
        assert fixed.blocks == plain.blocks and fixed.cache.blocks == plain.cache.blocks + 1
        for b in range(1, 9):
            tables = scattered_tables(plain, lengths[:b], seed=b)
            tokens: list[int] = []
            for table, length in zip(tables, lengths, strict=False):
                want = plain.prefill(table, ids[:length])
                assert torch.equal(fixed.prefill(table, ids[:length]), want)
                tokens.append(int(want.argmax()))
            positions = lengths[:b]
            for step in range(6):
                at = [p + step for p in positions]
                want = plain.decode(tables, at, tokens)
                got = fixed.decode(tables, at, tokens)
                assert got.shape == want.shape == (b, CFG.vocab_size)
                assert torch.equal(got, want), (b, step)
                tokens = want.argmax(-1).tolist()
            for a, c in zip(plain.cache.kv, fixed.cache.kv, strict=True):
                assert torch.equal(c[:, : plain.blocks], a), b


def test_the_logits_returned_are_the_callers_own() -> None:
    """The buffers' output is overwritten by the next step; decode hands out a copy."""
    kernels_built()
    with torch.inference_mode():
        dec = Decoder(model(), slots=4, device=CPU, dtype=FP32, graphs=True)
        dec.prefill(0, torch.arange(6))
        first = dec.decode([0], [6], [3])
        kept = first.clone()
        dec.decode([0, 0], [7, 7], [5, 9])
        assert torch.equal(first, kept)


def test_padded_rows_write_only_the_scratch_block() -> None:
    kernels_built()
    with torch.inference_mode():
        dec = Decoder(model(), slots=8, device=CPU, dtype=FP32, graphs=True)
        graphs = dec.graphs
        assert graphs is not None and dec.scratch_block == dec.blocks
        tables: list[Table] = [[5, 9], [12], [30, 31]]
        for table in tables:
            dec.prefill(table, torch.arange(12))
        before = [kv.clone() for kv in dec.cache.kv]
        dec.decode(tables, [12, 3, 20], [1, 2, 3])  # 3 rows: bucket 4, one padded row
        for layer, kv in enumerate(dec.cache.kv):
            changed = (kv != before[layer]).any(dim=-1)  # [2, blocks, heads, rows]
            where = torch.unique(changed.nonzero()[:, [1, 3]], dim=0).tolist()
            # Each sequence's block and row of its position, and the scratch block's row 0.
            assert where == [[5, 12], [12, 3], [31, 4], [dec.scratch_block, 0]], layer
        # The padded row: token 0 at position 0, every table entry the scratch block.
        assert graphs.tokens[3].item() == 0 and graphs.positions[3].item() == 0
        assert set(graphs.tables[3].tolist()) == {dec.scratch_block}
        # The real rows' tables are padded with it too past their own blocks.
        assert graphs.tables[1].tolist()[:2] == [12, dec.scratch_block]
        rows = graphs.rows[: 4 * graphs.rows_per_seq].view(4, -1)
        want = dec.cache.prepare_rows([[5, 9], [12], [30, 31], [dec.blocks]], [12, 3, 20, 0])
        assert torch.equal(rows.flatten(), want)


class OpRecorder(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Every op a region dispatches, with its tensor arguments' shapes."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: list[tuple[str, tuple[tuple[int, ...], ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        shapes = tuple(
            tuple(a.shape) for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)
        )
        self.ops.append((str(func.overloadpacket.__name__), shapes))
        return func(*args, **(kwargs or {}))


def test_the_step_a_graph_captures_reads_nothing_back_and_never_branches_on_values() -> None:
    """What `capture` records, run on CPU under a dispatch mode: no op that reads a value to the
    host (`.item()`, `.tolist()`, `bool()` go through `_local_scalar_dense`) or whose output
    shape depends on values (`nonzero`...), and the same ops on the same shapes for steps of
    different sequences, lengths and tables in one bucket."""
    kernels_built()
    with torch.inference_mode():
        dec = Decoder(model(), slots=8, device=CPU, dtype=FP32, graphs=True)
        graphs = dec.graphs
        assert graphs is not None
        for slot in range(6):
            dec.prefill(slot, torch.arange(3 + 7 * slot))
        recorded = []
        steps = (
            ([0, 1, 2], [3, 10, 17], [1, 2, 3]),
            ([5, 4, 3, 2], [40, 33, 24, 9], [7, 6, 5, 4]),
            ([5, 3], [40, 30], [9, 8]),
        )
        for tables, positions, tokens in steps:
            n = graphs.load([dec.table(t) for t in tables], positions, tokens)
            assert n == bucket_for(graphs.buckets, len(tables))
            with OpRecorder() as rec:
                graphs.run(n)
            recorded.append(rec.ops)
        assert len(recorded[0]) > 10 * CFG.num_layers
        names = {name for name, _ in recorded[0]}
        assert "paged_decode_attention_out" in names and "index_copy_" in names
        forbidden = {"_local_scalar_dense", "nonzero", "unique", "masked_select", "item"}
        assert not names & forbidden
        assert recorded[0] == recorded[1]  # bucket 4, other values: the very same ops
        # Bucket 2: the same ops, on its own rows.
        assert [name for name, _ in recorded[2]] == [name for name, _ in recorded[0]]


def test_bad_steps_are_refused_on_the_host_before_anything_runs() -> None:
    kernels_built()
    with torch.inference_mode():
        dec = Decoder(model(), slots=4, device=CPU, dtype=FP32, graphs=True)
        with pytest.raises(ValueError, match="position 128 is outside the context"):
            dec.decode([[0, 1, 2, 3, 4, 5, 6, 7]], [128], [1])
        with pytest.raises(ValueError, match="a table of 1 blocks does not cover position 20"):
            dec.decode([[3]], [20], [1])
        with pytest.raises(ValueError, match="a decode step of 5 rows"):
            dec.decode([[0]] * 5, [0] * 5, [0] * 5)
        with pytest.raises(ValueError, match="one table, position and token per sequence"):
            dec.decode([[0], [1]], [0], [0, 0])


def test_capture_is_cuda_only_and_the_padded_backend_has_no_fixed_buffers() -> None:
    kernels_built()
    with torch.inference_mode():
        dec = Decoder(model(), slots=2, device=CPU, dtype=FP32, graphs=True)
        assert dec.capture_graphs() is False  # CPU: the buffers run uncaptured
        assert dec.graphs is not None
        with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
            dec.graphs.capture()
        with pytest.raises(ValueError, match="needs kiln's paged attention kernel"):
            Decoder(model(), slots=2, device=CPU, dtype=FP32, buckets=[2], graphs=True)


# -- the runner and the engine ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def graphs_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("graphs"))


def test_the_engine_answers_the_same_through_fixed_buffers(graphs_model: Path) -> None:
    """Eight concurrent greedy requests and preemption (a cache of 6 blocks) with the fixed
    buffers on (uncaptured on CPU) give the tokens the default engine gives."""
    kernels_built()
    prompts = [f"request {i}: tell me about kilns" for i in range(8)]
    params = SamplingParams(max_new_tokens=24)

    preempted: list[int] = []

    def answers(settings: EngineSettings) -> list[list[int]]:
        with running_engine(graphs_model, settings) as client:
            done: list[Sequence | None] = [None] * len(prompts)

            def ask(i: int) -> None:
                done[i] = client.generate(prompts[i], params)

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert client.engine.runner.decoder is not None
            on = client.engine.runner.decoder.graphs is not None
            assert on == bool(settings.cuda_graphs)
            assert client.engine.runner.model_info["cuda_graphs"] is False  # CPU: uncaptured
        preempted.append(sum(s.preemptions for s in done if s is not None))
        return [s.tokens for s in done if s is not None]

    base = EngineSettings(max_batch=8, warmup=False)
    want = answers(base)
    assert len(want) == len(prompts)
    assert answers(dataclasses.replace(base, cuda_graphs=True)) == want
    block = 2 * CFG.num_layers * CFG.num_kv_heads * 16 * CFG.head_dim * 4 / 2**30
    tight = dataclasses.replace(base, max_batch=4, max_seq_len=64, kv_cache_gib=6.5 * block)
    assert answers(dataclasses.replace(tight, cuda_graphs=True)) == answers(tight)
    assert preempted[-1] >= 1 and preempted[-2] >= 1  # blocks ran out, sequences recomputed


def test_the_gpu_dtype_and_the_graphs_flag_resolve_at_load(
    graphs_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from kernels import ops

    cuda = torch.device("cuda")
    runner = ModelRunner(graphs_model, slots=2)
    # On a GPU: the checkpoint's dtype for auto, else the one asked for; CPU: float32.
    assert runner._activation_dtype(cuda, "bfloat16") == torch.bfloat16
    assert runner._activation_dtype(cuda, "float16") == torch.float16
    assert runner._activation_dtype(cuda, "float32") == torch.float32
    assert runner._activation_dtype(CPU, "bfloat16") == torch.float32
    for asked, want in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        runner.weight_dtype = asked
        assert runner._activation_dtype(cuda, "float32") == want
    # Default: on for CUDA with the CUDA kernels, off on CPU; asked for without them: refused.
    monkeypatch.setattr(runner_module, "shared_memory_per_block", lambda device: 227 * 1024)
    assert runner._fixed_buffers(CPU, 2048) is False
    monkeypatch.setattr(ops, "HAVE_CUDA_KERNELS", True)
    assert runner._fixed_buffers(cuda, 2048) is True
    monkeypatch.setattr(ops, "HAVE_CUDA_KERNELS", False)
    with caplog.at_level(logging.WARNING, logger="inference.runner"):
        assert runner._fixed_buffers(cuda, 2048) is False
    assert "decode CUDA graphs off: kiln's paged attention kernel is missing" in caplog.text
    runner.cuda_graphs = True
    with pytest.raises(ModelLoadError, match="--cuda-graphs: kiln's paged attention kernel"):
        runner._fixed_buffers(cuda, 2048)
    # A context whose scores outgrow a thread block's shared memory: no graphs, and what to do.
    monkeypatch.setattr(ops, "HAVE_CUDA_KERNELS", True)
    too_long = (
        "the paged attention kernel holds a sequence's scores in shared memory: a context of "
        "131072 needs 512 KiB, cuda has 227 KiB per block (lower --max-seq-len to 58080 or less"
    )
    with pytest.raises(ModelLoadError, match=re.escape(too_long)):
        runner._fixed_buffers(cuda, 131072)
    assert runner._fixed_buffers(cuda, 58080) is True
    runner.cuda_graphs = None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inference.runner"):
        assert runner._fixed_buffers(cuda, 131072) is False
    assert "decode CUDA graphs off: " + too_long in caplog.text
    runner.cuda_graphs = False
    assert runner._fixed_buffers(cuda, 2048) is False


def test_the_attention_kernels_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    assert attention_shared_bytes(2048, 16) == (2048 + 32) * 4
    assert attention_shared_bytes(2050, 16) == (2064 + 32) * 4  # whole blocks
    props = types.SimpleNamespace(major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert shared_memory_per_block(torch.device("cuda")) == 227 * 1024  # by capability
    props.shared_memory_per_block_optin = 101376
    assert shared_memory_per_block(torch.device("cuda")) == 101376  # as torch reports it


def test_the_flag_and_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    from inference.serve import build_parser, main

    assert build_parser({}).parse_args([]).cuda_graphs is None  # on for CUDA, off on CPU
    assert build_parser({}).parse_args(["--cuda-graphs"]).cuda_graphs is True
    assert build_parser({}).parse_args(["--no-cuda-graphs"]).cuda_graphs is False
    assert build_parser({"KILN_CUDA_GRAPHS": "0"}).parse_args([]).cuda_graphs is False
    assert build_parser({"KILN_CUDA_GRAPHS": "True"}).parse_args([]).cuda_graphs is True
    flag_wins = build_parser({"KILN_CUDA_GRAPHS": "off"}).parse_args(["--cuda-graphs"])
    assert flag_wins.cuda_graphs is True
    assert main([], env={"KILN_CUDA_GRAPHS": "maybe"}) == 2
    err = capsys.readouterr().err
    assert "KILN_CUDA_GRAPHS='maybe': expected one of 1, true, yes, on, 0, false, no, off" in err


# -- CUDA ------------------------------------------------------------------------------------------


@CUDA_ONLY
def test_a_captured_bf16_step_replays_bitwise_the_eager_step() -> None:
    from kernels import ops

    if not ops.HAVE_CUDA_KERNELS:
        pytest.skip(f"kiln's CUDA kernels are not built: {ops.UNAVAILABLE_REASON}")
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    lengths = [5, 17, 33, 2, 40, 16, 9, 61, 70, 3, 12]
    ids = torch.randint(0, 256, (80,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        eager = Decoder(model(), slots=12, device=cuda, dtype=bf16)
        graphed = Decoder(model(), slots=12, device=cuda, dtype=bf16, graphs=True)
        assert graphed.attention_kernel and graphed.graphs is not None
        assert graphed.capture_graphs() is True
        graphs = graphed.graphs
        assert sorted(graphs.graphs) == graphs.buckets == [1, 2, 4, 8, 12]
        for b in (1, 3, 8, 11):
            tables = scattered_tables(eager, lengths[:b], seed=b)
            tokens: list[int] = []
            for table, length in zip(tables, lengths, strict=False):
                want = eager.prefill(table, ids[:length])
                assert torch.equal(graphed.prefill(table, ids[:length]), want)
                tokens.append(int(want.argmax()))
            for step in range(5):
                at = [p + step for p in lengths[:b]]
                want = eager.decode(tables, at, tokens)
                got = graphed.decode(tables, at, tokens)  # replayed
                n = graphs.load([graphed.table(t) for t in tables], at, tokens)  # uncaptured
                uncaptured = graphs.forward(graphs.views(n))[:b]
                assert got.dtype == want.dtype == torch.float32
                assert torch.isfinite(got).all()
                assert torch.equal(got, uncaptured), (b, step)
                assert torch.equal(got, want), (b, step)
                tokens = want.argmax(-1).tolist()
            for a, c in zip(eager.cache.kv, graphed.cache.kv, strict=True):
                assert torch.equal(c[:, : eager.blocks], a), b


@pytest.fixture(scope="module")
def hf_llama_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from tests.modeling.hf_models import build

    root = tmp_path_factory.mktemp("hf-llama-bf16")
    return build("llama-3.2-1b", root / "llama", dtype=torch.bfloat16)


@CUDA_ONLY
def test_a_served_hf_llama_answers_the_same_with_and_without_cuda_graphs(
    hf_llama_bf16: Path, tmp_path: Path
) -> None:
    from kernels import ops

    if not ops.HAVE_CUDA_KERNELS:
        pytest.skip(f"kiln's CUDA kernels are not built: {ops.UNAVAILABLE_REASON}")
    prompts = [f"The kiln number {i} fires" for i in range(10)]

    def answers(flag: str) -> tuple[list[str], str]:
        server = start_server(
            hf_llama_bf16,
            tmp_path / f"server{flag}.log",
            args=["--device", "cuda", flag, "--max-batch", "8"],
            timeout=300,
        )
        try:
            with ThreadPoolExecutor(len(prompts)) as pool:
                replies = list(
                    pool.map(
                        lambda p: invoke(server.port, p, max_new_tokens=16, temperature=0),
                        prompts,
                    )
                )
            assert all(r.status == 200 for r in replies), [r.body for r in replies]
            texts = [r.json()["generated_text"] for r in replies]
        finally:
            assert server.stop() == 0, server.log()
        return texts, server.log()

    with_graphs, log = answers("--cuda-graphs")
    assert re.search(r"captured decode CUDA graphs for batch sizes \[1, 2, 4, 8\]", log), log
    assert "bfloat16 on cuda" in log
    without, log_off = answers("--no-cuda-graphs")
    assert "captured decode CUDA graphs" not in log_off
    assert with_graphs == without
    assert any(text for text in with_graphs)
