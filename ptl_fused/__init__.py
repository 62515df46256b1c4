"""ptl_fused: fused Batch-related Convolutional Cells (BConv-Cells) for Progressive Transfer Learning."""

from . import ops
from .backends import available_backends
from .modules import BConvCell, BConvCellV2, reset_states, set_recompute

__all__ = ["BConvCell", "BConvCellV2", "available_backends", "ops", "reset_states", "set_recompute"]
__version__ = "0.1.0"
