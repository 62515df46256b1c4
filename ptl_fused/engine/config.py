"""Experiment configuration: a nested dict of defaults (the paper's protocol), YAML files and
``key.sub=value`` command-line overrides, validated so that a typo stops the run.

The defaults follow DESIGN.md §1 "Paper protocol": SGD with momentum 0.9, lr 0.01 divided by
10 every 10 epochs, 50 epochs, ReID images 256x128, cross-entropy. A YAML file only states what
differs from them.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "name": "experiment",
    "job": "train",  # "train": one run (or a list of stages); "digits_transfer": the main job
    "out": "runs/experiment",
    "seed": 0,
    "deterministic": False,  # torch.use_deterministic_algorithms(True)
    "device": "auto",  # auto | cpu | cuda
    "amp": "bf16",  # bf16 | fp16 | off; always off on the CPU
    "data": {
        # digits | cifar10 | cifar100 | market1501 | dukemtmc | msmt17 | cuhk03 | folder
        # (folder: root/{train,query,gallery}/PID_CAMID_*.jpg, see ptl_fused.reid.datasets)
        "name": "market1501",
        "root": None,  # local dataset folder (nothing downloads)
        "height": 256,
        "width": 128,
        # CIFAR "+": pad 4, random crop, flip. ReID: flip, pad 10 + random crop, then random erasing
        # with probability random_erasing (the authors' code: flip and erasing p=0.5, no crop)
        "augment": True,
        "random_erasing": 0.5,  # ReID training only; 0 = off
        "batch_size": 32,
        "num_instances": 4,  # images per identity in a PK batch (triplet loss)
        "cuhk03_labeled": False,  # cuhk03: the hand-labelled boxes ([images_]labeled/), not detected
        "num_workers": 2,
        "classes": None,  # digits: the classes to use (relabelled 0..n-1); None = all
        "shots": None,  # digits: training images per class; None = all of the training half
    },
    "model": {
        "arch": "resnet50",  # resnet50 | densenet161 | mgn | densenet100 | digits
        "cell": "v1",  # v1 | v2 | null (plain backbone, the baseline)
        "head": "reid",  # reid | classification
        "backend": "auto",
        "recompute": False,  # the cells recompute their gates in backward (less memory, +1 conv)
        "pretrained": None,  # local torchvision state dict for the backbone
        "kwargs": {},  # passed on to ptl_fused.models.build_model
    },
    "optim": {
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "nesterov": False,
        "epochs": 50,
        "step_size": 10,  # lr x gamma every step_size epochs
        "gamma": 0.1,
    },
    "loss": {
        "label_smoothing": 0.0,
        "triplet": False,  # MGN: cross-entropy + triplet (then batches are P identities x K images)
        "margin": 0.3,
        "soft_margin": False,
    },
    "std": {
        "teacher": None,  # path of a PTL checkpoint written by this engine; set = distillation
        "lam": 0.8,  # L = (1 - lam) CE + lam L1(student feature, teacher feature)
    },
    # Sequential fine-tuning: a list of overrides (sections data/optim/loss/std/eval), one per
    # dataset, run in order; each stage gets a new classifier, backbone and cells are kept.
    "stages": [],
    "ddp": {"state_sync": "none"},  # none | mean: all-reduce the cells' states after each step
    # every: epochs between evals (0 = end); protocol (ReID): "market" ranks the whole gallery,
    # "cuhk03" the single-gallery-shot draws (ptl_fused.reid.evaluate).
    "eval": {"every": 1, "flip": False, "normalize": True, "protocol": "market"},
    "train": {"max_batches": None, "progress": True, "tensorboard": True},
    # Overrides applied by --quick (a smoke run); a YAML file may set its own.
    "quick": {"optim.epochs": 1, "train.max_batches": 2, "data.num_workers": 0},
    "digits": {  # the main job (job: digits_transfer)
        "pretrain_classes": [0, 1, 2, 3, 4],
        "transfer_classes": [5, 6, 7, 8, 9],
        "shots": 5,
        "pretrain_epochs": 10,
        "transfer_epochs": 20,
        "methods": ["baseline", "ptl", "ptl_v2", "std"],
        "seeds": [0, 1, 2],
    },
}

CHOICES: dict[str, tuple] = {
    "job": ("train", "digits_transfer"),
    "device": ("auto", "cpu", "cuda"),
    "amp": ("bf16", "fp16", "off"),
    "data.name": ("digits", "cifar10", "cifar100", "market1501", "dukemtmc", "msmt17", "cuhk03", "folder"),
    "model.cell": ("v1", "v2", None),
    "model.head": ("reid", "classification"),
    "ddp.state_sync": ("none", "mean"),
    "eval.protocol": ("market", "cuhk03"),
}
# Integer settings and their smallest valid value (0 or a negative count has no meaning: a
# division by zero, an empty run or an empty batch further on).
MINIMUMS: dict[str, int] = {
    "optim.epochs": 1,
    "optim.step_size": 1,
    "data.batch_size": 1,
    "data.num_instances": 1,
    "data.num_workers": 0,
    "eval.every": 0,
    "digits.pretrain_epochs": 1,
    "digits.transfer_epochs": 1,
    "digits.shots": 1,
}
FREE_FORM = {"model.kwargs", "quick"}  # dicts whose keys are not checked here
# Paths: an override's text is taken as it is (YAML would read "2024" as a number, cut a path at
# " #" and choke on a leading "@" or "*"), and "~" is expanded. A stage may set data.root and
# std.teacher too.
PATHS = ("out", "data.root", "model.pretrained", "std.teacher")
STAGE_SECTIONS = ("data", "optim", "loss", "std", "eval")
# What may differ from the checkpoint's config when a run is resumed (a key, or a section and
# everything under it): where the files are, how the run is watched and evaluated, the device,
# and optim.epochs of the stage being resumed (to extend it or end it early). Every other
# setting shapes the training itself, so a resumed run must have the checkpoint's (see
# checkpoint.check_resume).
RESUME_MAY_CHANGE = (
    "name",
    "out",
    "device",
    "deterministic",
    "data.root",
    "data.num_workers",
    "model.pretrained",  # a path; a resumed run loads every weight from the checkpoint
    "model.recompute",  # memory for compute: the same values
    "std.teacher",  # a path (the main job's lies under out, which may move)
    "optim.epochs",
    "eval",
    "train.progress",
    "train.tensorboard",
    "quick",  # a recipe of overrides; what it set is compared key by key
    "digits",  # the main job's plan; what it sets in each run is compared key by key
)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def config_dir() -> Path:
    """The folder of the bundled YAML files (ptl_fused/configs)."""
    return Path(str(resources.files("ptl_fused") / "configs"))


CONFIG_SUFFIXES = (".yaml", ".yml")


def resolve_config_path(name: str | Path) -> Path:
    """A YAML file, or the name of a bundled config ("digits").

    A name that looks like a path (it holds a "/" or ends with .yaml/.yml) is a file and must
    exist: it never falls back to the bundled config of the same name, which would silently train
    another experiment than the file the user meant.
    """
    path = Path(name)
    if path.is_file():
        return path
    text = str(name)
    if "/" in text or os.sep in text or path.suffix.lower() in CONFIG_SUFFIXES:
        raise ConfigError(f"config file not found: {text}")
    bundled = config_dir() / f"{path.name}.yaml"
    if bundled.is_file():
        return bundled
    names = sorted(p.stem for p in config_dir().glob("*.yaml"))
    raise ConfigError(f"config file {str(name)!r} not found; bundled configs: {', '.join(names)}")


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple = (), quick: bool = False
) -> dict:
    """Defaults, then the YAML file (if any), then --quick (its recipe, and out=<out>_quick),
    then ``key.sub=value`` overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = resolve_config_path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
        merge(cfg, data, where=str(path))
    if quick:
        for key, value in _quick_recipe(cfg).items():
            set_key(cfg, key, value, where="quick")
        # Its own folder, so a smoke run never mixes with (or overwrites) the full run's files;
        # an out= override below still wins.
        cfg["out"] = f"{str(cfg['out']).rstrip('/')}_quick"
    given = []  # (key, value) of each override
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        given.append((key.strip(), parse_value(key.strip(), text)))
        set_key(cfg, *given[-1], where="command line")
    if "stages" not in dict(given):  # stages= written on the command line: the user sees them
        for key, value in given:
            _check_not_shadowed(cfg, key, value)
    validate(cfg)
    return cfg


