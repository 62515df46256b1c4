"""The backend registry: one op contract (ptl_fused.ops), several implementations.

A backend supplies the two functional cells for tensors on some device types. ``"auto"``
takes the first available backend of AUTO_ORDER[device type].
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.utils.checkpoint

import python_ref

from . import _extension


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]  # devices it runs on
    # The cells of ptl_fused.ops, called with its positional arguments and, where set,
    # recompute=True (keep no gates for backward; compute them again there).
    bconv_cell: Callable
    bconv_cell_v2: Callable
    bconv_cell_eval: Callable  # the zero-state inference shortcut (python_ref/eval_path.py)
    unavailable: Callable[[], str | None]  # why it cannot run here, or None


def _always() -> None:
    return None


def _checkpointed(cell: Callable) -> Callable:
    """The reference's recompute: python_ref's cells are pure functions, so torch's own
    activation checkpointing keeps their inputs alone and runs them again in backward. They
    draw no random numbers, so no RNG state is saved: reading the CUDA generator's is an
    error under CUDA-graph capture."""

    def run(*args, recompute: bool = False):
        if not recompute:
            return cell(*args)
        return torch.utils.checkpoint.checkpoint(cell, *args, use_reentrant=False, preserve_rng_state=False)

    return run


def _cpu_unavailable() -> str | None:
    return _extension.LOAD_ERROR


def _cuda_unavailable() -> str | None:
    if _extension.LOAD_ERROR:
        return _extension.LOAD_ERROR
    if not _extension.WITH_CUDA:
        return "ptl_fused._C was built without CUDA kernels (see PTL_FUSED_WITH_CUDA in setup.py)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def _no_extension(*args):
    raise RuntimeError(f"ptl_fused: {_extension.LOAD_ERROR}")


if _extension.C is not None:
    from . import _cpp_ops

    _cpp_cell, _cpp_cell_v2, _cpp_eval = _cpp_ops.bconv_cell, _cpp_ops.bconv_cell_v2, _cpp_ops.bconv_cell_eval
    _igemm_cell, _igemm_cell_v2, _igemm_eval = (
        partial(f, fused_gemm=True) for f in (_cpp_cell, _cpp_cell_v2, _cpp_eval)
    )
else:
    _cpp_cell = _cpp_cell_v2 = _cpp_eval = _igemm_cell = _igemm_cell_v2 = _igemm_eval = _no_extension

# Triton runs on CUDA, and on the CPU only in its interpreter (tests; set TRITON_INTERPRET=1
# before triton is imported).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
try:
    from .triton import ops as _triton_ops

    TRITON_ERROR = None
except ImportError as err:
    _triton_ops, TRITON_ERROR = None, f"triton cannot be imported ({err})"


def _no_triton(*args):
    raise RuntimeError(f"ptl_fused: {TRITON_ERROR}")


def _triton_unavailable() -> str | None:
    if TRITON_ERROR:
        return TRITON_ERROR
    if not TRITON_INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on the CPU, slowly, for tests)"
    return _triton_ops.interpreter_problem()


BACKENDS: dict[str, Backend] = {
    "reference": Backend(
        "reference",
        ("cpu", "cuda"),
        _checkpointed(python_ref.bconv_cell),
        _checkpointed(python_ref.bconv_cell_v2),
        python_ref.bconv_cell_eval,
        _always,
    ),
    "cpu": Backend("cpu", ("cpu",), _cpp_cell, _cpp_cell_v2, _cpp_eval, _cpu_unavailable),
    "cuda": Backend("cuda", ("cuda",), _cpp_cell, _cpp_cell_v2, _cpp_eval, _cuda_unavailable),
    # The same ops with fused_gemm=True: one implicit-GEMM kernel per forward (tensor cores for
    # fp16/bf16; fp32/fp64 run it with scalar FMAs, slowly), cuDNN in backward.
    "cuda_igemm": Backend(
        "cuda_igemm", ("cuda",), _igemm_cell, _igemm_cell_v2, _igemm_eval, _cuda_unavailable
    ),
    "triton": Backend(
        "triton",
        ("cuda", "cpu") if TRITON_INTERPRET else ("cuda",),
        _triton_ops.bconv_cell if _triton_ops else _no_triton,
        _triton_ops.bconv_cell_v2 if _triton_ops else _no_triton,
        _triton_ops.bconv_cell_eval if _triton_ops else _no_triton,
        _triton_unavailable,
    ),
}

# Preference of "auto" per device type, first available wins. On CUDA the cuDNN + fused
# epilogue backend comes first until GPU benchmarks (bench/results/) show Triton or the
# implicit-GEMM kernel ahead (none has run on a GPU yet); the interpreted Triton is never
# picked on the CPU.
AUTO_ORDER = {"cuda": ["cuda", "triton", "reference"], "cpu": ["cpu", "reference"]}


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, e.g. ["reference", "cpu"]."""
    return [name for name, b in BACKENDS.items() if b.unavailable() is None]


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend to run for tensors on `device`: `backend` itself, or the choice of "auto"."""
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ["reference"]):
            b = BACKENDS[name]
            if device.type in b.device_types and b.unavailable() is None:
                return b
        raise RuntimeError(f"ptl_fused: no backend runs on {device}")
    b = BACKENDS.get(backend)
    if b is None:
        raise ValueError(
            f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)} "
            f"(available here: {available_backends()})"
        )
    why = b.unavailable()
    if why is not None:
        raise RuntimeError(
            f"backend {backend!r} is not available: {why}; available here: {available_backends()}"
        )
    if device.type not in b.device_types:
        raise ValueError(
            f"backend {backend!r} runs on {'/'.join(b.device_types)} tensors, but x is on {device}"
        )
    return b
