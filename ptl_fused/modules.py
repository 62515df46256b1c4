"""Drop-in nn.Modules: BConvCell and BConvCellV2 with the state rules of DESIGN.md §1.

Training carries the state (detached) from batch to batch, position-wise; evaluation starts
every batch from zeros and carries nothing (with state_init="normal" too, so that eval
features are deterministic). Eval therefore runs the inference shortcut of DESIGN.md §5
(ptl_fused.ops, python_ref/eval_path.py): no forget gate, no state read. Its i, o, g weight
rows (and v2's constant gate map) are taken from the parameters on every call: no cache can
see every update (a `p.data` write or a fused optimizer leaves the version counter alone).
When a gradient is needed in eval (grad mode on and a parameter or x requires grad), the
full cell runs from a zero state.
The state is not a parameter or buffer: it is not in state_dict, DDP does not broadcast it
(each rank keeps its own), and .to(device) moves it while keeping its float32 dtype.
A training forward run inside backward, as activation checkpointing (torch.utils.checkpoint)
re-runs it, is refused: it would read the state its first run advanced, so its gradients
would be wrong. Checkpoint the layers around the cells; eval-mode cells carry nothing and can
be checkpointed.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from python_ref import STATE_INITS, carry_state, state_dtype

from . import ops
from ._validate import check_int, check_recompute, output_size
from .backends import BACKENDS


class _BConvCellBase(nn.Module):
    state: Tensor | tuple[Tensor, ...] | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        bias: bool,
        state_init: str,
        backend: str,
        gate_in_channels: int,
        recompute: bool,
    ) -> None:
        super().__init__()
        # numpy integers too, as nn.Conv2d takes them
        in_channels, out_channels, kernel_size, stride, padding = (
            check_int(name, v, low)
            for name, v, low in (
                ("in_channels", in_channels, 1),
                ("out_channels", out_channels, 1),
                ("kernel_size", kernel_size, 1),
                ("stride", stride, 1),
                ("padding", padding, 0),
            )
        )
        if state_init not in STATE_INITS:
            raise ValueError(f"state_init must be one of {STATE_INITS}, got {state_init!r}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
        check_recompute(recompute)
        self.in_channels, self.out_channels = in_channels, out_channels
        # Training: keep no gates for backward, which computes them again (ptl_fused.ops).
        self.recompute = recompute
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.state_init, self.backend = state_init, backend
        k = kernel_size
        self.weight = nn.Parameter(torch.empty(4 * out_channels, gate_in_channels, k, k))
        self.bias = nn.Parameter(torch.empty(4 * out_channels)) if bias else None
        self.state = None
        _init_conv(self.weight, self.bias)

    def reset_state(self) -> None:
        """Forget the carried state (call at the start of every training epoch)."""
        self.state = None

    def state_shape(self, x: Tensor) -> tuple[int, int, int, int]:
        """(B, Cout, Ho, Wo) of the state and output for input x (B, Cin, H, W)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects x as a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects x of shape (B, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        # The ops' size error, before a state of that size is made or compared.
        ho, wo = output_size(*x.shape[-2:], self.kernel_size, self.stride, self.padding)
        return x.shape[0], self.out_channels, ho, wo

    def _previous(self, state: Tensor | None, shape: tuple[int, ...], x: Tensor, name: str) -> Tensor:
        dtype = state_dtype(x.dtype)
        if _left_by_inference_mode(state):  # written by a compiled forward under inference_mode
            state = state.clone()
        prev = carry_state(state, shape, dtype, x.device, self.state_init, name)
        # Under CUDA-graph capture the state is updated in place (_keep), so the op must not
        # save a view of it for backward.
        return prev.clone() if _capturing(x) else prev

    def _keep(self, new: tuple[Tensor, ...], x: Tensor) -> None:
        """Store the new (detached) state. Under CUDA-graph capture it is copied into the
        existing buffers, so that every replay reads what the previous replay wrote; warm up
        a few eager steps with the capture's batch size first, as CUDA graphs require."""
        if not torch.compiler.is_compiling() and any(n.is_inference() for n in new):
            # Written under torch.inference_mode: kept as a normal tensor, which a later training
            # forward's autograd may save, also a compiled one (an inference tensor it may not).
            # torch.compile cannot trace the test: what a compiled forward writes there is
            # copied when an eager forward reads it (_previous).
            with torch.inference_mode(False):
                new = tuple(n.clone() for n in new)
        old = None if self.state is None else _as_tuple(self.state)
        if (
            _capturing(x)
            and old is not None
            and all(o.shape == n.shape for o, n in zip(old, new, strict=True))
        ):
            for o, n in zip(old, new, strict=True):
                o.copy_(n)
            return
        self.state = new[0] if len(new) == 1 else new

    def _check_training_call(self) -> None:
        """A training forward reads and advances the carried state: refuse the calls where that
        state cannot be carried correctly."""
        # Not seen while torch.compile traces (ops.func_transforms): a transform compiled
        # around a training cell fails inside torch there, without this message.
        if ops.func_transforms():
            raise RuntimeError(
                f"{type(self).__name__}: a training forward under a torch.func transform (grad, vmap, "
                "jacrev, jvp, ...). The cell advances its carried state, and a transform cannot "
                "hand that state back out: the stored state would be the transform's wrapper and "
                "break the next call. Run the cell in eval mode under the transform, or use "
                "ptl_fused.ops.bconv_cell / bconv_cell_v2, which take the state as an argument "
                "and return the new one."
            )
        if ops.exporting():
            raise RuntimeError(
                f"{type(self).__name__}: torch.export / torch.onnx.export of a training-mode cell. "
                "Its forward reads and advances the carried state, which an exported program "
                "cannot carry: the state of the moment would be frozen into it as a constant, and "
                "its batch size with it. Call model.eval() before exporting (eval starts every "
                "batch from zeros, as a deployed cell does), or export ptl_fused.ops.bconv_cell / "
                "bconv_cell_v2, which take the state as an input and return the new one."
            )
        if getattr(self, "_is_replica", False):
            raise RuntimeError(
                f"{type(self).__name__}: a training forward in a replica made by nn.DataParallel. "
                "DataParallel copies the model for every forward and drops the copies, so the "
                "carried state would be lost after each batch and every batch would start from "
                "the initial state. Use DistributedDataParallel (one process per GPU; each keeps "
                "its cells' state), or one device."
            )
        if _inside_backward():
            raise RuntimeError(
                f"{type(self).__name__}: a training forward is running inside backward, as activation "
                "checkpointing (torch.utils.checkpoint) re-runs it. The cell's forward reads and "
                "advances the carried state, so a re-run would see the state its first run left and "
                "give wrong gradients. Keep the cells outside the checkpointed function (checkpoint "
                "the layers around them), or checkpoint them in eval mode, where nothing is carried."
            )

    def _apply(self, fn, recurse=True):
        # Follow .to(device) / .cuda(), but keep the state's own (float32) precision.
        super()._apply(fn, recurse)
        if self.state is not None and _as_tuple(self.state)[0].is_meta:
            # Left by a shape pass on the meta device: no values to move (to_empty). Forgotten,
            # with v2's batch count, which to_empty leaves uninitialised.
            self.reset_state()
        if self.state is not None:
            moved = [s.to(fn(s[:0]).device) for s in _as_tuple(self.state)]
            self.state = moved[0] if isinstance(self.state, Tensor) else tuple(moved)
        return self

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
            f"state_init={self.state_init!r}, backend={self.backend!r}"
            + (", recompute=True" if self.recompute else "")
        )


