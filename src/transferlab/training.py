"""The training stage's pieces: the hardware decision and loaders for a mode, its resume file, its
metrics summary."""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from transferlab.data import ImageSource, open_split_store
from transferlab.distributed import SINGLE, World, batchnorm_statistics
from transferlab.engine import (
    FitResult,
    fit,
    fused_optimizer,
    load_resume,
    loader_generators,
    make_optimizer,
    make_scheduler,
    peak_device_memory_mb,
    peak_rss_mb,
    seed_everything,
    set_train_mode,
    split_outputs,
)
from transferlab.errors import UserError, warn
from transferlab.features import feature_loaders
from transferlab.hardware import DTYPES, Hardware, Workload, decide, pick_hardware, warm_up
from transferlab.images import Sample, samples_digest
from transferlab.lr_finder import cached_range_test, range_test
from transferlab.models import (
    BuiltModel,
    HeadSpec,
    backbone_summary,
    build_for_mode,
    freeze_all_but,
    parameter_groups,
    trainable_parameters,
)
from transferlab.params import TrainParams, to_dict
from transferlab.recipes import BatchMixer, criterion


def train_hardware(train: TrainParams) -> Hardware:
    """The device and settings `train` asks for (its `auto` ones measured later, by `prepare`)."""
    return pick_hardware(train.device, train.precision, train.channels_last, train.workers, train.keep_freed_memory,
                         train.tensor_batches)


def optimizer_and_scheduler(model: nn.Module, built: BuiltModel, train: TrainParams, steps_per_epoch: int,
                            hw: Hardware):
    """The optimizer over `model`'s trainable weights (the backbone's at its own lr) and its schedule."""
    optimizer = training_optimizer(model, built, train, hw)
    scheduler = make_scheduler(optimizer, train.scheduler, train.epochs, train.step_size, train.gamma,
                               train.warmup_epochs, steps_per_epoch)
    return optimizer, scheduler


def training_optimizer(model: nn.Module, built: BuiltModel, train: TrainParams, hw: Hardware):
    """The optimizer over `model`'s trainable weights, the backbone's at its own lr, unscheduled."""
    return make_optimizer(parameter_groups(model, built, train.lr, train.backbone_lr_factor), train.optimizer,
                          train.lr, train.momentum, train.weight_decay, fused_optimizer(hw.device))


def batch_mixer(train: TrainParams, num_classes: int) -> BatchMixer | None:
    """Mixup and/or cutmix as `train` asks, None with both off; a UserError for data of one class."""
    if not (train.mixup_alpha > 0 or train.cutmix_alpha > 0):
        return None
    try:
        return BatchMixer(num_classes, train.mixup_alpha, train.cutmix_alpha)
    except ValueError as err:
        raise UserError(f"train.mixup_alpha, train.cutmix_alpha: {err}; set both to 0 for this data") from None


def head_spec(train: TrainParams) -> HeadSpec:
    """The new head train.head asks for: linear, or an MLP of train.head_hidden with dropout."""
    mlp = train.head == "mlp"
    return HeadSpec(train.head_hidden if mlp else (), train.head_dropout if mlp else 0.0)


