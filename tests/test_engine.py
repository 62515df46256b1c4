"""Training engine: config, one epoch, the state rules through the model, exact resume,
checkpoint errors, sequential fine-tuning and STD, with a tiny stand-in network on digits."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptl_fused.engine.trainer as trainer
from ptl_fused import BConvCell, BConvCellV2
from ptl_fused.engine import CheckpointError, ConfigError, load_checkpoint, load_config, run
from ptl_fused.engine.config import config_dir
from ptl_fused.engine.losses import ClassificationLoss, DistillationLoss


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only contend on the shared 2-core machine (100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


Out = namedtuple("Out", "feature logits embeddings")  # the models' ModelOutput contract


class TinyNet(nn.Module):
    """Stand-in for build_model("digits", ...): conv, an optional cell, feature, classifier."""

    def __init__(self, num_classes: int, cell: str | None = "v1", dropout: float = 0.2, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        cells = {"v1": BConvCell, "v2": BConvCellV2}
        self.cell = cells[cell](4, 4, kernel_size=3, padding=1) if cell else None
        self.feature_dim = 8
        self.embed = nn.Sequential(
            nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * 8 * 8, 8)
        )
        self.classifier = nn.Linear(8, num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x):
        h = self.stem(x)
        if self.cell is not None:
            h = h + self.cell(h)
        f = self.embed(h)
        return Out(f, (self.classifier(f),), (f,))


def tiny_build(model_cfg: dict, num_classes: int) -> nn.Module:
    return TinyNet(num_classes, model_cfg["cell"], **model_cfg["kwargs"])


def digits_cfg(tmp_path: Path, *overrides: str) -> dict:
    base = [
        f"out={tmp_path / 'run'}",
        "data.name=digits",
        "data.classes=[0,1,2]",
        "data.shots=12",
        "data.batch_size=8",
        "data.num_workers=0",
        "model.arch=tiny",
        "model.head=classification",
        "optim.epochs=2",
        "optim.step_size=1",
        "optim.lr=0.05",
        "train.progress=false",
        "train.tensorboard=false",
    ]
    return load_config(None, [*base, *overrides])


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("recompute", [False, True])
def test_model_recompute_reaches_every_cell(recompute):
    overrides = ["model.arch=digits", "model.head=classification", "model.cell=v2"]
    cfg = load_config(None, [*overrides, f"model.recompute={str(recompute).lower()}"])
    model = trainer.build_model_from_config(cfg["model"], 5)
    cells = [m for m in model.modules() if isinstance(m, (BConvCell, BConvCellV2))]
    assert cells and all(m.recompute is recompute for m in cells)
    with pytest.raises(ConfigError, match="model.recompute must be bool"):
        load_config(None, ["model.recompute=sometimes"])
    del cfg["model"]["recompute"]  # a checkpoint's config from before the key (an STD teacher's)
    assert trainer.build_model_from_config(cfg["model"], 5) is not None


def test_defaults_are_the_paper_protocol():
    cfg = load_config()
    o = cfg["optim"]
    assert (o["lr"], o["momentum"], o["epochs"], o["step_size"], o["gamma"]) == (0.01, 0.9, 50, 10, 0.1)
    assert (cfg["data"]["height"], cfg["data"]["width"]) == (256, 128)
    assert cfg["std"]["lam"] == 0.8


def test_overrides_are_typed_and_unknown_keys_list_the_valid_ones():
    cfg = load_config(None, ["optim.lr=3e-3", "model.cell=null", "data.classes=[1, 2]", "seed=7"])
    assert cfg["optim"]["lr"] == pytest.approx(0.003) and cfg["model"]["cell"] is None
    assert cfg["data"]["classes"] == [1, 2] and cfg["seed"] == 7
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'.*valid keys here: .*lr.*momentum"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="optim.epochs must be int"):
        load_config(None, ["optim.epochs=ten"])
    with pytest.raises(ConfigError, match="amp must be one of"):
        load_config(None, ["amp=fp8"])
    with pytest.raises(ConfigError, match=r"stages\[0\]: unknown sections \['model'\]"):
        load_config(None, ["stages=[{model: {cell: v2}}]"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.step_size=0", "optim.step_size must be >= 1, got 0"),
        ("optim.epochs=0", "optim.epochs must be >= 1, got 0"),
        ("optim.epochs=-2", "optim.epochs must be >= 1, got -2"),
        ("data.num_instances=0", "data.num_instances must be >= 1, got 0"),
        ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
        ("digits.transfer_epochs=0", "digits.transfer_epochs must be >= 1, got 0"),
        ("stages=[{}, {optim: {step_size: 0}}]", "stages[1]: optim.step_size must be >= 1, got 0"),
        ("data.random_erasing=1.5", "data.random_erasing must be in [0, 1], got 1.5"),
        ("std.lam=-0.1", "std.lam must be in [0, 1], got -0.1"),
        ("train.max_batches=0", "train.max_batches must be None (all) or an int >= 1, got 0"),
        ("train.max_batches=two", "train.max_batches must be None (all) or an int >= 1, got 'two'"),
        ("data.shots=0", "data.shots must be None (all) or an int >= 1, got 0"),
        (
            "data.classes=[]",
            "data.classes must be None (all ten) or a non-empty list of distinct digits 0-9, got []",
        ),
        (
            "data.classes=[42]",
            "data.classes must be None (all ten) or a non-empty list of distinct digits 0-9, got [42]",
        ),
        (
            "data.classes=[1, 1]",
            "data.classes must be None (all ten) or a non-empty list of distinct digits 0-9, got [1, 1]",
        ),
        (
            "data.classes=5",
            "data.classes must be None (all ten) or a non-empty list of distinct digits 0-9, got 5",
        ),
        (
            "digits.pretrain_classes=[0, 11]",
            "digits.pretrain_classes must be a non-empty list of distinct digits 0-9, got [0, 11]",
        ),
        ("digits.seeds=[]", "digits.seeds must not be empty"),
        ("digits.seeds=[-1]", "digits.seeds must be ints in [0, 2**32), got [-1]"),
        ("digits.seeds=[0, 4294967296]", "digits.seeds must be ints in [0, 2**32), got [4294967296]"),
        ("out=null", "out must be str, got None"),
        ("digits.methods=[]", "digits.methods must not be empty"),
        ("seed=-1", "seed must be in [0, 2**32), got -1"),
    ],
)
def test_out_of_range_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config(None, ["loss.triplet=true", override])


def test_paths_are_taken_as_written_and_other_values_as_decimal_yaml(tmp_path, monkeypatch):
    # YAML would read 2024 as a number, cut "x #1" at the comment, refuse a leading "@" and read
    # 010 as octal 8; a path's "~" is the home folder.
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(
        None,
        [
            "out=@runs/r x #1",
            "data.root=2024",
            "model.pretrained=~/w.pth",
            "std.teacher=null",
            "optim.epochs=010",
        ],
    )
    assert cfg["out"] == "@runs/r x #1" and cfg["data"]["root"] == "2024"
    assert cfg["model"]["pretrained"] == str(tmp_path / "w.pth") and cfg["std"]["teacher"] is None
    assert cfg["optim"]["epochs"] == 10
    cfg = load_config(None, ["name=08", "data.root= '/my data' ", 'model.pretrained="/w #1.pth"'])
    assert cfg["name"] == "08" and cfg["data"]["root"] == "/my data"  # a string key keeps its digits
    assert cfg["model"]["pretrained"] == "/w #1.pth"
    cfg = load_config(None, ["stages=[{}, {}]", "stages.1.data.root=~/b", "stages.0.data.root=007"])
    assert cfg["stages"][0]["data"]["root"] == "007"
    assert trainer.stage_config(cfg, 1)["data"]["root"] == str(tmp_path / "b")
    with pytest.raises(ConfigError, match=r"command line: optim.lr=@x: not a valid YAML value .*'@'"):
        load_config(None, ["optim.lr=@x"])
    f = tmp_path / "c.yaml"
    f.write_text("data: {root: 2024}\n")
    with pytest.raises(ConfigError, match=r"data.root must be a path, got 2024 \(quote it in a YAML file\)"):
        load_config(f)
    f.write_text("quick: null\n")
    with pytest.raises(ConfigError, match=r"quick must be a mapping of key.sub: value overrides, got None"):
        load_config(f, quick=True)


def test_a_stage_float_written_1e_x_is_a_float():
    from ptl_fused.engine.config import stage_config

    cfg = load_config(None, ["stages=[{optim: {weight_decay: 1e-4, lr: 2e-3}}]"])  # YAML: strings
    assert stage_config(cfg, 0)["optim"] == {**cfg["optim"], "weight_decay": 1e-4, "lr": 2e-3}
    assert isinstance(stage_config(cfg, 0)["optim"]["lr"], float)


SEQUENTIAL = "sequential_duke_market_msmt17_resnet50_ptl"  # its stages set their own data.root


def test_a_stage_key_is_set_from_the_command_line():
    from ptl_fused.engine.config import stage_config

    cfg = load_config(SEQUENTIAL, ["stages.1.data.root=/data/market", "stages.2.optim.lr=0.5"])
    assert stage_config(cfg, 1)["data"]["root"] == "/data/market"
    assert stage_config(cfg, 0)["data"]["root"] == "data/DukeMTMC-reID"  # the others are kept
    assert stage_config(cfg, 2)["optim"]["lr"] == 0.5 and stage_config(cfg, 1)["optim"]["lr"] == 0.01
    # A section override whose keys no stage sets reaches every stage.
    assert stage_config(load_config(SEQUENTIAL, ["data={batch_size: 16}"]), 2)["data"]["batch_size"] == 16
    # stages= written on the command line too: the top level is the default of what they leave.
    cfg = load_config(SEQUENTIAL, ["data.root=/top", "stages=[{data: {root: /a}}, {optim: {lr: 0.1}}]"])
    assert [stage_config(cfg, i)["data"]["root"] for i in (0, 1)] == ["/a", "/top"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # The stages' own roots won over it, silently (the error then named the bundled root).
        ("data.root=/mine", r"data.root changes nothing: stage\(s\) \[0, 1, 2\].*stages.0.data.root="),
        ("data={root: /mine, batch_size: 16}", r"data.root changes nothing"),  # a section's leaves
        ("stages.3.data.root=/x", "this config has 3 stage"),
        ("stages.0.model.arch=resnet18", "a stage may set data, optim"),
        ("stages.first.data.root=/x", "stages.N.section.key"),
        ("stages.0.data.rot=/x", r"^stages\[0\]: unknown key 'data.rot'"),
    ],
)
def test_stage_overrides_that_cannot_take_effect_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SEQUENTIAL, [override])


def test_an_override_some_stages_shadow_warns(tmp_path):
    from ptl_fused.engine.config import stage_config

    path = tmp_path / "two.yaml"
    path.write_text("stages:\n  - {data: {classes: [0, 1]}}\n  - {optim: {epochs: 1}}\n")
    with pytest.warns(UserWarning, match=r"data.classes applies to the other stages only: stage\(s\) \[0\]"):
        cfg = load_config(path, ["data.classes=[3, 4]"])
    assert [stage_config(cfg, i)["data"]["classes"] for i in (0, 1)] == [[0, 1], [3, 4]]


def test_every_bundled_config_loads():
    names = sorted(p.stem for p in config_dir().glob("*.yaml"))
    assert "digits" in names
    for name in names:
        load_config(name)


def test_a_config_path_that_does_not_exist_is_an_error_not_the_bundled_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no digits.yaml here; the bundled one has that name
    for name in (str(tmp_path / "digits.yaml"), "digits.yaml", "digits.yml", "configs/digits"):
        with pytest.raises(ConfigError, match=rf"^config file not found: {re.escape(name)}$"):
            load_config(name)
    (tmp_path / "mine.yml").write_text("seed: 3\n")
    assert load_config("mine.yml")["seed"] == 3 and load_config("digits")["job"] == "digits_transfer"


def test_missing_dataset_root_names_the_path_and_layout(tmp_path):
    cfg = load_config(None, ["data.name=cifar10", f"data.root={tmp_path / 'nowhere'}", f"out={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist.*cifar-10-batches-py"):
        run(cfg, build=tiny_build)
    cfg = load_config(None, ["data.name=cifar100", f"data.root={tmp_path}", f"out={tmp_path / 'o'}"])
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python"):
        run(cfg, build=tiny_build)
    (tmp_path / "a_file").write_text("")
    cfg = load_config(None, ["data.name=cifar10", f"data.root={tmp_path / 'a_file'}", f"out={tmp_path}"])
    with pytest.raises(NotADirectoryError, match=r"a_file is not a directory; it must be a folder holding"):
        run(cfg, build=tiny_build)


# --- one epoch, state rules ------------------------------------------------------------------


def test_resume_auto_without_a_checkpoint_says_it_starts_anew(tmp_path, capsys):
    run(digits_cfg(tmp_path, "optim.epochs=1"), resume="auto", build=tiny_build)
    assert f"--resume auto: no checkpoint under {tmp_path}" in capsys.readouterr().out


def test_one_classification_epoch_writes_logs_checkpoint_and_plot(tmp_path):
    cfg = digits_cfg(tmp_path, "optim.epochs=1", "train.tensorboard=true", "deterministic=true")
    try:
        res = run(cfg, build=tiny_build, verbose=False)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    folder = Path(res["out"])
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    header = (folder / "log.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["epoch", "lr", "train_loss", "train_accuracy"] and "test_accuracy" in header
    (stage,) = res["stages"]
    assert stage["num_classes"] == 3 and len(stage["history"]) == 1
    row = stage["history"][0]
    assert 0.0 <= row["test_accuracy"] <= 100.0 and row["test_error"] == pytest.approx(
        100 - row["test_accuracy"]
    )
    assert row["train_loss"] > 0
    for name in ("log.csv", "curves.png", "last.pt", "weights.pt", "results.json", "config.yaml"):
        assert (folder / name).is_file(), name
    assert load_checkpoint(folder / "last.pt")["epoch"] == 1


class RecordingCell(BConvCell):
    """Records, before every forward, whether the model is training and the carried state."""

    log: list

    def forward(self, x):
        self.log.append((self.training, None if self.state is None else self.state.clone(), x.shape[0]))
        return super().forward(x)


def test_state_reset_at_epoch_start_and_no_carry_in_eval(tmp_path):
    models = []

    def build(model_cfg, n):
        m = TinyNet(n, None, dropout=0.0)
        m.cell = RecordingCell(4, 4, kernel_size=3, padding=1)
        m.cell.log = []
        models.append(m)
        return m

    cfg = digits_cfg(tmp_path, "optim.epochs=2", "eval.every=1")
    run(cfg, build=build, verbose=False)
    log = models[0].cell.log
    batches_per_epoch = -(-36 // 8)  # 3 classes x 12 shots, batch 8 (last batch of 4 kept)
    n_test = run_test_size(cfg)
    n_eval = -(-n_test // 8)
    assert len(log) == 2 * (batches_per_epoch + n_eval)
    for epoch in range(2):
        chunk = log[epoch * (batches_per_epoch + n_eval) :][: batches_per_epoch + n_eval]
        train, evals = chunk[:batches_per_epoch], chunk[batches_per_epoch:]
        assert all(t for t, _, _ in train) and not any(t for t, _, _ in evals)
        assert train[0][1] is None, "every training epoch starts from the reset (initial) state"
        assert all(s is not None and s.abs().sum() > 0 for _, s, _ in train[1:]), "training carries"
    # No carry in eval, checked on the model's outputs: the test predictions do not depend on
    # the batch they are in or on what the training left in the cells.
    model = models[0].eval()
    x = torch.rand(6, 1, 8, 8)
    together = model(x).logits[0]
    alone = torch.cat([model(x[i : i + 1]).logits[0] for i in reversed(range(6))]).flip(0)
    torch.testing.assert_close(together, alone)


def run_test_size(cfg):
    from ptl_fused.engine.data import digits_split

    return len(digits_split(cfg["data"]["classes"], cfg["data"]["shots"], cfg["seed"])[3])


# --- resume -----------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def interrupt_at(monkeypatch, stop_epoch: int) -> None:
    """Make train_epoch raise when 0-based epoch `stop_epoch` starts (a killed run)."""
    real = trainer.train_epoch

    def fake(*args):
        if args[-2] == stop_epoch:
            raise Interrupt
        return real(*args)

    monkeypatch.setattr(trainer, "train_epoch", fake)


@pytest.mark.parametrize("cell", ["v1", "v2"])
def test_resume_after_epoch_k_is_bit_identical(tmp_path, monkeypatch, cell):
    overrides = ("optim.epochs=3", f"model.cell={cell}", "eval.every=2")
    full = run(digits_cfg(tmp_path / "a", *overrides), build=tiny_build, verbose=False)
    cfg_b = digits_cfg(tmp_path / "b", *overrides)
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(Interrupt):
            run(cfg_b, build=tiny_build, verbose=False)
    assert load_checkpoint(Path(cfg_b["out"]) / "last.pt")["epoch"] == 2
    resumed = run(cfg_b, resume="auto", build=tiny_build, verbose=False)
    wa = torch.load(Path(full["out"]) / "weights.pt")
    wb = torch.load(Path(resumed["out"]) / "weights.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert full["stages"][0]["history"][2]["train_loss"] == resumed["stages"][0]["history"][2]["train_loss"]
    # Without the saved state a fresh run would differ: the check can fail.
    other = run(digits_cfg(tmp_path / "c", *overrides, "seed=1"), build=tiny_build, verbose=False)
    wc = torch.load(Path(other["out"]) / "weights.pt")
    assert not torch.equal(wa["classifier.weight"], wc["classifier.weight"])


def test_fp16_resume_of_a_checkpoint_without_loss_scaling_starts_a_new_scaler(tmp_path, monkeypatch):
    # amp=fp16 run on the CPU (no scaling: the scaler saves {}), resumed where the scaler is on
    # (a GPU; forced on here): loading {} used to fail with a traceback.
    import ptl_fused.engine.trainer as trainer

    cfg = digits_cfg(tmp_path, "amp=fp16", "optim.epochs=1")
    run(cfg, build=tiny_build, verbose=False)
    assert load_checkpoint(Path(cfg["out"]) / "last.pt")["scaler"] == {}
    real = torch.amp.GradScaler
    monkeypatch.setattr(trainer.torch.amp, "GradScaler", lambda device, enabled: real(device, enabled=True))
    with pytest.warns(UserWarning, match="written without fp16 loss scaling .* starts a new GradScaler"):
        res = run(
            digits_cfg(tmp_path, "amp=fp16", "optim.epochs=2"), resume="auto", build=tiny_build, verbose=False
        )
    assert [h["epoch"] for h in res["stages"][0]["history"]] == [1, 2]


def test_resume_by_another_number_of_processes_warns(tmp_path):
    cfg = digits_cfg(tmp_path, "optim.epochs=1")
    run(cfg, build=tiny_build, verbose=False)
    path = Path(cfg["out"]) / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["rng"] = [ckpt["rng"][0]] * 2  # as two DDP ranks write it
    torch.save(ckpt, path)
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\), resumed by 1: .* not bit-identically"):
        run(digits_cfg(tmp_path, "optim.epochs=2"), resume="auto", build=tiny_build, verbose=False)


@pytest.mark.parametrize(("init_scale", "skips"), [(1.0, False), (3e38, True)])
def test_skipped_fp16_steps_are_counted_in_the_log(tmp_path, monkeypatch, init_scale, skips):
    # A scale that overflows the gradients skips steps (GradScaler's rule); the row says how many.
    import ptl_fused.engine.trainer as trainer

    real = torch.amp.GradScaler
    with monkeypatch.context() as m:
        m.setattr(
            trainer.torch.amp, "GradScaler", lambda device, enabled: real(device, init_scale=init_scale)
        )
        res = run(digits_cfg(tmp_path, "amp=fp16", "optim.epochs=1"), build=tiny_build, verbose=False)
    (row,) = res["stages"][0]["history"]
    assert isinstance(row["amp_skipped_steps"], int) and (row["amp_skipped_steps"] > 0) == skips
    plain = run(digits_cfg(tmp_path / "plain"), build=tiny_build, verbose=False)  # no scaler: no column
    assert "amp_skipped_steps" not in plain["stages"][0]["history"][0]


def test_resume_inside_a_sequential_run(tmp_path, monkeypatch):
    stages = "stages=[{data: {classes: [0,1,2]}}, {data: {classes: [3,4], shots: 6}, optim: {epochs: 2}}]"
    full = run(digits_cfg(tmp_path / "a", stages), build=tiny_build, verbose=False)
    cfg_b = digits_cfg(tmp_path / "b", stages)
    with monkeypatch.context() as m:
        real, calls = trainer.train_epoch, []

        def fake(*args):  # the fourth epoch overall: stage 2, epoch 2
            calls.append(1)
            if len(calls) == 4:
                raise Interrupt
            return real(*args)

        m.setattr(trainer, "train_epoch", fake)
        with pytest.raises(Interrupt):
            run(cfg_b, build=tiny_build, verbose=False)
    resumed = run(cfg_b, resume="auto", build=tiny_build, verbose=False)
    assert [s["dataset"] for s in resumed["stages"]] == ["digits", "digits"]
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert drop(resumed["stages"][0]["history"]) == drop(full["stages"][0]["history"])
    wa = torch.load(Path(full["stages"][1]["folder"]) / "weights.pt")
    wb = torch.load(Path(resumed["stages"][1]["folder"]) / "weights.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def counting_evaluations(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Wrap every task's evaluate: record the calls, raise OSError at call number `fail_at`."""
    real, calls = trainer.build_task, []

    def build_task(*args):
        task = real(*args)
        evaluate = task.evaluate

        def wrapped(*a):
            calls.append(1)
            if len(calls) == fail_at:
                raise OSError("cannot read image gallery/0001_c1.jpg")
            return evaluate(*a)

        task.evaluate = wrapped
        return task

    monkeypatch.setattr(trainer, "build_task", build_task)
    return calls


