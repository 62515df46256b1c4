"""ReID data: dataset readers on tiny fake datasets, ImageDataset, transforms and the PK sampler."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ptl_fused.reid import ImageDataset, PKSampler, ReIDDataset, build_reid_dataset, build_transforms


def _jpeg(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (value, 100, 200)).save(path)


def _market(root: Path, train, query, gallery) -> None:
    for sub, names in (("bounding_box_train", train), ("query", query), ("bounding_box_test", gallery)):
        (root / sub).mkdir(parents=True)
        for name in names:
            _jpeg(root / sub / name)


def _rel(items, root):
    return [(str(Path(p).relative_to(root)), pid, cam) for p, pid, cam in items]


def test_market1501_layout_junk_relabel_and_summary(tmp_path, capsys):
    _market(
        tmp_path,
        train=[
            "0007_c1s1_000001_00.jpg",
            "0007_c2s1_000002_00.jpg",
            "0003_c6s2_000003_01.jpg",
            "-1_c1s1_0_00.jpg",
        ],
        query=["0002_c3s1_000451_00.jpg"],
        gallery=["0002_c1s1_000100_01.jpg", "0000_c4s1_000200_02.jpg", "-1_c2s1_000300_03.jpg"],
    )
    (tmp_path / "query" / "Thumbs.db").write_text("not an image")  # ignored: not an image suffix
    (tmp_path / "query" / "0002_c3s1_000452_00.jpg").mkdir()  # ignored: a folder, not an image
    ds = build_reid_dataset("market1501", tmp_path)
    assert isinstance(ds, ReIDDataset) and ds.name == "market1501"
    # Sorted by file name; pids 3 and 7 relabelled to 0 and 1; cameras 1-based -> 0-based; -1 dropped.
    assert _rel(ds.train, tmp_path) == [
        ("bounding_box_train/0003_c6s2_000003_01.jpg", 0, 5),
        ("bounding_box_train/0007_c1s1_000001_00.jpg", 1, 0),
        ("bounding_box_train/0007_c2s1_000002_00.jpg", 1, 1),
    ]
    assert _rel(ds.query, tmp_path) == [("query/0002_c3s1_000451_00.jpg", 2, 2)]
    # pid 0 ("distractor") stays in the gallery; pid -1 ("junk") does not.
    assert _rel(ds.gallery, tmp_path) == [
        ("bounding_box_test/0000_c4s1_000200_02.jpg", 0, 3),
        ("bounding_box_test/0002_c1s1_000100_01.jpg", 2, 0),
    ]
    assert ds.num_train_pids == 2 and ds.num_cams == 6
    out = capsys.readouterr().out
    assert "market1501" in out
    rows = {line.split("|")[0].strip(): line.split("|")[1:] for line in out.splitlines() if "|" in line}
    assert [[int(n) for n in rows[split]] for split in ("train", "query", "gallery")] == [
        [2, 3, 3],
        [1, 1, 1],
        [2, 2, 2],
    ]


def test_dukemtmc_has_eight_cameras(tmp_path):
    _market(tmp_path, ["0005_c8_f0001.jpg", "0006_c7_f0002.jpg"], ["0001_c1_f1.jpg"], ["0001_c2_f2.jpg"])
    ds = build_reid_dataset("DukeMTMC-reID", tmp_path, verbose=False)
    assert [c for _, _, c in ds.train] == [7, 6] and ds.num_cams == 8
    # The configs' name for it (data.name=dukemtmc) reads the same dataset.
    assert build_reid_dataset("dukemtmc", tmp_path, verbose=False).train == ds.train
    (tmp_path / "query" / "0001_c9_f3.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"0001_c9_f3\.jpg has pid 1 / camera 9.*1 <= c <= 8"):
        build_reid_dataset("dukemtmcreid", tmp_path, verbose=False)


def test_hidden_files_are_not_images(tmp_path):
    _market(tmp_path, ["0001_c1s1_0.jpg"], ["0002_c1s1_0.jpg"], ["0002_c2s1_0.jpg"])
    (tmp_path / "query" / "._0002_c1s1_0.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble
    ds = build_reid_dataset("market1501", tmp_path, verbose=False)
    assert [Path(p).name for p, _, _ in ds.query] == ["0002_c1s1_0.jpg"]


def test_market_errors_name_file_and_pattern(tmp_path):
    _market(tmp_path, ["0001_c1s1_0.jpg"], ["0002_c1s1_0.jpg"], ["0002_c2s1_0.jpg", "img_002.jpg"])
    with pytest.raises(ValueError, match=r"malformed image name .*img_002\.jpg: expected 'PPPP_cC\.\.\.jpg'"):
        build_reid_dataset("market1501", tmp_path, verbose=False)
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*bounding_box_train"):
        build_reid_dataset("market1501", tmp_path / "query", verbose=False)
    with pytest.raises(FileNotFoundError, match="root folder not found"):
        build_reid_dataset("market1501", tmp_path / "nowhere", verbose=False)
    with pytest.raises(ValueError, match="unknown ReID dataset 'viper'"):
        build_reid_dataset("viper", tmp_path)


def _msmt(root: Path, lists: dict[str, list[str]], train_dir="train", test_dir="test") -> None:
    for split, lines in lists.items():
        folder = root / (train_dir if split in ("train", "val") else test_dir)
        for line in lines:
            _jpeg(folder / line.split()[0])
        (root / f"list_{split}.txt").write_text("\n".join(lines) + "\n")


MSMT_LISTS = {
    "train": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0001/0001_000_15_0303noon_0001_1.jpg 1"],
    "val": ["0002/0002_001_07_0303afternoon_0002_0.jpg 2"],
    "query": ["0000/0000_000_03_0303morning_0001_0.jpg 0"],
    "gallery": ["0000/0000_003_05_0303morning_0003_0.jpg 0", "0004/0004_000_02_0303noon_0011_0.jpg 4"],
}


def test_msmt17_lists_camera_field_and_val(tmp_path):
    _msmt(tmp_path, MSMT_LISTS)
    ds = build_reid_dataset("msmt17", tmp_path, verbose=False)
    # camid = third field of the file name, 1-based -> 0-based; train = list_train + list_val.
    assert _rel(ds.train, tmp_path) == [
        ("train/0000/0000_000_01_0303morning_0015_0.jpg", 0, 0),
        ("train/0001/0001_000_15_0303noon_0001_1.jpg", 1, 14),
        ("train/0002/0002_001_07_0303afternoon_0002_0.jpg", 2, 6),
    ]
    assert [(pid, cam) for _, pid, cam in ds.gallery] == [(0, 4), (4, 1)]
    assert ds.num_train_pids == 3 and ds.num_cams == 15
    assert build_reid_dataset("msmt17", tmp_path, include_val=False, verbose=False).num_train_pids == 2


def test_msmt17_v2_folders_and_errors(tmp_path):
    _msmt(tmp_path, MSMT_LISTS, "mask_train_v2", "mask_test_v2")
    assert len(build_reid_dataset("msmt17", tmp_path, verbose=False).query) == 1
    (tmp_path / "list_gallery.txt").write_text(MSMT_LISTS["gallery"][0] + "\n0000/bad.jpg 0\n")
    with pytest.raises(
        ValueError, match=r"malformed line 2 of .*list_gallery\.txt: '0000/bad\.jpg 0'; expected"
    ):
        build_reid_dataset("msmt17", tmp_path, verbose=False)
    (tmp_path / "list_gallery.txt").write_text("0000/0000_000_03_x.jpg 0\n")
    with pytest.raises(
        FileNotFoundError, match=r"listed in .*list_gallery\.txt line 1 not found: .*0000_000_03_x"
    ):
        build_reid_dataset("msmt17", tmp_path, verbose=False)
    for bad_camera in ("00", "16"):  # MSMT17 has cameras 01..15
        _msmt(
            tmp_path,
            {"gallery": [f"0000/0000_000_{bad_camera}_x_0001_0.jpg 0"]},
            "mask_train_v2",
            "mask_test_v2",
        )
        with pytest.raises(
            ValueError,
            match=rf"line 1 of .*list_gallery\.txt: .* has pid 0 / camera {int(bad_camera)}; expected",
        ):
            build_reid_dataset("msmt17", tmp_path, verbose=False)
    (tmp_path / "list_val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"MSMT17 list file not found: .*list_val\.txt"):
        build_reid_dataset("msmt17", tmp_path, verbose=False)


def _cuhk03(root: Path, kind: str = "detected") -> None:
    from scipy.io import savemat

    # Four identities (labels 11, 12 train; 21, 22 test), two views each.
    names = [f"1_{p:03d}_{v}_{i:02d}.png" for p in (1, 2, 3, 4) for v, i in ((1, 1), (2, 6))]
    labels = np.array([11, 11, 12, 12, 21, 21, 22, 22])
    for name in names:
        _jpeg(root / f"images_{kind}" / name)
    filelist = np.empty((len(names), 1), dtype=object)
    filelist[:, 0] = names
    savemat(
        root / f"cuhk03_new_protocol_config_{kind}.mat",
        {
            "filelist": filelist,
            "labels": labels[:, None],
            "train_idx": np.array([[1], [2], [3], [4]]),  # 1-based, MATLAB style
            "query_idx": np.array([[5], [7]]),
            "gallery_idx": np.array([[6], [8], [5]]),
        },
    )


def test_cuhk03_new_protocol(tmp_path):
    _cuhk03(tmp_path, "labeled")
    ds = build_reid_dataset("cuhk03", tmp_path, labeled=True, verbose=False)
    assert ds.name == "cuhk03_labeled" and ds.num_cams == 2 and ds.num_train_pids == 2
    assert _rel(ds.train, tmp_path) == [
        ("images_labeled/1_001_1_01.png", 0, 0),
        ("images_labeled/1_001_2_06.png", 0, 1),
        ("images_labeled/1_002_1_01.png", 1, 0),
        ("images_labeled/1_002_2_06.png", 1, 1),
    ]
    assert _rel(ds.query, tmp_path) == [
        ("images_labeled/1_003_1_01.png", 21, 0),
        ("images_labeled/1_004_1_01.png", 22, 0),
    ]
    assert [(pid, cam) for _, pid, cam in ds.gallery] == [(21, 1), (22, 1), (21, 0)]
    with pytest.raises(
        FileNotFoundError, match=r"images_detected.*extract the detected images of cuhk-03\.mat"
    ):
        build_reid_dataset("cuhk03", tmp_path, verbose=False)


@pytest.mark.parametrize("labeled", [False, True])
def test_cuhk03_np_folders(tmp_path, labeled):
    # cuhk03-np publishes the same new-protocol split as Market-style folders of PNGs.
    kind = "labeled" if labeled else "detected"
    root = tmp_path / "cuhk03-np"
    _market(
        root / kind, ["0003_c1_1.png", "0003_c2_6.png", "0010_c1_2.png"], ["0042_c1_1.png"], ["0042_c2_3.png"]
    )
    ds = build_reid_dataset("cuhk03", root, labeled=labeled, verbose=False)
    assert ds.name == f"cuhk03_{kind}" and ds.num_cams == 2 and ds.num_train_pids == 2
    assert _rel(ds.train, root) == [
        (f"{kind}/bounding_box_train/0003_c1_1.png", 0, 0),
        (f"{kind}/bounding_box_train/0003_c2_6.png", 0, 1),
        (f"{kind}/bounding_box_train/0010_c1_2.png", 1, 0),
    ]
    assert [(pid, cam) for _, pid, cam in ds.query + ds.gallery] == [(42, 0), (42, 1)]


def test_cuhk03_errors(tmp_path):
    _cuhk03(tmp_path)
    (tmp_path / "images_detected" / "1_004_2_06.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"listed in .*_detected\.mat not found: .*1_004_2_06\.png"):
        build_reid_dataset("cuhk03", tmp_path, verbose=False)
    from scipy.io import savemat

    savemat(tmp_path / "cuhk03_new_protocol_config_detected.mat", {"labels": np.array([1])})
    with pytest.raises(ValueError, match="cannot read .*expected a MATLAB file with filelist, labels"):
        build_reid_dataset("cuhk03", tmp_path, verbose=False)


def test_generic_folder(tmp_path):
    for sub, names in (
        ("train", ["3_0_a.jpg", "5_1_b.png", "-1_0_x.jpg"]),
        ("query", ["9_2_q.jpg"]),
        ("gallery", ["9_0_g.jpg"]),
    ):
        for name in names:
            _jpeg(tmp_path / sub / name)
    ds = build_reid_dataset("folder", tmp_path, verbose=False)
    assert [(pid, cam) for _, pid, cam in ds.train] == [(0, 0), (1, 1)] and ds.num_cams == 3
    _jpeg(tmp_path / "gallery" / "9-0.jpg")
    with pytest.raises(
        ValueError, match=r"malformed image name .*9-0\.jpg: expected 'PID_CAMID_anything\.jpg'"
    ):
        build_reid_dataset("folder", tmp_path, verbose=False)


def test_image_dataset_and_transforms(tmp_path):
    _jpeg(tmp_path / "a.jpg", value=255)
    items = [(str(tmp_path / "a.jpg"), 4, 1), (str(tmp_path / "missing.jpg"), 5, 0)]
    test_tf = build_transforms(32, 16, is_train=False)
    img, pid, camid, index = ImageDataset(items, test_tf)[0]
    assert img.shape == (3, 32, 16) and img.dtype == torch.float32 and (pid, camid, index) == (4, 1, 0)
    # Constant image (255, 100, 200) -> ImageNet normalisation per channel.
    want = (torch.tensor([255, 100, 200]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]
    )
    torch.testing.assert_close(img.mean(dim=(1, 2)), want, atol=0.02, rtol=0)
    torch.manual_seed(0)
    train_tf = build_transforms(32, 16, is_train=True, random_erasing=1.0)
    out = ImageDataset(items, train_tf)[0][0]
    assert out.shape == (3, 32, 16)
    assert (out == 0).all(dim=0).any()  # erased to 0 = the mean colour after normalisation
    with pytest.raises(OSError, match=r"cannot read image .*missing\.jpg \(item 1\)"):
        ImageDataset(items, test_tf)[1]


# ---------------------------------------------------------------- PK sampler
PIDS = [0] * 7 + [1] * 4 + [2] * 2 + [3] * 5 + [4] * 9 + [5] * 1 + [6] * 4  # some ids have < K images


def _batches(sampler: PKSampler) -> list[list[int]]:
    flat = list(sampler)
    assert len(flat) == len(sampler)
    size = sampler.p * sampler.k
    assert len(flat) % size == 0
    return [flat[i : i + size] for i in range(0, len(flat), size)]


def test_pk_batches_have_p_ids_times_k():
    sampler = PKSampler(PIDS, p=3, k=4, seed=1)
    batches = _batches(sampler)
    assert len(batches) == 2  # 8 groups of 4 (id 4 has two) over 7 ids: 2 batches of 3 ids
    for batch in batches:
        counts = Counter(PIDS[i] for i in batch)
        assert sorted(counts.values()) == [4, 4, 4], counts
        # Consecutive groups of K share one identity.
        assert all(len({PIDS[i] for i in batch[j : j + 4]}) == 1 for j in range(0, 12, 4))
    used = Counter(i for b in batches for i in b)
    # Identities with >= K images: each image at most once per epoch (sampled without replacement).
    assert all(n == 1 for i, n in used.items() if PIDS.count(PIDS[i]) >= 4)
    # Identities with < K images are drawn with replacement to make a full group.
    small = [i for i in used if PIDS.count(PIDS[i]) < 4]
    assert small and any(used[i] > 1 for i in small), "some image of a small identity is drawn twice"


def test_pk_deterministic_per_seed_and_epoch():
    a, b = PKSampler(PIDS, 2, 2, seed=3), PKSampler(PIDS, 2, 2, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    a.set_epoch(0)
    assert list(a) == first
    assert list(PKSampler(PIDS, 2, 2, seed=4)) != first


@pytest.mark.parametrize("world", [2, 3])
def test_pk_ddp_shares_disjoint_and_equal(world):
    whole = _batches(PKSampler(PIDS, 2, 2, seed=5, num_replicas=1, rank=0))
    shares = [_batches(PKSampler(PIDS, 2, 2, seed=5, num_replicas=world, rank=r)) for r in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == len(whole) // world
    # Rank r takes batches r, r + world, ...: together they are the first world * n batches, each once.
    got = sorted(map(tuple, (b for s in shares for b in s)))
    assert got == sorted(map(tuple, whole[: world * len(shares[0])]))
    for r, share in enumerate(shares):
        assert share == whole[r : world * len(share) : world]


def test_pk_with_dataloader_and_errors():
    loader = torch.utils.data.DataLoader(torch.tensor(PIDS), batch_size=6, sampler=PKSampler(PIDS, 3, 2))
    for batch in loader:
        assert sorted(Counter(batch.tolist()).values()) == [2, 2, 2]
    with pytest.raises(ValueError, match="at least p=8 identities, the dataset has 7"):
        PKSampler(PIDS, 8, 2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        PKSampler(PIDS, 2, 2, num_replicas=2, rank=2)


def test_pk_ddp_fewer_batches_than_ranks_raises():
    # PIDS with p=3, k=4 gives 2 batches (see above): 3 ranks would each get 0, i.e. an empty epoch.
    for rank in range(3):
        sampler = PKSampler(PIDS, 3, 4, seed=1, num_replicas=3, rank=rank)
        for use in (list, len):
            with pytest.raises(
                ValueError, match=r"only 2 batches of p=3 identities x k=4 images, fewer than num_replicas=3"
            ):
                use(sampler)
    assert len(PKSampler(PIDS, 3, 4, seed=1, num_replicas=2, rank=1)) == 12  # 2 ranks: one batch each
