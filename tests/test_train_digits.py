"""The main job (ptl-train with no config) in --quick mode, end to end through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from test_engine import tiny_build

import ptl_fused.engine.trainer as trainer
from ptl_fused.engine.cli import main


def test_main_job_quick_writes_table_json_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "build_model_from_config", tiny_build)  # until ptl_fused.models lands
    torch.set_num_threads(1)
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