def test_failing_evaluation_loses_no_training_and_resume_evaluates_that_epoch(tmp_path, monkeypatch):
    overrides = ("optim.epochs=3", "eval.every=1")
    full = run(digits_cfg(tmp_path / "a", *overrides), build=tiny_build, verbose=False)
    cfg = digits_cfg(tmp_path / "b", *overrides)
    with monkeypatch.context() as m:
        counting_evaluations(m, fail_at=2)  # the evaluation after epoch 2
        with pytest.raises(OSError, match="cannot read image"):
            run(cfg, build=tiny_build, verbose=False)
    ckpt = load_checkpoint(Path(cfg["out"]) / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["pending_eval"], "epoch 2's training is saved"
    assert "test_accuracy" in ckpt["history"][0] and "test_accuracy" not in ckpt["history"][1]
    trained_epochs = []
    with monkeypatch.context() as m:
        evals = counting_evaluations(m)
        real = trainer.train_epoch
        m.setattr(trainer, "train_epoch", lambda *a: trained_epochs.append(a[-2]) or real(*a))
        resumed = run(cfg, resume="auto", build=tiny_build, verbose=False)
    assert trained_epochs == [2] and len(evals) == 2, "epoch 2 is evaluated, not retrained; then epoch 3"
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert drop(resumed["stages"][0]["history"]) == drop(full["stages"][0]["history"])
    wa, wb = (torch.load(Path(r["out"]) / "weights.pt") for r in (full, resumed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    header = (Path(cfg["out"]) / "log.csv").read_text().splitlines()[0].split(",")
    assert header == list(full["stages"][0]["history"][0]), "log.csv columns in the usual order"
    # A finished run resumed evaluates nothing again (its last checkpoint is complete), and
    # says that nothing was trained (it was silent).
    with (
        monkeypatch.context() as m,
        pytest.warns(UserWarning, match=r"the run is finished \(3 epochs\).*larger optim.epochs"),
    ):
        evals = counting_evaluations(m)
        again = run(cfg, resume="auto", build=tiny_build, verbose=False)
    assert evals == [] and again["stages"][0]["history"] == resumed["stages"][0]["history"]


# --- checkpoint errors -----------------------------------------------------------------------


@pytest.fixture
def trained(tmp_path):
    cfg = digits_cfg(tmp_path, "optim.epochs=1")
    run(cfg, build=tiny_build, verbose=False)
    return cfg, Path(cfg["out"]) / "last.pt"


def test_a_refused_run_leaves_the_folders_config_and_a_new_run_warns(trained, tmp_path):
    # config.yaml describes what the folder holds: a resume refused once the model is built (here
    # a checkpoint for another number of classes) must not have rewritten it first.
    cfg, path = trained
    config_yaml = Path(cfg["out"]) / "config.yaml"
    before = config_yaml.read_text()
    ckpt = load_checkpoint(path)
    ckpt["meta"]["num_classes"] = 4
    torch.save(ckpt, path)
    changed = digits_cfg(tmp_path, "optim.epochs=2", "eval.every=0")  # may change on resume
    with pytest.raises(CheckpointError, match="num_classes: checkpoint has 4, this run has 3"):
        run(changed, resume="auto", build=tiny_build, verbose=False)
    assert config_yaml.read_text() == before
    with pytest.warns(
        trainer.ReplacesRunWarning, match=r"last.pt: a checkpoint of an earlier run .* --resume auto"
    ):
        run(changed, build=tiny_build, verbose=False)
    assert "every: 0" in config_yaml.read_text()


def test_a_training_set_that_makes_no_batch_is_an_error(tmp_path):
    cfg = digits_cfg(tmp_path, "data.classes=[0]", "data.shots=1", "optim.epochs=1")
    with pytest.raises(ValueError, match=r"training set \(1 images\) gives no batch of 8 images per process"):
        run(cfg, build=tiny_build, verbose=False)
    assert not (Path(cfg["out"]) / "config.yaml").exists()


def test_an_unusable_backend_kwargs_or_out_is_a_config_error_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"out=.*file is a file, not a folder"):
        run(digits_cfg(tmp_path, f"out={tmp_path / 'file'}"), build=tiny_build, verbose=False)
    cfg = digits_cfg(tmp_path, "model.backend=cuda", "optim.epochs=1")
    with pytest.raises(
        ConfigError,
        match=r"model.backend=cuda cannot run the cells on the training device \(cpu\): .*backend 'cuda'",
    ):
        run(cfg, build=tiny_build, verbose=False)
    run(
        digits_cfg(tmp_path, "model.backend=cuda", "model.cell=null", "optim.epochs=1"),
        build=tiny_build,
        verbose=False,
    )
    with pytest.raises(ConfigError, match=r"model.kwargs=\{'foo': 1\}: .*unexpected keyword argument 'foo'"):
        run(digits_cfg(tmp_path, "model.arch=digits", "model.kwargs={foo: 1}"), verbose=False)


def test_resume_from_a_folder_says_which_file_to_give(trained):
    cfg, path = trained
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(path.parent))} is a folder, not a checkpoint file.*last.pt"
    ):
        run(cfg, resume=str(path.parent), build=tiny_build, verbose=False)


