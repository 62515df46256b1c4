"""CIFAR and ReID tasks through the engine, on tiny fake datasets made in tmp_path."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
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


def one_epoch_overrides(root: Path, out: Path) -> list[str]:
    """One small epoch of a bundled config with the stand-in network, quietly."""
    return [
        f"data.root={root}",
        f"out={out}",
        "data.batch_size=8",
        "data.num_workers=0",
        "optim.epochs=1",
        "model.kwargs={in_channels: 3}",
        "train.progress=false",
        "train.tensorboard=false",
    ]


@pytest.mark.parametrize("augment", [False, True])
def test_cifar10_epoch_reports_error_rate(tmp_path, monkeypatch, augment):
    import torchvision.datasets.cifar as cifar

    fake_cifar10(tmp_path / "data")
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)  # fake files, fake md5s
    cfg = load_config(
        "cifar10plus_densenet100_ptl" if augment else "cifar10_densenet100_ptl",
        one_epoch_overrides(tmp_path / "data", tmp_path / "out"),
    )
    assert cfg["data"]["augment"] is augment
    res = run(cfg, build=tiny_build, verbose=False)
    (stage,) = res["stages"]
    assert stage["num_classes"] == 10 and stage["main_metric"] == "test_error"
    assert stage["info"] == {"train_images": 20, "test_images": 10}
    final = stage["final"]
    assert final["test_error"] == pytest.approx(100 - final["test_accuracy"])
    assert final["test_accuracy"] * 10 / 100 == pytest.approx(round(final["test_accuracy"] * 10 / 100))


def fake_market(root: Path) -> Path:
    """A Market-1501-like folder: {pid:04d}_c{cam}s1_{frame:06d}_00.jpg in bounding_box_train/,
    query/ and bounding_box_test/; each image is noise tinted by its identity's colour, so that
    retrieval is neither hopeless nor perfect after one epoch."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {pid: tuple(int(c) for c in rng.integers(0, 256, 3)) for pid in range(1, 20)}
    layout = {
        "bounding_box_train": [(pid, cam) for pid in (1, 2, 3, 4) for cam in (1, 2, 1, 2)],
        "query": [(pid, 1) for pid in (11, 12, 13)],
        "bounding_box_test": [(pid, cam) for pid in (11, 12, 13) for cam in (2, 3)] + [(14, 2), (15, 3)],
    }
    for folder, items in layout.items():
        (root / folder).mkdir(parents=True)
        for i, (pid, cam) in enumerate(items):
            noise = rng.integers(0, 256, (32, 16, 3))
            img = Image.fromarray((0.4 * np.array(colours[pid]) + 0.6 * noise).astype(np.uint8))
            img.save(root / folder / f"{pid:04d}_c{cam}s1_{i:06d}_00.jpg")
    return root


@pytest.mark.parametrize("triplet", [False, True])
def test_reid_epoch_on_a_fake_market_folder(tmp_path, triplet):
    root = fake_market(tmp_path / "Market-1501")
    cfg = load_config(
        "market1501_mgn_ptl" if triplet else "market1501_resnet50_ptl",
        [
            f"data.root={root}",
            f"out={tmp_path / 'out'}",
            "data.height=16",
            "data.width=8",
            "data.batch_size=8",
            "data.num_instances=2",
            "data.num_workers=0",
            "optim.epochs=1",
            "model.kwargs={in_channels: 3}",
            "train.progress=false",
            "train.tensorboard=false",
        ],
    )
    assert cfg["loss"]["triplet"] is triplet
    res = run(cfg, build=tiny_build, verbose=False)
    (stage,) = res["stages"]
    assert stage["num_classes"] == 4 and stage["main_metric"] == "test_mAP"
    assert stage["info"] == {"train_images": 16, "query": 3, "gallery": 8}
    final = stage["final"]
    assert 0.0 <= final["test_mAP"] <= 100.0 and 0.0 <= final["test_rank1"] <= 100.0
    assert np.isfinite(stage["history"][0]["train_loss"])
    # The reported mAP and rank-1 against a direct computation from the saved weights.
    model = tiny_build(cfg["model"], 4)
    model.load_state_dict(torch.load(Path(cfg["out"]) / "weights.pt"))
    m_ap, rank1 = hand_map_rank1(model.eval(), root, 16, 8)
    assert final["test_mAP"] == pytest.approx(m_ap, abs=1e-4) and final["test_rank1"] == pytest.approx(rank1)


