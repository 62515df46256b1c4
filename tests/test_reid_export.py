"""ONNX export of a small network with BConv-Cells: ONNX Runtime features match PyTorch's."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import ptl_fused
from ptl_fused.reid import export_onnx


def _session(path) -> ort.InferenceSession:
    # One thread, no spin-waiting: idle ORT threads would otherwise keep spinning and slow the
    # tests that run after these on a small machine.
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _Output(NamedTuple):
    feature: torch.Tensor
    logits: torch.Tensor


class _TinyPTLNet(nn.Module):
    """Image cell (v1, stride 2) -> conv+BN+ReLU -> v2 cell -> pooled feature (+ logits)."""

    def __init__(self, backend: str = "reference") -> None:
        super().__init__()
        self.cell1 = ptl_fused.BConvCell(3, 4, 3, stride=2, padding=1, backend=backend)
        self.block = nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.cell2 = ptl_fused.BConvCellV2(6, 8, 3, stride=1, padding=1, bias=True, backend=backend)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> _Output:
        feature = self.cell2(self.block(self.cell1(x))).mean(dim=(2, 3))
        return _Output(feature, self.classifier(feature))


# opset None: the torch.export-based exporter; opset 17: the TorchScript-based one. Fused
# backends trace as plain ATen ops (the eval shortcut) while exporting.
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("opset", [None, 17])
def test_onnx_round_trip_matches_pytorch(tmp_path, opset, backend):
    torch.manual_seed(0)
    model = _TinyPTLNet(backend)
    model.train()
    with torch.no_grad():  # non-trivial BN statistics and a carried state that eval must ignore
        model(torch.randn(4, 3, 16, 8))
    path = export_onnx(model, tmp_path / "tiny.onnx", height=16, width=8, opset=opset)
    assert model.training  # restored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"], "one self-contained file"
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == ["feature"]
    assert opset is None or proto.opset_import[0].version == opset
    session = _session(path)
    model.eval()
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 8)
        (got,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            want = model(x).feature.numpy()
        assert got.shape == (batch, 8)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_export_keeps_each_modules_mode_and_the_models_dtype(tmp_path):
    model = _TinyPTLNet().double().train()
    model.block[1].eval()  # a frozen BN: export used to hand it back in training mode
    path = export_onnx(model, tmp_path / "f64.onnx", height=16, width=8, opset=18)
    assert model.training and model.cell1.training and not model.block[1].training
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE


@pytest.mark.parametrize("backend", ["cuda", "cuda_igemm", "triton"])
def test_a_model_built_for_a_gpu_backend_exports_anywhere(tmp_path, backend):
    # The exporters trace the reference's ops whatever the backend, so none needs to run here.
    model = _TinyPTLNet(backend)
    path = export_onnx(model, tmp_path / "gpu.onnx", height=16, width=8, opset=18)
    x = torch.randn(2, 3, 16, 8)
    (got,) = _session(path).run(None, {"images": x.numpy()})
    reference = _TinyPTLNet("reference")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        np.testing.assert_allclose(got, reference.eval()(x).feature.numpy(), atol=1e-4, rtol=0)


def test_plain_tensor_model_and_missing_folder(tmp_path):
    model = nn.Sequential(ptl_fused.BConvCell(3, 2, 3, padding=1, backend="reference"), nn.Flatten())
    path = export_onnx(model, tmp_path / "plain.onnx", 8, 4, opset=18)
    assert onnx.load(str(path)).opset_import[0].version == 18
    x = torch.randn(2, 3, 8, 4)
    (got,) = _session(path).run(None, {"images": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model.eval()(x).numpy(), atol=1e-4, rtol=0)
    with pytest.raises(FileNotFoundError, match="folder for the ONNX file does not exist"):
        export_onnx(model, tmp_path / "no" / "m.onnx", 8, 4)