def _quick_recipe(cfg: dict) -> dict:
    """--quick's overrides: the config file's own `quick` where it has one (it replaces the
    default recipe: the digits job's sets its seeds and epochs, not a batch limit)."""
    recipe = cfg["quick"]
    if not isinstance(recipe, dict):
        raise ConfigError(f"quick must be a mapping of key.sub: value overrides, got {recipe!r}")
    return recipe


def parse_value(key: str, text: str) -> Any:
    """An override's value: YAML (numbers, lists, mappings, null), except that a path setting
    keeps its text (PATHS; "" or "null" unsets one that may be None) and digits with a leading
    zero stay decimal (YAML 1.1 reads 010 as octal 8)."""
    if _is_path(key):
        text = text.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # written quoted for YAML
            return text[1:-1]
        return None if text in ("", "null") else text  # None: out says it must be a path
    if re.fullmatch(r"[+-]?0[0-9]+", text.strip()) and _is_int_key(key):
        return int(text.strip(), 10)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"command line: {key}={text}: not a valid YAML value ({problem}); to pass it as a "
            f"string, quote it for YAML: {key}='\"...\"'"
        ) from None


def _schema_key(key: str) -> str:
    """The DEFAULTS key of an override key: stages.N.data.root -> data.root."""
    parts = key.split(".")
    return ".".join(parts[2:] if parts[0] == "stages" and len(parts) > 2 else parts)


