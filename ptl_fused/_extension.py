"""Loads the compiled extension ptl_fused._C, or explains once why it is not used.

Without it (not built, or built against another torch) the package still imports and the
``reference`` backend (and ``triton`` where usable) keep working.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from pathlib import Path
from types import ModuleType

import torch


def _load() -> tuple[ModuleType | None, str | None]:
    # Looked up first: importing a missing submodule while the package is still initialising
    # would blame a circular import.
    try:
        missing = importlib.util.find_spec(f"{__package__}._C") is None
    except ValueError:  # sys.modules holds None for it: the import below says so
        missing = False
    if missing:
        return (
            None,
            f"the compiled extension ptl_fused._C is not built (no _C library in {Path(__file__).parent})",
        )
    try:
        _C = importlib.import_module(f"{__package__}._C")
    except (ImportError, OSError) as err:
        return None, f"the compiled extension ptl_fused._C could not be loaded ({err})"
    if _C.TORCH_VERSION != torch.__version__:
        return None, (
            f"ptl_fused._C was built against torch {_C.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed"
        )
    return _C, None


C, LOAD_ERROR = _load()
WITH_CUDA = bool(C is not None and C.WITH_CUDA)

if LOAD_ERROR is not None:
    warnings.warn(
        f"ptl_fused: {LOAD_ERROR}; the 'cpu' and 'cuda' backends are disabled, 'reference' "
        "(and 'triton' where usable) "
        "still work. Rebuild with: pip install --no-build-isolation -e .",
        RuntimeWarning,
        stacklevel=2,
    )
