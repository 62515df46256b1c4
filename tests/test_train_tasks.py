"""CIFAR and ReID tasks through the engine, on tiny fake datasets made in tmp_path."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from test_engine import one_thread, tiny_build  # noqa: F401  (one_thread: autouse fixture)

from ptl_fused.engine import load_config, run


def fake_cifar10(root: Path, n_train: int = 20, n_test: int = 10) -> None:
    """The python-version layout: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(name, n):
        labels = (np.arange(n) % 10).tolist()
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))

    for i in range(1, 6):
        dump(f"data_batch_{i}", n_train // 5)
    dump("test_batch", n_test)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


@pytest.mark.parametrize("augment", [False, True])
def test_cifar10_epoch_reports_error_rate(tmp_path, monkeypatch, augment):
    import torchvision.datasets.cifar as cifar

    fake_cifar10(tmp_path / "data")
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)  # fake files, fake md5s
    cfg = load_config(
        "cifar10plus_densenet100_ptl" if augment else "cifar10_densenet100_ptl",
        [
            f"data.root={tmp_path / 'data'}",
            f"out={tmp_path / 'out'}",
            "data.batch_size=8",
            "data.num_workers=0",
            "optim.epochs=1",
            "model.kwargs={in_channels: 3}",
            "train.progress=false",
            "train.tensorboard=false",
        ],
    )
    assert cfg["data"]["augment"] is augment
    res = run(cfg, build=tiny_build, verbose=False)
    (stage,) = res["stages"]
    assert stage["num_classes"] == 10 and stage["main_metric"] == "test_error"
    assert stage["info"] == {"train_images": 20, "test_images": 10}
    final = stage["final"]
    assert final["test_error"] == pytest.approx(100 - final["test_accuracy"])
    assert final["test_accuracy"] * 10 / 100 == pytest.approx(round(final["test_accuracy"] * 10 / 100))
