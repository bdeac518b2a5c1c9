"""The training stage's pieces: loaders for a mode, its resume file, its metrics summary."""
from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

from torch import nn

from transferlab.data import ImageDataset, build_transform, make_loader, samples_digest
from transferlab.engine import FitResult, Hardware, peak_rss_mb
from transferlab.features import feature_loaders
from transferlab.images import read_split
from transferlab.models import BuiltModel, trainable_parameters
from transferlab.params import TrainParams


def resume_file(cache_dir: Path, mode: str, identity: list) -> Path:
    """Where the run identified by `identity` (model, seed, params, data) saves its state after
    each epoch. Files of the same mode left by runs with another identity are stale: removed."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"resume-{mode}-{key}.pt"
    for stale in cache_dir.glob(f"resume-{mode}-*.pt"):
        if stale != path:
            stale.unlink()
    return path


def make_loaders(built: BuiltModel, classes: list[str], train: TrainParams, hw: Hardware, seed: int,
                 split_dir: Path, cache_dir: Path):
    """(model to fit, train loader, val loader, data key). A frozen backbone runs once, over cached
    embeddings, when train.cache_features allows; otherwise images are decoded once and augmented
    every epoch. The data key identifies the images, for the resume file."""
    samples = {split: read_split(split_dir / f"{split}.csv") for split in ("train", "val")}
    data_key = samples_digest(samples["train"] + samples["val"])
    if train.cache_features and not backbone_trains(built):
        prepared = feature_loaders(built, samples["train"], samples["val"], classes, train.batch_size,
                                   train.feature_views, hw, seed, cache_dir)
        if prepared is not None:
            return (*prepared, data_key)
        print("feature cache: this model's output is not its head's output; running the backbone every epoch")
    pre = built.preprocess

    def loader(split: str, training: bool):
        dataset = ImageDataset(samples[split], classes, build_transform(pre, training), pre.resize_size,
                               cache_dir=cache_dir)
        return make_loader(dataset, train.batch_size, training, seed, hw.workers, hw.pin_memory)
    return built.model, loader("train", True), loader("val", False), data_key


def backbone_trains(built: BuiltModel) -> bool:
    """Whether any parameter outside the new head trains (false in extract mode)."""
    heads = tuple(f"{name}." for name in built.head_names)
    return any(p.requires_grad for n, p in built.model.named_parameters() if not n.startswith(heads))


def summary(result: FitResult, built: BuiltModel, model: nn.Module, hw: Hardware, wall_seconds: float) -> dict:
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
        "epochs": len(history),
        "wall_seconds": wall_seconds,
        "seconds_per_epoch": sum(r["train_seconds"] + r["val_seconds"] for r in history) / len(history),
        "train_images_per_s": images / train_seconds,
        "first_epoch_images_per_s": history[0]["train_images_per_s"],
        "steady_images_per_s": statistics.median(later) if later else None,
        "trainable_parameters": sum(p.numel() for p in trainable_parameters(model)),
        "parameters": sum(p.numel() for p in built.model.parameters()),
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_after_epoch_1": history[0]["peak_rss_mb"],
        "features_cached": model is not built.model,
        **hw.describe(),
    }


def headline(details: dict) -> dict:
    """The few numbers metrics/train/MODE.json keeps for `dvc metrics show` and `dvc exp show`."""
    return {"train_seconds": round(details["wall_seconds"], 1), "best_val_accuracy": details["best_val_accuracy"]}
