"""Weights as served on CPU: a model directory's matrices read memory-mapped in their own dtype,
packed once into `panel_linear`'s panels as float32, bfloat16 or int8, never a float32 copy.

`load_served(directory, weight_dtype)` builds the model on the meta device and fills it:

- Every matrix (the projections, the embedding, an untied head) becomes a `PackedWeight`:
  float32 and bfloat16 as panels `[ceil(N/64), K, 64]` (`kernels.reference.pack_panels`' layout,
  computed by `panel_linear`); int8 quantized symmetrically per output channel
  (`kernels.reference.quantize_int8`: a float32 scale per output feature) and packed for
  `w8a8_linear` (`pack_int8_panels`: `[ceil(N/64), ceil(K/4), 64, 4]` and the row sums), which
  quantizes the activations per row too and multiplies in integers (W8A8, as ctranslate2's int8
  does). The module keeps an empty placeholder. A tied embedding is
  packed once and serves both the head's projection and the token lookup (`PackedWeight.rows`:
  an int8 row's scale is its output feature's).
- Norm weights and biases (small) are loaded as float32 parameters.

The safetensors files are mapped, not read: a tensor is a view of the mapping in its stored
dtype, converted about 2^20 elements (whole panels of rows) at a time into the panels, and its
pages are released (`madvise(MADV_DONTNEED)`) once packed. So peak memory is the served weights
plus one chunk, not the file, and a bfloat16 checkpoint served as bfloat16 or int8 never exists
in float32.

`load_to_device(directory, device, dtype)` is the plain model (no panels) for a GPU: each
parameter allocated on the device in the served dtype and filled from the mapped parts (a fused
q/k/v or gate/up from its parts, in place), crossing to the device in the stored dtype and
converted there; each part's pages are released once copied. The host holds about one tensor at a
time, never the model: an 8B bfloat16 checkpoint (16 GB) loads onto a 24 GB GPU from a 32 GiB host.
On CPU the same function gives `modeling.artifact.load_model_dir`'s model bit for bit (tested).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import json
import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kernels import reference
from modeling import hf
from modeling.artifact import CONFIG_FILE, LEGACY_FORMAT, ArtifactError, read_config
from modeling.config import ModelConfig
from modeling.model import LlamaModel, load_ops
from modeling.rope import rope_table

WeightDtype = Literal["auto", "float32", "bfloat16", "int8"]
WEIGHT_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "int8")
PANEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
# Elements converted at a time (whole panels of rows, at least one): bounds the float32 scratch.
# int8's quantization makes about four temporaries of a chunk's size: at 1,024 rows of 8,192 that
# was 130 MiB above the weights at the peak of a Llama-3.2-1B load (its memory line 11 MiB over
# the bound); at 2^20 elements (4 MiB) it is ~20 MiB.
CHUNK_ELEMENTS = 1 << 20
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def resolve_weight_dtype(requested: str, stored: str | None) -> str:
    """The served dtype: `requested`, or for "auto" the stored one where panels hold it
    (bfloat16 as bfloat16; float32 and float16, which widens exactly, as float32)."""
    if requested not in WEIGHT_DTYPES:
        raise ValueError(
            f"weight dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {requested!r}"
        )
    if requested != "auto":
        return requested
    return "bfloat16" if stored == "bfloat16" else "float32"


@dataclass(slots=True)
class PackedWeight:
    """One matrix [out_features, in_features] as `panel_linear` (float32, bfloat16) or
    `w8a8_linear` (int8: with `scale` and `sums`) reads it."""

    panels: Tensor
    scale: Tensor | None  # int8: float32 [out_features]
    out_features: int
    in_features: int
    sums: Tensor | None = None  # int8: int32 [out_features], each row's sum

    def nbytes(self) -> int:
        extra = sum(t.numel() * 4 for t in (self.scale, self.sums) if t is not None)
        return self.panels.numel() * self.panels.element_size() + extra

    def rows(self, ids: Tensor) -> Tensor:
        """Rows `ids` [...] of the matrix as float32 [..., in_features] (the embedding lookup)."""
        width = reference.PANEL_WIDTH
        flat = ids.reshape(-1)
        if self.sums is None:
            out = self.panels[flat // width, :, flat % width].float()
        else:  # [n, ceil(K/4), 4] -> [n, K]
            picked = self.panels[flat // width, :, flat % width, :]
            out = picked.reshape(flat.shape[0], -1)[:, : self.in_features].float()
        if self.scale is not None:
            out.mul_(self.scale[flat].unsqueeze(1))
        return out.view(*ids.shape, self.in_features)

    def dense(self) -> Tensor:
        """The float32 matrix (tests and quality checks; not used for serving)."""
        if self.sums is None:
            w = reference.unpack_panels(self.panels, self.out_features).float()
        else:
            w = reference.unpack_int8_panels(
                self.panels, self.out_features, self.in_features
            ).float()
        return w if self.scale is None else w * self.scale[:, None]


class _Mapped:
    """A safetensors file mapped read-only: its tensors as views, their pages released after."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ArtifactError(f"{path} is not a safetensors file (shorter than 8 bytes)")
                (n,) = struct.unpack("<Q", head)
                header = json.loads(f.read(n))
                # Private and copy-on-write (never written): torch views it without a warning.
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError, struct.error) as err:
            raise ArtifactError(f"{path}: {type(err).__name__}: {err}") from err
        self.base = 8 + n
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header

    def tensor(self, name: str) -> Tensor:
        entry = self.entries[name]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ArtifactError(
                f"{self.path}: {name} is {entry['dtype']}; kiln serves F32, BF16 or F16 weights"
            )
        begin, end = entry["data_offsets"]
        count = (end - begin) // torch.empty(0, dtype=dtype).element_size()
        if count == 0:
            return torch.empty(entry["shape"], dtype=dtype)
        flat = torch.frombuffer(self.map, dtype=dtype, count=count, offset=self.base + begin)
        return flat.view(entry["shape"])

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Drops the tensor's pages (or those of its `rows` [first, end)) from this process
        (they stay in the page cache). The mapping is never written, so a page that also holds
        bytes still to be read is only read again from the page cache."""
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        if rows is not None:
            row_bytes = (end - begin) // max(1, int(entry["shape"][0]))
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        start = (self.base + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > begin:
            self.map.madvise(mmap.MADV_DONTNEED, start, self.base + end - start)


def _pack(
    parts: list[Tensor],
    dtype: str,
    done: Callable[[int, int, int], None] | None = None,
) -> PackedWeight:
    """The row-stacked parts as panels of `dtype`, about CHUNK_ELEMENTS at a time (whole
    panels of rows); `done(part, first_row, end_row)` after each chunk, for the rows of each
    part it read."""
    n = sum(p.shape[0] for p in parts)
    k = int(parts[0].shape[1])
    width = reference.PANEL_WIDTH
    chunk_rows = max(1, CHUNK_ELEMENTS // max(1, k) // width) * width
    int8 = dtype == "int8"
    if int8:
        groups = -(-k // reference.INT8_GROUP)
        panels = torch.empty(-(-n // width), groups, width, reference.INT8_GROUP, dtype=torch.int8)
    else:
        panels = torch.empty(-(-n // width), k, width, dtype=PANEL_DTYPES[dtype])
    scale = torch.empty(n, dtype=torch.float32) if int8 else None
    sums = torch.empty(n, dtype=torch.int32) if int8 else None
    offsets = [0]
    for p in parts:
        offsets.append(offsets[-1] + p.shape[0])
    for start in range(0, n, chunk_rows):
        end = min(n, start + chunk_rows)
        pieces = [
            part[max(start, lo) - lo : min(end, hi) - lo].float()
            for part, lo, hi in zip(parts, offsets, offsets[1:], strict=False)
            if lo < end and hi > start
        ]
        chunk = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if scale is not None and sums is not None:
            chunk, scale[start:end] = reference.quantize_int8(chunk)
            packed, sums[start:end] = reference.pack_int8_panels(chunk)
        else:
            packed = reference.pack_panels(chunk.to(panels.dtype))
        panels[start // width : start // width + packed.shape[0]] = packed
        del chunk, packed, pieces
        if done is not None:
            for i, (lo, hi) in enumerate(itertools.pairwise(offsets)):
                if lo < end and hi > start:
                    done(i, max(start, lo) - lo, min(end, hi) - lo)
    return PackedWeight(panels, scale, n, k, sums)


@contextlib.contextmanager
def returning_scratch_to_the_os() -> Iterator[None]:
    """glibc malloc serves blocks under a threshold that grows to 32 MiB from its heap, and the
    packed weights allocated between the chunks' scratch pin the freed scratch there: measured
    here, 200 MB of resident memory for 54 MB of int8 weights. While packing, blocks from 1 MiB
    are mapped and unmapped on their own; after, the threshold sits at glibc's usual ceiling and
    what is free is trimmed. Elsewhere (no glibc) nothing changes. The server's load-time checks
    and warm-up run inside it too (`inference.runner`): their [rows, vocab] logits fragment the
    heap the same way."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    mallopt = getattr(libc, "mallopt", None)
    m_mmap_threshold = -3
    if mallopt is not None:
        mallopt(m_mmap_threshold, 1 << 20)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(m_mmap_threshold, 32 << 20)
            libc.malloc_trim(0)  # type: ignore[union-attr]


