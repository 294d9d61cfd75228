"""The Python face of kiln's ops: loads the compiled extension, registers fake kernels and autograd.

Callers use the functions here (`kernels.ops.rms_norm(x, w, eps)`, ...). With the extension loaded
they are the `torch.ops.kiln.*` operators themselves; without it (not built, or built for another
torch) they are the pure-PyTorch versions in `kernels.reference`, and the first call logs why.
Tensors on a GPU take the reference too when the extension was built without CUDA.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kernels import reference

log = logging.getLogger(__name__)

# Functional forms (with autograd) and the in-place / write-into-`out` forms (no allocation).
OP_NAMES = (
    "rms_norm",
    "rms_norm_out",
    "rms_norm_backward",
    "fused_add_rms_norm",
    "fused_add_rms_norm_",
    "fused_add_rms_norm_out",
    "silu_and_mul",
    "silu_and_mul_out",
    "silu_and_mul_backward",
    "rotary_embedding",
    "rotary_embedding_",
    "rotary_embedding_backward",
    "int8_linear",
    "int8_linear_out",
    "panel_linear",
    "panel_linear_out",
    "w8a8_linear",
    "w8a8_linear_out",
    "decode_attention",
    "decode_attention_out",
    "paged_decode_attention",
    "paged_decode_attention_out",
)


def _candidates() -> Iterator[Path]:
    """_C*.so next to this file first (editable or in-place builds), then in other `kernels/`
    directories on sys.path (the source tree imported while the built package is installed)."""
    here = Path(__file__).resolve().parent
    dirs = [here] + [Path(p) / "kernels" for p in sys.path if p]
    seen: set[Path] = set()
    for d in dirs:
        if d in seen:
            continue
        seen.add(d)
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = d / f"_C{suffix}"
            if path.is_file():
                yield path


def _load() -> tuple[Path | None, str]:
    if os.environ.get("KILN_KERNELS_DISABLE") == "1":
        return None, "disabled by KILN_KERNELS_DISABLE=1"
    errors = []
    for path in _candidates():
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as err:  # built for another torch, or a broken build
            errors.append(f"{path}: {err}")
            continue
        # A build from older sources lacks the newer ops: use the references, and say so.
        missing = [name for name in OP_NAMES if not hasattr(torch.ops.kiln, name)]
        if missing:
            return None, (
                f"{path} is a stale build without {', '.join(missing)} (run `make kernels` or "
                "`pip install --no-build-isolation -e ./kernels`)"
            )
        return path, ""
    if errors:
        return None, "could not load " + "; ".join(errors)
    return (
        None,
        "not built (run `pip install --no-build-isolation -e ./kernels`, or `make kernels`)",
    )


LIBRARY_PATH, UNAVAILABLE_REASON = _load()
HAVE_EXTENSION = LIBRARY_PATH is not None
# Whether the build has CUDA kernels (a CPU-only build still runs GPU tensors, on the reference).
HAVE_CUDA_KERNELS = HAVE_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
    "kiln::rms_norm", "CUDA"
)

_warned: set[str] = set()


def _note_fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("kiln kernels: using the pure-PyTorch reference ops: %s", reason)


# ------------------------------------------------------------------------------------------------
# fake (meta) kernels and autograd: only where the compiled ops exist

if HAVE_EXTENSION:

    @torch.library.register_fake("kiln::rms_norm")
    def _rms_norm_fake(x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return x.new_empty(x.shape)

    @torch.library.register_fake("kiln::rms_norm_out")
    def _rms_norm_out_fake(x: Tensor, weight: Tensor, eps: float, out: Tensor) -> None:
        return None

    @torch.library.register_fake("kiln::rms_norm_backward")
    def _rms_norm_backward_fake(
        grad: Tensor, z: Tensor, weight: Tensor, eps: float, grad_residual: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return z.new_empty(z.shape), weight.new_empty(weight.shape)

    @torch.library.register_fake("kiln::fused_add_rms_norm")
    def _fused_add_rms_norm_fake(
        x: Tensor, residual: Tensor, weight: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake("kiln::fused_add_rms_norm_")
    def _fused_add_rms_norm_inplace_fake(
        x: Tensor, residual: Tensor, weight: Tensor, eps: float
    ) -> None:
        return None

    @torch.library.register_fake("kiln::fused_add_rms_norm_out")
    def _fused_add_rms_norm_out_fake(
        x: Tensor, residual: Tensor, weight: Tensor, eps: float, out: Tensor
    ) -> None:
        return None

    @torch.library.register_fake("kiln::silu_and_mul")
    def _silu_and_mul_fake(x: Tensor) -> Tensor:
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    @torch.library.register_fake("kiln::silu_and_mul_out")
    def _silu_and_mul_out_fake(x: Tensor, out: Tensor) -> None:
        return None

    @torch.library.register_fake("kiln::silu_and_mul_backward")
    def _silu_and_mul_backward_fake(grad: Tensor, x: Tensor) -> Tensor:
        return x.new_empty(x.shape)

    @torch.library.register_fake("kiln::rotary_embedding")
    def _rotary_fake(
        positions: Tensor, query: Tensor, key: Tensor, cos_sin_cache: Tensor, is_neox: bool = True
    ) -> tuple[Tensor, Tensor]:
        return query.new_empty(query.shape), key.new_empty(key.shape)

    @torch.library.register_fake("kiln::rotary_embedding_")
    def _rotary_inplace_fake(
        positions: Tensor, query: Tensor, key: Tensor, cos_sin_cache: Tensor, is_neox: bool = True
    ) -> None:
        return None

    @torch.library.register_fake("kiln::rotary_embedding_backward")
    def _rotary_backward_fake(
        positions: Tensor,
        grad_query: Tensor,
        grad_key: Tensor,
        cos_sin_cache: Tensor,
        is_neox: bool = True,
    ) -> tuple[Tensor, Tensor]:
        return grad_query.new_empty(grad_query.shape), grad_key.new_empty(grad_key.shape)

    @torch.library.register_fake("kiln::int8_linear")
    def _int8_linear_fake(
        x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("kiln::int8_linear_out")
    def _int8_linear_out_fake(
        x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, out: Tensor
    ) -> None:
        return None

    @torch.library.register_fake("kiln::panel_linear")
    def _panel_linear_fake(
        x: Tensor, weight_panels: Tensor, out_features: int, scale: Tensor | None = None
    ) -> Tensor:
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("kiln::panel_linear_out")
    def _panel_linear_out_fake(
        x: Tensor,
        weight_panels: Tensor,
        out_features: int,
        out: Tensor,
        scale: Tensor | None = None,
    ) -> None:
        return None

    @torch.library.register_fake("kiln::w8a8_linear")
    def _w8a8_linear_fake(
        x: Tensor, weight_panels: Tensor, weight_sums: Tensor, scale: Tensor, out_features: int
    ) -> Tensor:
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("kiln::w8a8_linear_out")
    def _w8a8_linear_out_fake(
        x: Tensor,
        weight_panels: Tensor,
        weight_sums: Tensor,
        scale: Tensor,
        out_features: int,
        out: Tensor,
    ) -> None:
        return None

    @torch.library.register_fake("kiln::decode_attention_out")
    def _decode_attention_out_fake(
        query: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        slots: Tensor,
        lengths: Tensor,
        scale: float,
        out: Tensor,
    ) -> None:
        return None

    @torch.library.register_fake("kiln::decode_attention")
    def _decode_attention_fake(
        query: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        slots: Tensor,
        lengths: Tensor,
        scale: float,
    ) -> Tensor:
        return query.new_empty(query.shape)

    @torch.library.register_fake("kiln::paged_decode_attention_out")
    def _paged_decode_attention_out_fake(
        query: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        block_tables: Tensor,
        lengths: Tensor,
        scale: float,
        out: Tensor,
    ) -> None:
        return None

    @torch.library.register_fake("kiln::paged_decode_attention")
    def _paged_decode_attention_fake(
        query: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        block_tables: Tensor,
        lengths: Tensor,
        scale: float,
    ) -> Tensor:
        return query.new_empty(query.shape)

    # -- autograd: each backward is itself a kiln op, so torch.compile traces fwd+bwd whole --

    def _rms_norm_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps = eps

    def _rms_norm_bwd(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, weight = ctx.saved_tensors
        grad_x, grad_w = torch.ops.kiln.rms_norm_backward(grad, x, weight, ctx.eps, None)
        return grad_x, grad_w, None

    torch.library.register_autograd("kiln::rms_norm", _rms_norm_bwd, setup_context=_rms_norm_setup)

    def _fused_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        _, _, weight, eps = inputs
        ctx.save_for_backward(output[1], weight)  # the sum x + residual, as stored
        ctx.eps = eps

    def _fused_bwd(
        ctx: Any, grad_out: Tensor, grad_residual: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, None]:
        z, weight = ctx.saved_tensors
        grad_z, grad_w = torch.ops.kiln.rms_norm_backward(
            grad_out, z, weight, ctx.eps, grad_residual
        )
        return grad_z, grad_z, grad_w, None

    torch.library.register_autograd(
        "kiln::fused_add_rms_norm", _fused_bwd, setup_context=_fused_setup
    )

    def _silu_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[0])

    def _silu_bwd(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.kiln.silu_and_mul_backward(grad, x)

    torch.library.register_autograd("kiln::silu_and_mul", _silu_bwd, setup_context=_silu_setup)

    def _rotary_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        positions, _, _, cache, is_neox = inputs
        ctx.save_for_backward(positions, cache)
        ctx.is_neox = is_neox

    def _rotary_bwd(
        ctx: Any, grad_q: Tensor, grad_k: Tensor
    ) -> tuple[None, Tensor, Tensor, None, None]:
        positions, cache = ctx.saved_tensors
        gq, gk = torch.ops.kiln.rotary_embedding_backward(
            positions, grad_q, grad_k, cache, ctx.is_neox
        )
        return None, gq, gk, None, None  # the cos/sin table is a constant, not trained

    torch.library.register_autograd(
        "kiln::rotary_embedding", _rotary_bwd, setup_context=_rotary_setup
    )


# ------------------------------------------------------------------------------------------------
# the functions callers use


def _on_cuda_without_kernels(t: Tensor) -> str | None:
    return "the extension was built without CUDA kernels" if t.is_cuda else None


def _choose(
    name: str, not_compiled_for: Callable[[Tensor], str | None] | None = None
) -> Callable[..., Any]:
    """The compiled op, or the reference when the extension is absent or when
    `not_compiled_for(first argument)` gives a reason (default: a GPU tensor in a build without
    CUDA kernels)."""
    ref: Callable[..., Any] = getattr(reference, name)
    if not HAVE_EXTENSION:
        reason = UNAVAILABLE_REASON

        def fallback(*args: Any, **kwargs: Any) -> Any:
            _note_fallback(reason)
            return ref(*args, **kwargs)

        fallback.__name__ = name
        fallback.__doc__ = ref.__doc__
        return fallback
    op: Callable[..., Any] = getattr(torch.ops.kiln, name).default
    if not_compiled_for is None:
        if HAVE_CUDA_KERNELS:
            return op
        not_compiled_for = _on_cuda_without_kernels

    def by_input(*args: Any, **kwargs: Any) -> Any:
        reason = not_compiled_for(args[0])
        if reason is not None:
            _note_fallback(reason)
            return ref(*args, **kwargs)
        return op(*args, **kwargs)

    by_input.__name__ = name
    by_input.__doc__ = ref.__doc__
    return by_input


rms_norm = _choose("rms_norm")
rms_norm_out = _choose("rms_norm_out")
fused_add_rms_norm = _choose("fused_add_rms_norm")
fused_add_rms_norm_ = _choose("fused_add_rms_norm_")
fused_add_rms_norm_out = _choose("fused_add_rms_norm_out")
silu_and_mul = _choose("silu_and_mul")
silu_and_mul_out = _choose("silu_and_mul_out")
rotary_embedding = _choose("rotary_embedding")
rotary_embedding_ = _choose("rotary_embedding_")
int8_linear = _choose("int8_linear")
int8_linear_out = _choose("int8_linear_out")
quantize_int8 = reference.quantize_int8
rope_cache = reference.rope_cache
pack_panels = reference.pack_panels
# The decode ops (panel_linear, decode_attention) are compiled for CPU float32 only, and
# batch-invariant by construction there. Callers that need the guarantee check this.
HAVE_CPU_DECODE_OPS = HAVE_EXTENSION


def _not_cpu_float32(t: Tensor) -> str | None:
    if t.device.type == "cpu" and t.dtype == torch.float32:
        return None
    return f"the decode ops are compiled for CPU float32 only, not {t.device.type} {t.dtype}"


panel_linear = _choose("panel_linear", _not_cpu_float32)
panel_linear_out = _choose("panel_linear_out", _not_cpu_float32)
w8a8_linear = _choose("w8a8_linear", _not_cpu_float32)
w8a8_linear_out = _choose("w8a8_linear_out", _not_cpu_float32)
pack_int8_panels = reference.pack_int8_panels
decode_attention = _choose("decode_attention", _not_cpu_float32)
decode_attention_out = _choose("decode_attention_out", _not_cpu_float32)


def _paged_unsupported(t: Tensor) -> str | None:
    """The paged decode op runs on CPU in float32 and, with the CUDA kernels, on CUDA in any
    kernel dtype."""
    if t.device.type == "cuda":
        return None if HAVE_CUDA_KERNELS else "the extension was built without CUDA kernels"
    return _not_cpu_float32(t)


paged_decode_attention = _choose("paged_decode_attention", _paged_unsupported)
paged_decode_attention_out = _choose("paged_decode_attention_out", _paged_unsupported)


# ------------------------------------------------------------------------------------------------
# the CPU instruction-set variant (for tests and the benchmark)


def _cdll() -> ctypes.CDLL:
    if LIBRARY_PATH is None:
        raise RuntimeError(f"kiln kernels are not loaded: {UNAVAILABLE_REASON}")
    lib = ctypes.CDLL(str(LIBRARY_PATH))  # the library already loaded: same handle, same state
    lib.kiln_cpu_isa.restype = ctypes.c_char_p
    lib.kiln_cpu_isas_supported.restype = ctypes.c_char_p
    lib.kiln_set_cpu_isa.argtypes = [ctypes.c_char_p]
    lib.kiln_set_cpu_isa.restype = ctypes.c_int
    lib.kiln_cpu_int8_isa.restype = ctypes.c_char_p
    lib.kiln_set_int8_level.argtypes = [ctypes.c_int]
    lib.kiln_set_int8_level.restype = ctypes.c_int
    lib.kiln_time_decode_call_us.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.kiln_time_decode_call_us.restype = ctypes.c_double
    return lib


def cpu_isa() -> str:
    """The CPU variant in use: 'avx512', 'avx2' or 'generic' (best supported, or KILN_CPU_ISA)."""
    return str(_cdll().kiln_cpu_isa().decode())


def cpu_isas() -> list[str]:
    """The variants this build has and this CPU runs, best first."""
    return [s for s in _cdll().kiln_cpu_isas_supported().decode().split(",") if s]


def set_cpu_isa(name: str) -> None:
    rc = _cdll().kiln_set_cpu_isa(name.encode())
    if rc == 1:
        raise ValueError(f"no CPU variant {name!r} in this build; it has {cpu_isas()}")
    if rc == 2:
        raise ValueError(f"this CPU cannot run the {name!r} variant; it runs {cpu_isas()}")


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Runs the block on one CPU variant, then restores the previous one."""
    previous = cpu_isa()
    set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(previous)


