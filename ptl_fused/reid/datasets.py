"""Person re-identification datasets read from a local folder (nothing is ever downloaded).

Every dataset becomes a `ReIDDataset`: three lists of (image path, pid, camid) with camids
0-based and the training pids relabelled 0..num_train_pids-1 (query/gallery keep their own pids,
which only need to agree with each other). `build_reid_dataset(name, root)` picks the reader:

- "market1501", "dukemtmcreid": `root/{bounding_box_train,query,bounding_box_test}/*.jpg` named
  `PPPP_cC...jpg` (pid, 1-based camera). Images of pid -1 ("junk", partial bodies) are dropped
  as torchreid/open-reid do; pid 0 (Market's "distractors") stays in the gallery.
- "msmt17": `root/list_{train,val,query,gallery}.txt` of `relpath pid` lines, images under
  `root/train` and `root/test` (MSMT17_V1; MSMT17_V2 uses `mask_train_v2`/`mask_test_v2` and is
  found automatically). The camera is the third `_`-field of the file name,
  `pid_index_camera_...jpg`, 1-based, as torchreid reads it. The published training set
  (1,041 ids, 32,621 images) is list_train + list_val; `include_val=True` (default) gives that.
  (torchreid's current reader adds val only with `combineall=True`.)
- "cuhk03": the new protocol (Zhong et al. CVPR 2017; 767 training / 700 test ids), images
  `root/images_{detected,labeled}/` as extracted from the release's cuhk-03.mat with torchreid's
  names `pair_pid_view_index.png`, split `root/cuhk03_new_protocol_config_{detected,labeled}.mat`
  (fields filelist, labels, train_idx, query_idx, gallery_idx; 1-based indices). The camid is
  the view (0 or 1) within a camera pair, as in torchreid. Choose with `labeled=False|True`.
  A missing image folder is extracted once from `root/cuhk03_release/cuhk-03.mat` (the standard
  release, MATLAB v7.3 = HDF5, read with h5py) by `extract_cuhk03`. The same split as published
  in cuhk03-np (`root/{detected,labeled}/{bounding_box_train,query,bounding_box_test}/`, names
  `PPPP_cV_...png`) is read from there when present.
- "folder": `root/{train,query,gallery}/` of images named `pid_camid_anything.{jpg,jpeg,png}`
  with a 0-based camid; pid -1 images are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

Item = tuple[str, int, int]  # (image path, pid, camid)

JUNK_PID = -1
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class ReIDDataset:
    """train/query/gallery: lists of (path, pid, camid); camids are 0..num_cams-1."""

    train: list[Item]
    query: list[Item]
    gallery: list[Item]
    num_train_pids: int
    num_cams: int
    name: str

    def summary(self) -> str:
        """A table of identities, images and cameras per split."""
        lines = [
            f"{self.name} dataset",
            f"  {'subset':<8} | {'# ids':>6} | {'# images':>8} | {'# cameras':>9}",
            "  " + "-" * 42,
        ]
        for split in ("train", "query", "gallery"):
            items = getattr(self, split)
            pids, cams = {p for _, p, _ in items}, {c for _, _, c in items}
            lines.append(f"  {split:<8} | {len(pids):>6} | {len(items):>8} | {len(cams):>9}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _relabel(items: list[Item]) -> tuple[list[Item], int]:
    """Map the training pids to 0..N-1 in sorted order (the classifier's labels)."""
    label = {pid: i for i, pid in enumerate(sorted({p for _, p, _ in items}))}
    return [(path, label[pid], cam) for path, pid, cam in items], len(label)


def _make(name: str, train: list[Item], query: list[Item], gallery: list[Item]) -> ReIDDataset:
    for split, items in (("train", train), ("query", query), ("gallery", gallery)):
        if not items:
            raise ValueError(f"{name}: the {split} split has no images")
    train, num_pids = _relabel(train)
    num_cams = 1 + max(c for items in (train, query, gallery) for _, _, c in items)
    return ReIDDataset(train, query, gallery, num_pids, num_cams, name)


def _images(folder: Path) -> list[Path]:
    _require(folder, "image folder")
    # Hidden files are no images: macOS leaves "._NAME.jpg" metadata beside each copied file.
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


# ---------------------------------------------------------------- Market-1501 / DukeMTMC-reID
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")


def _market_style_split(folder: Path, num_cams: int, what: str) -> list[Item]:
    items = []
    for path in _images(folder):
        m = _MARKET_NAME.match(path.name)
        if m is None:
            raise ValueError(
                f"{what}: malformed image name {path}: expected 'PPPP_cC...jpg' "
                "(pid, then 'c' and a 1-based camera, e.g. 0002_c1s1_000451_03.jpg)"
            )
        pid, cam = int(m.group(1)), int(m.group(2))
        if pid == JUNK_PID:
            continue
        if pid < 0 or not 1 <= cam <= num_cams:
            raise ValueError(
                f"{what}: {path} has pid {pid} / camera {cam}; expected pid >= -1, 1 <= c <= {num_cams}"
            )
        items.append((str(path), pid, cam - 1))
    return items


def _market_style(name: str, num_cams: int) -> Callable[..., ReIDDataset]:
    def read(root: str | Path) -> ReIDDataset:
        root = _require(Path(root), f"{name} root folder")
        splits = [
            _market_style_split(root / sub, num_cams, name)
            for sub in ("bounding_box_train", "query", "bounding_box_test")
        ]
        return _make(name, *splits)

    read.__doc__ = f"{name} from root/{{bounding_box_train,query,bounding_box_test}}."
    return read


market1501 = _market_style("market1501", num_cams=6)
dukemtmcreid = _market_style("dukemtmcreid", num_cams=8)


# ---------------------------------------------------------------- MSMT17
_MSMT_FOLDERS = {"train": ("train", "mask_train_v2"), "test": ("test", "mask_test_v2")}


def _msmt_list(list_path: Path, image_dir: Path) -> list[Item]:
    _require(list_path, "MSMT17 list file")
    items = []
    for line_no, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            path_str, pid_str = fields
            pid, cam = int(pid_str), int(Path(path_str).name.split("_")[2]) - 1
        except (ValueError, IndexError):
            raise ValueError(
                f"MSMT17: malformed line {line_no} of {list_path}: {line!r}; expected "
                "'relative/path/PID_INDEX_CAM_....jpg PID' (e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0')"
            ) from None
        if pid < 0 or not 0 <= cam < 15:
            raise ValueError(
                f"MSMT17: line {line_no} of {list_path}: {line!r} has pid {pid} / camera {cam + 1}; "
                "expected pid >= 0 and a camera 01..15"
            )
        path = image_dir / path_str
        if not path.exists():
            raise FileNotFoundError(f"MSMT17: image listed in {list_path} line {line_no} not found: {path}")
        items.append((str(path), pid, cam))
    return items


def msmt17(root: str | Path, include_val: bool = True) -> ReIDDataset:
    """MSMT17 (V1 or V2) from the folder holding list_*.txt and the train/test image folders."""
    root = _require(Path(root), "MSMT17 root folder")
    dirs = {}
    for key, names in _MSMT_FOLDERS.items():
        found = [root / n for n in names if (root / n).is_dir()]
        if not found:
            raise FileNotFoundError(f"MSMT17: no {' or '.join(names)} image folder in {root}")
        dirs[key] = found[0]
    train = _msmt_list(root / "list_train.txt", dirs["train"])
    if include_val:
        train += _msmt_list(root / "list_val.txt", dirs["train"])
    query = _msmt_list(root / "list_query.txt", dirs["test"])
    gallery = _msmt_list(root / "list_gallery.txt", dirs["test"])
    return _make("msmt17", train, query, gallery)


# ---------------------------------------------------------------- CUHK03 (new protocol)
def _mat_strings(array) -> list[str]:
    """A MATLAB cell array of strings as loadmat returns it (nested object arrays) -> list[str]."""
    out = []
    for cell in array.ravel():
        while not isinstance(cell, str):
            cell = cell.ravel()[0] if getattr(cell, "size", 0) else ""
        out.append(cell.strip())
    return out


_CUHK03_KINDS = ("detected", "labeled")


def extract_cuhk03(
    raw_dir: str | Path, verbose: bool = True, kinds: Sequence[str] = _CUHK03_KINDS
) -> dict[str, int]:
    """Write the images of raw_dir/cuhk03_release/cuhk-03.mat as PNGs in raw_dir/images_{kind}/.

    As torchreid's CUHK03 preprocessing: the .mat (MATLAB v7.3, i.e. HDF5) holds, for each kind
    ("detected", "labeled"), a cell array of camera pairs, each a (num_ids, 10) cell array of
    images (columns 0-4: view 1, 5-9: view 2), every image a uint8 (H, W, 3) array that HDF5 stores
    transposed. Image imgid of identity pid in pair campid becomes
    `{campid+1}_{pid+1:03d}_{view}_{imgid+1:02d}.png`; empty cells (some identities lack images)
    are skipped. Each folder is written under a temporary name and renamed when complete, so an
    interrupted run leaves no partial images_{kind}/; an existing images_{kind}/ is left alone.
    Returns {kind: number of images written} for the kinds extracted.
    """
    try:
        import h5py
    except ImportError as e:
        raise ImportError(
            "extract_cuhk03 needs h5py to read cuhk-03.mat (MATLAB v7.3): pip install h5py"
        ) from e

    raw_dir = Path(raw_dir)
    mat_path = _require(raw_dir / "cuhk03_release" / "cuhk-03.mat", "CUHK03 release file")
    bad = [k for k in kinds if k not in _CUHK03_KINDS]
    if bad:
        raise ValueError(f"extract_cuhk03: kinds must be among {_CUHK03_KINDS}, got {bad}")
    try:
        mat = h5py.File(mat_path, "r")
    except OSError as e:
        raise ValueError(
            f"CUHK03: cannot read {mat_path} ({e}); expected the MATLAB v7.3 (HDF5) release"
        ) from e
    counts = {}
    with mat:
        for kind in kinds:
            if kind not in mat:
                raise ValueError(
                    f"CUHK03: {mat_path} has no {kind!r} cell array; expected 'detected' and 'labeled'"
                )
            if verbose:
                print(f"CUHK03: extracting the {kind} images of {mat_path} ...")
            final_dir = raw_dir / f"images_{kind}"
            if final_dir.exists():
                if verbose:
                    print(f"CUHK03: {final_dir} exists, left as it is")
                continue
            tmp_dir = raw_dir / f"images_{kind}.partial"
            tmp_dir.mkdir(exist_ok=True)
            count = 0
            for campid, camp_ref in enumerate(np.ravel(mat[kind][()])):
                camp = mat[camp_ref][()].T  # (num_ids, 10) image references
                for pid, img_refs in enumerate(camp):
                    for imgid, img_ref in enumerate(img_refs):
                        img = mat[img_ref][()].T
                        if img.size == 0 or img.ndim < 3:  # an empty cell: MATLAB stores a [0, 0] shape
                            continue
                        view = 1 if imgid < 5 else 2
                        name = f"{campid + 1}_{pid + 1:03d}_{view}_{imgid + 1:02d}.png"
                        Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(tmp_dir / name)
                        count += 1
                if verbose:
                    print(f"  camera pair {campid + 1}: {len(camp)} identities")
            tmp_dir.rename(final_dir)
            counts[kind] = count
            if verbose:
                print(f"CUHK03: wrote {count} {kind} images to {final_dir}")
    return counts


def cuhk03(root: str | Path, labeled: bool = False) -> ReIDDataset:
    """CUHK03 new protocol (767/700), detected (default) or labeled bounding boxes."""
    from scipy.io import loadmat

    kind = "labeled" if labeled else "detected"
    root = _require(Path(root), "CUHK03 root folder")
    if (root / kind / "bounding_box_train").is_dir():  # cuhk03-np: the same split, Market-style
        return _market_style(f"cuhk03_{kind}", num_cams=2)(root / kind)
    image_dir = root / f"images_{kind}"
    release = root / "cuhk03_release" / "cuhk-03.mat"
    if not image_dir.is_dir():
        if not release.is_file():
            raise FileNotFoundError(
                f"CUHK03: image folder not found: {image_dir}, nor the release file {release} to "
                f"extract the {kind} images of cuhk-03.mat from; put cuhk-03.mat there, or extract them "
                "yourself with torchreid's names 'pair_pid_view_index.png' (e.g. 1_001_1_01.png)"
            )
        print(f"CUHK03: {image_dir} not found; extracting it from {release} (once)")
        extract_cuhk03(root, kinds=(kind,))
    mat_path = _require(root / f"cuhk03_new_protocol_config_{kind}.mat", "CUHK03 new-protocol split file")
    try:
        split = loadmat(str(mat_path))
        names, labels = _mat_strings(split["filelist"]), split["labels"].ravel().astype(int)
        idx = {k: split[f"{k}_idx"].ravel().astype(int) - 1 for k in ("train", "query", "gallery")}
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(
            f"CUHK03: cannot read {mat_path} ({e}); expected a MATLAB file with filelist, labels, "
            "train_idx, query_idx, gallery_idx"
        ) from e
    if len(names) != len(labels):
        raise ValueError(f"CUHK03: {mat_path} has {len(names)} filelist entries but {len(labels)} labels")

    def subset(indices) -> list[Item]:
        items = []
        for i in indices:
            if not 0 <= i < len(names):
                raise ValueError(f"CUHK03: {mat_path} has index {i + 1} outside 1..{len(names)}")
            fields = names[i].split("_")
            if len(fields) != 4 or fields[2] not in ("1", "2"):
                raise ValueError(
                    f"CUHK03: malformed file name {names[i]!r} in {mat_path}; expected "
                    "'pair_pid_view_index.png' with view 1 or 2 (e.g. 1_001_1_01.png)"
                )
            path = image_dir / names[i]
            if not path.exists():
                raise FileNotFoundError(f"CUHK03: image listed in {mat_path} not found: {path}")
            items.append((str(path), int(labels[i]), int(fields[2]) - 1))
        return items

    return _make(f"cuhk03_{kind}", *(subset(idx[k]) for k in ("train", "query", "gallery")))


# ---------------------------------------------------------------- generic folder
_FOLDER_NAME = re.compile(r"^(-?\d+)_(\d+)_")


def image_folder(root: str | Path, name: str = "folder") -> ReIDDataset:
    """root/{train,query,gallery}/pid_camid_*.{jpg,jpeg,png} with 0-based camids."""
    root = _require(Path(root), "ReID image-folder root")
    splits = []
    for sub in ("train", "query", "gallery"):
        items = []
        for path in _images(root / sub):
            m = _FOLDER_NAME.match(path.name)
            if m is None:
                raise ValueError(
                    f"{name}: malformed image name {path}: expected 'PID_CAMID_anything.jpg' "
                    "(integers, camid 0-based, e.g. 12_0_0001.jpg)"
                )
            pid, cam = int(m.group(1)), int(m.group(2))
            if pid != JUNK_PID:
                if pid < 0:
                    raise ValueError(f"{name}: {path} has pid {pid}; expected pid >= 0 (or -1 for junk)")
                items.append((str(path), pid, cam))
        splits.append(items)
    return _make(name, *splits)


DATASETS: dict[str, Callable[..., ReIDDataset]] = {
    "market1501": market1501,
    "dukemtmcreid": dukemtmcreid,
    "msmt17": msmt17,
    "cuhk03": cuhk03,
    "folder": image_folder,
}


def build_reid_dataset(name: str, root: str | Path, verbose: bool = True, **kwargs) -> ReIDDataset:
    """Read dataset `name` (one of DATASETS) from the local folder `root`; print its summary."""
    key = name.lower().replace("-", "").replace("_", "")
    # "dukemtmc": the name the engine's configs use (data.name).
    aliases = {
        "market": "market1501",
        "duke": "dukemtmcreid",
        "dukemtmc": "dukemtmcreid",
        "msmt": "msmt17",
        "imagefolder": "folder",
    }
    key = aliases.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown ReID dataset {name!r}; choose one of {sorted(DATASETS)}")
    dataset = DATASETS[key](root, **kwargs)
    if verbose:
        print(dataset.summary())
    return dataset
