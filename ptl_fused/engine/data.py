"""Datasets of the experiments as *tasks*: a training set, its number of classes, and how the
trained model is evaluated (accuracy/error for classification, mAP/rank-1 for ReID).

Everything is read from local paths; nothing downloads. A missing dataset is a
FileNotFoundError that names the path and the layout expected there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

CLASSIFICATION = ("digits", "cifar10", "cifar100")
REID = ("market1501", "dukemtmc", "msmt17", "cuhk03", "folder")
CIFAR_STATS = {  # per-channel mean and std of the training images
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class Task:
    """What a training stage needs to know about its data.

    train_set yields (image (C, H, W), label) or, for ReID, (image, pid, camid, index);
    train_labels: the label of every training item (for the PK sampler);
    evaluate(model, device, autocast) -> metrics dict (the model is in eval mode then).
    """

    name: str
    kind: str  # "classification" | "reid"
    num_classes: int
    train_set: Dataset
    train_labels: list[int]
    evaluate: Callable[..., dict[str, float]]
    main_metric: str
    info: dict = field(default_factory=dict)
    criterion: nn.Module | None = None  # None: cross-entropy over the model's logits
    pk_sampling: bool = False  # batches of P identities x K images (needed by the triplet loss)


def build_task(cfg: dict, device: torch.device) -> Task:
    """The task of a (stage) config: data.name decides which builder runs."""
    name = cfg["data"]["name"]
    if name == "digits":
        return digits_task(cfg)
    if name in CIFAR_STATS:
        return cifar_task(cfg)
    if name in REID:
        from .reid_task import reid_task  # torchvision/PIL image folders; kept apart

        return reid_task(cfg)
    raise ValueError(f"unknown dataset {name!r}; choose one of {CLASSIFICATION + REID}")


def _eval_loader(dataset: Dataset, cfg: dict) -> DataLoader:
    return DataLoader(dataset, batch_size=cfg["data"]["batch_size"], shuffle=False, num_workers=0)


@torch.no_grad()
def classification_metrics(model: nn.Module, loader: DataLoader, device: torch.device, autocast) -> dict:
    """Top-1 accuracy and error rate (%) of the first classifier's logits."""
    correct = total = 0
    for x, y in loader:
        with autocast():
            logits = model(x.to(device)).logits[0]
        correct += (logits.argmax(1).cpu() == y).sum().item()
        total += len(y)
    acc = 100.0 * correct / max(total, 1)
    return {"accuracy": acc, "error": 100.0 - acc}


# --- scikit-learn digits (8x8, 1 channel), bundled with scikit-learn --------------------------


def digits_split(classes: list[int] | None, shots: int | None, seed: int):
    """Half of each class for training, half held out for testing (stratified by `seed`);
    then `shots` training images per class (None = all). Labels become 0..len(classes)-1 in
    the order given. Returns (x_train, y_train, x_test, y_test), x (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.images.astype(np.float32) / 16.0, digits.target
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, stratify=y, random_state=seed)
    classes = list(range(10)) if classes is None else list(classes)
    rng = np.random.default_rng(seed)
    parts = []
    for split_x, split_y, n in ((x_tr, y_tr, shots), (x_te, y_te, None)):
        idx = []
        for c in classes:
            members = np.flatnonzero(split_y == c)
            if n is not None:
                if n > len(members):
                    raise ValueError(f"data.shots={n} but class {c} has only {len(members)} training images")
                members = np.sort(rng.choice(members, size=n, replace=False))
            idx.extend(members.tolist())
        idx = np.array(idx)
        relabel = {c: i for i, c in enumerate(classes)}
        parts += [
            torch.from_numpy(split_x[idx]).unsqueeze(1),
            torch.tensor([relabel[c] for c in split_y[idx]], dtype=torch.long),
        ]
    return tuple(parts)


def digits_task(cfg: dict) -> Task:
    d = cfg["data"]
    x_tr, y_tr, x_te, y_te = digits_split(d["classes"], d["shots"], cfg["seed"])
    test = _eval_loader(TensorDataset(x_te, y_te), cfg)
    return Task(
        name="digits",
        kind="classification",
        num_classes=len(d["classes"]) if d["classes"] is not None else 10,
        train_set=TensorDataset(x_tr, y_tr),
        train_labels=y_tr.tolist(),
        evaluate=lambda model, device, autocast: classification_metrics(model, test, device, autocast),
        main_metric="accuracy",
        info={"train_images": len(y_tr), "test_images": len(y_te)},
    )


# --- CIFAR-10/100 ---------------------------------------------------------------------------


def cifar_task(cfg: dict) -> Task:
    import torchvision
    from torchvision import transforms as T

    d, name = cfg["data"], cfg["data"]["name"]
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    root = require_root(d["root"], f"a folder holding {folder}/ (the python version of {name})")
    mean, std = CIFAR_STATS[name]
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if d["augment"] else []
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(str(root), train=True, transform=T.Compose(aug + norm), download=False)
        test = cls(str(root), train=False, transform=T.Compose(norm), download=False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{name}: no usable dataset under data.root={root}: expected {root / folder}/ as extracted "
            f"from the official python archive ({e})"
        ) from e
    loader = _eval_loader(test, cfg)
    return Task(
        name=name,
        kind="classification",
        num_classes=len(train.classes),
        train_set=train,
        train_labels=list(train.targets),
        evaluate=lambda model, device, autocast: classification_metrics(model, loader, device, autocast),
        main_metric="error",
        info={"train_images": len(train), "test_images": len(test)},
    )


def require_root(root: str | None, layout: str) -> Path:
    """The dataset folder, or a FileNotFoundError naming the path and the expected layout."""
    if root is None:
        raise FileNotFoundError(f"data.root is not set; point it at {layout}")
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"data.root={path} is not a directory; it must be {layout}")
    if not path.is_dir():
        raise FileNotFoundError(f"data.root={path} does not exist; it must be {layout}")
    return path