class BConvCell(_BConvCellBase):
    """Batch-related Convolutional Cell (PTL, DESIGN.md §1).

    x (B, Cin, H, W) -> y (B, Cout, Ho, Wo); .state is C_b (B, Cout, Ho, Wo), float32 (float64
    for a float64 cell).
    Parameters: weight (4·Cout, Cin, k, k), gates ordered input, forget, output, cell;
    bias (4·Cout) or None.
    recompute=True: training keeps no (B, 4·Cout, Ho, Wo) gates for backward, which computes
    them again (one more gate convolution); the same values and gradients (on a GPU to
    rounding: Triton may tune the recomputing kernel to other tiles).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
        state_init: str = "zeros",
        backend: str = "auto",
        recompute: bool = False,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            bias,
            state_init,
            backend,
            in_channels,
            recompute,
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self._eval_forward(x)
        self._check_training_call()
        shape = self.state_shape(x)
        c_prev = self._previous(self.state, shape, x, "state")
        y, c_new = ops.bconv_cell(
            x, self.weight, self.bias, c_prev, self.stride, self.padding, self.backend, self.recompute
        )
        self._keep((c_new.detach(),), x)
        return y

    def _eval_forward(self, x: Tensor) -> Tensor:
        self.state_shape(x)  # the module's own shape message
        return ops.bconv_cell(x, self.weight, self.bias, None, self.stride, self.padding, self.backend)[0]


class BConvCellV2(_BConvCellBase):
    """BConv-Cell-v2: recovers historical features from the aggregated hidden output.

    x (B, Cin, H, W) -> y (B, Cout, Ho, Wo); .state is (C_b, H_b), each (B, Cout, Ho, Wo).
    Parameters: weight (4·Cout, 2·Cin, k, k) over [x, X~]; weight_rec (Cout, Cin, k, k) of
    the transpose-convolution recovery; bias/bias_rec when bias=True.
    H_b is the running mean of the outputs since the last reset (hidden_momentum=None) or an
    EMA with alpha = hidden_momentum. recompute=True: as BConvCell's (X~ is recomputed too).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
        state_init: str = "zeros",
        hidden_momentum: float | None = None,
        backend: str = "auto",
        recompute: bool = False,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            bias,
            state_init,
            backend,
            2 * in_channels,
            recompute,
        )
        if hidden_momentum is not None and (
            isinstance(hidden_momentum, bool)
            or not isinstance(hidden_momentum, numbers.Real)
            or not 0.0 < hidden_momentum <= 1.0
        ):
            raise ValueError(f"hidden_momentum must be None or a number in (0, 1], got {hidden_momentum!r}")
        self.hidden_momentum = None if hidden_momentum is None else float(hidden_momentum)
        k = kernel_size
        self.weight_rec = nn.Parameter(torch.empty(out_channels, in_channels, k, k))
        self.bias_rec = nn.Parameter(torch.empty(in_channels)) if bias else None
        _init_conv(self.weight_rec, self.bias_rec)
        # Batches since the last reset (n_b); a buffer so that .to() moves it and
        # torch.compile sees a tensor, not a Python int that would recompile every step.
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long), persistent=False)

    def reset_state(self) -> None:
        super().reset_state()
        self.num_batches.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self._eval_forward(x)
        self._check_training_call()
        shape = self.state_shape(x)
        c_state, h_state = self.state if self.state is not None else (None, None)
        c_prev = self._previous(c_state, shape, x, "state[0] (C)")
        h_prev = self._previous(h_state, shape, x, "state[1] (H)")
        alpha = self._alpha(x)
        y, c_new, h_new = ops.bconv_cell_v2(
            x,
            self.weight,
            self.bias,
            self.weight_rec,
            self.bias_rec,
            c_prev,
            h_prev,
            alpha,
            self.stride,
            self.padding,
            backend=self.backend,
            recompute=self.recompute,
        )
        if self.hidden_momentum is None:
            self.num_batches.add_(1)  # only once the call has succeeded
        self._keep((c_new.detach(), h_new.detach()), x)
        return y

    def _alpha(self, x: Tensor) -> Tensor:
        """The aggregation weight of this batch: 1/n_b (running mean) or hidden_momentum (EMA).
        Made on the device: no host-to-device copy, so CUDA-graph capturable."""
        dtype = state_dtype(x.dtype)  # a float32 0.3 would be 0.3 + 1.2e-8 in a float64 state
        if self.hidden_momentum is not None:
            return torch.full((), self.hidden_momentum, dtype=dtype, device=x.device)
        if self.state is None:  # the first batch since the reset (also after to_empty(): garbage)
            self.num_batches.zero_()
        return 1.0 / (self.num_batches + 1).to(dtype)

    def _eval_forward(self, x: Tensor) -> Tensor:
        self.state_shape(x)  # the module's own shape message
        w, b, wr, br, s, p = self.weight, self.bias, self.weight_rec, self.bias_rec, self.stride, self.padding
        return ops.bconv_cell_v2(x, w, b, wr, br, None, None, 1.0, s, p, self.backend)[0]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", hidden_momentum={self.hidden_momentum}"