def resume_file(resume_dir: Path, mode: str, identity: list) -> Path:
    """Where the run identified by `identity` (model, seed, params, data) saves its state after
    each epoch. Files of the same mode left by runs with another identity are stale: removed."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = resume_dir / f"resume-{mode}-{key}.pt"
    for stale in resume_dir.glob(f"resume-{mode}-*.pt"):
        if stale != path:
            stale.unlink()
    return path


@dataclass(frozen=True)
class Subset:
    """A learning-curve point's training images: `rows` index samples["train"], and an image listed
    k times is taken k times an epoch. A frozen backbone's embeddings are those of all of train,
    cropped with `embed_seed`, so that every point of a curve shares one embedding pass."""
    rows: list[int]
    embed_seed: int


def prepare(built: BuiltModel, classes: list[str], samples: dict[str, list[Sample]], train: TrainParams,
            hw: Hardware, seed: int, source: ImageSource, cache_dir: Path, world: World = SINGLE,
            subset: Subset | None = None):
    """(hardware, model to fit, train loader, val loader) for one mode, on `subset` of train if given.

    The `auto` hardware settings are measured on this model and these batch shapes (by rank 0,
    for all processes). A frozen backbone runs once, over cached embeddings, when
    train.cache_features allows; otherwise the decoded images are augmented every epoch.
    """
    pre, views = built.preprocess, train.feature_views
    head_only = train.cache_features and not backbone_trains(built)
    trained_on = trained_samples(samples, subset)
    # The batches every process meets (Workload gives each rank its shares, as World.shard cuts
    # them). A curve's points decide on the whole training set's shapes, whatever their subset's
    # size: one decision, the same settings at every size (a smaller subset's tail batch is not
    # warmed up). The embedding pass runs hw.inference_images per pass on each process (padded:
    # one shape).
    n_train, n_val = len(samples["train"]), len(samples["val"])
    infer_batch = hw.inference_images * world.size if head_only and hw.inference_images else train.batch_size
    work = Workload(built.model, pre.crop_size, train_images=0 if head_only else n_train,
                    infer_images=n_val + (views * n_train if head_only else 0), train_batch=train.batch_size,
                    infer_batch=infer_batch, processes=world.size)

    def input_seconds(tensor: bool) -> float:
        return time_inputs(source, samples["train"], classes, pre, train.batch_size, hw, tensor, train.augment)
    # A policy's per-image cost differs between the input paths, so it is part of the decision
    # (only when set: decisions cached without one stay valid).
    key = [built.arch, sum(p.numel() for p in trainable_parameters(built.model)), world.size]
    key += [train.augment] if train.augment != "none" else []
    decided = world.broadcast(decide(hw, work, cache_dir, key, input_seconds) if world.main else None)
    hw = replace(decided, device=hw.device)  # each process keeps its own GPU
    if not (world.main and hw.decision.get("measured_now")):
        warm_up(hw, work, world.rank)  # this process's own shares, at the chosen settings; nothing on a CPU

    def image_batches(split_samples: list[Sample], training: bool, shuffle: bool | None = None, draws: int = seed):
        return source.batches(split_samples, classes, pre, train.batch_size, training, draws, hw, world=world,
                              shuffle=shuffle, augment=train.augment)
    if head_only:  # the embedding passes keep the images' order: row i of every view is image i
        if train.mixup_alpha > 0 or train.cutmix_alpha > 0:  # what params could not tell: this model freezes all
            raise UserError("mixup_alpha, cutmix_alpha: mixup and cutmix mix images, and this mode's head trains on "
                            "cached embeddings of them (its whole backbone is frozen): set the mode's "
                            "cache_features: false (the backbone then runs every epoch), or both alphas to 0")
        embed_seed = seed if subset is None else subset.embed_seed
        # The cached views are augmented as training images are (train.augment): each view one draw.
        prepared = feature_loaders(built, samples["train"], samples["val"], train.batch_size, views, hw, embed_seed,
                                   cache_dir, partial(image_batches, shuffle=False, draws=embed_seed), world,
                                   train_rows=None if subset is None else subset.rows, order_seed=seed,
                                   augment=train.augment)
        if prepared is not None:
            return (hw, *prepared)
        warn("feature cache: this model's output is not its head's output; running the backbone every epoch")
    return hw, built.model, image_batches(trained_on, True), image_batches(samples["val"], False)


def train_head_first(built: BuiltModel, classes: list[str], samples: dict[str, list[Sample]], train: TrainParams,
                     hw: Hardware, seed: int, source: ImageSource, cache_dir: Path,
                     world: World = SINGLE, subset: Subset | None = None) -> list[dict]:
    """The first part of fastai's fine_tune: the new head alone, on the frozen backbone (over cached
    embeddings), for train.head_epochs epochs at train.lr. Returns their history; the head's
    weights stay in `built.model`, and what was trainable before is trainable again."""
    if world.main:
        print(f"the head alone first, on the frozen backbone: {train.head_epochs} epochs", flush=True)
    trainable = {p: p.requires_grad for p in built.model.parameters()}
    freeze_all_but(built.model, built.head_names)
    try:
        # On cached embeddings: no mixing of images; and no average of the weights, whose head phase
        # hands on its last weights, not a best epoch's.
        head_train = replace(train, epochs=train.head_epochs, scheduler="none", warmup_epochs=0, cache_features=True,
                             mixup_alpha=0.0, cutmix_alpha=0.0, ema_decay=0.0)
        head_hw, model, train_loader, val_loader = prepare(built, classes, samples, head_train, hw, seed, source,
                                                           cache_dir, world, subset)
        optimizer = make_optimizer(trainable_parameters(model), train.optimizer, train.lr, train.momentum,
                                   train.weight_decay, fused_optimizer(head_hw.device))
        result = fit(model, train_loader, val_loader, optimizer, None, train.head_epochs, head_hw,
                     train.aux_loss_weight, world=world, loss=criterion(train.label_smoothing))
    finally:
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)
    if world.main:
        print(f"then with the backbone unfrozen: {train.epochs} epochs", flush=True)
    return [{**record, "phase": "head"} for record in result.history]


@dataclass
class Trained:
    """One mode trained by `train_mode`; on rank 0 its best epoch's weights are loaded."""
    built: BuiltModel
    model: nn.Module         # what was fitted: built.model, or its head alone over cached embeddings
    source: ImageSource
    hw: Hardware
    result: FitResult
    steps_per_epoch: int
    resume_path: Path | None  # the caller removes it once its outputs are written
    lr_find: dict | None = None  # the range test's sweep and pick, where train.lr is find