def test_resume_refuses_changed_training_settings_and_may_extend_epochs(trained, tmp_path):
    cfg, path = trained  # 1 epoch, lr 0.05, step_size 1
    config_yaml = Path(cfg["out"]) / "config.yaml"
    before = config_yaml.read_text()
    changed = digits_cfg(
        tmp_path, "optim.epochs=3", "optim.lr=0.1", "optim.step_size=3", "optim.momentum=0.5"
    )
    with pytest.raises(CheckpointError) as e:
        run(changed, resume="auto", build=tiny_build, verbose=False)
    msg = str(e.value)
    assert msg.startswith(f"cannot resume from {path}: ") and "\n" not in msg
    for diff in ("optim.lr: checkpoint 0.05, requested 0.1", "optim.momentum: checkpoint 0.9, requested 0.5"):
        assert diff in msg
    assert "optim.step_size: checkpoint 1, requested 3" in msg and "optim.epochs:" not in msg
    assert "resume with its settings" in msg and "another out=" in msg
    assert config_yaml.read_text() == before, "config.yaml still describes the saved run"
    # optim.epochs may grow: the run goes on exactly as one planned with 3 epochs from the start.
    # So may the paths of files whose content the checkpoint holds (the digits job's teacher
    # lies under out, which may move).
    # model.recompute too: memory for compute, the same values.
    moved = ("optim.epochs=3", "model.pretrained=/moved/weights.pth", "std.teacher=/moved/last.pt")
    moved += ("model.recompute=true",)
    with pytest.raises(CheckpointError, match="checkpoint /moved/last.pt does not exist") as e:
        run(digits_cfg(tmp_path, *moved), resume="auto", build=tiny_build, verbose=False)
    assert "cannot resume" not in str(e.value), "a moved path is not a changed setting"
    extended = run(digits_cfg(tmp_path, "optim.epochs=3"), resume="auto", build=tiny_build, verbose=False)
    fresh = run(digits_cfg(tmp_path / "fresh", "optim.epochs=3"), build=tiny_build, verbose=False)
    wa, wb = (torch.load(Path(r["out"]) / "weights.pt") for r in (extended, fresh))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "epochs: 3" in config_yaml.read_text()
    with pytest.raises(CheckpointError, match="optim.epochs: the checkpoint has 3 epochs done, requested 2"):
        run(digits_cfg(tmp_path, "optim.epochs=2"), resume="auto", build=tiny_build, verbose=False)


