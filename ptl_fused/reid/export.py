"""Export a ReID model's retrieval feature to ONNX.

In eval mode every BConv-Cell starts from zero state, so the network is feed-forward and
exports as a plain graph: input "images" (B, 3, height, width) in the model's dtype (float32 for
most), output "feature" (B, D),
with a dynamic batch axis. A model that returns an object with `.feature` (ModelOutput) is
wrapped so that the graph outputs only the feature.

Exporter: torch.onnx.export's torch.export-based exporter (the default since torch 2.9, needs
onnxscript) for opset >= 18 (its own default is 20). It implements no older opset, and its
down-conversion produced invalid graphs here (torch 2.14, onnxscript 0.7: a Split with opset-18
attributes in an opset-17 model), so for opset < 18 the TorchScript-based exporter (deprecated by
torch, still reliable) is used; `dynamo=True/False` forces one. Whatever their backend, the
cells trace as plain ATen ops while an exporter runs (ptl_fused.ops.exporting), through the
eval shortcut of python_ref/eval_path.py, so the graph needs no custom op.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ptl_fused.models.ptl_wrap import param_device_dtype


class _FeatureOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        output = self.model(images)
        return getattr(output, "feature", output)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    height: int,
    width: int,
    opset: int | None = None,
    dynamo: bool | None = None,
) -> Path:
    """Write model's eval-mode feature as an ONNX graph to `path`; returns the path.

    The model stays on its device and dtype (the example input (2, 3, height, width) is made
    in them); the training mode of each of its modules is restored afterwards. opset=None takes
    the exporter's default; dynamo=None picks the exporter from the opset (see the module
    docstring).
    """
    path = Path(path)
    if dynamo is None:
        dynamo = opset is None or opset >= 18
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder for the ONNX file does not exist: {path.parent}")
    modes = [(m, m.training) for m in model.modules()]  # a frozen BN stays in eval
    model.eval()
    device, dtype = param_device_dtype([model])
    example = torch.randn(2, 3, height, width, device=device, dtype=dtype)
    try:
        kwargs = {"opset_version": opset} if opset is not None else {}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            if dynamo:
                # external_data=False: one self-contained file (the weights inside; ONNX allows
                # up to 2 GB), not the default's .onnx.data sidecar that a deployment could miss.
                kwargs.update(
                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, external_data=False
                )
            else:
                kwargs["dynamic_axes"] = {"images": {0: "batch"}, "feature": {0: "batch"}}
            torch.onnx.export(
                _FeatureOnly(model).eval(),
                (example,),
                str(path),
                input_names=["images"],
                output_names=["feature"],
                dynamo=dynamo,
                **kwargs,
            )
    finally:
        for m, mode in modes:
            m.train(mode)
    return path
