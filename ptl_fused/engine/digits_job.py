"""The main job: transfer learning on scikit-learn's bundled handwritten digits.

The paper's protocol (DESIGN.md §1, "Paper protocol") at toy scale. Per seed, a plain CNN (no
cells; the paper's ImageNet backbone) is pre-trained ONCE on digits 0-4 and saved. Every method
then starts from those same weights, gets a new classifier and is fine-tuned on digits 5-9 with
a few images per class, then tested on held-out images of 5-9:
  baseline - the pre-trained plain CNN, fine-tuned
  ptl      - the pre-trained CNN with BConv-Cells (v1) and fusion convs added at fine-tuning
             time (new, randomly initialised), carrying their state across mini-batches
  ptl_v2   - the same with BConv-Cell-v2
  std      - the pre-trained plain CNN fine-tuned with Student-Teacher Distillation from the
             fine-tuned `ptl` network of the same seed (loss (1-lam) CE + lam L1 on the features)
Methods share the split, the seeds, the pre-trained weights and the schedule.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .config import set_key, validate
from .data import digits_split
from .distributed import is_main_process
from .trainer import FinishedRunWarning, ModelFactory, ReplacesRunWarning, build_model_from_config, run

DESCRIPTIONS = {
    "baseline": "pre-trained plain CNN, fine-tuned",
    "ptl": "+ new BConv-Cells (PTL, v1), fine-tuned",
    "ptl_v2": "+ new BConv-Cell-v2 (PTL-v2), fine-tuned",
    "std": "plain CNN distilled from `ptl` (STD)",
}
CELLS = {"baseline": None, "ptl": "v1", "ptl_v2": "v2", "std": None}
# The parts of a plain network that transfer: the backbone stages (all of them must fit) and
# the head, whose classifier is replaced because the transfer task has other classes.
STAGES, HEAD, CLASSIFIER = "body.stages.", "head.", "head.classifier."


def load_pretrained_plain(model: nn.Module, plain_state: Mapping[str, Tensor]) -> list[str]:
    """Start `model` (a digits net with any cell setting) from a pre-trained PLAIN net's weights.

    Copies every backbone-stage tensor (body.stages.*, BatchNorm statistics included; each must
    exist in `model` with the same shape) and every head tensor whose name and shape match,
    except the classifier (the transfer task's classifier stays freshly initialised). The cells
    and fusion convs (body.cells/fuses/final_fuse) are not in a plain net and keep their fresh
    initialisation. Returns the names of the copied tensors.
    """
    own = model.state_dict()
    copied = {}
    for name, value in plain_state.items():
        if not name.startswith((STAGES, HEAD)):
            raise ValueError(
                f"pre-trained weights hold {name}: not a plain network (only body.stages.* and head.*)"
            )
        if name.startswith(STAGES):
            if name not in own or own[name].shape != value.shape:
                got = tuple(own[name].shape) if name in own else "no such tensor"
                raise ValueError(
                    f"pre-trained plain weights: {name} {tuple(value.shape)} does not fit the "
                    f"{type(model).__name__} being fine-tuned ({got}); build both from the same backbone"
                )
            copied[name] = value
        elif name.startswith(HEAD) and not name.startswith(CLASSIFIER):
            if name in own and own[name].shape == value.shape:
                copied[name] = value
    if not any(name.startswith(STAGES) for name in copied):
        raise ValueError(
            "pre-trained plain weights hold no backbone stage (body.stages.*): nothing to transfer"
        )
    model.load_state_dict(copied, strict=False)
    return list(copied)


def pretrain_config(cfg: dict, seed: int) -> dict:
    """The run that pre-trains the plain CNN of one seed on the pre-training digits."""
    d = cfg["digits"]
    m = copy.deepcopy(cfg)
    m |= {"job": "train", "seed": seed, "out": str(Path(cfg["out"]) / f"seed{seed}" / "pretrain")}
    set_key(m, "model.cell", None, "digits job")
    set_key(m, "data", {"classes": d["pretrain_classes"], "shots": None}, "digits job")
    set_key(m, "optim.epochs", d["pretrain_epochs"], "digits job")
    validate(m)
    return m


def method_config(cfg: dict, method: str, seed: int, teacher: str | None) -> dict:
    """The fine-tuning run of one method and seed on the transfer digits."""
    d = cfg["digits"]
    m = copy.deepcopy(cfg)
    m |= {"job": "train", "seed": seed, "out": str(Path(cfg["out"]) / f"seed{seed}" / method)}
    set_key(m, "model.cell", CELLS[method], "digits job")
    set_key(m, "data", {"classes": d["transfer_classes"], "shots": d["shots"]}, "digits job")
    set_key(m, "optim.epochs", d["transfer_epochs"], "digits job")
    set_key(m, "std.teacher", teacher, "digits job")
    validate(m)
    return m


def from_pretrained(build: ModelFactory, weights: Path) -> ModelFactory:
    """`build`, then load_pretrained_plain from the plain net saved at `weights`. (A resumed run
    or an STD teacher then loads its own checkpoint over it.)"""
    state = torch.load(weights, map_location="cpu", weights_only=True)

    def factory(model_cfg: dict, num_classes: int) -> nn.Module:
        model = build(model_cfg, num_classes)
        load_pretrained_plain(model, state)
        return model

    return factory


def run_digits_job(cfg: dict, resume: str | None = None, build: ModelFactory | None = None) -> dict:
    """Run every method for every seed; print a table, write results.json and curves.png."""
    d, out = cfg["digits"], Path(cfg["out"])
    if resume not in (None, "auto"):
        raise ValueError(
            "the digits job runs many trainings: resume it with --resume auto, not a single file"
        )
    if cfg["data"]["name"] != "digits":
        raise ValueError(
            f"the digits job (job: digits_transfer, the default without a config) trains on "
            f"scikit-learn's digits, not data.name={cfg['data']['name']!r}: name a config for that "
            "dataset, or set job=train"
        )
    unknown = set(d["methods"]) - set(CELLS)
    if unknown:
        raise ValueError(f"digits.methods: unknown {sorted(unknown)}; choose from {list(CELLS)}")
    if "std" in d["methods"] and "ptl" not in d["methods"]:
        raise ValueError("digits.methods: 'std' needs 'ptl' (its teacher) in the list")
    if cfg["eval"]["every"] != 1:  # found before any training, not after all of it
        every = cfg["eval"]["every"]
        raise ValueError(
            f"the digits job plots test accuracy after every epoch: eval.every must be 1, got {every}"
        )
    for seed in d["seeds"]:  # too many shots for a class: found now, not after pre-training
        try:
            digits_split(d["transfer_classes"], d["shots"], seed)
        except ValueError as e:
            if not str(e).startswith("data.shots="):
                raise
            raise ValueError(f"digits.shots: {e}".replace("data.shots=", "")) from None
    earlier = sorted(out.glob("seed*/**/last.pt")) if resume is None else []
    if earlier and is_main_process():
        warnings.warn(
            f"{out} holds the checkpoints of an earlier digits job ({len(earlier)} runs); this new job "
            "replaces them (pass --resume auto to continue that job instead)",
            ReplacesRunWarning,
            stacklevel=2,
        )
    methods = sorted(d["methods"], key=lambda m: m == "std")  # the teacher first
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    pretrain_runs: list[dict] = []
    threads = torch.get_num_threads()
    # 8x8 images: each op is too small to split over threads; one thread is several times
    # faster, and much faster when other processes share the cores.
    torch.set_num_threads(1)
    try:
        _run_all(cfg, methods, runs, pretrain_runs, resume, build or build_model_from_config)
    finally:
        torch.set_num_threads(threads)
    summary = summarize(cfg, pretrain_runs, runs)
    if is_main_process():  # under torchrun every rank has the summary; one writes it
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        plot_curves(summary, out / "curves.png")
        print(format_table(summary))
        print(f"\nwritten: {out / 'results.json'}, {out / 'curves.png'} (per-run logs under {out}/seed*/)")
    return summary


def _say(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs)


def _run_all(
    cfg: dict, methods: list[str], runs: dict, pretrain_runs: list, resume: str | None, build: ModelFactory
) -> None:
    d = cfg["digits"]
    # A resumed job finds its finished sub-runs: their "train on with a larger optim.epochs" does
    # not apply (the job sets its own epochs).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FinishedRunWarning)
        warnings.simplefilter("ignore", ReplacesRunWarning)  # said once, by run_digits_job
        for seed in d["seeds"]:
            _say(f"-- seed {seed}: pre-train the plain CNN on digits {d['pretrain_classes']}", flush=True)
            pre = run(pretrain_config(cfg, seed), resume, build, verbose=False)
            pretrain_runs.append(pre)
            acc = pre["stages"][0]["final"]["test_accuracy"]
            _say(f"   held-out accuracy on the pre-training digits: {acc:.1f}%", flush=True)
            start = from_pretrained(build, Path(pre["out"]) / "weights.pt")
            for method in methods:
                teacher = None
                if method == "std":
                    teacher = str(Path(runs["ptl"][-1]["out"]) / "last.pt")
                _say(f"-- seed {seed}: {method} ({DESCRIPTIONS[method]})", flush=True)
                result = run(method_config(cfg, method, seed, teacher), resume, start, verbose=False)
                runs[method].append(result)
                acc = result["stages"][0]["final"]["test_accuracy"]
                _say(f"   held-out accuracy on the transfer digits: {acc:.1f}%", flush=True)


def summarize(cfg: dict, pretrain_runs: list[dict], runs: dict[str, list[dict]]) -> dict:
    d = cfg["digits"]
    pre = pretrain_runs[0]["stages"][0]["info"]
    transfer = next(iter(runs.values()))[0]["stages"][0]["info"]
    pre_acc = [r["stages"][0]["final"]["test_accuracy"] for r in pretrain_runs]
    methods = {}
    for method, per_seed in runs.items():
        finals = [r["stages"][0]["final"]["test_accuracy"] for r in per_seed]
        curves = np.array([[h["test_accuracy"] for h in r["stages"][0]["history"]] for r in per_seed])
        methods[method] = {
            "description": DESCRIPTIONS[method],
            "transfer_test_accuracy_mean": float(np.mean(finals)),
            "transfer_test_accuracy_std": float(np.std(finals)),
            "transfer_test_accuracy_per_seed": finals,
            "transfer_curve_mean": curves.mean(0).tolist(),
            "transfer_curve_std": curves.std(0).tolist(),
        }
    return {
        "what": "per seed, one plain CNN pre-trained on digits {}; every method starts from it, gets a new "
        "classifier and is fine-tuned on digits {} with {} images per class; numbers are test accuracy (%) "
        "on held-out images of the transfer digits".format(
            d["pretrain_classes"], d["transfer_classes"], d["shots"]
        ),
        "pretrain_train_images": pre["train_images"],
        "pretrain_test_images": pre["test_images"],
        "pretrain_test_accuracy_mean": float(np.mean(pre_acc)),
        "pretrain_test_accuracy_per_seed": pre_acc,
        "transfer_train_images": transfer["train_images"],
        "transfer_test_images": transfer["test_images"],
        "pretrain_classes": d["pretrain_classes"],
        "transfer_classes": d["transfer_classes"],
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
        f"  1. pre-train ONE plain CNN (no cells) per seed on {s['pretrain_train_images']} images of digits "
        f"{s['pretrain_classes']}",
        f"     ({s['pretrain_epochs']} epochs; held-out accuracy on those digits "
        f"{s['pretrain_test_accuracy_mean']:.1f}%, mean over seeds)",
        "  2. ALL methods start from that same pre-trained plain CNN: new classifier (PTL also adds new,",
        "     randomly initialised BConv-Cells and fusion convs), then fine-tune on only "
        f"{s['transfer_train_images']} images",
        f"     of digits {s['transfer_classes']} ({s['transfer_epochs']} epochs)",
        f"  3. test on {s['transfer_test_images']} held-out images of those digits (never trained on)",
        f"  Seeds {s['seeds']}: each seed is its own split, pre-trained CNN and batch order,"
        " shared by all methods.",
        "",
        f"{'method':<9} {'what was fine-tuned':<42} {'transfer test acc. (%)':>24}",
        "-" * 77,
    ]
    for name, m in s["methods"].items():
        acc = f"{m['transfer_test_accuracy_mean']:.1f} ± {m['transfer_test_accuracy_std']:.1f}"
        lines.append(f"{name:<9} {m['description']:<42} {acc:>24}")
    lines += [
        "-" * 77,
        "transfer test acc.: share of the held-out transfer images classified correctly, mean ± std over",
        "the seeds (higher is better; guessing gives 100/number of classes). STD's teacher is the",
        f"fine-tuned `ptl` network of the same seed; lambda = {s['std_lambda']}.",
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
