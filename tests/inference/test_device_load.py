"""Weights loaded onto the serving device tensor by tensor (`modeling.served.load_to_device`):
from the mapped safetensors files, in the served dtype, fused q/k/v and gate/up filled from their
parts, the host holding about one tensor at a time, never the model.

On CPU: the same function gives `load_model_dir`'s model bit for bit, in the stored dtype and
converted (bfloat16 <-> float32), for a tied Llama and a sharded Qwen2 with biases; a fresh process
loading a few hundred MB holds the model once, not twice; the memory line states the bound. The
CUDA tests (skipped without a GPU; `make gpu-check` runs them): a bfloat16 Llama loads onto the
GPU with the host's peak below baseline + half the model, the decoder copies nothing again, and
the served model's greedy tokens are transformers' within the bfloat16 tolerance of
`test_weights.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from inference.runner import ModelLoadError, ModelRunner, memory_line
from modeling.artifact import ArtifactError, load_model_dir
from modeling.served import load_to_device
from tests.inference.support import REPO
from tests.modeling.hf_models import build, hf_model

transformers = pytest.importorskip("transformers")
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16, FP32 = torch.bfloat16, torch.float32
# Max |logit difference| against transformers' float32 over the logits' std. test_weights.py
# allows 0.05 for bfloat16 weights over float32 activations; on a GPU the activations are bfloat16
# too: the same models served so on CPU (Decoder, dtype bfloat16) measured 0.042 (Llama) and 0.034
# (Qwen2) over 12 greedy steps, so int8's 0.1 here.
BF16_TOLERANCE = 0.1
# A few hundred MB of bfloat16 weights: big enough that a second copy stands out of the
# process's noise (tens of MB), small enough to build here in seconds.
BIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
}


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("llama-3.2-1b", tmp_path_factory.mktemp("llama") / "m", dtype=BF16)


@pytest.fixture(scope="module")
def qwen_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qwen")
    return build("qwen2.5-0.5b", root / "m", max_shard_size="200KB")


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name].cpu(), sb[name].cpu()), name
    assert torch.equal(a.rope.cpu(), b.rope.cpu())  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_on_cpu_the_model_is_load_model_dirs_bit_for_bit(
    llama_bf16: Path, dtype: torch.dtype
) -> None:
    """Stored bfloat16, loaded as bfloat16 (no conversion) and as float32 (widened exactly)."""
    with torch.inference_mode():
        got, info = load_to_device(llama_bf16, "cpu", dtype, max_seq_len=64)
        want, _ = load_model_dir(llama_bf16, dtype=dtype, max_seq_len=64)
    assert info["dtype"] == "bfloat16"
    assert all(p.device.type == "cpu" and p.dtype == dtype for p in got.parameters())
    assert got.lm_head is None  # tied: the embedding is the head
    assert_same_model(got, want)
    assert not got.training


def test_a_sharded_float32_model_with_biases_narrows_to_bfloat16_as_torch_rounds(
    qwen_sharded: Path,
) -> None:
    with torch.inference_mode():
        got, info = load_to_device(qwen_sharded, torch.device("cpu"), BF16)
        want, _ = load_model_dir(qwen_sharded, dtype=FP32)
    assert len(info["weights"]) > 1
    rounded = {name: t.to(BF16) for name, t in want.state_dict().items()}
    for name, t in got.state_dict().items():
        assert t.dtype == BF16 and torch.equal(t, rounded[name]), name
    # The fused q/k/v bias is the three parts stacked, in order.
    assert "layers.0.attn.qkv_proj.bias" in rounded


class Copies(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Every copy torch makes: (source device, source dtype, destination device, its dtype)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.seen: list[tuple[str, torch.dtype, str, torch.dtype]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        aten = torch.ops.aten
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            self.seen.append((src.device.type, src.dtype, out.device.type, out.dtype))
        return out


def test_off_the_host_parts_cross_in_the_stored_dtype_and_convert_there(
    llama_bf16: Path,
) -> None:
    """The meta device stands in for a GPU (no data, the same dispatch): torch would convert a
    host-to-device copy on the host, a float32 copy of each bfloat16 tensor there; the parts
    cross as bfloat16 and are widened on the device."""
    with Copies() as copies:
        model, _ = load_to_device(llama_bf16, "meta", FP32)
    assert all(p.device.type == "meta" and p.dtype == FP32 for p in model.parameters())
    crossing = [c for c in copies.seen if c[0] == "cpu" and c[2] == "meta"]
    weights = [c for c in crossing if c[1] == BF16]
    assert len(weights) == sum(len(v) for v in hf_sources(llama_bf16).values())
    assert all(c[1] == c[3] for c in crossing), crossing  # no conversion on the way
    # No weight copied on the host (the rotary table is computed there, from int64 positions).
    assert not [c for c in copies.seen if c[0] == c[2] == "cpu" and c[1] == BF16]
    widened = [c for c in copies.seen if c[0] == "meta" and c[1] == BF16 and c[3] == FP32]
    assert len(widened) == len(weights)


def hf_sources(directory: Path) -> dict[str, list[str]]:
    from modeling.artifact import read_config
    from modeling.hf import tensor_sources

    return tensor_sources(read_config(directory)[0])


def test_a_tensor_of_the_wrong_shape_names_the_file_and_the_parts(
    tmp_path: Path, llama_bf16: Path
) -> None:
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "m"
    directory.mkdir()
    for f in llama_bf16.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    tensors = load_file(directory / "model.safetensors")
    k = tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.1.self_attn.k_proj.weight"] = k[:-1].contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match=r"model\.safetensors: model\.layers\.1\.self_attn\.q"):
        load_to_device(directory, "cpu", BF16)


def test_int8_on_a_gpu_is_refused_saying_what_to_pass(llama_bf16: Path) -> None:
    runner = ModelRunner(llama_bf16, slots=2, weight_dtype="int8", device="cuda")
    with pytest.raises(ModelLoadError, match="int8 is served on CPU only, not cuda: pass"):
        runner._served_dtype(torch.device("cuda"), "bfloat16")


def test_the_memory_line_states_the_gpu_and_the_bound() -> None:
    mib = 2**20
    cpu = {"weights": 100 * mib, "kv_cache": 10 * mib, "rss": 300 * mib, "peak_rss": 500 * mib}
    line = memory_line(cpu, "int8")
    assert line.startswith("weights 100.0 MiB (int8), KV cache 10.0 MiB, RSS 300.0 MiB")
    assert line.endswith(
        "peak RSS over by 80.0 MiB: 1.1 x weights + KV cache + 300 MiB = 420.0 MiB"
    )
    gpu = {
        **cpu,
        "rss_before_weights": 250 * mib,
        "gpu_allocated": 120 * mib,
        "gpu_peak": 140 * mib,
    }
    line = memory_line(gpu, "bfloat16")
    assert line.startswith(
        "weights 100.0 MiB (bfloat16) on the GPU, KV cache 10.0 MiB on the GPU, GPU allocated "
        "120.0 MiB, peak 140.0 MiB; host RSS 300.0 MiB, peak RSS 500.0 MiB (250.0 MiB before "
        "the weights)"
    )
    assert line.endswith("GPU peak allocated within 1.1 x weights + KV cache + 300 MiB = 420.0 MiB")


# A fresh process: the peak RSS reset (clear_refs 5) once torch (and CUDA) are up, then the load.
PEAK_SCRIPT = """
import json, sys, torch
from pathlib import Path
from modeling.served import load_to_device
from kernels import ops  # imported before the baseline, as a server has it
device, dtype = sys.argv[2], getattr(torch, sys.argv[3])
if device.startswith("cuda"):
    torch.cuda.mem_get_info(device)