def load_served(
    directory: str | Path, weight_dtype: str, *, max_seq_len: int | None = None
) -> tuple[LlamaModel, dict[str, PackedWeight], dict[str, Any]]:
    """The model (norms and biases in float32, matrices as empty placeholders), its matrices
    packed by parameter name, and `read_config`'s info. `weight_dtype`: float32, bfloat16, int8."""
    if weight_dtype not in PANEL_DTYPES:
        raise ValueError(f"weight dtype must be float32, bfloat16 or int8, got {weight_dtype!r}")
    with returning_scratch_to_the_os():
        return _load(Path(directory), weight_dtype, max_seq_len)


def _mapped_sources(
    directory: Path, cfg: ModelConfig, info: dict[str, Any], model: LlamaModel
) -> tuple[dict[str, list[str]], list[_Mapped], dict[str, _Mapped]]:
    """Each parameter's stored parts (`hf.tensor_sources`), the mapped files and which file holds
    each part; an ArtifactError naming the files where the tensors do not match the config."""
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if info["format"] == LEGACY_FORMAT:
        sources = {name: [name] for name in expected}
    else:
        sources = hf.tensor_sources(cfg)
    files = [_Mapped(directory / name) for name in info["weights"] if _exists(directory / name)]
    where = {name: f for f in files for name in f.entries}
    needed = {n for parts in sources.values() for n in parts}
    missing = sorted(needed - set(where))
    ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(
        n for n in set(where) - needed - ignored if not n.endswith(hf.IGNORED_SUFFIXES)
    )
    if missing or unexpected:
        shown = ", ".join(f.path.name for f in files)
        raise ArtifactError(
            f"{shown}: the tensors do not match {directory / CONFIG_FILE}: missing "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    return sources, files, where


def _stored_parts(
    directory: Path,
    part_names: list[str],
    where: dict[str, _Mapped],
    expected: torch.Size,
) -> tuple[list[Tensor], tuple[int, ...]]:
    """Views of a parameter's parts in the mapping and the stacked shape, checked against the
    config's (an ArtifactError naming the file and the parts where they differ)."""
    parts = [where[p].tensor(p) for p in part_names]
    rows = sum(p.shape[0] for p in parts)
    shape = (rows, *parts[0].shape[1:])
    if shape != tuple(expected) or any(p.shape[1:] != parts[0].shape[1:] for p in parts):
        shapes = ", ".join(str(tuple(p.shape)) for p in parts)
        verb, together = ("is", "") if len(parts) == 1 else ("are", " together")
        raise ArtifactError(
            f"{where[part_names[0]].path}: {', '.join(part_names)} {verb} {shapes} where "
            f"{directory / CONFIG_FILE} needs {tuple(expected)}{together}"
        )
    return parts, shape


def _load(
    directory: Path, weight_dtype: str, max_seq_len: int | None
) -> tuple[LlamaModel, dict[str, PackedWeight], dict[str, Any]]:
    cfg, info = read_config(directory, max_seq_len=max_seq_len)
    load_ops("kiln")
    with torch.device("meta"):
        model = LlamaModel(cfg, ops="kiln")
    expected = {name: p.shape for name, p in model.state_dict().items()}
    sources, files, where = _mapped_sources(directory, cfg, info, model)
    packed: dict[str, PackedWeight] = {}
    state: dict[str, Tensor] = {}
    for name, part_names in sources.items():
        parts, shape = _stored_parts(directory, part_names, where, expected[name])
        if len(shape) == 2:
            # Each chunk's source rows released once packed: a matrix's mapped pages are not
            # all resident at once (Llama-3.2-1B's gate/up: 64 MiB of bfloat16, which was the
            # load's peak above the weights).
            def done(i: int, lo: int, hi: int, names: list[str] = part_names) -> None:
                where[names[i]].release(names[i], (lo, hi))

            packed[name] = _pack(parts, weight_dtype, done)
            state[name] = torch.empty(0)
        else:
            state[name] = (
                torch.cat(parts).float()
                if len(parts) > 1
                else parts[0].to(torch.float32, copy=True)
            )
        del parts  # views of the mapping: dropped before it is closed
        for p in part_names:
            where[p].release(p)
    for f in files:
        f.map.close()
    # The placeholders have the wrong shape on purpose: the packed matrices replace them.
    for name, tensor in state.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
    model.rope = rope_table(cfg)
    return model.eval(), packed, info


def load_to_device(
    directory: str | Path,
    device: str | torch.device,
    dtype: torch.dtype,
    *,
    max_seq_len: int | None = None,
) -> tuple[LlamaModel, dict[str, Any]]:
    """The model (eval mode) with every parameter on `device` in `dtype`, and `read_config`'s
    info; the rotary table on `device` in float32, as `load_model_dir` makes it."""
    directory, device = Path(directory), torch.device(device)
    cfg, info = read_config(directory, max_seq_len=max_seq_len)
    load_ops("kiln")  # imports the kernels outside the meta-device context
    with torch.device("meta"):
        model = LlamaModel(cfg, ops="kiln")
    expected = {name: p.shape for name, p in model.state_dict().items()}
    sources, files, where = _mapped_sources(directory, cfg, info, model)
    state: dict[str, Tensor] = {}
    try:
        for name, part_names in sources.items():
            parts, shape = _stored_parts(directory, part_names, where, expected[name])
            out = torch.empty(shape, dtype=dtype, device=device)
            start = 0
            for part, part_name in zip(parts, part_names, strict=True):
                rows = part.shape[0]
                if part.dtype != dtype and device.type != "cpu":
                    # torch converts a host-to-device copy on the host: a float32 copy of a
                    # bfloat16 tensor there. Across in the stored dtype, converted on the device.
                    part = part.to(device)
                out[start : start + rows].copy_(part)  # synchronous: the pages are read now
                start += rows
                del part
                where[part_name].release(part_name)
            del parts
            state[name] = out
    finally:
        for f in files:
            # After an error the traceback may still hold views of the mapping.
            with contextlib.suppress(BufferError):
                f.map.close()
    model.load_state_dict(state, assign=True, strict=True)
    model.rope = rope_table(cfg).to(device)
    return model.eval(), info


def _exists(path: Path) -> bool:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    return True


def packed_by_module(
    model: LlamaModel, packed: dict[str, PackedWeight]
) -> dict[nn.Module, PackedWeight]:
    """The packed matrices keyed by the module that holds each (the head's is the embedding's
    when tied)."""
    out = {}
    for name, weight in packed.items():
        module_name = name.removesuffix(".weight")
        out[model.get_submodule(module_name)] = weight
    return out