def reset_states(model: nn.Module) -> int:
    """Reset every BConv-Cell in `model` (call at each training epoch start); returns how many."""
    cells = [m for m in model.modules() if isinstance(m, _BConvCellBase)]
    for m in cells:
        m.reset_state()
    return len(cells)


def set_recompute(model: nn.Module, recompute: bool = True) -> int:
    """Make every BConv-Cell in `model` recompute its gates in backward instead of keeping them
    (recompute=True), or keep them again (False); returns how many cells were set."""
    check_recompute(recompute)
    cells = [m for m in model.modules() if isinstance(m, _BConvCellBase)]
    for m in cells:
        m.recompute = recompute
    return len(cells)


def _inside_backward() -> bool:
    """True while autograd's engine runs a backward pass on this thread (in any grad mode: a
    reentrant checkpoint nested in another re-runs its forward under no_grad). Not traced by
    torch.compile, whose graphs recompute from saved inputs; compiled autograd re-running an
    eager reentrant checkpoint is not caught."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _left_by_inference_mode(state: Tensor | None) -> bool:
    """A state that a compiled training forward under torch.inference_mode wrote, now read by an
    eager forward outside it (an eager forward's own writes are never inference tensors: _keep)."""
    if state is None or torch.compiler.is_compiling():
        return False
    return state.is_inference() and not torch.is_inference_mode_enabled()


def _capturing(x: Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _as_tuple(state: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (state,) if isinstance(state, Tensor) else tuple(state)


def _init_conv(weight: nn.Parameter, bias: nn.Parameter | None) -> None:
    """nn.Conv2d's default initialisation (the authors' cells are nn.Conv2d)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)
