"""The training loop: stages (sequential fine-tuning), epochs with the PTL state rules, AMP,
DDP, evaluation, logs and atomic per-epoch checkpoints with exact resume.

State rules (DESIGN.md §1): every training epoch starts with ptl_fused.reset_states(model);
evaluation is plain model.eval(), where the cells carry nothing.
"""

from __future__ import annotations

import json
import os
import random
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from ptl_fused import reset_states
from ptl_fused.models import PTLModel

from .checkpoint import (
    CheckpointError,
    atomic_save,
    capture_rng,
    check_identity,
    check_resume,
    load_checkpoint,
    load_model_state,
    rank_rng,
    restore_rng,
    save_checkpoint,
)
from .config import ConfigError, dump, has_key, num_stages, stage_config
from .data import Task, build_task
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    gather_objects,
    init_distributed,
    sync_cell_states,
)
from .logs import EpochLog
from .losses import ClassificationLoss, DistillationLoss

ModelFactory = Callable[[dict, int], nn.Module]


def build_model_from_config(model_cfg: dict, num_classes: int) -> nn.Module:
    """ptl_fused.models.build_model with the config's model section."""
    from ptl_fused import set_recompute
    from ptl_fused.models import build_model

    try:
        model = build_model(
            model_cfg["arch"],
            num_classes,
            cell=model_cfg["cell"],
            head=model_cfg["head"],
            backend=model_cfg["backend"],
            pretrained=model_cfg["pretrained"],
            **model_cfg["kwargs"],
        )
    except TypeError as e:  # a model.kwargs key the network's builder does not take
        if not any(f"keyword argument '{k}'" in str(e) for k in model_cfg["kwargs"]):
            raise
        raise ConfigError(f"model.kwargs={model_cfg['kwargs']}: {e}") from e
    set_recompute(model, model_cfg.get("recompute", False))  # a checkpoint's config may predate the key
    return model


def build_for_checkpoint(build: ModelFactory, model_cfg: dict, num_classes: int) -> nn.Module:
    """The network whose every weight is then loaded from a checkpoint (a resumed run, an STD
    teacher): built without model.pretrained, whose file need not exist any more and would be
    overwritten anyway; the 'randomly initialised' warning would be wrong, so it is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*pretrained=None, so the backbone is randomly initialised"
        )
        return build({**model_cfg, "pretrained": None}, num_classes)


class FinishedRunWarning(UserWarning):
    """A resumed run had already finished: nothing was trained."""


class ReplacesRunWarning(UserWarning):
    """A new run (no resume) writes over the checkpoint of an earlier one in its folder."""


def identity(cfg: dict, num_classes: int) -> dict:
    """What a checkpoint must match to be loaded into this run's model."""
    m = cfg["model"]
    return {"arch": m["arch"], "cell": m["cell"], "head": m["head"], "num_classes": num_classes}


def stage_folder(cfg: dict, stage: int) -> Path:
    out = Path(cfg["out"])
    if num_stages(cfg) == 1:
        return out
    return out / f"stage{stage + 1}-{stage_config(cfg, stage)['data']['name']}"


def find_resume(cfg: dict, resume: str | None) -> Path | None:
    """--resume PATH, or 'auto': the last stage's last.pt under cfg['out'] (None: start afresh)."""
    if resume is None:
        return None
    if resume != "auto":
        return Path(resume)
    found = [stage_folder(cfg, s) / "last.pt" for s in range(num_stages(cfg))]
    found = [p for p in found if p.is_file()]
    return found[-1] if found else None