def status():
    return {k: int(v.split()[0]) * 1024 for k, _, v in (
        line.partition(":") for line in open("/proc/self/status")) if k in ("VmRSS", "VmHWM")}
open("/proc/self/clear_refs", "w").write("5")
base = status()
with torch.inference_mode():
    model, _ = load_to_device(Path(sys.argv[1]), device, dtype)
    after = status()
    out = {"base": base["VmRSS"], "base_peak": base["VmHWM"], "peak": after["VmHWM"],
           "rss": after["VmRSS"],
           "model": sum(p.numel() * p.element_size() for p in model.parameters())}
    if device.startswith("cuda"):
        from inference.decoder import Decoder
        torch.cuda.reset_peak_memory_stats(device)
        loaded = torch.cuda.memory_allocated(device)
        dec = Decoder(model, slots=4, device=torch.device(device), dtype=dtype, blocks=16)
        out |= {"gpu_loaded": loaded, "gpu_peak": torch.cuda.max_memory_allocated(device),
                "cache": dec.cache_bytes(), "weights": dec.weight_bytes()}
print(json.dumps(out))
"""


def peak(directory: Path, device: str, dtype: str) -> dict[str, Any]:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(directory), device, dtype],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def big_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("llama-3.2-1b", tmp_path_factory.mktemp("big") / "m", dtype=BF16, **BIG)


def test_on_cpu_the_host_holds_the_model_once_not_twice(big_bf16: Path) -> None:
    """bfloat16 stored, float32 served: ~470 MB. A second copy (or the file's pages kept) would
    put the peak near twice that; one tensor at a time (the largest 16 MB) keeps it near once."""
    m = peak(big_bf16, "cpu", "float32")
    stored = sum(p.stat().st_size for p in big_bf16.glob("*.safetensors"))
    assert m["model"] > 1.9 * stored  # widened to float32
    assert m["base_peak"] < m["base"] + 20 * 2**20  # the reset took
    grown = m["peak"] - m["base"]
    assert m["model"] * 0.9 < grown < m["model"] * 1.15, (m, grown)


@CUDA_ONLY
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_on_cuda_the_host_never_holds_the_model(big_bf16: Path, dtype: str) -> None:
    """Host peak below baseline + half the model; on the GPU the model once, and the decoder's
    move to the device copies nothing (its peak is the weights and the cache, a few MB more)."""
    m = peak(big_bf16, "cuda", dtype)
    assert m["base_peak"] < m["base"] + 20 * 2**20
    assert m["peak"] - m["base"] < m["model"] / 2, m
    assert m["weights"] == m["model"]
    assert m["gpu_loaded"] < m["model"] + 16 * 2**20, m
    assert m["gpu_peak"] < m["model"] + m["cache"] + 64 * 2**20, m


@CUDA_ONLY
def test_a_bf16_llama_served_on_cuda_picks_transformers_tokens(
    llama_bf16: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Greedy for 12 tokens on the GPU in bfloat16: logits within the tolerance of transformers'
    float32 ones (the bf16 weights widened exactly), and each token kiln picks transformers'
    choice unless its two best are nearer than twice the tolerance (a near tie)."""
    caplog.set_level("INFO", logger="inference.runner")
    runner = ModelRunner(llama_bf16, slots=4, device="cuda", max_seq_len=128)
    runner.load()
    assert runner.model_info["device"].startswith("cuda")
    assert runner.model_info["dtype"] == "bfloat16"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("memory:"))
    assert "on the GPU" in line and "GPU peak allocated within" in line, line
    decoder = runner.decoder
    assert decoder is not None
    assert all(p.device.type == "cuda" for p in decoder.model.parameters())
    reference = hf_model(llama_bf16)  # float32: bf16 weights widened exactly
    ids = [1, 17, 99, 5, 42, 7, 300, 12]
    prompt = len(ids)
    with torch.inference_mode():
        logits = decoder.prefill(0, torch.tensor(ids))
        for _ in range(12):
            want = reference(torch.tensor([ids])).logits[0, -1].float()
            got = logits.cpu()
            assert float((got - want).abs().max() / want.std()) < BF16_TOLERANCE
            token = int(got.argmax())
            if token != int(want.argmax()):
                top2 = want.topk(2).values
                assert float(top2[0] - top2[1]) < 2 * BF16_TOLERANCE * float(want.std()), ids
            ids.append(token)
            logits = decoder.decode([0], [len(ids) - 1], [token])[0]
    assert len(ids) == prompt + 12
