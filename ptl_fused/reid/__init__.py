"""Person re-identification: datasets, sampling, losses, features, re-ranking, evaluation, export."""

from .data import ImageDataset, build_transforms
from .datasets import DATASETS, ReIDDataset, build_reid_dataset, extract_cuhk03
from .evaluation import evaluate, evaluate_features
from .export import export_onnx
from .features import compute_distance, extract_features
from .losses import CrossEntropyLabelSmooth, ReIDLoss, ReIDLossParts, TripletLoss
from .rerank import re_rank
from .samplers import PKSampler

__all__ = [
    "DATASETS",
    "CrossEntropyLabelSmooth",
    "ImageDataset",
    "PKSampler",
    "ReIDDataset",
    "ReIDLoss",
    "ReIDLossParts",
    "TripletLoss",
    "build_reid_dataset",
    "build_transforms",
    "compute_distance",
    "evaluate",
    "evaluate_features",
    "export_onnx",
    "extract_cuhk03",
    "extract_features",
    "re_rank",
]