def train_mode(model_name: str, mode: str, train: TrainParams, seed: int, classes: list[str],
               samples: dict[str, list[Sample]], split_dir: Path, cache_dir: Path, resume: tuple[Path, str, list],
               world: World = SINGLE, subset: Subset | None = None, weights: str = "default") -> Trained:
    """Train `mode` as the train stage and a learning curve's point both do: seed, build, the head
    first if asked, fit (after the last finished epoch of an interrupted run with the same
    identity, `resume` being (folder, name, identity), at the hardware settings that run decided),
    then the best epoch's weights."""
    seed_everything(seed, train.deterministic)
    mixer = batch_mixer(train, len(classes))  # before any work: it refuses data of one class
    hw = train_hardware(train)
    if hw.device.type == "cuda":
        hw = replace(hw, device=torch.device("cuda", world.local_rank))
    built = build_for_mode(model_name, len(classes), mode, head_spec(train), train.freeze, weights)
    source = ImageSource(open_split_store(split_dir, built.preprocess.resize_size, cache_dir,
                                          built.preprocess.interpolation))
    # A state saved on another kind of device (its generators, fp16's scaler) fits no other: the
    # device is part of the run's identity.
    folder, name, identity = resume
    resume_path = resume_file(folder, name, [*identity, hw.device.type]) if train.resume and world.main else None
    saved = load_resume(resume_path, world)
    head_history = []
    if train.head_epochs and backbone_trains(built):  # freeze, train the head, then unfreeze
        head_history = train_head_first(built, classes, samples, train, hw, seed, source, cache_dir, world, subset)
    hw = hw if saved is None else as_saved(hw, saved["hardware"])
    hw, model, train_loader, val_loader = prepare(built, classes, samples, train, hw, seed, source, cache_dir, world,
                                                  subset)
    found = None
    if train.lr == "find":  # Smith's range test on this mode's own start, before training
        # The sweep's loss is plain cross-entropy, unmixed (find_lr): those keys do not change it.
        swept = replace(train, lr=1.0, epochs=1, patience=0, min_epochs=0, label_smoothing=0.0, mixup_alpha=0.0,
                        cutmix_alpha=0.0, ema_decay=0.0)
        identity = [built.arch, weights, mode, to_dict(swept), seed,
                    samples_digest(trained_samples(samples, subset)), world.size]
        # Rank 0 sweeps for all (on its share of the batches): every process trains at one lr.
        found = world.broadcast(find_lr(model, built, train, hw, train_loader, cache_dir, identity)
                                if world.main else None)
        train = replace(train, lr=found["suggestion"])
        if world.main:
            print(f"lr range test: lr {train.lr:.3g} ({found['rule']}{'; cached' if found['cached'] else ''})",
                  flush=True)
    optimizer, scheduler = optimizer_and_scheduler(model, built, train, len(train_loader), hw)
    result = fit(model, train_loader, val_loader, optimizer, scheduler, train.epochs, hw, train.aux_loss_weight,
                 resume_path=resume_path, world=world, saved=saved, patience=train.patience,
                 min_epochs=train.min_epochs,
                 loss=criterion(train.label_smoothing), mixer=mixer, ema_decay=train.ema_decay)
    result.after(head_history)
    if world.main:
        model.load_state_dict(result.best_state)  # `model` may be the head alone: it lives in built.model
    return Trained(built, model, source, hw, result, len(train_loader), resume_path, found)


def trained_samples(samples: dict[str, list[Sample]], subset: Subset | None) -> list[Sample]:
    """The images an epoch trains on: all of train, or a curve point's rows of it (repeats kept)."""
    return samples["train"] if subset is None else [samples["train"][i] for i in subset.rows]


