"""ptl_wrap: stage discovery per torchvision family, cell strides from measured sizes, the carried
state through a whole network, and equality with python_ref.ptl_forward (the formula)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

import ptl_fused
from ptl_fused import BConvCell, BConvCellV2
from ptl_fused.models import PTLNet, find_stages, ptl_wrap
from python_ref.ptl_net import ptl_forward

# Every network built here runs its stages as a chain: the check for one that does not must
# not fire (test_a_forward_that_is_not_the_chain_of_stages_warns makes it fire).
pytestmark = pytest.mark.filterwarnings("error:ptl_wrap:UserWarning")

# family -> (builder, halvings of the cell chains (hand-derived from the architecture),
# the plain backbone's own computation of its last stage output)
FAMILIES = {
    "resnet18": (
        tvm.resnet18,
        [2, 0, 1, 1, 1],  # stem /4 (conv + maxpool), layer1 keeps, layer2..4 halve
        lambda m, x: m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))))),
    ),
    "densenet121": (tvm.densenet121, [2, 1, 1, 1, 0], lambda m, x: F.relu(m.features(x))),
    "mobilenet_v3_small": (tvm.mobilenet_v3_small, [1, 1, 1, 1, 1], lambda m, x: m.features(x)),
    "efficientnet_b0": (tvm.efficientnet_b0, [1, 1, 1, 1, 1], lambda m, x: m.features(x)),
    "convnext_tiny": (tvm.convnext_tiny, [2, 1, 1, 1], lambda m, x: m.features(x)),  # stem k4 s4
}


def _cells(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BConvCell, BConvCellV2))]


@pytest.mark.parametrize("size", [(64, 64), (96, 64)], ids=["64x64", "96x64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_families_shapes_and_state(family, size):
    build, halvings, _ = FAMILIES[family]
    torch.manual_seed(0)
    backbone = build(weights=None)
    net = ptl_wrap(backbone, "auto", backend="cpu", input_size=size)
    assert net.halvings == halvings
    k = len(halvings)
    assert len(net.stages) == k and len(net.cells) == k and len(net.fuses) == k - 1
    c_last, h_last, w_last = net.stage_shapes[-1]
    assert (h_last, w_last) == (size[0] // 32, size[1] // 32)
    assert net.out_channels == c_last  # default: the last stage's channels

    x1, x2 = torch.randn(2, 3, *size), torch.randn(2, 3, *size)
    net.train()
    out1 = net(x1)
    assert out1.shape == (2, c_last, h_last, w_last)
    assert all(c.state is not None and c.state.shape[0] == 2 for c in _cells(net))
    carried = net(x2)  # uses the states x1 left
    assert ptl_fused.reset_states(net) == len(_cells(net))
    assert all(c.state is None for c in _cells(net))
    fresh = net(x2)
    assert not torch.allclose(carried, fresh), "the carried state must change the next batch's output"

    net.eval()  # eval: no carry, so a sample's feature does not depend on its batch
    pair = net(torch.stack([x1[0], x2[0]]))
    swapped = net(torch.stack([x2[1], x1[0], x2[0]]))
    torch.testing.assert_close(pair[0], swapped[1])
    torch.testing.assert_close(pair[1], swapped[2])
    other = (size[0] + 32, size[1])  # another size with the same stage ratios
    assert net(torch.randn(1, 3, *other)).shape == (1, c_last, other[0] // 32, other[1] // 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_baseline_is_the_backbones_own_computation(family):
    build, _, own_forward = FAMILIES[family]
    torch.manual_seed(0)
    backbone = build(weights=None).eval()
    plain = ptl_wrap(backbone, "auto", cell=None, input_size=(64, 64)).eval()
    assert not _cells(plain) and plain.fuses is None and plain.final_fuse is None
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(plain(x), own_forward(backbone, x))


def test_densenet161_five_blocks():
    stages = find_stages(tvm.densenet161(weights=None))
    names = [[type(m).__name__ for m in s] for s in stages]
    assert names == [
        ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"],
        ["_DenseBlock", "_Transition"],
        ["_DenseBlock", "_Transition"],
        ["_DenseBlock", "_Transition"],
        ["_DenseBlock", "BatchNorm2d", "ReLU"],
    ]


def _tiny_backbone() -> nn.Sequential:
    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())

    # ratios 4 (a chain of two cells), 1, 2
    return nn.Sequential(
        nn.Sequential(block(3, 8, 2), nn.MaxPool2d(3, 2, 1)), block(8, 8, 1), block(8, 16, 2)
    ).double()


@pytest.mark.parametrize("cell", ["v1", "v2"])
def test_equals_python_ref_ptl_forward(cell):
    torch.manual_seed(0)
    backbone = _tiny_backbone()
    net = ptl_wrap(
        backbone, list(backbone), cell, out_channels=12, backend="reference", input_size=(16, 12)
    ).double()
    assert net.halvings == [2, 0, 1]
    assert [len(c) for c in net.cells] == [2, 1, 1]
    ref = copy.deepcopy(net)
    for _ in range(3):  # training batches: the state carries in both
        x = torch.randn(3, 3, 16, 12, dtype=torch.float64)
        got = net(x)
        want = ptl_forward(ref.stages, ref.cells, ref.fuses, ref.final_fuse, x)
        assert got.shape == (3, 12, 2, 2)  # 16x12 -> /4 -> 4x3 -> /2 -> 2x2
        torch.testing.assert_close(got, want)
    net.eval(), ref.eval()
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64)
    torch.testing.assert_close(net(x), ptl_forward(ref.stages, ref.cells, ref.fuses, ref.final_fuse, x))


def test_stage_names_and_cell_channels():
    backbone = _tiny_backbone()
    net = ptl_wrap(backbone, ["0", "1", "2"], cell_channels=[4, 6, 10], input_size=(16, 12)).double()
    # image chain 3 -> 2 -> 4 (two stride-2 cells doubling); fuse -> 6 -> cell 6; fuse -> 5 -> cell 10 (s2)
    widths = [[(c.in_channels, c.out_channels, c.stride) for c in chain] for chain in net.cells]
    assert widths == [[(3, 2, 2), (2, 4, 2)], [(6, 6, 1)], [(5, 10, 2)]]
    assert [f[0].in_channels for f in net.fuses] == [8 + 4, 8 + 6]
    assert net.final_fuse[0].in_channels == 10 + 16
    assert all(c.padding == 1 for c in _cells(net))


def test_undiscoverable_model_names_what_to_pass():
    with pytest.raises(ValueError, match=r"stages=\[\.\.\.\]") as e:
        ptl_wrap(tvm.squeezenet1_0(weights=None), "auto")
    assert "SqueezeNet" in str(e.value)
    with pytest.raises(ValueError, match="SqueezeNet"):
        find_stages(tvm.squeezenet1_0(weights=None))
    with pytest.raises(ValueError, match="no submodule 'layer9'"):
        ptl_wrap(tvm.resnet18(weights=None), ["layer1", "layer9"])


class _ForwardDoesMore(nn.Module):
    """Stages a, b, c, and a forward that does more between them than the chain would."""

    def __init__(self, act: bool = True, residual: bool = True):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 16, 3, 2, 1)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()
        self.residual = residual

    def forward(self, x):
        x = self.act(self.a(x))  # in place on a's output, the tensor stage b then gets
        x = x + self.b(x) if self.residual else self.b(x)
        return F.relu(self.c(x))


class _ResNetWithItsOwnForward(tvm.ResNet):
    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x) * 2)))


@pytest.mark.filterwarnings("default:ptl_wrap:UserWarning")
def test_a_forward_that_is_not_the_chain_of_stages_warns():
    # The wrapped network runs the stages only: what the forward does between them was silently
    # dropped (a user net's output min -0.67 behind a final ReLU; GoogLeNet's input transform).
    def warned(backbone, stages, size=(32, 32)):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ptl_wrap(backbone, stages, input_size=size)
        return [str(m.message) for m in w if str(m.message).startswith("ptl_wrap")]

    (msg,) = warned(_ForwardDoesMore(), ["a", "b", "c"])
    assert "_ForwardDoesMore.forward does not run the stages as a chain" in msg
    assert "stage 2 gets something other than stage 1's output; stage 3 gets" in msg
    (msg,) = warned(_ForwardDoesMore(act=False), ["a", "b", "c"])
    assert "stage 3 gets something other than stage 2's output" in msg and "stage 2 gets" not in msg
    assert warned(_ForwardDoesMore(act=False, residual=False), ["a", "b", "c"]) == []
    (msg,) = warned(_ResNetWithItsOwnForward(tvm.resnet.BasicBlock, [1, 1, 1, 1]), "auto", (64, 64))
    assert "stage 3 gets something other than stage 2's output" in msg and "stage 2 gets" not in msg
    g = tvm.googlenet(weights=None, transform_input=True, aux_logits=False, init_weights=False)
    stem = [nn.Sequential(g.conv1, g.maxpool1), nn.Sequential(g.conv2, g.conv3, g.maxpool2)]
    (msg,) = warned(g, stem, (64, 64))
    assert "stage 1 gets something other than the image (the forward transforms it first)" in msg
    g.transform_input = False
    assert warned(g, stem, (64, 64)) == []
    (msg,) = warned(g, [g.conv1, stem[1]], (64, 64))  # maxpool1 left out of the stages
    assert "stage 2 gets something other than stage 1's output" in msg


def test_float64_backbone_gets_float64_cells():
    backbone = _tiny_backbone()  # float64
    net = ptl_wrap(backbone, list(backbone), input_size=(16, 12))
    assert {p.dtype for p in net.parameters()} == {torch.float64}
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64)
    assert net.train()(x).dtype == torch.float64 and net.eval()(x).dtype == torch.float64


def test_ratio_not_a_power_of_two_is_an_error():
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    with pytest.raises(ValueError, match="power of 2") as e:
        ptl_wrap(backbone, list(backbone), input_size=(27, 27))
    assert "27x27 to 9x9" in str(e.value)


def test_size_mismatch_is_a_clear_error():
    # ConvNeXt downsamples with floor(H/2), a padded stride-2 cell with ceil(H/2): they agree on
    # even sizes only, so 68x68 (stage 2 sees 17x17) is refused at build time and at run time.
    backbone = tvm.convnext_tiny(weights=None)
    with pytest.raises(ValueError, match="17x17 to 8x8"):
        ptl_wrap(backbone, "auto", input_size=(68, 68))
    net = ptl_wrap(backbone, "auto", input_size=(64, 64), backend="cpu").eval()
    with pytest.raises(ValueError, match=r"input_size=\(64, 64\)") as e:
        net(torch.randn(1, 3, 68, 68))
    # the advice names both ways out: the images' own size, or one its cells can follow
    assert "input_size = your images' size" in str(e.value) and "divisible by its total stride" in str(
        e.value
    )


def test_size_mismatch_names_each_tensor_with_its_own_shape():
    # VGG11 built at 64x64 and run at 80x80: the final fusion meets x^6 (512, 2x2: 80 -> 40 -> ... ->
    # floor halvings) and y^5 (256, 3x3: ceil halvings); each shape must sit next to its own name.
    net = ptl_wrap(tvm.vgg11(weights=None), "auto", input_size=(64, 64), backend="cpu").eval()
    with pytest.raises(ValueError) as e:
        net(torch.randn(1, 3, 80, 80))
    assert "x^6 (1, 512, 2, 2)" in str(e.value) and "y^5 (1, 256, 3, 3)" in str(e.value)
    # the inner joins (x^i first in the concatenation) name theirs the same way. ConvNeXt at 68x68:
    # x^1 = 17x17 (stem k4 s4); stage 2 downsamples with floor, x^2 = 8x8 (192 channels), while
    # cell 1 (stride 2, padding 1) gives ceil, y^1 = 9x9 (96 = 192 / 2 channels)
    net = ptl_wrap(tvm.convnext_tiny(weights=None), "auto", input_size=(64, 64), backend="cpu").eval()
    with pytest.raises(ValueError) as e:
        net(torch.randn(1, 3, 68, 68))
    assert "x^2 (1, 192, 8, 8)" in str(e.value) and "y^1 (1, 96, 9, 9)" in str(e.value)


def test_bad_arguments():
    backbone = _tiny_backbone()
    with pytest.raises(ValueError, match="cell must be"):
        ptl_wrap(backbone, list(backbone), cell="v3", input_size=(16, 12))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ptl_wrap(backbone, list(backbone), kernel_size=2, input_size=(16, 12))
    with pytest.raises(ValueError, match="cell_channels must be 3"):
        ptl_wrap(backbone, list(backbone), cell_channels=[4, 4], input_size=(16, 12))
    with pytest.raises(ValueError, match="plain backbone"):
        ptl_wrap(backbone, list(backbone), cell=None, out_channels=7, input_size=(16, 12))
    with pytest.raises(ValueError, match="stage 1 .* in_channels"):
        ptl_wrap(backbone, list(backbone), input_size=(16, 12), in_channels=1)
    for bad in (0, -5, 2.0, True):  # 0 used to mean the last stage's width, silently
        with pytest.raises(ValueError, match=f"out_channels must be a positive int or None.*got {bad}"):
            ptl_wrap(backbone, list(backbone), out_channels=bad, input_size=(16, 12))
    assert (
        ptl_wrap(backbone, list(backbone), out_channels=np.int64(12), input_size=(16, 12)).out_channels == 12
    )
    widths = [np.int64(4), 6, np.int32(10)]
    assert ptl_wrap(backbone, list(backbone), cell_channels=widths, input_size=(16, 12)).cell_channels == [
        4,
        6,
        10,
    ]
    with pytest.raises(ValueError, match=r"cell_channels must be 3 positive ints .*got \[4, 0, 10\]"):
        ptl_wrap(backbone, list(backbone), cell_channels=[4, 0, 10], input_size=(16, 12))
    with pytest.raises(ValueError, match="input_size must be"):
        ptl_wrap(backbone, list(backbone), input_size=16)

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(
        ValueError, match=r"stage 2 \(Pair\) must return a \(B, C, H, W\) tensor, got a tuple"
    ):
        ptl_wrap(backbone, [backbone[0], Pair()], input_size=(16, 12))


def test_ptlnet_takes_stages_for_a_backbone_auto_cannot_split():
    with pytest.raises(
        ValueError, match=r"cannot discover the stages of a RegNet.*\(to ptl_wrap or PTLNet\)"
    ):
        PTLNet("regnet_y_400mf", 5, input_size=(64, 32), backend="cpu")
    names = ["stem", *(f"trunk_output.block{i}" for i in range(1, 5))]
    with pytest.warns(UserWarning, match="randomly initialised"):
        net = PTLNet("regnet_y_400mf", 5, input_size=(64, 32), backend="cpu", stages=names)
    assert [c for c, _, _ in net.body.stage_shapes] == [3, 32, 48, 104, 208, 440]
    out = net.train()(torch.randn(2, 3, 64, 32))
    assert out.logits[0].shape == (2, 5)
    # Modules of another network would be wrapped without the weights or last_stride PTLNet sets.
    with pytest.raises(TypeError, match="PTLNet builds its own backbone, so stages must name"):
        PTLNet("resnet18", 5, stages=list(tvm.resnet18(weights=None).children())[4:8])


def test_measuring_keeps_the_training_flags():
    backbone = _tiny_backbone().train()
    backbone[1][1].eval()  # e.g. a frozen BN
    ptl_wrap(backbone, list(backbone), input_size=(16, 12))
    assert backbone[0].training and backbone[2][1].training and not backbone[1][1].training
