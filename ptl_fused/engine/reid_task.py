"""ReID datasets as engine tasks, kept thin: ptl_fused.reid parses the folders, makes the
transforms, the PK sampler, the losses and the Market-1501 evaluation; this file only wires
them to the trainer. Evaluation: features of query and gallery (model.eval(), no state carry),
then mAP and rank-1/5/10 (%)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .data import Task, require_root
from .losses import ClassificationLoss

LAYOUTS = {
    "market1501": "the extracted Market-1501 folder (bounding_box_train/, query/, bounding_box_test/)",
    "dukemtmc": "the extracted DukeMTMC-reID folder (bounding_box_train/, query/, bounding_box_test/)",
    "msmt17": "the extracted MSMT17 folder (train/, test/ and the list_*.txt files)",
    "cuhk03": "the CUHK03 folder, new protocol (bounding_box_train/, query/, bounding_box_test/)",
}


class ReIDCriterion(nn.Module):
    """Cross-entropy over every classifier, plus (loss.triplet) the batch-hard triplet loss
    over every embedding, as in MGN. Needs PK batches when the triplet term is on."""

    def __init__(self, label_smoothing: float, triplet: bool, margin: float, soft_margin: bool) -> None:
        super().__init__()
        from ptl_fused.reid import TripletLoss

        self.ce = ClassificationLoss(label_smoothing)
        self.triplet = TripletLoss(margin=margin, soft_margin=soft_margin) if triplet else None

    def forward(self, out, pids: Tensor, images: Tensor | None = None) -> Tensor:
        loss = self.ce(out, pids)
        if self.triplet is not None:
            loss = loss + torch.stack([self.triplet(e.float(), pids) for e in out.embeddings]).mean()
        return loss


def reid_task(cfg: dict) -> Task:
    from ptl_fused.reid import ImageDataset, build_reid_dataset, build_transforms, evaluate_features

    d, name = cfg["data"], cfg["data"]["name"]
    root = require_root(d["root"], LAYOUTS[name])
    data = build_reid_dataset(name, str(root))
    train = ImageDataset(data.train, build_transforms(d["height"], d["width"], is_train=d["augment"]))
    test_tf = build_transforms(d["height"], d["width"], is_train=False)
    loaders = [
        DataLoader(
            ImageDataset(items, test_tf),
            batch_size=d["batch_size"],
            shuffle=False,
            num_workers=d["num_workers"],
        )
        for items in (data.query, data.gallery)
    ]

    def evaluate(model: nn.Module, device: torch.device, autocast) -> dict:
        with autocast():
            result = evaluate_features(
                model, *loaders, device=device, flip=cfg["eval"]["flip"], normalize=cfg["eval"]["normalize"]
            )
        return result

    loss = cfg["loss"]
    return Task(
        name=name,
        kind="reid",
        num_classes=data.num_train_pids,
        train_set=train,
        train_labels=[pid for _, pid, _ in data.train],
        evaluate=evaluate,
        main_metric="mAP",
        info={"train_images": len(data.train), "query": len(data.query), "gallery": len(data.gallery)},
        criterion=ReIDCriterion(
            loss["label_smoothing"], loss["triplet"], loss["margin"], loss["soft_margin"]
        ),
        pk_sampling=loss["triplet"],
    )