def check_backend(backend: str, device: torch.device) -> None:
    """model.backend can run the cells on the training device: found before anything is written,
    not at the first step."""
    if backend == "auto":
        return
    from ptl_fused.backends import resolve

    try:
        resolve(backend, device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(
            f"model.backend={backend} cannot run the cells on the training device ({device}): {e}"
        ) from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # seed + rank may pass numpy's range
    torch.manual_seed(seed)


def pick_device(cfg: dict, info: DistInfo) -> torch.device:
    want = cfg["device"]
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for, but torch sees no CUDA device")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def run(
    cfg: dict, resume: str | None = None, build: ModelFactory | None = None, verbose: bool = True
) -> dict:
    """Train every stage of `cfg` in order (one stage unless cfg['stages'] lists several).

    Returns {"out": folder, "stages": [{"dataset", "num_classes", "history", "final", ...}]};
    rank 0 also writes config.yaml and results.json into cfg['out']. build(model_cfg,
    num_classes) makes the network (default: ptl_fused.models.build_model).
    """
    build = build or build_model_from_config
    device_kind = (
        "cuda"
        if cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    info = init_distributed(device_kind)
    device = pick_device(cfg, info)
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    out = Path(cfg["out"])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file, not a folder")
    ckpt_path = find_resume(cfg, resume)
    if resume == "auto" and ckpt_path is None and info.is_main and verbose:
        print(f"--resume auto: no checkpoint under {out}, starting a new run", flush=True)
    ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    first = ckpt["stage"] if ckpt is not None else 0
    if ckpt is not None and not 0 <= first < num_stages(cfg):
        raise CheckpointError(
            f"checkpoint {ckpt_path} is from stage {first}; this config has {num_stages(cfg)}"
        )
    if ckpt is not None:  # before config.yaml: it must describe what runs
        check_resume(ckpt, ckpt_path, cfg)
        epochs = stage_config(cfg, first)["optim"]["epochs"]
        if first == num_stages(cfg) - 1 and ckpt["epoch"] >= epochs and not ckpt.get("pending_eval"):
            own = bool(cfg["stages"]) and has_key(cfg["stages"][first], "optim.epochs")
            if info.is_main:
                warnings.warn(
                    f"{ckpt_path}: the run is finished ({epochs} epochs"
                    + (f" of its last stage, {first + 1}" if first else "")
                    + "); nothing is trained. To train on, resume with a larger "
                    + (f"stages.{first}.optim.epochs" if own else "optim.epochs"),
                    FinishedRunWarning,
                    stacklevel=2,
                )
    # Every stage's data is read now, before anything is written or trained: a later stage's
    # missing or unusable dataset fails here, not after the earlier stages have trained for
    # hours. (The builders draw no random numbers: their seeds are the config's.)
    tasks = [build_task(stage_config(cfg, s), device) for s in range(first, num_stages(cfg))]
    if cfg["model"]["cell"] is not None:  # a plain network never runs a cell
        check_backend(cfg["model"]["backend"], device)
    if ckpt is None and resume is None and info.is_main:
        earlier = find_resume(cfg, "auto")
        if earlier is not None:
            warnings.warn(
                f"{earlier}: a checkpoint of an earlier run in out={out}; this new run replaces it "
                "(pass --resume auto to continue that run instead)",
                ReplacesRunWarning,
                stacklevel=2,
            )

    def write_config() -> None:
        # Once the first stage's model, checkpoint, teacher and data loader are in place: a run
        # refused there leaves the folder's config.yaml describing what is in it.
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(dump(cfg))

    results = list(ckpt.get("previous_stages", [])) if ckpt is not None else []
    model = None
    for s in range(first, num_stages(cfg)):
        scfg = stage_config(cfg, s)
        seed_everything(scfg["seed"] + info.rank)  # DDP broadcasts rank 0's initial weights
        task = tasks.pop(0)  # released once its stage is done
        resume_here = (ckpt, ckpt_path) if s == first and ckpt is not None else None
        if model is None and resume_here is not None:  # every weight comes from the checkpoint
            model = build_for_checkpoint(build, scfg["model"], task.num_classes)
        elif model is None:
            model = build(scfg["model"], task.num_classes)
        else:  # sequential fine-tuning: a new classifier, the backbone and cells are kept
            model.reset_classifier(task.num_classes)
        model.to(device)
        result = train_stage(
            model,
            task,
            scfg,
            s,
            stage_folder(cfg, s),
            device,
            info,
            resume_here,
            build,
            results,
            verbose,
            cfg,
            on_ready=write_config if s == first else None,
        )
        results.append(result)
    if info.is_main:
        (out / "results.json").write_text(json.dumps({"config": cfg, "stages": results}, indent=2))
    return {"out": str(out), "stages": results}


def make_criterion(
    cfg: dict, task: Task, model: nn.Module, device: torch.device, build: ModelFactory
) -> nn.Module:
    base = task.criterion or ClassificationLoss(cfg["loss"]["label_smoothing"])
    teacher_path = cfg["std"]["teacher"]
    if teacher_path is None:
        return base
    teacher = load_teacher(teacher_path, build, device)
    t_dim, s_dim = getattr(teacher, "feature_dim", None), getattr(model, "feature_dim", None)
    if t_dim is not None and s_dim is not None and t_dim != s_dim:
        raise ValueError(
            f"STD: teacher {teacher_path} has feature_dim {t_dim}, the student {s_dim}; they must match"
        )
    return DistillationLoss(base, teacher, cfg["std"]["lam"], name=f"the teacher {teacher_path}")


def load_teacher(path: str | Path, build: ModelFactory, device: torch.device) -> nn.Module:
    """A trained network from an engine checkpoint, frozen and in eval mode (no state carry)."""
    ckpt = load_checkpoint(path)
    teacher = build_for_checkpoint(build, ckpt["config"]["model"], ckpt["meta"]["num_classes"])
    load_model_state(teacher, ckpt["model"], path)
    return teacher.to(device).eval().requires_grad_(False)


def make_train_loader(task: Task, cfg: dict, info: DistInfo, device: torch.device):
    """The order of the batches is a function of (seed, epoch) only (sampler.set_epoch), so a
    resumed run sees the same batches as an uninterrupted one."""
    d = cfg["data"]
    batch_size = d["batch_size"]
    if task.pk_sampling:  # P identities x K images per batch, as the triplet loss needs
        from ptl_fused.reid import PKSampler

        k = d["num_instances"]
        p = max(2, batch_size // k)
        num_ids = len(set(task.train_labels))
        if num_ids < p:
            how = f"data.batch_size // data.num_instances = {batch_size} // {k}"
            how = f"{how} = {p}" if batch_size // k >= 2 else f"max(2, {how}) = 2"
            raise ValueError(
                f"loss.triplet: each batch holds p identities x k = data.num_instances images, with p = "
                f"{how}, but the {task.name} training set has only {num_ids} identities; lower "
                "data.batch_size or raise data.num_instances"
            )
        if p * k != batch_size and info.is_main:
            warnings.warn(
                f"loss.triplet: batches of p identities x k = {p} x {k} = {p * k} images, not "
                f"data.batch_size = {batch_size} (p = max(2, batch_size // num_instances)); set "
                "data.batch_size to a multiple of data.num_instances to choose it",
                UserWarning,
                stacklevel=2,
            )
        batch_size = p * k
        sampler = PKSampler(
            task.train_labels, p=p, k=k, seed=cfg["seed"], num_replicas=info.world, rank=info.rank
        )
    else:
        sampler = DistributedSampler(
            task.train_set, num_replicas=info.world, rank=info.rank, shuffle=True, seed=cfg["seed"]
        )
    # A last batch of one image breaks BatchNorm in training: drop it, keep the others.
    drop_last = len(sampler) % batch_size == 1
    loader = DataLoader(
        task.train_set,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=d["num_workers"],
        pin_memory=device.type == "cuda",
    )
    return loader, sampler


def train_stage(
    model: nn.Module,
    task: Task,
    cfg: dict,
    stage: int,
    folder: Path,
    device: torch.device,
    info: DistInfo,
    resume: tuple[dict, Path] | None,
    build: ModelFactory,
    previous: list[dict],
    verbose: bool = True,
    run_cfg: dict | None = None,
    on_ready: Callable[[], None] | None = None,
) -> dict:
    """Train one dataset for cfg['optim']['epochs'] epochs; returns its history and results.
    cfg: the stage's config; run_cfg: the whole run's (saved in the checkpoints); on_ready:
    called once everything is set up, before the first epoch."""
    o, ident = cfg["optim"], identity(cfg, task.num_classes)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"], nesterov=o["nesterov"]
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=o["step_size"], gamma=o["gamma"])
    amp_dtype = None
    if device.type == "cuda" and cfg["amp"] != "off":
        amp_dtype = torch.bfloat16 if cfg["amp"] == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    autocast = partial(torch.autocast, device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    criterion = make_criterion(cfg, task, model, device, build)
    history: list[dict] = []
    start = 0
    if resume is not None:
        ckpt, path = resume
        check_identity(ckpt, path, ident)
        load_model_state(model, ckpt["model"], path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"] or not scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        else:  # saved by a run without fp16 autocast (on the CPU): a GradScaler starts afresh
            warnings.warn(
                f"{path}: the checkpoint was written without fp16 loss scaling (another device or "
                "amp setting); the resumed run starts a new GradScaler",
                UserWarning,
                stacklevel=2,
            )
        history, start = list(ckpt["history"]), ckpt["epoch"]
    net = model
    if info.joined:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    loader, sampler = make_train_loader(task, cfg, info, device)
    if len(loader) == 0:
        raise ValueError(
            f"{task.name}: the training set ({len(task.train_labels)} images) gives no batch of "
            f"{loader.batch_size} images per process (data.batch_size; a last batch of one image is "
            "dropped: BatchNorm cannot train on it); lower data.batch_size or add images"
        )
    if on_ready is not None:
        on_ready()
    log = EpochLog(folder, cfg["train"]["tensorboard"]) if info.is_main else None
    # The other ranks' RNG states at the last epoch end, for rank 0's checkpoints (DDP).
    others: list[dict] = []
    if resume is not None:
        saved = resume[0]
        saved_world = len(saved["rng"]) if isinstance(saved["rng"], list) else 1
        if saved_world != info.world and info.is_main:
            warnings.warn(
                f"{resume[1]}: written by {saved_world} process(es), resumed by {info.world}: the run "
                "goes on, not bit-identically (the global batch is data.batch_size per rank, and the "
                "ranks start from rank 0's random state)",
                UserWarning,
                stacklevel=2,
            )
        others = [rank_rng(saved, r, info.world) for r in range(1, info.world)]
        # Last: building the loader etc. must not disturb it.
        restore_rng(rank_rng(saved, info.rank, info.world))
    epochs, every = o["epochs"], cfg["eval"]["every"]
    sync = cfg["ddp"]["state_sync"] == "mean" and info.joined

    def evaluated_at(epoch: int) -> bool:  # 0-based epoch
        return (every > 0 and (epoch + 1) % every == 0) or epoch + 1 == epochs

    def save(epoch_done: int, pending_eval: bool) -> None:
        save_checkpoint(
            folder / "last.pt",
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            stage=stage,
            epoch=epoch_done,
            meta=ident,
            config=cfg,
            history=history,
            previous_stages=previous,
            run_config=run_cfg if run_cfg is not None else cfg,
            pending_eval=pending_eval,
            other_ranks_rng=others,
        )

    def evaluate(row: dict) -> None:
        """The test metrics into `row` (the epoch's seconds grow by the evaluation's), then the
        checkpoint again, now complete."""
        t0 = time.perf_counter()
        model.eval()  # the cells carry nothing in eval mode
        metrics = task.evaluate(model, device, autocast)
        model.train()
        seconds = row.pop("seconds")
        row |= {f"test_{k}": v for k, v in metrics.items()}
        row["seconds"] = round(seconds + time.perf_counter() - t0, 3)
        save(row["epoch"], pending_eval=False)

    def report(row: dict) -> None:
        log.write(history)
        if verbose:
            tqdm.write(f"[{task.name}] " + "  ".join(_fmt(k, v) for k, v in row.items()))

    def share(row: dict) -> None:
        """Rank 0's row (its evaluation: only rank 0 evaluates) into every rank's, so that every
        rank returns the same history and final metrics. A collective: also the epoch's barrier."""
        row |= gather_objects(row, info)[0]

    # The checkpoint of an epoch is written before its evaluation (pending_eval), so an
    # evaluation that fails loses no training: the resumed run evaluates that epoch first, from
    # the RNG state the evaluation started from, as the uninterrupted run did.
    if resume is not None and resume[0].get("pending_eval") and start > 0 and evaluated_at(start - 1):
        if info.is_main:
            evaluate(history[-1])
            report(history[-1])
        share(history[-1])
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        row |= train_epoch(
            net,
            model,
            loader,
            sampler,
            criterion,
            optimizer,
            scaler,
            autocast,
            device,
            info,
            cfg,
            epoch,
            sync,
        )
        scheduler.step()
        row["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(row)
        others = gather_objects(capture_rng(), info)[1:]  # every rank, before rank 0 saves
        if info.is_main:
            save(epoch + 1, pending_eval=evaluated_at(epoch))
            if evaluated_at(epoch):
                evaluate(row)
            report(row)
        share(row)
    result = {
        "stage": stage,
        "dataset": task.name,
        "num_classes": task.num_classes,
        "folder": str(folder),
        "history": history,
        "final": {k: v for k, v in (history[-1] if history else {}).items() if k.startswith("test_")},
        "main_metric": f"test_{task.main_metric}",
        "info": task.info,
    }
    if info.is_main:
        log.close(history, f"{task.name}: {ident['arch']} cell={ident['cell']}")
        # The trained weights alone, without optimizer or teacher (an STD student is a plain model).
        atomic_save(model.state_dict(), folder / "weights.pt")
        if isinstance(model, PTLModel) and model.body.cells is None:
            # A plain network (baseline, STD student): its backbone under torchvision's names
            # (not for a user's stages that are no one backbone's modules: they have no names).
            try:
                backbone = model.body.backbone_state_dict()
            except ValueError:
                pass
            else:
                atomic_save(backbone, folder / "backbone.pt")
    barrier(info)  # every rank returns once the stage's files exist (the digits job reads weights.pt)
    return result


def train_epoch(
    net, model, loader, sampler, criterion, optimizer, scaler, autocast, device, info, cfg, epoch, sync
) -> dict:
    """One pass over the training data; returns the mean loss and accuracy (%) over all ranks."""
    reset_states(model)  # state rule: each training epoch starts from the initial state
    model.train()
    sampler.set_epoch(epoch)
    max_batches = cfg["train"]["max_batches"]
    total = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, images, fp16 steps skipped
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{cfg['optim']['epochs']}",
        disable=not (cfg["train"]["progress"] and info.is_main),
        leave=False,
        total=min(len(loader), max_batches) if max_batches else len(loader),
    )
    scale = scaler.get_scale() if scaler.is_enabled() else 0.0
    for i, batch in enumerate(bar):
        if max_batches is not None and i >= max_batches:
            break
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast():
            out = net(x)
            loss = criterion(out, y, x)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()  # lowers the scale where the step was skipped (inf/NaN gradients)
        previous, scale = scale, scaler.get_scale() if scaler.is_enabled() else 0.0
        skipped = scale < previous
        if sync:
            sync_cell_states(model, info.world)
        correct = (out.logits[0].argmax(1) == y).sum().item()
        total += torch.tensor([loss.item() * len(y), correct, len(y), skipped], dtype=torch.float64)
        bar.set_postfix(loss=f"{total[0] / total[2]:.4f}", acc=f"{100 * total[1] / total[2]:.1f}%")
    if info.joined:
        total = all_reduce_sum(total, device)
    n = max(total[2].item(), 1.0)
    row = {"train_loss": total[0].item() / n, "train_accuracy": 100.0 * total[1].item() / n}
    if scaler.is_enabled():  # a run whose fp16 steps keep overflowing says so
        row["amp_skipped_steps"] = int(total[3].item() / info.world)
    return row


def _fmt(k: str, v) -> str:
    return f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
