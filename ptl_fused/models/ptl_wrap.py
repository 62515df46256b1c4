"""ptl_wrap: PTL for any CNN that splits into stages (DESIGN.md §1, "The PTL network").

With x^0 the image and x^i = stage_i(x^{i-1}) for the K stages (the backbone's own forward
is not used):

    y^0 = Cell_0(x^0)                                        the image cell
    y^i = Cell_i(Fuse_i(cat[x^i, y^{i-1}]))   i = 1..K-1     Fuse = conv1x1 + BN + ReLU
    feature map = FinalFuse(cat[y^{K-1}, x^K])               conv1x1 + BN + ReLU

Alignment (the authors' MGN-PTL rule): y^i is concatenated with x^{i+1}, so Cell_i has the
stride of stage i+1. The stage resolutions are measured once, with a dummy forward at
`input_size`; a stage that halves the resolution n times is matched by a chain of n stride-2
cells (n = 2 for the ResNet stem, like the authors' bconv1 + bconv2), one that keeps it by one
stride-1 cell. Cells use padding (k-1)//2, so a stride-2 cell maps H to ceil(H/2).

Channel widths (the project's rule): Cell_i's output width w_i is half the channels of
x^{i+1}, the stage output it joins, rounded down to a multiple of 8 and clamped to [16, 256]
(ResNet-50: 32, 128, 256, 256, 256; the cap bounds the cost of the 3x3 gate convolution, which
has 4·w_i output channels). As in the authors' MGN-PTL cells, every stride-2 cell doubles the
channels, like the backbones' downsampling blocks: a chain of n stride-2 cells starts from
w_i / 2^n, and Fuse_i projects to that width (MGN-PTL: fuse2 -> 128, bconv4 128 -> 256, stride
2). `cell_channels` overrides the w_i (MGN passes the authors' 32, 64, 256, 512).
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from python_ref import conv_output_size

from .._validate import few
from ..modules import BConvCell, BConvCellV2
from .stages import find_stages

CELL_TYPES: dict[str, type[nn.Module]] = {"v1": BConvCell, "v2": BConvCellV2}
MAX_HALVINGS = 6


def conv1x1_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """The fusion layer: a 1x1 conv (no bias: BN follows), BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
    )


