"""Without a GPU, the Triton kernels run in Triton's CPU interpreter, so that CI tests them.

This must happen before triton is imported (ptl_fused imports it), hence here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