def cpu_int8_isa() -> str:
    """The instruction set of w8a8_linear: 'amx_int8' (tile dot products), 'avx512_vnni'
    (vpdpbusd), or the CPU variant's own ('avx512' and 'avx2': vpmaddubsw; 'generic': C++)."""
    return str(_cdll().kiln_cpu_int8_isa().decode())


INT8_LEVELS = {"amx_int8": 2, "avx512_vnni": 1, "variant": 0}


@contextlib.contextmanager
def use_int8_isa(name: str) -> Iterator[None]:
    """Runs the block with w8a8_linear on at most `name` ('amx_int8', 'avx512_vnni', or
    'variant': the CPU variant's own build), each where the CPU has it."""
    if name not in INT8_LEVELS:
        raise ValueError(f"int8 instruction set must be one of {sorted(INT8_LEVELS)}, got {name!r}")
    lib = _cdll()
    previous = lib.kiln_set_int8_level(INT8_LEVELS[name])
    try:
        yield
    finally:
        lib.kiln_set_int8_level(previous)


def time_decode_call_from_cpp(n: int = 4096, iters: int = 20000) -> float:
    """Microseconds per fused_add_rms_norm_ call on a [1, n] float32 row, called through the
    dispatcher from C++ (no Python binding): the op's own cost, for the benchmark."""
    return float(_cdll().kiln_time_decode_call_us(n, iters))