def test_resume_may_end_the_run_early(tmp_path, monkeypatch):
    # Planned for 4 epochs, killed after 2, resumed for 3: the same as a 3-epoch run (StepLR's
    # schedule does not depend on the total).
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(Interrupt):
            run(digits_cfg(tmp_path / "a", "optim.epochs=4"), build=tiny_build, verbose=False)
    ended = run(digits_cfg(tmp_path / "a", "optim.epochs=3"), resume="auto", build=tiny_build, verbose=False)
    fresh = run(digits_cfg(tmp_path / "b", "optim.epochs=3"), build=tiny_build, verbose=False)
    assert load_checkpoint(Path(ended["out"]) / "last.pt")["epoch"] == 3
    wa, wb = (torch.load(Path(r["out"]) / "weights.pt") for r in (ended, fresh))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_changes_to_a_finished_stage(tmp_path):
    stages = "stages=[{data: {classes: [0,1,2]}}, {data: {classes: [3,4]}}]"
    cfg = digits_cfg(tmp_path, "optim.epochs=1", stages)
    run(cfg, build=tiny_build, verbose=False)  # the last checkpoint is stage 2's
    later = "stages=[{data: {classes: [0,1,2]}, optim: {lr: 0.2, epochs: 2}}, {data: {classes: [3,4]}}]"
    with pytest.raises(CheckpointError) as e:
        run(digits_cfg(tmp_path, "optim.epochs=1", later), resume="auto", build=tiny_build, verbose=False)
    assert "stage 1 optim.lr: checkpoint 0.05, requested 0.2" in str(e.value)
    assert "stage 1 optim.epochs: checkpoint 1, requested 2" in str(e.value)
    assert "stage 2" not in str(e.value)


