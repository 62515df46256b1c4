from torch import nn

from ptl_fused.engine import load_config, run
from ptl_fused.models import PTLModel, ptl_wrap


def build(model_cfg, num_classes):  # your own CNN, its stages named in order
    cnn = nn.Sequential()
    cnn.add_module("stem", nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()))
    cnn.add_module("block1", nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU()))
    cnn.add_module("block2", nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU()))
    body = ptl_wrap(cnn, ["stem", "block1", "block2"], cell="v1", in_channels=1, input_size=(8, 8))
    return PTLModel(body, num_classes, head="classification", feat_dim=64)


cfg = load_config("digits", ["job=train", "optim.epochs=5", "out=runs/wrap_example"])
print(run(cfg, build=build)["stages"][-1]["final"])
