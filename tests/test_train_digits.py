"""The main job (ptl-train with no config): every method starts from one pre-trained plain CNN
(load_pretrained_plain), and --quick runs end to end."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from ptl_fused import BConvCell, BConvCellV2
from ptl_fused.engine import load_config
from ptl_fused.engine.cli import main
from ptl_fused.engine.digits_job import from_pretrained, load_pretrained_plain, run_digits_job
from ptl_fused.engine.trainer import FinishedRunWarning, build_model_from_config
from ptl_fused.models import build_model

NEW_IN_PTL = ("body.cells.", "body.fuses.", "body.final_fuse.")


def trained_looking_plain(seed: int = 0) -> dict:
    """A plain digits net's state with every tensor changed from its initial value (BN
    statistics too), so that a copied tensor cannot equal the target's by accident."""
    torch.manual_seed(seed)
    sd = build_model("digits", 5, cell=None).state_dict()
    return {k: v + 1 + torch.rand_like(v.float()).to(v.dtype) for k, v in sd.items()}


@pytest.mark.parametrize("cell", ["v1", "v2", None])
def test_load_pretrained_plain_copies_stages_and_head_not_classifier_or_cells(cell):
    plain = trained_looking_plain()
    torch.manual_seed(1)
    net = build_model("digits", 5, cell=cell)
    before = copy.deepcopy(net.state_dict())
    copied = load_pretrained_plain(net, plain)
    after = net.state_dict()
    stage_keys = [k for k in plain if k.startswith("body.stages.")]
    assert len(stage_keys) == 18  # 3 stages x (conv weight + 5 BN tensors)
    for k in stage_keys + ["head.embed.0.weight", "head.embed.0.bias"]:  # the head's feature layer
        assert torch.equal(after[k], plain[k]), k
    assert sorted(copied) == sorted(stage_keys + ["head.embed.0.weight", "head.embed.0.bias"])
    for k in ("head.classifier.weight", "head.classifier.bias"):  # the new classifier: not copied
        assert torch.equal(after[k], before[k]) and not torch.equal(after[k], plain[k])
    fresh = [k for k in after if k.startswith(NEW_IN_PTL)]
    assert bool(fresh) == (cell is not None)
    for k in fresh:  # the cells and fusion convs keep their fresh initialisation
        assert torch.equal(after[k], before[k]), k
    if cell is not None:
        cells = [m for m in net.modules() if isinstance(m, (BConvCell, BConvCellV2))]
        assert len(cells) == 3


def test_load_pretrained_plain_rejects_what_does_not_fit():
    plain = trained_looking_plain()
    bad = dict(plain, **{"body.stages.0.0.weight": torch.zeros(8, 1, 3, 3)})
    with pytest.raises(ValueError, match=r"body\.stages\.0\.0\.weight \(8, 1, 3, 3\).*\(16, 1, 3, 3\)"):
        load_pretrained_plain(build_model("digits", 5, cell="v1"), bad)
    ptl_state = build_model("digits", 5, cell="v1").state_dict()
    with pytest.raises(ValueError, match=r"body\.cells\..*not a plain network"):
        load_pretrained_plain(build_model("digits", 5, cell="v1"), ptl_state)
    head_only = {k: v for k, v in plain.items() if k.startswith("head.")}
    with pytest.raises(ValueError, match="no backbone stage"):
        load_pretrained_plain(build_model("digits", 5, cell=None), head_only)


def test_from_pretrained_factory_loads_the_saved_plain_net(tmp_path):
    plain = trained_looking_plain()
    torch.save(plain, tmp_path / "weights.pt")
    cfg = load_config("digits", ["model.cell=v2"])
    net = from_pretrained(build_model_from_config, tmp_path / "weights.pt")(cfg["model"], 5)
    assert any(isinstance(m, BConvCellV2) for m in net.modules())
    sd = net.state_dict()
    assert all(torch.equal(sd[k], plain[k]) for k in plain if not k.startswith("head.classifier."))


