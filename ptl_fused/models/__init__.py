"""PTL networks (DESIGN.md §1): ptl_wrap for any staged CNN, PTLNet, MGN, DenseNet-BC-100, digits."""

from .heads import ClassificationHead, ModelOutput, ReIDHead
from .mgn import MGN
from .pretrained import load_backbone_weights
from .ptl_net import PTLModel, PTLNet
from .ptl_wrap import PTLBackbone, ptl_wrap
from .registry import build_model
from .small import densenet_bc_100, digits_net
from .stages import find_stages

__all__ = [
    "MGN",
    "ClassificationHead",
    "ModelOutput",
    "PTLBackbone",
    "PTLModel",
    "PTLNet",
    "ReIDHead",
    "build_model",
    "densenet_bc_100",
    "digits_net",
    "find_stages",
    "load_backbone_weights",
    "ptl_wrap",
]