def test_truncated_and_corrupt_checkpoints_name_the_file(trained, tmp_path):
    cfg, path = trained
    data = path.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt cannot be read \(truncated or corrupt"):
        run(cfg, resume=str(bad), build=tiny_build)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="junk.pt cannot be read .*not a torch file of tensors") as e:
        load_checkpoint(junk)
    assert "weights_only" not in str(e.value), "torch's advice to load untrusted code does not apply"
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pt cannot be read .*EOFError: the file ends early$"):
        load_checkpoint(tmp_path / "empty.pt")
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="plain.pt is not a ptl_fused engine checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="/dev/null is not a regular file"):
        load_checkpoint("/dev/null")
    hand_made = tmp_path / "hand_made.pt"
    torch.save({"format": load_checkpoint(path)["format"], "model": {}}, hand_made)
    with pytest.raises(CheckpointError, match=r"hand_made.pt lacks \['meta', 'stage', 'epoch', 'optimizer'"):
        load_checkpoint(hand_made)


def test_mismatched_checkpoint_names_the_file_and_mismatch(trained, tmp_path):
    cfg, path = trained
    other_classes = digits_cfg(tmp_path / "x", "data.classes=[0,1,2,3]", "optim.epochs=1")
    with pytest.raises(
        CheckpointError,
        match=r"cannot resume from .*last.pt: .*data.classes: checkpoint \[0, 1, 2\], requested \[0, 1, 2, 3",
    ):
        run(other_classes, resume=str(path), build=tiny_build)
    other_model = digits_cfg(tmp_path / "y", "model.cell=v2", "optim.epochs=1")
    with pytest.raises(CheckpointError, match=r"model.cell: checkpoint 'v1', requested 'v2'"):
        run(other_model, resume=str(path), build=tiny_build)
    other_arch = digits_cfg(tmp_path / "z", "model.arch=resnet50", "optim.epochs=1")
    with pytest.raises(CheckpointError, match=r"model.arch: checkpoint 'tiny', requested 'resnet50'"):
        run(other_arch, resume=str(path), build=tiny_build)
    # Same settings, but the data now has another number of classes (a moved data.root, say).
    ckpt = load_checkpoint(path)
    ckpt["meta"]["num_classes"] = 4
    torch.save(ckpt, tmp_path / "four.pt")
    with pytest.raises(
        CheckpointError,
        match=r"four.pt was saved for another model; num_classes: checkpoint has 4, this run has 3",
    ):
        run(cfg, resume=str(tmp_path / "four.pt"), build=tiny_build)


