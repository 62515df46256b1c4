"""The networks: output shapes per head, MGN-PTL's exact layout, training steps, baselines,
reset_classifier, pretrained loading, build_model, torch.compile, autocast and DDP."""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision import models as tvm

import ptl_fused
from ptl_fused import BConvCell, BConvCellV2
from ptl_fused.models import (
    MGN,
    ModelOutput,
    PTLNet,
    build_model,
    densenet_bc_100,
    digits_net,
    find_stages,
)


def _cells(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BConvCell, BConvCellV2))]


def _quiet(build, *args, **kw):
    """Build a model with pretrained=None without the (tested elsewhere) random-init warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build(*args, **kw)


def _check_output(out, batch, feature_dim, num_classes, n_logits=1, emb_dims=None):
    assert isinstance(out, ModelOutput)
    assert out.feature.shape == (batch, feature_dim)
    assert len(out.logits) == n_logits and all(t.shape == (batch, num_classes) for t in out.logits)
    emb_dims = emb_dims or [feature_dim]
    assert [tuple(e.shape) for e in out.embeddings] == [(batch, d) for d in emb_dims]


def _train_step(model, x, labels, steps=1):
    """SGD steps on CE over every classifier + a feature term over every embedding; returns the
    names of parameters without a nonzero gradient in the last step (unused in forward: DDP
    rejects those). v2 needs 2 steps: after a reset H_prev = 0, so weight_rec's gradient is 0."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(steps):
        out = model(x)
        loss = sum(nn.functional.cross_entropy(lg, labels) for lg in out.logits)
        loss = loss + sum(e.pow(2).mean() for e in out.embeddings)
        opt.zero_grad()
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
        assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    return no_grad


@pytest.mark.parametrize("head", ["reid", "classification"])
@pytest.mark.parametrize("cell", ["v1", None])
@pytest.mark.parametrize("arch", ["resnet50", "densenet161"])
def test_ptlnet_shapes(arch, cell, head):
    torch.manual_seed(0)
    net = _quiet(PTLNet, arch, 7, cell=cell, head=head, feat_dim=32, input_size=(64, 32), backend="cpu")
    assert net.feature_dim == 32
    # 1 + 4 cell chains (DESIGN.md); the chain on the image is two stride-2 cells, as the authors'
    # MGN bconv1 + bconv2, because both stems divide by 4: 6 cells in all.
    assert len(_cells(net)) == (6 if cell is not None else 0)
    assert [len(chain) for chain in net.body.cells or []] == ([2, 1, 1, 1, 1] if cell else [])
    for mode in (net.train, net.eval):
        mode()
        _check_output(net(torch.randn(2, 3, 64, 32)), 2, 32, 7)
    if arch == "resnet50":  # last_stride=1: layer4 keeps layer3's 1/16
        assert [s[1:] for s in net.body.stage_shapes] == [(64, 32), (16, 8), (16, 8), (8, 4), (4, 2), (4, 2)]
        assert net.body.halvings == ([2, 0, 1, 1, 0] if cell else [])
    else:  # DESIGN.md: five blocks, the last two at 1/32
        assert [s[0] for s in net.body.stage_shapes[1:]] == [96, 192, 384, 1056, 2208]
        assert [s[1:] for s in net.body.stage_shapes[-2:]] == [(2, 1), (2, 1)]
        if cell:
            assert net.body.halvings == [2, 1, 1, 1, 0]


def test_last_stride():
    plain = _quiet(PTLNet, "resnet18", 3, cell=None, last_stride=2, input_size=(64, 32))
    assert plain.body.stage_shapes[-1][1:] == (2, 1)
    with pytest.raises(ValueError, match="ResNet backbones only"):
        _quiet(PTLNet, "densenet121", 3, last_stride=1, input_size=(64, 32))


