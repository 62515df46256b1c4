"""ReID datasets as engine tasks, kept thin: ptl_fused.reid parses the folders, makes the
transforms, the PK sampler, the losses and the Market-1501 evaluation; this file only wires
them to the trainer. Evaluation: features of query and gallery (model.eval(), no state carry),
then mAP and rank-1/5/10 (%)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .data import Task, require_root

LAYOUTS = {
    "market1501": "the extracted Market-1501 folder (bounding_box_train/, query/, bounding_box_test/)",
    "dukemtmc": "the extracted DukeMTMC-reID folder (bounding_box_train/, query/, bounding_box_test/)",
    "msmt17": "the extracted MSMT17 folder (train/, test/ and the list_*.txt files)",
    "cuhk03": "the CUHK03 folder, new protocol: cuhk03-np (detected/, labeled/, each with "
    "bounding_box_train/, query/, bounding_box_test/), or images_detected/ and images_labeled/ "
    "extracted as torchreid names them (or cuhk03_release/cuhk-03.mat) plus cuhk03_new_protocol_config_*.mat",
    "folder": "a folder of train/, query/ and gallery/ images named PID_CAMID_anything.jpg (camid 0-based)",
}


class ReIDCriterion(nn.Module):
    """ptl_fused.reid.ReIDLoss on a ModelOutput: cross-entropy over every classifier, plus
    (loss.triplet, as in MGN) the batch-hard triplet loss over every embedding."""

    def __init__(self, num_classes: int, loss_cfg: dict) -> None:
        super().__init__()
        from ptl_fused.reid import ReIDLoss

        self.loss = ReIDLoss(
            num_classes,
            epsilon=loss_cfg["label_smoothing"],
            margin=loss_cfg["margin"],
            soft_margin=loss_cfg["soft_margin"],
            triplet_weight=1.0 if loss_cfg["triplet"] else 0.0,
        )

    def forward(self, out, pids: Tensor, images: Tensor | None = None) -> Tensor:
        return self.loss(out.logits, out.embeddings, pids).total


def check_query_matches(data, name: str, root) -> None:
    """At least one query must have a true match in the gallery (an image of its identity by
    another camera, as the evaluation counts them), or every evaluation fails: raise before the
    training rather than after its first epoch."""
    from ptl_fused._validate import few

    gallery_cams: dict[int, set[int]] = {}
    for _, pid, cam in data.gallery:
        if pid != -1:  # junk: never a match
            gallery_cams.setdefault(pid, set()).add(cam)
    if not any(gallery_cams.get(pid, set()) - {cam} for _, pid, cam in data.query):
        q_ids = sorted({pid for _, pid, _ in data.query})
        raise ValueError(
            f"{name} (data.root={root}): no image of the query split has a true match in the gallery "
            "split (an image of the same identity from another camera), so mAP and CMC are undefined; "
            f"query identities {few(q_ids)}, of which {len(set(q_ids) & gallery_cams.keys())} appear "
            "in the gallery at all. Check that both splits come from the same dataset"
        )


READER_NAMES = {"dukemtmc": "dukemtmcreid"}  # config name -> ptl_fused.reid dataset name


def reid_task(cfg: dict) -> Task:
    from ptl_fused.reid import (
        ImageDataset,
        build_reid_dataset,
        build_transforms,
        evaluate_features,
        extract_features,
    )

    d, name = cfg["data"], cfg["data"]["name"]
    root = require_root(d["root"], LAYOUTS[name])
    kwargs = {"labeled": d["cuhk03_labeled"]} if name == "cuhk03" else {}
    data = build_reid_dataset(READER_NAMES.get(name, name), root, verbose=False, **kwargs)
    check_query_matches(data, name, root)
    train_tf = build_transforms(
        d["height"], d["width"], is_train=d["augment"], random_erasing=d["random_erasing"]
    )
    train = ImageDataset(data.train, train_tf)
    test_tf = build_transforms(d["height"], d["width"], is_train=False)
    query, gallery = (
        DataLoader(ImageDataset(items, test_tf), batch_size=d["batch_size"], num_workers=d["num_workers"])
        for items in (data.query, data.gallery)
    )

    def evaluate(model: nn.Module, device: torch.device, autocast) -> dict:
        """mAP and CMC rank-1/5/10 (%) of the query against the gallery (eval.protocol), ranked
        on the training device."""
        e = cfg["eval"]
        with autocast():  # extract_features puts the model in eval mode: no state carry
            qf, q_pids, q_cams = extract_features(model, query, device, e["flip"], e["normalize"])
            gf, g_pids, g_cams = extract_features(model, gallery, device, e["flip"], e["normalize"])
        # Query chunks of about 2^24 distances: a ranking chunk holds some eight (chunk, gallery)
        # tensors of 8-byte elements, about 1 GiB on the training GPU beside the training state
        # (MSMT17's 82k gallery: 204 queries at a time). Chunking leaves the result unchanged.
        cmc, mean_ap = evaluate_features(
            qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=min(50, len(gf)), device=device,
            protocol=e["protocol"], chunk=max(1, min(1024, 2**24 // max(len(gf), 1))),
        )  # fmt: skip
        ranks = {f"rank{r}": 100.0 * float(cmc[r - 1]) for r in (1, 5, 10) if r <= len(cmc)}
        return {"mAP": 100.0 * mean_ap, **ranks}

    return Task(
        name=name,
        kind="reid",
        num_classes=data.num_train_pids,
        train_set=train,
        train_labels=[pid for _, pid, _ in data.train],
        evaluate=evaluate,
        main_metric="mAP",
        info={"train_images": len(data.train), "query": len(data.query), "gallery": len(data.gallery)},
        criterion=ReIDCriterion(data.num_train_pids, cfg["loss"]),
        pk_sampling=cfg["loss"]["triplet"],
    )