def default_cell_channels(stage_channels: Sequence[int]) -> list[int]:
    """w_i for the cell whose output joins a stage with C channels: C/2 rounded down to a
    multiple of 8, clamped to [16, 256]."""
    return [min(256, max(16, 8 * (c // 16))) for c in stage_channels]


def make_cell_chain(
    cell: str,
    in_channels: int,
    out_channels: int,
    halvings: int,
    kernel_size: int = 3,
    state_init: str = "zeros",
    backend: str = "auto",
) -> nn.Sequential:
    """`halvings` stride-2 cells (each doubling the width, ending at out_channels), or one
    stride-1 cell when halvings == 0. (B, in_channels, H, W) -> (B, out_channels, H/2^n, W/2^n)."""
    cell_type = CELL_TYPES[cell]
    kw = dict(kernel_size=kernel_size, padding=(kernel_size - 1) // 2, state_init=state_init, backend=backend)
    if halvings == 0:
        return nn.Sequential(cell_type(in_channels, out_channels, stride=1, **kw))
    chain = []
    for j in range(halvings):
        width = max(1, out_channels >> (halvings - 1 - j))
        chain.append(cell_type(in_channels, width, stride=2, **kw))
        in_channels = width
    return nn.Sequential(*chain)


class PTLBackbone(nn.Module):
    """A backbone's stages with the PTL side stream of BConv-Cells (see the module docstring).

    forward: x (B, in_channels, H, W) -> feature map (B, out_channels, H_K, W_K).
    With cell=None it is the plain backbone: the stages in sequence, no cells, no fusion.

    Attributes: stages (ModuleList, K), cells (ModuleList of K cell chains; cells[0] is on the
    image) or None, fuses (ModuleList, K-1) or None, final_fuse or None, stage_shapes
    ((C, H, W) of x^0..x^K at input_size), halvings (per cell chain), cell_channels, out_channels.
    """

    def __init__(
        self,
        backbone: nn.Module,
        stages: Sequence[str | nn.Module] | Literal["auto"] = "auto",
        cell: Literal["v1", "v2"] | None = "v1",
        out_channels: int | None = None,
        cell_channels: Sequence[int] | None = None,
        backend: str = "auto",
        kernel_size: int = 3,
        state_init: str = "zeros",
        input_size: tuple[int, int] = (224, 224),
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if cell is not None and cell not in CELL_TYPES:
            raise ValueError(f"cell must be 'v1', 'v2' or None (plain backbone), got {cell!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (padding (k-1)//2 keeps the size), got {kernel_size}")
        if not isinstance(input_size, Sequence) or len(input_size) != 2 or min(input_size) < 1:
            raise ValueError(f"input_size must be (H, W) with H, W >= 1, got {input_size!r}")
        self.input_size, self.in_channels = tuple(input_size), in_channels
        self.stages = nn.ModuleList(resolve_stages(backbone, stages))
        # Each stage tensor's name in the backbone (backbone_state_dict: torchvision's keys).
        names = {id(t): n for n, t in backbone.state_dict(keep_vars=True).items()}
        self._backbone_keys = {
            k: names.get(id(t)) for k, t in self.stages.state_dict(prefix="stages.", keep_vars=True).items()
        }
        self.stage_shapes = measure_stages(self.stages, input_size, in_channels)
        warn_if_not_a_chain(backbone, self.stages, input_size, in_channels)
        channels = [c for c, _, _ in self.stage_shapes]
        k = len(self.stages)
        self.cells = self.fuses = self.final_fuse = None
        if cell is None:
            if out_channels not in (None, channels[-1]) or cell_channels is not None:
                raise ValueError(
                    "cell=None is the plain backbone: it has no cells and no fusion layer, so "
                    f"cell_channels must be None and out_channels None or {channels[-1]} (the last stage's)"
                )
            self.out_channels, self.cell_channels, self.halvings = channels[-1], [], []
            return
        widths = list(cell_channels) if cell_channels is not None else default_cell_channels(channels[1:])
        widths = [positive_int(w) for w in widths]
        if len(widths) != k or None in widths:
            raise ValueError(
                f"cell_channels must be {k} positive ints (one per stage), got {cell_channels!r}"
            )
        self.halvings = [
            _halvings(i, self.stage_shapes[i][1:], self.stage_shapes[i + 1][1:], kernel_size, input_size)
            for i in range(k)
        ]
        self.cell_channels = widths
        self.out_channels = channels[-1] if out_channels is None else positive_int(out_channels)
        if self.out_channels is None:
            raise ValueError(
                f"out_channels must be a positive int or None (the last stage's), got {out_channels!r}"
            )
        cell_kw = dict(kernel_size=kernel_size, state_init=state_init, backend=backend)
        chains = [make_cell_chain(cell, in_channels, widths[0], self.halvings[0], **cell_kw)]
        fuses = []
        for i in range(1, k):
            fused = max(1, widths[i] >> self.halvings[i])
            fuses.append(conv1x1_bn_relu(channels[i] + widths[i - 1], fused))
            chains.append(make_cell_chain(cell, fused, widths[i], self.halvings[i], **cell_kw))
        self.cells, self.fuses = nn.ModuleList(chains), nn.ModuleList(fuses)
        self.final_fuse = conv1x1_bn_relu(widths[-1] + channels[-1], self.out_channels)
        device, dtype = param_device_dtype(self.stages)  # where the backbone is, in its dtype
        for m in (self.cells, self.fuses, self.final_fuse):
            m.to(device, dtype)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, Cin, H, W) -> (feature map (B, out_channels, H_K, W_K), x^K (B, C_K, H_K, W_K))."""
        if self.cells is None:
            for stage in self.stages:
                x = stage(x)
            return x, x
        y = self.cells[0](x)
        x = self.stages[0](x)
        for i in range(1, len(self.stages)):
            y = self.cells[i](self.fuses[i - 1](self._join(x, y, i)))
            x = self.stages[i](x)
        return self.final_fuse(self._join(x, y, len(self.stages), y_first=True)), x

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """The stages' weights under the wrapped backbone's own names (for PTLNet: torchvision's
        keys; its fc/classifier, which no stage holds, is left out), without the cells and
        fusions: `backbone.load_state_dict(sd, strict=False)` reports only those heads missing."""
        foreign = [k for k, name in self._backbone_keys.items() if name is None]
        if foreign:
            raise ValueError(
                f"stage tensors that are not the backbone's own have no backbone name: {few(foreign)}"
            )
        own = self.stages.state_dict(prefix="stages.")
        return {name: own[k] for k, name in self._backbone_keys.items()}

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)[0]

    def _join(self, x: Tensor, y: Tensor, i: int, y_first: bool = False) -> Tensor:
        """cat[x^i, y^{i-1}] along channels (cat[y^{i-1}, x^i] for the final fusion, y_first)."""
        if x.shape[-2:] != y.shape[-2:]:
            raise ValueError(
                f"PTL: x^{i} {tuple(x.shape)} and y^{i - 1} {tuple(y.shape)} differ in size: the cell "
                f"strides were chosen from the stage sizes at input_size={self.input_size}, and these "
                "images halve differently. Build with input_size = your images' size. Where that is "
                "refused, the backbone rounds an odd size down when it halves (DenseNet's and VGG's "
                "pooling, ConvNeXt) while a stride-2 cell rounds it up; image sizes divisible by its "
                "total stride always work: resize or crop the images to one"
            )
        return torch.cat([y, x] if y_first else [x, y], dim=1)


def ptl_wrap(
    backbone: nn.Module,
    stages: Sequence[str | nn.Module] | Literal["auto"],
    cell: Literal["v1", "v2"] | None = "v1",
    out_channels: int | None = None,
    cell_channels: Sequence[int] | None = None,
    backend: str = "auto",
    kernel_size: int = 3,
    state_init: str = "zeros",
    input_size: tuple[int, int] = (224, 224),
    in_channels: int = 3,
) -> PTLBackbone:
    """Wrap `backbone` with PTL cells: image (B, in_channels, H, W) -> feature map (B, D, H_K, W_K).

    stages: "auto" (find_stages: torchvision ResNet, DenseNet, MobileNet, EfficientNet,
    ConvNeXt, VGG) or, in order, submodule names of `backbone` or modules. The stage modules
    are shared with `backbone`, not copied. cell: "v1" (BConvCell), "v2" (BConvCellV2), or
    None for the plain backbone. out_channels: D (default: the last stage's channels).
    cell_channels: the K cell widths (default: see the module docstring). input_size and
    in_channels: the dummy input whose stage sizes fix the cell strides.
    """
    return PTLBackbone(
        backbone,
        stages,
        cell,
        out_channels,
        cell_channels,
        backend,
        kernel_size,
        state_init,
        input_size,
        in_channels,
    )


def positive_int(n) -> int | None:
    """A channel count as an int (numpy ints too; not bools); None if it is not one."""
    try:
        value = None if isinstance(n, bool) else operator.index(n)
    except TypeError:
        return None
    return value if value is not None and value >= 1 else None


def resolve_stages(backbone: nn.Module, stages: Sequence[str | nn.Module] | str) -> list[nn.Module]:
    """The stage modules: found by stages="auto", or named (submodule paths) or given."""
    if isinstance(stages, str):
        if stages != "auto":
            raise ValueError(
                f"stages must be 'auto' or a sequence of submodule names/modules, got {stages!r}"
            )
        return find_stages(backbone)
    resolved = []
    for s in stages:
        if isinstance(s, nn.Module):
            resolved.append(s)
            continue
        try:
            resolved.append(backbone.get_submodule(s))
        except AttributeError as e:
            raise ValueError(f"stages: {type(backbone).__name__} has no submodule {s!r} ({e})") from None
    if not resolved:
        raise ValueError("stages must name at least one stage")
    return resolved


def param_device_dtype(modules: Sequence[nn.Module]) -> tuple:
    """Where the first floating-point parameter of `modules` is, and its dtype (CPU float32
    without one): the device and dtype of an input for them."""
    param = next((p for m in modules for p in m.parameters() if p.is_floating_point()), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


@contextlib.contextmanager
def _in_eval(modules: Sequence[nn.Module]):
    """Every module of `modules` in eval mode inside, each back in its own mode after."""
    modes = [(m, m.training) for top in modules for m in top.modules()]
    try:
        for top in modules:
            top.eval()
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


@torch.no_grad()
def measure_stages(stages: Sequence[nn.Module], input_size: tuple[int, int], in_channels: int) -> list:
    """(C, H, W) of x^0..x^K for one dummy image (eval mode, no grad; modes restored after)."""
    device, dtype = param_device_dtype(stages)
    x = torch.zeros(1, in_channels, *input_size, device=device, dtype=dtype)
    shapes = [tuple(x.shape[1:])]
    with _in_eval(stages):
        for i, stage in enumerate(stages, start=1):
            try:
                x = stage(x)
            except Exception as e:
                raise ValueError(
                    f"stage {i} ({type(stage).__name__}) failed on x^{i - 1} of shape {tuple(x.shape)} "
                    f"(dummy image {in_channels}x{input_size[0]}x{input_size[1]}; check the stage order, "
                    f"in_channels and input_size): {e}"
                ) from e
            if not isinstance(x, Tensor) or x.dim() != 4:
                got = f"a {x.dim()}-D tensor" if isinstance(x, Tensor) else f"a {type(x).__name__}"
                raise ValueError(
                    f"stage {i} ({type(stage).__name__}) must return a (B, C, H, W) tensor, got {got}"
                )
            shapes.append(tuple(x.shape[1:]))
    return shapes


def _ends(stage: nn.Module, first: bool) -> list[nn.Module]:
    """The stage and, through nested nn.Sequentials, its first (or last) child: whichever of
    them the backbone's forward calls sees the stage's input (or gives its output)."""
    ends = [stage]
    while isinstance(ends[-1], nn.Sequential) and len(ends[-1]) > 0:
        ends.append(ends[-1][0 if first else -1])
    return ends


@torch.no_grad()
def warn_if_not_a_chain(
    backbone: nn.Module, stages: Sequence[nn.Module], input_size: tuple[int, int], in_channels: int
) -> None:
    """Warn where backbone.forward, run once on a random dummy image (eval mode, modes restored
    after), does not compute x^i = stage_i(x^{i-1}) from the image: PTLBackbone runs only the
    stages, so what the forward does between them (an input transform, a residual add, an
    in-place activation) would be silently dropped. A forward that cannot run on an image is
    not checked."""
    device, dtype = param_device_dtype(stages)
    inputs: dict[int, Tensor] = {}
    outputs: dict[int, Tensor] = {}

    def record(store: dict, i: int, t) -> None:
        if i not in store and isinstance(t, Tensor):  # the first call: later ones are reuses
            store[i] = t.detach().clone()

    handles = []
    for i, stage in enumerate(stages):
        for m in _ends(stage, first=True):
            handles.append(
                m.register_forward_pre_hook(lambda m, a, i=i: record(inputs, i, a[0] if a else None))
            )
        for m in _ends(stage, first=False):
            handles.append(m.register_forward_hook(lambda m, a, out, i=i: record(outputs, i, out)))
    gen = torch.Generator().manual_seed(0)  # the global random stream is left alone
    x = torch.randn(1, in_channels, *input_size, generator=gen).to(device, dtype)
    try:
        with _in_eval([backbone]):
            backbone(x)
    except Exception:
        return
    finally:
        for h in handles:
            h.remove()
    problems = []
    for i in range(len(stages)):
        expected = x if i == 0 else outputs.get(i - 1)
        got = inputs.get(i)
        if got is None:
            problems.append(f"stage {i + 1} is not called")
        elif expected is None or got.shape != expected.shape or not torch.equal(got, expected):
            problems.append(
                f"stage {i + 1} gets something other than "
                + ("the image (the forward transforms it first)" if i == 0 else f"stage {i}'s output")
            )
    if problems:
        warnings.warn(
            f"ptl_wrap: {type(backbone).__name__}.forward does not run the stages as a chain from the "
            f"image: {'; '.join(problems)}. The wrapped network runs only the stages, in sequence, so "
            "it would not compute what the backbone computes. Pass stages that hold those "
            "computations (or a backbone whose forward is the chain)",
            UserWarning,
            stacklevel=4,
        )


def _halvings(i: int, size: tuple, next_size: tuple, k: int, input_size: tuple) -> int:
    """How many stride-2 cells (padding (k-1)//2) take x^i's size to x^{i+1}'s."""
    s = tuple(size)
    for n in range(MAX_HALVINGS + 1):
        if s == tuple(next_size):
            return n
        s = tuple(conv_output_size(v, k, 2, (k - 1) // 2) for v in s)
    raise ValueError(
        f"stage {i + 1} maps {size[0]}x{size[1]} to {next_size[0]}x{next_size[1]} (measured at "
        f"input_size={tuple(input_size)}): PTL's cells can only follow a resolution ratio that is a power "
        "of 2 (a stride-2 cell maps H to ceil(H/2)); use an input_size divisible by the backbone's total "
        "stride, or other stages. A stage whose strided convolutions have no padding (Inception v3's "
        "stem) shrinks every size by more than a halving: no input_size makes it fit"
    )