def test_mgn_ptl_is_the_authors_layout():
    """DESIGN.md §1's list at 384x128: cell Cin->Cout, stride, input size; fuse widths."""
    torch.manual_seed(0)
    net = _quiet(MGN, 5, cell="v1", backend="cpu").eval()
    seen = []
    for c in _cells(net):
        c.register_forward_pre_hook(lambda m, a: seen.append((m, tuple(a[0].shape[-2:]))))
    with torch.no_grad():
        out = net(torch.randn(1, 3, 384, 128))
    _check_output(out, 1, 8 * 256, 5, n_logits=8, emb_dims=[256] * 3)
    got = {(m.in_channels, m.out_channels, m.stride, size) for m, size in seen}
    assert len(seen) == 8 and got == {
        (3, 16, 2, (384, 128)),  # bconv1
        (16, 32, 2, (192, 64)),  # bconv2
        (64, 64, 1, (96, 32)),  # bconv3
        (128, 256, 2, (96, 32)),  # bconv4
        (256, 512, 2, (48, 16)),  # bconv5
        (512, 128, 2, (24, 8)),  # bconv6, global branch
        (512, 128, 1, (24, 8)),  # bconv7 / bconv8, part branches (twice)
    }
    fuses = [*net.body.fuses, net.body.final_fuse]
    assert [(f[0].in_channels, f[0].out_channels) for f in fuses] == [
        (32 + 64, 64),
        (256 + 64, 128),
        (512 + 256, 256),
        (1024 + 512, 512),
    ]
    assert all(isinstance(f[1], nn.BatchNorm2d) and isinstance(f[2], nn.ReLU) for f in fuses)
    assert net.reduction[0].in_channels == 2048 + 128
    # the part branches' layer4 keeps 24x8 (stride 1), the global one halves it
    strides = [b[1][0].conv2.stride for b in net.branches]
    assert strides == [(2, 2), (1, 1), (1, 1)]


@pytest.mark.parametrize("cell", ["v1", None])
def test_mgn_train_step_and_outputs(cell):
    torch.manual_seed(0)
    net = _quiet(MGN, 4, cell=cell, feat_dim=16, input_size=(64, 32), backend="cpu")
    assert bool(_cells(net)) == (cell is not None)
    x = torch.randn(2, 3, 64, 32)
    _check_output(net(x), 2, 8 * 16, 4, n_logits=8, emb_dims=[16] * 3)
    assert _train_step(net, x, torch.tensor([0, 3])) == []
    net.eval()
    out = net(x)
    # the eval feature is the 8 reduced features; the first 3 are the triplet embeddings
    torch.testing.assert_close(out.feature[:, :48], torch.cat(out.embeddings, dim=1))
    if cell:
        assert ptl_fused.reset_states(net) == 8 and all(c.state is None for c in _cells(net))


def test_densenet100_cifar():
    torch.manual_seed(0)
    net = densenet_bc_100(10, "v1", backend="cpu")
    # depth 100 = 3 blocks x 16 bottleneck layers x 2 convs + first conv + 2 transitions + classifier
    convs = [m for m in net.body.stages.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 16 * 2 + 2 and convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1)
    assert [s[0] for s in net.body.stage_shapes[1:]] == [24, 108, 150, 342]
    assert [s[1:] for s in net.body.stage_shapes] == [(32, 32), (32, 32), (16, 16), (8, 8), (8, 8)]
    assert net.body.halvings == [0, 1, 1, 0]
    _check_output(net(torch.randn(2, 3, 32, 32)), 2, 256, 10)
    assert not _cells(densenet_bc_100(10, None))


@pytest.mark.parametrize("cell", ["v1", "v2", None])
def test_digits_net_trains(cell):
    torch.manual_seed(0)
    net = digits_net(10, cell, backend="cpu")
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    assert _train_step(net, x, y, steps=2) == []
    _check_output(net(x), 8, 64, 10)
    assert len(_cells(net)) == (3 if cell else 0)
    if cell:
        assert all(c.state is not None for c in _cells(net))
        assert ptl_fused.reset_states(net) == 3


def test_ptlnet_reid_train_step():
    torch.manual_seed(0)
    net = _quiet(PTLNet, "resnet18", 5, cell="v2", feat_dim=16, input_size=(64, 32), backend="cpu")
    assert _train_step(net, torch.randn(4, 3, 64, 32), torch.tensor([0, 1, 2, 4]), steps=2) == []