def test_interrupted_write_keeps_the_last_good_checkpoint(trained, monkeypatch):
    from ptl_fused.engine import checkpoint

    _, path = trained
    before = path.read_bytes()

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"x": 1}, path)
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".last.pt.tmp-*")), "the temporary file is cleaned up"


def test_a_killed_writers_temporary_file_is_removed_by_the_next_save(tmp_path):
    from ptl_fused.engine import checkpoint

    dead = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    for d in dead:
        d.wait()  # their pids name no live process now
    old = time.time() - 2 * checkpoint.STALE_TEMP_S
    killed, fresh, live = (
        tmp_path / f".last.pt.tmp-{pid}" for pid in (dead[0].pid, dead[1].pid, os.getppid())
    )
    other = tmp_path / f".other.pt.tmp-{dead[0].pid}"  # another file's
    for t in (killed, fresh, live, other):
        t.write_bytes(b"half a checkpoint")
        if t is not fresh:
            os.utime(t, (old, old))
    checkpoint.atomic_save({"x": 1}, tmp_path / "last.pt")
    assert torch.load(tmp_path / "last.pt") == {"x": 1}
    assert not killed.exists(), "a dead writer's old temporary file is removed"
    assert fresh.exists(), "one written a moment ago may be another machine's writer's"
    assert live.exists() and other.exists()


