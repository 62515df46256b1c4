"""Pure-PyTorch reference of the BConv-Cell: the oracle every ptl_fused backend is tested against."""

from .bconv_cell import bconv_cell, bconv_cell_v2, conv_output_size, output_padding, state_dtype
from .eval_path import bconv_cell_eval, eval_gate_rows, v2_gate_map
from .state import STATE_INITS, carry_state, initial_state

__all__ = [
    "STATE_INITS",
    "bconv_cell",
    "bconv_cell_eval",
    "bconv_cell_v2",
    "carry_state",
    "conv_output_size",
    "eval_gate_rows",
    "initial_state",
    "output_padding",
    "state_dtype",
    "v2_gate_map",
]
