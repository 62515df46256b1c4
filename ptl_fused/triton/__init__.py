"""Triton kernels of the BConv-Cell (the ``triton`` backend): forward.py, backward.py, ops.py."""