def _is_path(key: str) -> bool:
    return _schema_key(key) in PATHS


def _is_int_key(key: str) -> bool:
    try:
        default = get(DEFAULTS, _schema_key(key))
    except (KeyError, TypeError):
        return False
    return isinstance(default, int) and not isinstance(default, bool)


def merge(cfg: dict, update: dict, where: str, prefix: str = "") -> None:
    """Merge `update` into `cfg` in place; a key the schema lacks is a ConfigError."""
    for key, value in update.items():
        full = f"{prefix}{key}"
        if key not in cfg:
            raise ConfigError(f"{where}: unknown key {full!r}; valid keys here: {', '.join(sorted(cfg))}")
        if isinstance(cfg[key], dict) and full not in FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {full!r} must be a mapping, got {value!r}")
            merge(cfg[key], value, where, f"{full}.")
        else:
            cfg[key] = copy.deepcopy(value)


def set_key(cfg: dict, dotted: str, value: Any, where: str) -> None:
    """cfg[a][b] = value for dotted = "a.b" (the key must exist); "stages.N.section.key" sets
    the key in stage N (0-based; validate checks it against the schema)."""
    parts = dotted.split(".")
    if parts[0] == "stages" and len(parts) > 1:
        stages = cfg["stages"]
        if len(parts) < 4 or not parts[1].isdigit():
            raise ConfigError(f"{where}: {dotted!r}: a stage's key is stages.N.section.key")
        if int(parts[1]) >= len(stages):
            raise ConfigError(
                f"{where}: {dotted!r}: this config has {len(stages)} stage(s)"
                + (f", stages.0 to stages.{len(stages) - 1}" if stages else "")
            )
        if parts[2] not in STAGE_SECTIONS:
            raise ConfigError(f"{where}: {dotted!r}: a stage may set {', '.join(STAGE_SECTIONS)}")
        node = stages[int(parts[1])]
        for part in parts[2:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {dotted!r}: {part!r} is not a mapping")
        node[parts[-1]] = copy.deepcopy(value)
        return
    update: Any = value
    for part in reversed(parts):
        update = {part: update}
    merge(cfg, update, where)


def _check_not_shadowed(cfg: dict, key: str, value: Any) -> None:
    """A command-line key (each leaf of a mapping value) that the config file's stages set
    themselves, whose values win over the top level's: an error where every stage does (the
    override changes nothing), a warning where some do."""
    if key.startswith("stages.") or key.split(".")[0] not in STAGE_SECTIONS:
        return
    leaves = [f"{key}.{k}" for k in _leaves(value)] if isinstance(value, dict) and value else [key]
    for leaf in leaves:
        shadowed = [i for i, stage in enumerate(cfg["stages"]) if has_key(stage, leaf)]
        if not shadowed:
            continue
        where = f"stage(s) {shadowed} of this config set {leaf} themselves, and a stage's value wins"
        if len(shadowed) == len(cfg["stages"]):
            raise ConfigError(
                f"command line: {leaf} changes nothing: {where}; set it per stage: "
                f"stages.{shadowed[0]}.{leaf}=..."
            )
        warnings.warn(
            f"command line: {leaf} applies to the other stages only: {where}", UserWarning, stacklevel=3
        )


def _leaves(d: dict, prefix: str = "") -> list[str]:
    return [
        leaf
        for k, v in d.items()
        for leaf in (_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"])
    ]


def has_key(cfg: dict, dotted: str) -> bool:
    """Whether get(cfg, dotted) finds a value (a stage's sections hold only the keys it sets)."""
    try:
        get(cfg, dotted)
    except (KeyError, TypeError):  # a missing key, or a value where a mapping was looked for
        return False
    return True


def get(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def validate(cfg: dict) -> None:
    """Check types against the defaults and the fixed choices; raises ConfigError."""
    _check_types(cfg, DEFAULTS, "")
    _check_paths(cfg)
    for key, allowed in CHOICES.items():
        if get(cfg, key) not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {get(cfg, key)!r}")
    for key, low in MINIMUMS.items():
        if get(cfg, key) < low:
            raise ConfigError(f"{key} must be >= {low}, got {get(cfg, key)}")
    mb = cfg["train"]["max_batches"]  # None (every batch) has no type to check against
    if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or mb < 1):
        raise ConfigError(f"train.max_batches must be None (all) or an int >= 1, got {mb!r}")
    seed = cfg["seed"]
    if not 0 <= seed < 2**32:  # numpy's seed range
        raise ConfigError(f"seed must be in [0, 2**32), got {seed}")
    shots = cfg["data"]["shots"]
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise ConfigError(f"data.shots must be None (all) or an int >= 1, got {shots!r}")
    _check_digits("data.classes", cfg["data"]["classes"], may_be_none=True)
    for key in ("digits.pretrain_classes", "digits.transfer_classes"):
        _check_digits(key, get(cfg, key))
    for key in ("digits.seeds", "digits.methods"):
        if not get(cfg, key):
            raise ConfigError(f"{key} must not be empty")
    bad_seeds = [
        s
        for s in cfg["digits"]["seeds"]
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32
    ]
    if bad_seeds:
        raise ConfigError(f"digits.seeds must be ints in [0, 2**32), got {bad_seeds}")
    for key in ("std.lam", "data.random_erasing"):
        if not 0.0 <= get(cfg, key) <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {get(cfg, key)}")
    for i, stage in enumerate(cfg["stages"]):
        if not isinstance(stage, dict):
            raise ConfigError(f"stages[{i}] must be a mapping of sections, got {stage!r}")
        bad = set(stage) - set(STAGE_SECTIONS)
        if bad:
            raise ConfigError(
                f"stages[{i}]: unknown sections {sorted(bad)}; a stage may set {', '.join(STAGE_SECTIONS)}"
            )
        try:
            validate(stage_config(cfg, i))
        except ConfigError as e:
            where = f"stages[{i}]"
            raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def _check_digits(key: str, value: Any, may_be_none: bool = False) -> None:
    """Digit classes: a non-empty list of distinct digits 0-9 (None: all ten, where allowed)."""
    if value is None and may_be_none:
        return
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 9 for c in value)
        and len(set(value)) == len(value)
    )
    if not ok:
        what = "None (all ten) or " if may_be_none else ""
        raise ConfigError(f"{key} must be {what}a non-empty list of distinct digits 0-9, got {value!r}")