# --- sequential and STD ----------------------------------------------------------------------


def test_sequential_new_classifier_per_dataset_backbone_kept(tmp_path, monkeypatch):
    built, resets = [], []

    def build(model_cfg, n):
        m = TinyNet(n, model_cfg["cell"])
        real = m.reset_classifier

        def reset(k):
            resets.append((k, m.stem[0].weight.detach().clone()))
            real(k)

        m.reset_classifier = reset
        built.append(m)
        return m

    stages = "stages=[{data: {classes: [0,1,2]}}, {data: {classes: [3,4,5,6], shots: 5}, optim: {epochs: 1}}]"
    res = run(digits_cfg(tmp_path, stages), build=build, verbose=False)
    assert len(built) == 1, "one network for the whole sequence"
    assert [s["num_classes"] for s in res["stages"]] == [3, 4]
    w1 = torch.load(Path(res["stages"][0]["folder"]) / "weights.pt")
    (k, stem_at_reset) = resets[0]
    assert k == 4 and torch.equal(stem_at_reset, w1["stem.0.weight"]), (
        "stage 2 starts from stage 1's backbone"
    )
    w2 = torch.load(Path(res["stages"][1]["folder"]) / "weights.pt")
    assert w2["classifier.weight"].shape == (4, 8) and w1["classifier.weight"].shape == (3, 8)
    assert "stage2-digits" in res["stages"][1]["folder"]


def test_distillation_loss_matches_hand_computation():
    torch.manual_seed(0)
    teacher = TinyNet(3, "v1", dropout=0.0)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 2, 1, 1])
    student_out = Out(torch.randn(4, 8), (torch.randn(4, 3),), ())
    loss = DistillationLoss(ClassificationLoss(), teacher, lam=0.8)(student_out, y, x)
    t_feat = teacher.eval()(x).feature
    expected = (
        0.2 * F.cross_entropy(student_out.logits[0], y) + 0.8 * (student_out.feature - t_feat).abs().mean()
    )
    torch.testing.assert_close(loss, expected)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_distillation_loss_names_a_teacher_that_cannot_take_the_images():
    loss = DistillationLoss(ClassificationLoss(), TinyNet(3, "v1", in_channels=1), name="the teacher t.pt")
    y = torch.tensor([0, 2, 1, 1])
    out = Out(torch.randn(4, 8), (torch.randn(4, 3),), ())
    with pytest.raises(ValueError, match=r"STD: the teacher t.pt cannot take .* shape \(4, 3, 8, 8\)") as e:
        loss(out, y, torch.rand(4, 3, 8, 8))
    assert isinstance(e.value.__cause__, RuntimeError)  # the layer's own message is kept
    with pytest.raises(
        ValueError, match=r"student's feature has shape \(4, 6\), the teacher t.pt's \(4, 8\)"
    ):
        loss(Out(torch.randn(4, 6), (torch.randn(4, 3),), ()), y, torch.rand(4, 1, 8, 8))


def test_std_student_has_no_ptl_modules(tmp_path):
    teacher_cfg = digits_cfg(tmp_path / "teacher", "optim.epochs=1", "model.cell=v1")
    run(teacher_cfg, build=tiny_build, verbose=False)
    teacher_ckpt = Path(teacher_cfg["out"]) / "last.pt"
    students = []

    def build(model_cfg, n):
        m = tiny_build(model_cfg, n)
        students.append(m)
        return m

    cfg = digits_cfg(tmp_path / "student", "optim.epochs=1", "model.cell=null", f"std.teacher={teacher_ckpt}")
    res = run(cfg, build=build, verbose=False)
    assert res["stages"][0]["final"]["test_accuracy"] >= 0
    student, teacher = students  # the student is built first, then the teacher is loaded
    assert any(isinstance(m, BConvCell) for m in teacher.modules()) and not teacher.training
    assert not any(isinstance(m, (BConvCell, BConvCellV2)) for m in student.modules())
    saved = torch.load(Path(cfg["out"]) / "weights.pt")
    assert saved.keys() == TinyNet(3, None).state_dict().keys(), "the saved student is the plain network"
    assert not any(k.startswith("cell.") for k in saved)
    ckpt = load_checkpoint(Path(cfg["out"]) / "last.pt")
    assert not any(k.startswith("cell.") for k in ckpt["model"]), "no teacher/cell weights in the checkpoint"


def build_reading_pretrained(model_cfg: dict, n: int) -> nn.Module:
    """tiny_build that, like build_model, reads model.pretrained when one is named."""
    if model_cfg["pretrained"] is not None:
        torch.load(model_cfg["pretrained"])  # FileNotFoundError once the file is gone
    return tiny_build(model_cfg, n)


def test_teacher_and_resumed_run_do_not_need_the_pretrained_file_any_more(tmp_path, monkeypatch):
    weights = tmp_path / "backbone.pth"
    torch.save({}, weights)
    cfg = digits_cfg(tmp_path / "teacher", "optim.epochs=2", f"model.pretrained={weights}")
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(Interrupt):
            run(cfg, build=build_reading_pretrained, verbose=False)
    weights.unlink()  # moved away, or the run copied to another machine
    ckpt = Path(cfg["out"]) / "last.pt"
    teacher = trainer.load_teacher(ckpt, build_reading_pretrained, torch.device("cpu"))
    saved = load_checkpoint(ckpt)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())
    res = run(cfg, resume="auto", build=build_reading_pretrained, verbose=False)
    assert [r["epoch"] for r in res["stages"][0]["history"]] == [1, 2]