def test_a_plain_network_run_saves_its_backbone_under_torchvision_names(tmp_path):
    # A baseline or an STD student (model.cell=null) is a plain network: backbone.pt loads into
    # the torchvision model itself (weights.pt has PTLNet's keys, body.stages.0.0.weight...).
    from torchvision import models as tvm

    root = fake_market(tmp_path / "Market-1501")
    overrides = [f"data.root={root}", f"out={tmp_path / 'out'}", "data.height=32", "data.width=16",
                 "data.batch_size=8", "data.num_workers=0", "optim.epochs=1", "train.max_batches=1",
                 "model.arch=resnet18", "model.cell=null", "train.progress=false",
                 "train.tensorboard=false", "device=cpu"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random init: no pretrained file
        run(load_config("market1501_resnet50_baseline", overrides), verbose=False)
    backbone = torch.load(tmp_path / "out" / "backbone.pt")
    weights = torch.load(tmp_path / "out" / "weights.pt")
    tv = tvm.resnet18(weights=None)
    result = tv.load_state_dict(backbone, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert torch.equal(tv.conv1.weight, weights["body.stages.0.0.weight"])
    assert torch.equal(tv.layer4[1].bn2.running_var, weights["body.stages.4.1.bn2.running_var"])


@pytest.mark.parametrize("protocol", ["market", "cuhk03"])
def test_reid_evaluation_takes_the_configured_protocol_on_the_training_device(
    tmp_path, monkeypatch, protocol
):
    # It was always the Market protocol, ranked where the features are returned (the CPU). Here
    # the training device is the CPU too: the device argument is what this checks.
    import ptl_fused.reid as reid

    root, calls, real = fake_market(tmp_path / "Market-1501"), [], reid.evaluate_features
    monkeypatch.setattr(reid, "evaluate_features", lambda *a, **k: calls.append(k) or real(*a, **k))
    overrides = [*reid_overrides(root, tmp_path / "out"), f"eval.protocol={protocol}", "device=cpu"]
    run(load_config("market1501_resnet50_ptl", overrides), build=tiny_build, verbose=False)
    assert [(k["protocol"], torch.device(k["device"])) for k in calls] == [(protocol, torch.device("cpu"))]


@pytest.mark.parametrize(
    ("override", "p"), [([], 0.5), (["data.random_erasing=0.2"], 0.2), (["data.random_erasing=0"], None)]
)
def test_reid_training_transform_erases_with_the_configured_probability(tmp_path, override, p):
    import torchvision.transforms as T

    from ptl_fused.engine.reid_task import reid_task

    root = fake_market(tmp_path / "Market-1501")
    cfg = load_config("market1501_resnet50_ptl", [f"data.root={root}", *override])
    erasing = [t for t in reid_task(cfg).train_set.transform.transforms if isinstance(t, T.RandomErasing)]
    assert [t.p for t in erasing] == ([] if p is None else [p])


def reid_overrides(root: Path, out: Path) -> list[str]:
    """A 16x8 one-epoch run with the stand-in network."""
    return [*one_epoch_overrides(root, out), "data.height=16", "data.width=8"]


def test_folder_dataset_trains_through_the_engine(tmp_path):
    from PIL import Image

    layout = {
        "train": [(p, c) for p in (0, 1, 2) for c in (0, 1)],
        "query": [(7, 0)],
        "gallery": [(7, 1), (8, 1)],
    }
    for split, items in layout.items():
        (tmp_path / "data" / split).mkdir(parents=True)
        for i, (pid, cam) in enumerate(items):
            Image.new("RGB", (8, 16), (40 * pid, 20 * i, 100)).save(
                tmp_path / "data" / split / f"{pid}_{cam}_{i}.jpg"
            )
    cfg = load_config(None, ["data.name=folder", *reid_overrides(tmp_path / "data", tmp_path / "out")])
    (stage,) = run(cfg, build=tiny_build, verbose=False)["stages"]
    assert stage["dataset"] == "folder" and stage["num_classes"] == 3
    assert stage["info"] == {"train_images": 6, "query": 1, "gallery": 2}
    assert 0.0 <= stage["final"]["test_mAP"] <= 100.0


def test_cuhk03_labeled_or_detected_boxes(tmp_path):
    from test_reid_data import _cuhk03

    from ptl_fused.engine.reid_task import reid_task

    _cuhk03(tmp_path, "labeled")  # only the labelled images and split
    cfg = load_config(
        "cuhk03_resnet50_ptl", [*reid_overrides(tmp_path, tmp_path / "out"), "data.cuhk03_labeled=true"]
    )
    task = reid_task(cfg)
    assert task.num_classes == 2 and all("images_labeled" in path for path, _, _ in task.train_set.items)
    cfg = load_config("cuhk03_resnet50_ptl", reid_overrides(tmp_path, tmp_path / "out"))
    assert cfg["data"]["cuhk03_labeled"] is False  # the default: detected boxes, as before
    with pytest.raises(FileNotFoundError, match="images_detected"):
        reid_task(cfg)


def test_query_without_any_gallery_match_stops_before_training(tmp_path, monkeypatch):
    import ptl_fused.engine.trainer as trainer

    root = fake_market(tmp_path / "Market-1501")
    # The gallery keeps ids 11-13 by camera 2 only, and the query moves to camera 2: no true match.
    for f in (root / "bounding_box_test").glob("001[123]_c3*.jpg"):
        f.unlink()
    for f in (root / "query").glob("*.jpg"):
        f.rename(f.with_name(f.name.replace("_c1", "_c2")))
    monkeypatch.setattr(trainer, "train_epoch", lambda *a: pytest.fail("trained before the check"))
    cfg = load_config("market1501_resnet50_ptl", reid_overrides(root, tmp_path / "out"))
    with pytest.raises(
        ValueError,
        match=r"^market1501 \(data.root=.*Market-1501\): no image of the query split has a true "
        r"match in the gallery split .*query identities 11, 12, 13, of which 3 appear in the gallery",
    ):
        run(cfg, build=tiny_build, verbose=False)


def test_a_later_stages_missing_dataset_stops_before_the_first_trains(tmp_path, monkeypatch):
    import ptl_fused.engine.trainer as trainer

    duke = fake_market(tmp_path / "DukeMTMC-reID")
    missing = tmp_path / "MSMT17_V1"
    monkeypatch.setattr(trainer, "train_epoch", lambda *a: pytest.fail("trained before the check"))
    cfg = load_config(
        "sequential_duke_market_msmt17_resnet50_ptl",
        [
            *reid_overrides(duke, tmp_path / "out"),
            f"stages=[{{data: {{name: dukemtmc, root: {duke}}}}}, "
            f"{{data: {{name: msmt17, root: {missing}}}}}]",
        ],
    )
    with pytest.raises(FileNotFoundError, match=rf"data.root={re.escape(str(missing))} does not exist"):
        run(cfg, build=tiny_build, verbose=False)
    assert not (tmp_path / "out").exists(), "nothing written for a run that cannot finish"


def test_too_few_identities_for_a_pk_batch_says_how_p_is_made(tmp_path):
    root = fake_market(tmp_path / "Market-1501")  # 4 training identities
    cfg = load_config(
        "market1501_mgn_ptl",  # loss.triplet: PK batches
        [f"data.root={root}", f"out={tmp_path / 'out'}", "data.batch_size=16", "data.num_instances=2"],
    )
    how = "p = data.batch_size // data.num_instances = 16 // 2 = 8"
    with pytest.raises(ValueError, match=re.escape(how) + ".* has only 4 identities"):
        run(cfg, build=tiny_build, verbose=False)


@pytest.mark.parametrize(("batch_size", "made"), [(8, None), (9, 8), (4, 8)])
def test_a_pk_batch_of_another_size_than_asked_warns(batch_size, made):
    from types import SimpleNamespace

    from ptl_fused.engine.distributed import DistInfo
    from ptl_fused.engine.trainer import make_train_loader

    cfg = load_config("market1501_mgn_ptl", [f"data.batch_size={batch_size}", "data.num_instances=4"])
    task = SimpleNamespace(
        pk_sampling=True, train_labels=[i % 5 for i in range(40)], train_set=list(range(40))
    )
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        loader, _ = make_train_loader(task, cfg, DistInfo(), torch.device("cpu"))
    msgs = [str(m.message) for m in w if "loss.triplet" in str(m.message)]
    assert loader.batch_size == (made or batch_size)
    assert msgs == ([] if made is None else [msgs[0]]) and (
        made is None or f"= {made} images, not" in msgs[0]
    )


def hand_map_rank1(model, root: Path, height: int, width: int) -> tuple[float, float]:
    """Market-1501 protocol written out: drop same-pid same-camera gallery images, rank by
    Euclidean distance of L2-normalised features, AP = mean precision at each true match."""
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose(
        [T.Resize((height, width)), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )

    def load(folder):
        files = sorted((root / folder).glob("*.jpg"))
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
        with torch.no_grad():
            feats = torch.nn.functional.normalize(model(x).feature, dim=1).numpy()
        pids = np.array([int(p.name[:4]) for p in files])
        cams = np.array([int(p.name.split("_c")[1][0]) for p in files])
        return feats, pids, cams

    qf, qp, qc = load("query")
    gf, gp, gc = load("bounding_box_test")
    aps, hits = [], []
    for f, p, c in zip(qf, qp, qc, strict=True):
        keep = ~((gp == p) & (gc == c))
        dist = ((gf[keep] - f) ** 2).sum(1)
        matches = gp[keep][np.argsort(dist, kind="stable")] == p
        where = np.flatnonzero(matches)
        aps.append(np.mean([(i + 1) / (r + 1) for i, r in enumerate(where)]))
        hits.append(matches[0])
    return 100 * float(np.mean(aps)), 100 * float(np.mean(hits))
