"""The main job: transfer learning on scikit-learn's bundled handwritten digits.

Each method pre-trains a small CNN on digits 0-4, replaces the classifier and fine-tunes on
digits 5-9 with a few images per class, then is tested on held-out images of 5-9. Methods
share the split, the seeds and the schedule:
  baseline - the plain CNN (no BConv-Cells)
  ptl      - the same CNN with BConv-Cells (v1) carrying their state across mini-batches
  ptl_v2   - the same with BConv-Cell-v2
  std      - a plain CNN student fine-tuned with Student-Teacher Distillation from the
             `ptl` network of the same seed (loss (1-lam) CE + lam L1 on the features)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from .config import set_key, validate
from .trainer import ModelFactory, run

DESCRIPTIONS = {
    "baseline": "plain CNN, fine-tuned",
    "ptl": "CNN + BConv-Cells (PTL, v1)",
    "ptl_v2": "CNN + BConv-Cell-v2 (PTL-v2)",
    "std": "plain CNN student distilled from `ptl`",
}
CELLS = {"baseline": None, "ptl": "v1", "ptl_v2": "v2", "std": None}


def method_config(cfg: dict, method: str, seed: int, teacher: str | None) -> dict:
    """The two-stage train config (pre-train, transfer) of one method and seed."""
    d = cfg["digits"]
    m = copy.deepcopy(cfg)
    m |= {"job": "train", "seed": seed, "out": str(Path(cfg["out"]) / f"seed{seed}" / method)}
    set_key(m, "model.cell", CELLS[method], "digits job")
    m["stages"] = [
        {
            "data": {"classes": d["pretrain_classes"], "shots": None},
            "optim": {"epochs": d["pretrain_epochs"]},
        },
        {
            "data": {"classes": d["transfer_classes"], "shots": d["shots"]},
            "optim": {"epochs": d["transfer_epochs"]},
            "std": {"teacher": teacher},
        },
    ]
    validate(m)
    return m


def run_digits_job(cfg: dict, resume: str | None = None, build: ModelFactory | None = None) -> dict:
    """Run every method for every seed; print a table, write results.json and curves.png."""
    d, out = cfg["digits"], Path(cfg["out"])
    if resume not in (None, "auto"):
        raise ValueError(
            "the digits job runs many trainings: resume it with --resume auto, not a single file"
        )
    unknown = set(d["methods"]) - set(CELLS)
    if unknown:
        raise ValueError(f"digits.methods: unknown {sorted(unknown)}; choose from {list(CELLS)}")
    if "std" in d["methods"] and "ptl" not in d["methods"]:
        raise ValueError("digits.methods: 'std' needs 'ptl' (its teacher) in the list")
    methods = sorted(d["methods"], key=lambda m: m == "std")  # the teacher first
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    threads = torch.get_num_threads()
    # 8x8 images: each op is too small to split over threads; one thread is several times
    # faster, and much faster when other processes share the cores.
    torch.set_num_threads(1)
    try:
        _run_all(cfg, methods, runs, resume, build)
    finally:
        torch.set_num_threads(threads)
    summary = summarize(cfg, runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot_curves(summary, out / "curves.png")
    print(format_table(summary))
    print(f"\nwritten: {out / 'results.json'}, {out / 'curves.png'} (per-run logs under {out}/seed*/)")
    return summary


def _run_all(
    cfg: dict, methods: list[str], runs: dict, resume: str | None, build: ModelFactory | None
) -> None:
    for seed in cfg["digits"]["seeds"]:
        for method in methods:
            teacher = None
            if method == "std":
                teacher = str(Path(runs["ptl"][-1]["stages"][1]["folder"]) / "last.pt")
            print(f"-- seed {seed}: {method} ({DESCRIPTIONS[method]})", flush=True)
            result = run(method_config(cfg, method, seed, teacher), resume, build, verbose=False)
            runs[method].append(result)
            pre, tr = (st["final"]["test_accuracy"] for st in result["stages"])
            print(f"   test accuracy: pre-training digits {pre:.1f}%, transfer digits {tr:.1f}%", flush=True)


def summarize(cfg: dict, runs: dict[str, list[dict]]) -> dict:
    d = cfg["digits"]
    first = next(iter(runs.values()))[0]["stages"]
    methods = {}
    for method, per_seed in runs.items():
        finals = [r["stages"][1]["final"]["test_accuracy"] for r in per_seed]
        pre = [r["stages"][0]["final"]["test_accuracy"] for r in per_seed]
        curves = np.array([[h["test_accuracy"] for h in r["stages"][1]["history"]] for r in per_seed])
        methods[method] = {
            "description": DESCRIPTIONS[method],
            "transfer_test_accuracy_mean": float(np.mean(finals)),
            "transfer_test_accuracy_std": float(np.std(finals)),
            "transfer_test_accuracy_per_seed": finals,
            "pretrain_test_accuracy_mean": float(np.mean(pre)),
            "transfer_curve_mean": curves.mean(0).tolist(),
            "transfer_curve_std": curves.std(0).tolist(),
        }
    return {
        "what": "pre-train on digits {} then fine-tune on digits {} with {} images per class; "
        "numbers are test accuracy (%) on held-out images of the transfer digits".format(
            d["pretrain_classes"], d["transfer_classes"], d["shots"]
        ),
        "pretrain_train_images": first[0]["info"]["train_images"],
        "pretrain_test_images": first[0]["info"]["test_images"],
        "transfer_train_images": first[1]["info"]["train_images"],
        "transfer_test_images": first[1]["info"]["test_images"],
        "pretrain_epochs": d["pretrain_epochs"],
        "transfer_epochs": d["transfer_epochs"],
        "seeds": d["seeds"],
        "std_lambda": cfg["std"]["lam"],
        "methods": methods,
    }


def format_table(s: dict) -> str:
    lines = [
        "",
        "Transfer learning on scikit-learn's handwritten digits (8x8 grey images)",
        f"  1. pre-train on {s['pretrain_train_images']} images of the first digit group "
        f"({s['pretrain_epochs']} epochs)",
        f"  2. new classifier, fine-tune on only {s['transfer_train_images']} images of the other group "
        f"({s['transfer_epochs']} epochs)",
        f"  3. test on {s['transfer_test_images']} held-out images of that group (never trained on)",
        f"  Seeds {s['seeds']}: each seed is its own split, initial weights and batch order,"
        " shared by all methods.",
        "",
        f"{'method':<9} {'what was trained':<40} {'transfer test acc. (%)':>24}  {'pre-train acc.':>14}",
        "-" * 92,
    ]
    for name, m in s["methods"].items():
        acc = f"{m['transfer_test_accuracy_mean']:.1f} ± {m['transfer_test_accuracy_std']:.1f}"
        lines.append(
            f"{name:<9} {m['description']:<40} {acc:>24}  {m['pretrain_test_accuracy_mean']:>13.1f}%"
        )
    lines += [
        "-" * 92,
        "transfer test acc.: share of the held-out transfer images classified correctly, mean ± std over",
        "the seeds (higher is better; guessing gives 100/number of classes). pre-train acc.: the same on",
        f"held-out images of the pre-training digits. STD uses lambda = {s['std_lambda']}.",
    ]
    return "\n".join(lines)


def plot_curves(s: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, m in s["methods"].items():
        mean, std = np.array(m["transfer_curve_mean"]), np.array(m["transfer_curve_std"])
        epochs = np.arange(1, len(mean) + 1)
        ax.plot(epochs, mean, marker="o", ms=3, label=f"{name}: {m['description']}")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("fine-tuning epoch on the transfer digits")
    ax.set_ylabel("held-out test accuracy (%)")
    ax.set_title(f"Few-shot transfer ({s['transfer_train_images']} training images), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