def stage_config(cfg: dict, index: int) -> dict:
    """The config of stage `index`: the top level with the stage's sections merged in, typed
    like the top level (a stage's `lr: 1e-3`, which YAML reads as a string, becomes a float)."""
    out = copy.deepcopy(cfg)
    out["stages"] = []
    if cfg["stages"]:
        merge(out, cfg["stages"][index], where=f"stages[{index}]")
        _check_types(out, DEFAULTS, "")
        _check_paths(out)
    return out


def num_stages(cfg: dict) -> int:
    return max(1, len(cfg["stages"]))


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 0.01, ...}: every leaf by its dotted key (FREE_FORM dicts are leaves)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and full not in FREE_FORM:
            out |= flatten(value, f"{full}.")
        else:
            out[full] = value
    return out


def may_change_on_resume(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in RESUME_MAY_CHANGE)


def resume_differences(saved: dict, requested: dict, keep: tuple[str, ...] = ()) -> list[tuple]:
    """(key, saved value, requested value) for every setting of `requested` that differs from
    `saved` (a checkpoint's config) and may not change on resume (RESUME_MAY_CHANGE, less the
    keys in `keep`). A key the saved config lacks (written before the key existed) counts as
    its default."""
    old, defaults = flatten(saved), flatten(DEFAULTS)
    return [
        (key, old.get(key, defaults.get(key)), value)
        for key, value in flatten(requested).items()
        if (key in keep or not may_change_on_resume(key)) and old.get(key, defaults.get(key)) != value
    ]


def _check_types(cfg: dict, ref: dict, prefix: str) -> None:
    for key, default in ref.items():
        full, value = f"{prefix}{key}", cfg[key]
        if isinstance(default, dict) and full not in FREE_FORM:
            _check_types(value, default, f"{full}.")
        elif default is None or value is None and full in _NULLABLE:
            continue
        elif isinstance(default, bool) or isinstance(value, bool):
            if not (isinstance(default, bool) and isinstance(value, bool)):
                raise ConfigError(f"{full} must be {type(default).__name__}, got {value!r}")
        elif isinstance(default, float):
            try:  # YAML reads "5e-4" (no dot) as a string
                cfg[key] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{full} must be a number, got {value!r}") from None
        elif not isinstance(value, type(default)):
            raise ConfigError(f"{full} must be {type(default).__name__}, got {value!r}")


_NULLABLE = {"model.cell"}


def _check_paths(cfg: dict) -> None:
    """A path is a string (YAML reads an unquoted 2024 in a file as a number); "~" expanded."""
    for key in PATHS:
        section, _, name = key.rpartition(".")
        node = get(cfg, section) if section else cfg
        value = node[name]
        if value is None and key != "out":
            continue
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a path, got {value!r} (quote it in a YAML file)")
        node[name] = os.path.expanduser(value)


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
