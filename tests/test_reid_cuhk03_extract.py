"""CUHK03: extracting the images of the release's cuhk-03.mat (MATLAB v7.3 = HDF5) on a tiny fake."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from ptl_fused.reid import build_reid_dataset, extract_cuhk03

# Camera pair -> identities; (pair, pid, imgid) cells left empty (0-based), as some ids lack a view.
PAIR_IDS = (2, 1)
EMPTY = {(0, 1, 7), (0, 1, 8), (0, 1, 9), (1, 0, 0)}


def _fake_release(root: Path, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Write root/cuhk03_release/cuhk-03.mat laid out as the real one; return {kind: {png name: image}}.

    Like MATLAB v7.3: a 512-byte user block, cells as datasets of object references into '#refs#',
    every array stored transposed (so an (H, W, 3) image is a (3, W, H) dataset), empty cells as a
    uint64 [0, 0] with the MATLAB_empty attribute. The expected names are written out by hand from
    torchreid's rule, independently of the code under test.
    """
    rng = np.random.default_rng(seed)
    path = root / "cuhk03_release" / "cuhk-03.mat"
    path.parent.mkdir(parents=True)
    expected: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")

        def store(data) -> h5py.Reference:
            ds = refs.create_dataset(str(len(refs)), data=data)
            return ds.ref

        for kind in ("detected", "labeled"):
            expected[kind] = {}
            pairs = []
            for pair, num_ids in enumerate(PAIR_IDS):
                cells = np.empty((10, num_ids), dtype=object)  # MATLAB (num_ids, 10), transposed
                for pid in range(num_ids):
                    for imgid in range(10):
                        if (pair, pid, imgid) in EMPTY:
                            empty = refs.create_dataset(str(len(refs)), data=np.zeros(2, np.uint64))
                            empty.attrs["MATLAB_empty"] = np.uint8(1)
                            cells[imgid, pid] = empty.ref
                            continue
                        h, w = rng.integers(4, 9, size=2)
                        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                        cells[imgid, pid] = store(img.T)
                        view = 1 if imgid < 5 else 2
                        expected[kind][f"{pair + 1}_00{pid + 1}_{view}_{imgid + 1:02d}.png"] = img
                pairs.append(store(cells.astype(h5py.ref_dtype)))
            f.create_dataset(kind, data=np.array([pairs], dtype=h5py.ref_dtype))  # a (1, 2) cell row
    return expected


def _read(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.iterdir())}


def test_extract_names_and_pixels(tmp_path, capsys):
    expected = _fake_release(tmp_path)
    assert "2_001_1_02.png" in expected["detected"] and "1_002_2_07.png" in expected["labeled"]
    assert "1_002_2_08.png" not in expected["detected"]  # an empty cell
    counts = extract_cuhk03(tmp_path)
    assert counts == {"detected": 26, "labeled": 26}  # 3 ids x 10 cells - 4 empty
    for kind in ("detected", "labeled"):
        got = _read(tmp_path / f"images_{kind}")
        assert sorted(got) == sorted(expected[kind])
        for name, img in expected[kind].items():
            np.testing.assert_array_equal(got[name], img, err_msg=name)
    assert not list(tmp_path.glob("*.partial"))
    assert "camera pair 2: 1 identities" in capsys.readouterr().out
    # An existing folder is left alone.
    (tmp_path / "images_labeled" / "1_001_1_01.png").unlink()
    assert extract_cuhk03(tmp_path, verbose=False) == {}
    assert not (tmp_path / "images_labeled" / "1_001_1_01.png").exists()


def test_reader_extracts_missing_folder(tmp_path, capsys):
    expected = _fake_release(tmp_path, seed=1)
    names = ["1_001_1_01.png", "1_001_2_06.png", "1_002_1_02.png", "2_001_2_10.png", "2_001_1_02.png"]
    filelist = np.empty((len(names), 1), dtype=object)
    filelist[:, 0] = names
    savemat(
        tmp_path / "cuhk03_new_protocol_config_labeled.mat",
        {
            "filelist": filelist,
            "labels": np.array([[1], [1], [2], [3], [3]]),
            "train_idx": np.array([[1], [2], [3]]),
            "query_idx": np.array([[4]]),
            "gallery_idx": np.array([[5]]),
        },
    )
    ds = build_reid_dataset("cuhk03", tmp_path, labeled=True, verbose=False)
    assert "extracting it from" in capsys.readouterr().out
    assert not (tmp_path / "images_detected").exists()  # only the kind asked for
    assert [(Path(p).name, pid, cam) for p, pid, cam in ds.query] == [("2_001_2_10.png", 3, 1)]
    assert [(Path(p).name, pid, cam) for p, pid, cam in ds.train] == [
        ("1_001_1_01.png", 0, 0),
        ("1_001_2_06.png", 0, 1),
        ("1_002_1_02.png", 1, 0),
    ]
    np.testing.assert_array_equal(np.asarray(Image.open(ds.gallery[0][0])), expected["labeled"][names[4]])


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"images_detected, nor the release file .*cuhk-03\.mat"):
        build_reid_dataset("cuhk03", tmp_path, verbose=False)
    with pytest.raises(
        FileNotFoundError, match=r"CUHK03 release file not found: .*cuhk03_release/cuhk-03\.mat"
    ):
        extract_cuhk03(tmp_path)
    mat = tmp_path / "cuhk03_release" / "cuhk-03.mat"
    mat.parent.mkdir()
    mat.write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
    with pytest.raises(ValueError, match=r"cannot read .*cuhk-03\.mat .*MATLAB v7\.3 \(HDF5\)"):
        extract_cuhk03(tmp_path)
    with h5py.File(mat, "w") as f:
        f.create_dataset("detected", data=np.zeros(1))
    with pytest.raises(ValueError, match=r"has no 'labeled' cell array"):
        extract_cuhk03(tmp_path, kinds=("labeled",))
    with pytest.raises(ValueError, match=r"kinds must be among"):
        extract_cuhk03(tmp_path, kinds=("both",))
