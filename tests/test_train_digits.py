"""The main job (ptl-train with no config) in --quick mode, end to end through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from ptl_fused import BConvCell, BConvCellV2
from ptl_fused.engine.cli import main
from ptl_fused.models import build_model


def test_main_job_quick_writes_table_json_and_plot(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path / "digits")]) == 0
    text = capsys.readouterr().out
    assert "transfer test acc. (%)" in text and "held-out" in text
    for method in ("baseline", "ptl", "ptl_v2", "std"):
        assert f"\n{method} " in text
    res = json.loads((tmp_path / "digits" / "results.json").read_text())
    assert set(res["methods"]) == {"baseline", "ptl", "ptl_v2", "std"}
    assert res["transfer_train_images"] == 5 * 5  # 5 digits x 5 shots
    for m in res["methods"].values():
        assert 0.0 <= m["transfer_test_accuracy_mean"] <= 100.0
        assert len(m["transfer_curve_mean"]) == res["transfer_epochs"]
        assert m["transfer_test_accuracy_per_seed"] == [pytest.approx(m["transfer_curve_mean"][-1])]
    png = (tmp_path / "digits" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the STD student learned from the ptl run of the same seed
    std_cfg = json.loads((tmp_path / "digits" / "seed0" / "std" / "results.json").read_text())["config"]
    assert std_cfg["stages"][1]["std"]["teacher"].endswith("seed0/ptl/stage2-digits/last.pt")


def test_main_job_std_student_is_the_plain_digits_net(tmp_path):
    """The real networks: the saved STD student loads into build_model("digits", cell=None)
    and has no BConv-Cell; its teacher (the ptl run) does."""
    out = tmp_path / "digits"
    assert main(["--quick", "--out", str(out), "digits.methods=[ptl, std]"]) == 0
    student_sd = torch.load(out / "seed0" / "std" / "stage2-digits" / "weights.pt")
    plain = build_model("digits", 5, cell=None, head="classification")
    assert student_sd.keys() == plain.state_dict().keys()
    plain.load_state_dict(student_sd)
    assert not any(isinstance(m, (BConvCell, BConvCellV2)) for m in plain.modules())
    teacher_sd = torch.load(out / "seed0" / "ptl" / "stage2-digits" / "weights.pt")
    ptl = build_model("digits", 5, cell="v1", head="classification")
    ptl.load_state_dict(teacher_sd)
    cell_keys = {f"{n}.weight" for n, m in ptl.named_modules() if isinstance(m, BConvCell)}
    assert cell_keys and cell_keys <= teacher_sd.keys() and not cell_keys & student_sd.keys()