def test_reset_classifier_keeps_everything_else():
    net = digits_net(10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.reset_classifier(3)
    after = net.state_dict()
    assert after["head.classifier.weight"].shape == (3, 64)
    assert before.keys() == after.keys()
    for k in before:
        if not k.startswith("head.classifier."):
            assert torch.equal(before[k], after[k]), k
    _check_output(net(torch.randn(2, 1, 8, 8)), 2, 64, 3)


@pytest.mark.parametrize("cell", ["v1", None])
def test_mgn_reduction_normalises_each_feature_on_its_own(cell):
    """The authors call the shared reduction once per pooled feature (mgn_ptl.py: 8 calls), so in
    training each of the 8 features gets its own BN batch statistics and the running statistics
    are updated 8 times a step. With a large BN bias the ReLU passes everything, so each feature's
    batch mean is exactly that bias, channel by channel; joint statistics over the 8 would only
    make the mean over all 8 equal to it."""
    torch.manual_seed(0)
    net = _quiet(MGN, 4, cell=cell, feat_dim=8, input_size=(64, 32), backend="cpu").train()
    bn = net.reduction[1]
    with torch.no_grad():
        bn.bias.fill_(50.0)
        feats = net(torch.randn(4, 3, 64, 32)).feature.view(4, 8, 8)  # (B, feature, channel)
    torch.testing.assert_close(feats.mean(0), torch.full((8, 8), 50.0), atol=1e-4, rtol=0)
    assert (feats.std(0) > 0.1).all()  # the features are not constant across the batch
    assert int(bn.num_batches_tracked) == 8


@pytest.mark.parametrize("cell", ["v1", "v2", None])
def test_mgn_initialisation_is_the_authors(cell):
    """mgn_ptl.py (PTL.init_param, _init_reduction, _init_fc) and mgn.py: the PTL cells' gate convs
    and fuse convs kaiming_normal_(fan_in), reduction conv kaiming_normal_(fan_in), reduction BN
    weight ~ N(1, 0.02) and bias 0, classifiers kaiming_normal_ (fan_in in MGN-PTL, fan_out in the
    authors' plain MGN) with bias 0. The ResNet layers keep theirs."""
    torch.manual_seed(0)
    num_classes = 50
    net = _quiet(MGN, num_classes, cell=cell, input_size=(64, 32), backend="cpu")

    def assert_kaiming_normal(w, fan):
        std = (2.0 / fan) ** 0.5  # kaiming_normal_ with the ReLU gain; the default init is 1/sqrt(3·fan)
        assert abs(w.mean().item()) < 4 * std / w.numel() ** 0.5
        assert abs(w.std().item() / std - 1) < 4 / (2 * w.numel()) ** 0.5 + 0.01

    bn = net.reduction[1]
    assert abs(bn.weight.mean().item() - 1) < 4 * 0.02 / 256**0.5
    assert abs(bn.weight.std().item() / 0.02 - 1) < 0.2
    assert torch.equal(bn.bias, torch.zeros(256))
    conv = net.reduction[0].weight
    assert_kaiming_normal(conv, conv.shape[1])
    fc_fan = 256 if cell else num_classes
    for fc in net.classifiers:
        assert_kaiming_normal(fc.weight, fc_fan)
        assert torch.equal(fc.bias, torch.zeros(num_classes))
    ptl_convs = [c.weight for c in _cells(net)]
    ptl_convs += [f[0].weight for f in [*(net.body.fuses or []), net.body.final_fuse] if f is not None]
    assert len(ptl_convs) == (12 if cell else 0)  # 8 cells, fuse1..4
    for w in ptl_convs:
        assert_kaiming_normal(w, w[0].numel())
    # the backbone (pretrained when given) is not re-initialised: the stem conv keeps torchvision's init
    stem = net.body.stages[0][0].weight
    assert abs(stem.std().item() / (2.0 / stem.shape[0] / 49) ** 0.5 - 1) < 0.05  # fan_out, 64·7·7
    net.reset_classifier(7)
    assert all(torch.equal(fc.bias, torch.zeros(7)) for fc in net.classifiers)


def test_mgn_reset_classifier():
    net = _quiet(MGN, 4, feat_dim=8, input_size=(64, 32))
    reduction = net.reduction[0].weight.clone()
    net.reset_classifier(9)
    assert all(fc.out_features == 9 for fc in net.classifiers) and len(net.classifiers) == 8
    assert torch.equal(net.reduction[0].weight, reduction)


# --- pretrained weights -----------------------------------------------------------------------


def _save(obj, path) -> str:
    torch.save(obj, path)
    return os.fspath(path)


def test_pretrained_loads_a_local_torchvision_state_dict(tmp_path):
    torch.manual_seed(1)
    source = tvm.resnet18(weights=None, num_classes=7)  # its fc does not fit: ignored
    path = _save(source.state_dict(), tmp_path / "r18.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no random-init warning
        net = PTLNet("resnet18", 3, cell="v1", pretrained=path, input_size=(64, 32))
    # every backbone tensor (parameters and BN buffers) is the file's
    want = nn.ModuleList(find_stages(source)).state_dict()
    got = net.body.stages.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_mgn_pretrained_reaches_every_branch(tmp_path):
    torch.manual_seed(2)
    source = tvm.resnet50(weights=None)
    net = MGN(4, cell="v1", pretrained=_save(source.state_dict(), tmp_path / "r50.pth"), input_size=(64, 32))
    assert torch.equal(net.body.stages[0][0].weight, source.conv1.weight)
    assert torch.equal(net.body.stages[3].conv1.weight, source.layer3[0].conv1.weight)
    for branch in net.branches:  # each branch: its own copy of layer3[1:] and layer4, both loaded
        assert torch.equal(branch[0][0].conv1.weight, source.layer3[1].conv1.weight)
        assert torch.equal(branch[1][0].conv2.weight, source.layer4[0].conv2.weight)
    assert net.branches[1][1][0].conv2.weight is not net.branches[2][1][0].conv2.weight


def test_pretrained_densenet_file_with_torchvision_published_key_names(tmp_path):
    """torchvision's published DenseNet files say "norm.1" for "norm1" and have no BN counters."""
    source = tvm.densenet121(weights=None)
    published = {
        re.sub(r"(norm|relu|conv)([12])\.", r"\1.\2.", k): v
        for k, v in source.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in published
    assert "features.denseblock1.denselayer1.conv.2.weight" in published
    path = _save(published, tmp_path / "d.pth")
    net = PTLNet("densenet121", 3, cell=None, pretrained=path, input_size=(64, 32))
    layer = net.body.stages[1][0].denselayer1
    assert torch.equal(layer.norm1.weight, source.features.denseblock1.denselayer1.norm1.weight)
    assert torch.equal(layer.conv2.weight, source.features.denseblock1.denselayer1.conv2.weight)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
@pytest.mark.parametrize("cell", [None, "v1"])
def test_backbone_state_dict_has_torchvision_keys(arch, cell):
    net = _quiet(PTLNet, arch, 3, cell=cell, input_size=(64, 32))
    with torch.no_grad():
        for p in net.body.stages.parameters():
            p.uniform_()  # not the initialisation a fresh torchvision model would also have
    tv = tvm.get_model(arch, weights=None)
    result = tv.load_state_dict(net.body.backbone_state_dict(), strict=False)
    head = "fc" if arch.startswith("resnet") else "classifier"
    assert sorted(result.missing_keys) == [f"{head}.bias", f"{head}.weight"] and not result.unexpected_keys
    first = tv.conv1 if head == "fc" else tv.features.conv0  # the stem's convolution
    assert torch.equal(first.weight, net.body.stages[0][0].weight)
    if head == "fc":  # the last stage is layer4 itself
        assert torch.equal(tv.layer4[-1].bn2.weight, net.body.stages[-1][-1].bn2.weight)
    else:  # [denseblock4, norm5, ReLU]
        assert torch.equal(tv.features.norm5.weight, net.body.stages[-1][1].weight)


def test_head_errors_name_the_head_and_the_fix():
    net = _quiet(PTLNet, "resnet18", 3, input_size=(64, 32))
    with pytest.raises(ValueError, match=r"ReIDHead: a training batch of 1 image.*drop_last=True"):
        net.train()(torch.randn(1, 3, 64, 32))  # was torch's BatchNorm1d error, naming neither
    assert net.eval()(torch.randn(1, 3, 64, 32)).feature.shape == (1, net.feature_dim)
    # Allowed: the head's BatchNorm1d layers frozen (eval) in a training network, and FX tracing.
    net.train().head.embed.eval()
    assert net(torch.randn(1, 3, 64, 32)).feature.shape == (1, net.feature_dim)
    torch.fx.symbolic_trace(_quiet(PTLNet, "resnet18", 3, cell=None, input_size=(64, 32)).train())
    assert _quiet(PTLNet, "resnet18", np.int64(3), input_size=(64, 32)).head.classifier.out_features == 3
    for bad in (0, -1, 2.0):  # a classifier with no outputs was built without a word
        with pytest.raises(ValueError, match=rf"num_classes must be an int >= 1, got {bad}"):
            _quiet(PTLNet, "resnet18", bad, input_size=(64, 32))
        with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
            net.reset_classifier(bad)
        with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
            _quiet(MGN, bad)


def test_pretrained_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        PTLNet("resnet18", 3, pretrained=missing, input_size=(64, 32))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt.pth") as e:
        PTLNet("resnet18", 3, pretrained=corrupt, input_size=(64, 32))
    # One line, without torch's advice to load the file with weights_only=False (which would
    # run whatever code the file holds).
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    (tmp_path / "text.pth").write_text("garbage\n")
    with pytest.raises(ValueError, match=r"text.pth.*not a torch file of tensors") as e:
        PTLNet("resnet18", 3, pretrained=tmp_path / "text.pth", input_size=(64, 32))
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    state = tvm.resnet18(weights=None).state_dict()
    wrong_keys = {("backbone." + k): v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"keys.pth.*missing keys bn1.bias, .*conv1.weight") as e:
        PTLNet("resnet18", 3, pretrained=_save(wrong_keys, tmp_path / "keys.pth"), input_size=(64, 32))
    # Five names of each, and how many in all: every key of the file is unexpected, and every
    # backbone tensor is missing (not fc's, nor the BN batch counters, which are not required).
    required = [k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert f"({len(required)} in all), unexpected keys backbone." in str(e.value)
    assert str(e.value).endswith(
        f"... ({len(state)} in all) (expected a torchvision state dict of this architecture)"
    )
    wrong_arch = tvm.resnet34(weights=None).state_dict()
    with pytest.raises(ValueError, match="r34.pth.*unexpected keys layer1.2"):
        PTLNet("resnet18", 3, pretrained=_save(wrong_arch, tmp_path / "r34.pth"), input_size=(64, 32))
    bad_shape = dict(state, **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    with pytest.raises(ValueError, match=r"shape.pth.*conv1.weight: file \(64, 3, 3, 3\)"):
        PTLNet("resnet18", 3, pretrained=_save(bad_shape, tmp_path / "shape.pth"), input_size=(64, 32))
    with pytest.raises(ValueError, match="list.pth.*not a state dict"):
        PTLNet("resnet18", 3, pretrained=_save([1, 2], tmp_path / "list.pth"), input_size=(64, 32))
    from ptl_fused.models.pretrained import load_backbone_weights

    ok = _save(state, tmp_path / "ok.pth")
    with pytest.raises(
        ValueError, match=r"none of the stages' tensors belong to the ResNet to load .*ok.pth"
    ):
        load_backbone_weights(tvm.resnet18(weights=None), find_stages(tvm.resnet18(weights=None)), ok)


def test_random_init_warns_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PTLNet("resnet18", 3, input_size=(64, 32))
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1 and "randomly initialised" in msgs[0]


# --- build_model --------------------------------------------------------------------------------


def test_build_model_registry():
    assert isinstance(build_model("digits", 10, cell=None), nn.Module)
    assert isinstance(_quiet(build_model, "mgn", 4, input_size=(64, 32)), MGN)
    net = _quiet(build_model, "mobilenet_v3_small", 4, head="classification", input_size=(64, 64), feat_dim=8)
    assert isinstance(net, PTLNet) and net.arch == "mobilenet_v3_small"
    _check_output(net(torch.randn(2, 3, 64, 64)), 2, 8, 4)
    with pytest.raises(ValueError, match="only the 'classification' head"):
        build_model("digits", 10, head="reid")
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("densenet100", 10, pretrained="x.pth")
    with pytest.raises(ValueError, match="unknown architecture 'resnet5'"):
        build_model("resnet5", 10)


# --- torch.compile, autocast, DDP -------------------------------------------------------------


def test_compile_fullgraph_matches_eager_with_carried_state():
    torch.manual_seed(0)
    eager = digits_net(10, "v1", backend="cpu")
    compiled_model = digits_net(10, "v1", backend="cpu")
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the second batch reads the state the first left
        x = torch.randn(4, 1, 8, 8)
        want, got = eager(x), compiled(x)
        torch.testing.assert_close(got.feature, want.feature)
        got.logits[0].sum().backward()
    assert all(p.grad is not None for p in compiled_model.parameters())


def test_autocast_bf16():
    net = digits_net(10, "v1", backend="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(4, 1, 8, 8))
    assert out.logits[0].dtype == torch.bfloat16
    assert all(c.state.dtype == torch.float32 for c in _cells(net))


def test_ddp_finds_no_unused_parameters(tmp_path):
    """DDP without find_unused_parameters fails on the second step if any parameter went unused."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(digits_net(10, "v2", backend="cpu"))
        for _ in range(3):
            ddp(torch.randn(4, 1, 8, 8)).logits[0].sum().backward()
    finally:
        dist.destroy_process_group()