# --- command line ----------------------------------------------------------------------------


def test_cli_reports_config_errors_and_trains_a_config_file(tmp_path, capsys, monkeypatch):
    from ptl_fused.engine.cli import main

    assert main(["digits", "optim.lrr=1"]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err
    assert main(["no_such_config"]) == 2
    assert "bundled configs: " in capsys.readouterr().err
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text(
        "data: {name: digits, classes: [0, 1], shots: 8, batch_size: 8, num_workers: 0}\n"
        "model: {arch: tiny, head: classification}\noptim: {epochs: 1}\ntrain: {progress: false}\n"
    )
    monkeypatch.setattr(trainer, "build_model_from_config", tiny_build)
    assert main([str(yaml_file), "--out", str(tmp_path / "o"), "train.tensorboard=false"]) == 0
    assert "[digits] epoch=1" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "o" / "last.pt")["meta"]["num_classes"] == 2


def test_cli_user_errors_are_one_line_with_status_2_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    from ptl_fused.engine import cli

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    base = [
        "job=train",
        "data.name=digits",
        "model.arch=tiny",
        "model.head=classification",
        "train.progress=false",
    ]
    monkeypatch.setattr(trainer, "build_model_from_config", tiny_build)
    cases = [
        ([*base, f"out={tmp_path}", "--resume", str(junk)], "checkpoint .*junk.pt cannot be read"),
        (
            ["cifar10_densenet100_ptl", f"data.root={tmp_path / 'nowhere'}", f"out={tmp_path / 'c'}"],
            "data.root=.*nowhere does not exist",
        ),
        (
            ["market1501_resnet50_ptl", f"data.root={junk}", f"out={tmp_path / 'm'}"],
            "data.root=.*junk.pt is not a directory",
        ),
        (["--resume", str(junk)], "the digits job runs many trainings"),  # a ValueError
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.fullmatch(f"ptl-train: error: {message}.* \\(--traceback shows where\\)\n", err), err
        assert "weights_only" not in err
    with pytest.raises(ValueError, match="the digits job runs many trainings"):  # --traceback: raised
        cli.main(["--resume", str(junk), "--traceback"])
    monkeypatch.setattr(cli, "run", lambda cfg, resume=None: [][0])  # a bug: IndexError
    with pytest.raises(IndexError):
        cli.main(["market1501_resnet50_ptl"])
    err = OSError(
        "Caught OSError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1\nOSError: cannot read image q.jpg (item 3)'
    )
    assert cli.one_line(err) == "OSError: cannot read image q.jpg (item 3)"


def test_cli_config_paths_with_an_equals_sign_and_path_flags(monkeypatch, tmp_path):
    from ptl_fused.engine import cli

    seen = {}
    monkeypatch.setattr(cli, "run", lambda cfg, resume=None: seen.update(cfg=cfg, resume=resume))
    sweep = tmp_path / "lr=0.1"
    sweep.mkdir()
    (sweep / "cfg.yaml").write_text("optim: {lr: 0.1}\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    out = str(tmp_path / "r x #1")
    assert cli.main([str(sweep / "cfg.yaml"), "--out", out, "--resume", "~/last.pt"]) == 0
    assert seen["cfg"]["optim"]["lr"] == 0.1 and seen["cfg"]["out"] == out
    assert seen["resume"] == str(tmp_path / "last.pt")
    monkeypatch.chdir(tmp_path)  # relative: lr=0.1/cfg.yaml's key "lr" holds no "/"
    assert cli.main(["lr=0.1/cfg.yaml", "out=runs/a.yml"]) == 0
    assert seen["cfg"]["optim"]["lr"] == 0.1 and seen["cfg"]["out"] == "runs/a.yml"
    assert not cli._is_config("out=runs/a.yml")  # an override, though its value ends in .yml


def test_cli_digits_job_refuses_another_dataset(capsys):
    from ptl_fused.engine import cli

    assert cli.main(["data.name=folder", "data.root=/x"]) == 2
    assert "the digits job (job: digits_transfer, the default without a config)" in capsys.readouterr().err
    assert cli.main(["digits.shots=1000"]) == 2
    assert re.search(r"digits.shots: 1000 but class 5 has only \d+ training images", capsys.readouterr().err)


def test_digits_job_over_an_earlier_one_warns_once(monkeypatch, tmp_path):
    from ptl_fused.engine import digits_job

    for run_dir in ("seed0/pretrain", "seed0/ptl"):
        (tmp_path / run_dir).mkdir(parents=True)
        (tmp_path / run_dir / "last.pt").write_bytes(b"")

    def stop(*args):
        raise KeyboardInterrupt  # the job's trainings: not needed here

    monkeypatch.setattr(digits_job, "_run_all", stop)
    cfg = load_config("digits", [f"out={tmp_path}"])
    with pytest.warns(trainer.ReplacesRunWarning, match=r"earlier digits job \(2 runs\)") as seen:
        with pytest.raises(KeyboardInterrupt):
            digits_job.run_digits_job(cfg)
    assert len(seen) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", trainer.ReplacesRunWarning)
        with pytest.raises(KeyboardInterrupt):
            digits_job.run_digits_job(cfg, resume="auto")


def test_cli_pretrained_flag_sets_the_model_weights_path(monkeypatch, tmp_path):
    from ptl_fused.engine import cli

    seen = {}
    monkeypatch.setattr(cli, "run", lambda cfg, resume=None: seen.update(cfg=cfg))
    weights = tmp_path / "resnet50.pth"
    assert cli.main(["market1501_resnet50_ptl", "--pretrained", str(weights), "data.root=/x"]) == 0
    assert seen["cfg"]["model"]["pretrained"] == str(weights)
    assert seen["cfg"]["data"]["root"] == "/x"
