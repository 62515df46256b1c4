"""Per-epoch logs: a CSV file, TensorBoard scalars when tensorboard is installed, and a
matplotlib PNG of the curves written beside them at the end of a stage."""

from __future__ import annotations

import csv
from pathlib import Path


class EpochLog:
    """Rewrites log.csv from the whole history each epoch (so a resumed run's file is whole)."""

    def __init__(self, folder: Path, tensorboard: bool = True) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: CSV and PNG only
                pass
            else:
                self.writer = SummaryWriter(log_dir=str(self.folder / "tensorboard"))

    def write(self, history: list[dict]) -> None:
        keys = list(dict.fromkeys(k for row in history for k in row))
        with open(self.folder / "log.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(history)
        if self.writer is not None and history:
            row = history[-1]
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def close(self, history: list[dict], title: str) -> Path:
        if self.writer is not None:
            self.writer.close()
        return plot_history(history, self.folder / "curves.png", title)


def plot_history(history: list[dict], path: Path, title: str) -> Path:
    """One panel per logged quantity (loss, accuracy, eval metrics) against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in dict.fromkeys(k for r in history for k in r) if k not in ("epoch", "lr", "seconds")]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