def test_main_job_quick_every_method_starts_from_the_same_pretrained_plain_net(tmp_path, capsys):
    """The job end to end (--quick config), with a build function that records each trained
    network's weights at its first training forward pass (STD's teacher runs in eval mode)."""
    starts: dict[str, dict] = {}

    def recording_build(model_cfg: dict, num_classes: int):
        net = build_model_from_config(model_cfg, num_classes)

        def first_forward(module, args):
            if module.training and id(module) not in seen:
                seen.add(id(module))
                starts.setdefault(str(model_cfg["cell"]), []).append(copy.deepcopy(module.state_dict()))

        net.register_forward_pre_hook(first_forward)
        return net

    seen: set[int] = set()
    out = tmp_path / "digits"
    cfg = load_config("digits", [f"out={out}"], quick=True)
    summary = run_digits_job(cfg, build=recording_build)
    text = capsys.readouterr().out
    assert "transfer test acc. (%)" in text and "held-out" in text
    assert "ALL methods start from that same pre-trained plain CNN" in text
    for method in ("baseline", "ptl", "ptl_v2", "std"):
        assert f"\n{method} " in text

    # Trained networks, in order: pre-training (plain), baseline (plain), ptl, ptl_v2, std (plain).
    assert [len(starts[c]) for c in ("None", "v1", "v2")] == [3, 1, 1]
    pre_init, baseline, std = starts["None"]
    pretrained = torch.load(out / "seed0" / "pretrain" / "weights.pt", weights_only=True)
    transferred = [k for k in pretrained if not k.startswith("head.classifier.")]
    for net in (baseline, starts["v1"][0], starts["v2"][0], std):
        assert all(torch.equal(net[k], pretrained[k]) for k in transferred)
    # the pre-training itself started from random weights and changed them
    assert not torch.equal(pre_init["body.stages.0.0.weight"], pretrained["body.stages.0.0.weight"])

    res = json.loads((out / "results.json").read_text())
    assert res == json.loads(json.dumps(summary))
    assert set(res["methods"]) == {"baseline", "ptl", "ptl_v2", "std"}
    assert res["transfer_train_images"] == 5 * 5  # 5 digits x 5 shots
    pre_run = json.loads((out / "seed0" / "pretrain" / "results.json").read_text())
    assert res["pretrain_test_accuracy_per_seed"] == [pre_run["stages"][0]["final"]["test_accuracy"]]
    for m in res["methods"].values():
        assert 0.0 <= m["transfer_test_accuracy_mean"] <= 100.0
        assert len(m["transfer_curve_mean"]) == res["transfer_epochs"]
        assert m["transfer_test_accuracy_per_seed"] == [pytest.approx(m["transfer_curve_mean"][-1])]
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the STD student learned from the ptl run of the same seed
    std_cfg = json.loads((out / "seed0" / "std" / "results.json").read_text())["config"]
    assert std_cfg["std"]["teacher"].endswith("seed0/ptl/last.pt")


def test_main_job_cli_std_student_is_the_plain_digits_net(tmp_path, capsys):
    """Through the CLI, with the real networks: the saved STD student loads into
    build_model("digits", cell=None) and has no BConv-Cell; its teacher (the ptl run) does."""
    out = tmp_path / "digits"
    assert main(["--quick", "--out", str(out), "digits.methods=[ptl, std]"]) == 0
    assert "\nptl " in capsys.readouterr().out
    student_sd = torch.load(out / "seed0" / "std" / "weights.pt")
    plain = build_model("digits", 5, cell=None, head="classification")
    assert student_sd.keys() == plain.state_dict().keys()
    plain.load_state_dict(student_sd)
    assert not any(isinstance(m, (BConvCell, BConvCellV2)) for m in plain.modules())
    teacher_sd = torch.load(out / "seed0" / "ptl" / "weights.pt")
    ptl = build_model("digits", 5, cell="v1", head="classification")
    ptl.load_state_dict(teacher_sd)
    cell_keys = {f"{n}.weight" for n, m in ptl.named_modules() if isinstance(m, BConvCell)}
    assert cell_keys and cell_keys <= teacher_sd.keys() and not cell_keys & student_sd.keys()
    # resume: a second run with --resume auto trains nothing more and gives the same numbers
    first = json.loads((out / "results.json").read_text())
    with warnings.catch_warnings():  # nor the finished sub-runs' "train on with more epochs" advice
        warnings.simplefilter("error", FinishedRunWarning)
        assert main(["--quick", "--out", str(out), "--resume", "auto", "digits.methods=[ptl, std]"]) == 0
    assert json.loads((out / "results.json").read_text()) == first


def test_quick_runs_in_its_own_folder(tmp_path):
    # --quick must not overwrite (or mix with) a full run's results; an out= override wins.
    assert load_config("digits", quick=True)["out"] == "runs/digits_quick"
    assert load_config("digits", [f"out={tmp_path}"], quick=True)["out"] == str(tmp_path)


def test_main_job_refuses_an_optim_epochs_override(tmp_path, capsys):
    # The main job sets every run's epochs itself: the override would be silently ignored.
    assert main(["--quick", f"out={tmp_path}", "optim.epochs=1"]) == 2
    assert "optim.epochs: the digits job sets each run's epochs itself" in capsys.readouterr().err
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "nothing may run"


def test_main_job_refuses_epochs_without_evaluation_before_training(tmp_path, capsys):
    # Its curves need every epoch's test accuracy: eval.every=0 failed after all the training.
    assert main(["--quick", f"out={tmp_path}", "eval.every=0"]) == 2
    assert "the digits job plots test accuracy after every epoch: eval.every must be 1, got 0" in (
        capsys.readouterr().err
    )
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "nothing may run"