def find_lr(model: nn.Module, built: BuiltModel, train: TrainParams, hw: Hardware, loader, cache_dir: Path,
            identity: list) -> dict:
    """The lr range test (lr_finder.py) on `model` as training will start it, on the training
    loader's batches; the loader's generators are put back afterwards, so training draws what it
    would have drawn. Cached under `identity`.

    Its loss is plain cross-entropy on unmixed batches, whatever train's label smoothing and
    mixing: they raise the loss's floor, not the lr at which it falls fastest, and the pick's
    rule was made for the plain loss."""
    def run() -> dict:
        hw.prepare(model)
        set_train_mode(model)
        generators = loader_generators(loader)
        states = [g.get_state() for g in generators]
        criterion = nn.CrossEntropyLoss()

        def loss_of(net: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            with hw.autocast():
                logits, _ = split_outputs(net(hw.to_device(images)))
                return criterion(logits.float(), targets.to(hw.device))
        try:
            # The optimizer alone: a schedule (onecycle, a warm-up) would rescale the lrs swept.
            return range_test(model, lambda: loader,
                              lambda lr: training_optimizer(model, built, replace(train, lr=lr), hw), loss_of)
        finally:
            for generator, state in zip(generators, states):
                generator.set_state(state)
    return cached_range_test(cache_dir, identity, run)


def as_saved(hw: Hardware, settings: dict) -> Hardware:
    """`hw` at the precision, layout, input path and loader workers an interrupted run decided
    (engine's hardware_settings), not decided again: a new measurement (another GPU, a pruned
    cache, a new torch) may choose otherwise, and the saved state fits only these (fp16's
    GradScaler state, the draws of the input path's generators and workers)."""
    # Not measured now: every process warms up at these settings before the loop.
    decision = ({**settings["decision"], "measured_now": False, "kept_from_resume_state": True}
                if settings["decision"] else {})
    return replace(hw, amp_dtype=DTYPES[settings["precision"]], channels_last=settings["channels_last"],
                   tensor_batches=settings["tensor_batches"], workers=settings["workers"], decision=decision)


def time_inputs(source: ImageSource, samples: list[Sample], classes: list[str], pre, batch_size: int,
                hw: Hardware, tensor: bool, augment: str = "none", batches: int = 4) -> float:
    """Seconds per image to produce augmented training batches one way or the other, with the
    run's own `augment` policy."""
    loader = iter(source.batches(samples, classes, pre, batch_size, True, 0, hw, tensor_batches=tensor,
                                 augment=augment))
    next(loader)  # warm-up: first reads of the store, first calls
    start, images = time.perf_counter(), 0
    for _, (batch, _) in zip(range(batches), loader):
        images += len(batch)
    return (time.perf_counter() - start) / max(images, 1)


def backbone_trains(built: BuiltModel) -> bool:
    """Whether any parameter outside the new head trains (false in extract mode)."""
    heads = tuple(f"{name}." for name in built.head_names)
    return any(p.requires_grad for n, p in built.model.named_parameters() if not n.startswith(heads))


def summary(result: FitResult, built: BuiltModel, model: nn.Module, hw: Hardware, wall_seconds: float,
            steps_per_epoch: int, world_size: int = 1) -> dict:
    """What reports/train/MODE.json holds: best epoch, speed, memory, hardware.

    The first epoch is reported apart from the rest (`steady_images_per_s`): it pays one-off
    costs (allocator warm-up, first calls of each shape) that later epochs do not.
    """
    history = result.history
    train_seconds = sum(r["train_seconds"] for r in history)
    images = sum(r["train_images_per_s"] * r["train_seconds"] for r in history)
    later = [r["train_images_per_s"] for r in history[1:]]
    return {
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val.accuracy,
        "best_val_loss": result.best_val.loss,
        "epochs": len(history),  # those it trained: the cap, or fewer where patience stopped it
        "stopped_early": result.stopped_early,
        "wall_seconds": wall_seconds,
        "seconds_per_epoch": sum(r["train_seconds"] + r["val_seconds"] for r in history) / len(history),
        "train_images_per_s": images / train_seconds,
        "first_epoch_images_per_s": history[0]["train_images_per_s"],
        "steady_images_per_s": statistics.median(later) if later else None,
        "trainable_parameters": sum(p.numel() for p in trainable_parameters(model)),
        "parameters": sum(p.numel() for p in built.model.parameters()),
        "backbone": backbone_summary(built),  # the leaderboard's backbone columns
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_after_epoch_1": history[0]["peak_rss_mb"],
        "peak_gpu_memory_mb": peak_device_memory_mb(hw.device),  # torch's allocator, on this process's GPU
        "batchnorm_statistics": batchnorm_statistics(model, hw.device, world_size),
        "features_cached": model is not built.model,
        "world_size": world_size,
        "optimizer_steps_per_epoch": steps_per_epoch,  # the same whatever world_size: batch_size is global
        **hw.describe(),
    }


def headline(details: dict) -> dict:
    """The few numbers metrics/train/MODE.json keeps for `dvc metrics show` and `dvc exp show`."""
    return {"train_seconds": round(details["wall_seconds"], 1), "best_val_accuracy": details["best_val_accuracy"],
            "world_size": details["world_size"]}
