"""MGN (Wang et al., ACM MM 2018, "Multiple Granularity Network") and MGN-PTL (the authors' layout).

Trunk: ResNet-50 up to layer3[0]. Three branches, each with its own copy of layer3[1:] and
layer4: the global branch keeps layer4's stride 2, the two part branches use stride 1 (same
weights). Max pooling gives 8 features: the three branches' global features and the 2 + 3
horizontal stripes of the part branches; one shared 1x1 conv + BN + ReLU (the reduction) reduces
each to feat_dim. As in the authors' code (mgn.py, mgn_ptl.py; GNAYUOHZ/ReID-MGN) it is called
once per feature: the weights are shared, but in training each feature is normalised with its own
batch statistics, and BN's running statistics are updated 8 times a step. Eight linear
classifiers; the eval feature is the concatenation of the 8 reduced features (8·feat_dim); the
triplet embeddings are the 3 reduced global ones.

Initialisation (the authors'): the reduction conv kaiming_normal_(fan_in), its BN weight
~ N(1, 0.02) and bias 0; the classifiers kaiming_normal_ with bias 0 (fan_in in MGN-PTL, fan_out
in the authors' plain MGN); the PTL cells' gate convs and the fuse convs kaiming_normal_(fan_in)
(their PTL.init_param; v2's recovery weight keeps BConvCellV2's own init). The ResNet layers
(pretrained or not) keep theirs.

MGN-PTL (cell="v1"/"v2", DESIGN.md §1): ptl_wrap over [stem, layer1, layer2, layer3[0]] with
cell widths (32, 64, 256, 512) and a 512-channel final fusion gives exactly the authors' bconv1..5
and fuse1..4; bconv6 (512->128, stride 2) then feeds the global branch, bconv7 and bconv8
(stride 1) the part branches. A cell's output joins its branch like in the authors' code: it is
concatenated with the branch's layer4 output (2048 + 128 channels), pooled with it, and the
reduction (2176 -> feat_dim) is the final fusion.
"""

from __future__ import annotations

import copy
import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models as tvm

from .heads import ModelOutput, check_num_classes
from .pretrained import load_backbone_weights, warn_random_init
from .ptl_net import set_first_block_stride
from .ptl_wrap import CELL_TYPES, conv1x1_bn_relu, make_cell_chain, ptl_wrap
from .stages import find_stages

MGN_CELL_CHANNELS = (32, 64, 256, 512)  # bconv2, bconv3, bconv4, bconv5
MGN_FUSE_CHANNELS = 512  # fuse4
MGN_BRANCH_CELL_CHANNELS = 128  # bconv6, bconv7, bconv8
PARTS = (1, 2, 3)  # stripes per branch (the global branch has none)


class MGN(nn.Module):
    """image (B, 3, H, W) -> ModelOutput(feature (B, 8·feat_dim), 8 logits, 3 embeddings (B, feat_dim)).

    input_size: the image size the trunk's cell strides are fitted to (384x128 in the paper).
    """

    def __init__(
        self,
        num_classes: int,
        cell: Literal["v1", "v2"] | None = None,
        backend: str = "auto",
        pretrained: str | os.PathLike | None = None,
        feat_dim: int = 256,
        input_size: tuple[int, int] = (384, 128),
        kernel_size: int = 3,
        state_init: str = "zeros",
    ) -> None:
        super().__init__()
        resnet = tvm.resnet50(weights=None)
        if pretrained is None:
            warn_random_init("MGN")
        else:
            load_backbone_weights(resnet, find_stages(resnet), pretrained)
        stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        ptl = cell is not None
        self.body = ptl_wrap(
            resnet,
            [stem, resnet.layer1, resnet.layer2, resnet.layer3[0]],
            cell,
            out_channels=MGN_FUSE_CHANNELS if ptl else None,
            cell_channels=MGN_CELL_CHANNELS if ptl else None,
            backend=backend,
            kernel_size=kernel_size,
            state_init=state_init,
            input_size=input_size,
        )
        global_layer4 = resnet.layer4
        part_layer4 = copy.deepcopy(resnet.layer4)
        set_first_block_stride(part_layer4, 1)
        self.branches = nn.ModuleList(
            nn.Sequential(copy.deepcopy(resnet.layer3[1:]), copy.deepcopy(layer4))
            for layer4 in (global_layer4, part_layer4, part_layer4)
        )
        self.branch_cells = None
        if ptl:
            self.branch_cells = nn.ModuleList(
                make_cell_chain(
                    cell,
                    MGN_FUSE_CHANNELS,
                    MGN_BRANCH_CELL_CHANNELS,
                    halvings,
                    kernel_size,
                    state_init,
                    backend,
                )
                for halvings in (1, 0, 0)  # bconv6 follows the global layer4's stride 2
            )
        branch_channels = 2048 + (MGN_BRANCH_CELL_CHANNELS if ptl else 0)
        self.reduction = conv1x1_bn_relu(branch_channels, feat_dim)
        self.fc_init_mode = "fan_in" if ptl else "fan_out"  # mgn_ptl.py vs mgn.py
        self.classifiers = self._new_classifiers(feat_dim, num_classes)
        self.feature_dim = 8 * feat_dim
        nn.init.kaiming_normal_(self.reduction[0].weight, mode="fan_in")
        nn.init.normal_(self.reduction[1].weight, mean=1.0, std=0.02)
        nn.init.zeros_(self.reduction[1].bias)
        if ptl:
            for part in (self.body.cells, self.body.fuses, self.body.final_fuse, self.branch_cells):
                for m in part.modules():
                    if isinstance(m, (nn.Conv2d, *CELL_TYPES.values())):  # a cell's weight is its gate conv
                        nn.init.kaiming_normal_(m.weight, mode="fan_in")

    def forward(self, x: Tensor) -> ModelOutput:
        fused, trunk = self.body.features(x)
        maps = [branch(trunk) for branch in self.branches]
        if self.branch_cells is not None:
            maps = [torch.cat([m, c(fused)], dim=1) for m, c in zip(maps, self.branch_cells, strict=True)]
        pooled = [m.amax(dim=(2, 3), keepdim=True) for m in maps]  # 3 global (B, C, 1, 1)
        for m, n in zip(maps[1:], PARTS[1:], strict=True):  # 2 + 3 stripes (B, C, 1, 1)
            pooled += F.adaptive_max_pool2d(m, (n, 1)).split(1, dim=2)
        feats = [self.reduction(p).flatten(1) for p in pooled]  # 8 x (B, feat_dim), 8 BN batches
        logits = tuple(fc(f) for fc, f in zip(self.classifiers, feats, strict=True))
        return ModelOutput(torch.cat(feats, dim=1), logits, tuple(feats[:3]))

    def reset_classifier(self, num_classes: int) -> None:
        """Eight fresh classifiers for num_classes; everything else is kept."""
        old = self.classifiers[0]
        self.classifiers = self._new_classifiers(old.in_features, num_classes).to(
            old.weight.device, old.weight.dtype
        )

    def _new_classifiers(self, feat_dim: int, num_classes: int) -> nn.ModuleList:
        check_num_classes(num_classes)
        fcs = nn.ModuleList(nn.Linear(feat_dim, num_classes) for _ in range(8))
        for fc in fcs:
            nn.init.kaiming_normal_(fc.weight, mode=self.fc_init_mode)
            nn.init.zeros_(fc.bias)
        return fcs
