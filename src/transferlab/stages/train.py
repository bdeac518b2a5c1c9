"""train MODE: split CSVs -> models/MODE.pt, logs/MODE/ (per-epoch curves), metrics/train/MODE.json.

MODE is finetune (all weights from ImageNet), extract (frozen ImageNet backbone, new head) or
scratch (random init). The checkpoint kept is the epoch with the best validation accuracy.
"""
import argparse
import platform
import time
from pathlib import Path

import torch
import torchvision
from dvclive import Live
from scmrepo.exceptions import SCMError
from torch import nn

import transferlab
from transferlab.data import ImageDataset, build_transform, make_loader, read_split
from transferlab.engine import (Hardware, fit, make_optimizer, make_scheduler, peak_rss_mb, pick_hardware,
                                seed_everything)
from transferlab.errors import UserError
from transferlab.features import feature_loaders
from transferlab.files import read_json, save_checkpoint, write_json
from transferlab.models import MODES, BuiltModel, build_for_mode, describe, trainable_parameters
from transferlab.params import TrainParams, load_params, to_dict
from transferlab.stages import run_stage

SPLIT_DIR = Path("data/split")
CACHE_DIR = Path("data/cache")  # decoded images and embeddings, keyed by content: safe to delete


def main() -> None:
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=list(MODES))
    mode = parser.parse_args().mode
    params = load_params()
    train = params.for_mode(mode)
    seed_everything(params.seed, train.deterministic)
    hw = pick_hardware(train.device, train.precision, train.channels_last, train.workers)
    classes = read_json(SPLIT_DIR / "report.json")["classes"]
    built = build_for_mode(params.model, len(classes), mode)
    model, train_loader, val_loader = make_loaders(built, classes, train, hw, params.seed)
    optimizer = make_optimizer(trainable_parameters(model), train.optimizer, train.lr,
                               train.momentum, train.weight_decay)
    scheduler = make_scheduler(optimizer, train.scheduler, train.epochs, train.step_size, train.gamma)
    with open_live(f"logs/{mode}") as live:
        result = fit(model, train_loader, val_loader, optimizer, scheduler, train.epochs, hw,
                     train.aux_loss_weight, on_epoch=lambda record: log_epoch(live, record))
    model.load_state_dict(result.best_state)  # `model` may be the head alone: it lives in built.model
    features_cached = model is not built.model
    wall_seconds = time.perf_counter() - start
    save_checkpoint(f"models/{mode}.pt", {
        **describe(built), "format": 1, "mode": mode, "model": params.model, "classes": classes,
        "state_dict": {k: v.detach().cpu() for k, v in built.model.state_dict().items()},
        "best_epoch": result.best_epoch, "features_cached": features_cached,
        "params": {"seed": params.seed, "train": to_dict(train)}, "versions": versions()})
    write_json(f"metrics/train/{mode}.json",
               {**summary(result, built, model, hw, wall_seconds), "features_cached": features_cached})
    print(f"{mode}: best val accuracy {result.best_val.accuracy:.4f} at epoch {result.best_epoch}")


def make_loaders(built: BuiltModel, classes: list[str], train: TrainParams, hw: Hardware, seed: int):
    """(model to fit, train loader, val loader). A frozen backbone runs once, over cached
    embeddings, when train.cache_features allows; otherwise images are decoded once and augmented
    every epoch."""
    samples = {split: read_split(SPLIT_DIR / f"{split}.csv") for split in ("train", "val")}
    if train.cache_features and not backbone_trains(built):
        prepared = feature_loaders(built, samples["train"], samples["val"], classes, train.batch_size,
                                   train.feature_views, hw, seed, CACHE_DIR)
        if prepared is not None:
            return prepared
        print("feature cache: this model's output is not its head's output; running the backbone every epoch")
    pre = built.preprocess
    def loader(split: str, training: bool):
        dataset = ImageDataset(samples[split], classes, build_transform(pre, training), pre.resize_size,
                               cache_dir=CACHE_DIR)
        return make_loader(dataset, train.batch_size, training, seed, hw.workers, hw.pin_memory)
    return built.model, loader("train", True), loader("val", False)


def backbone_trains(built: BuiltModel) -> bool:
    heads = tuple(f"{name}." for name in built.head_names)
    return any(p.requires_grad for n, p in built.model.named_parameters() if not n.startswith(heads))


def open_live(directory: str) -> Live:
    """dvclive writing per-epoch TSVs for `dvc plots`; dvc.yaml declares them, so no dvc.yaml of its own."""
    try:
        return Live(directory, dvcyaml=False, save_dvc_exp=False)
    except SCMError as err:  # dvclive reads git's HEAD, which a repo without commits lacks
        raise UserError(f"git: {err}; dvclive logs against a commit: run `git add -A && git commit -m "
                        f"start` once, then run the pipeline again") from None


def log_epoch(live: Live, record: dict) -> None:
    for name in ("loss", "acc"):
        live.log_metric(f"train/{name}", record[f"train_{name}"])
        live.log_metric(f"val/{name}", record[f"val_{name}"])
    live.next_step()


def summary(result, built: BuiltModel, model: nn.Module, hw: Hardware, wall_seconds: float) -> dict:
    history = result.history
    train_seconds = sum(r["train_seconds"] for r in history)
    images = sum(r["train_images_per_s"] * r["train_seconds"] for r in history)
    return {
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val.accuracy,
        "best_val_loss": result.best_val.loss,
        "epochs": len(history),
        "wall_seconds": wall_seconds,
        "seconds_per_epoch": sum(r["train_seconds"] + r["val_seconds"] for r in history) / len(history),
        "train_images_per_s": images / train_seconds,
        "trainable_parameters": sum(p.numel() for p in trainable_parameters(model)),
        "parameters": sum(p.numel() for p in built.model.parameters()),
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_after_epoch_1": history[0]["peak_rss_mb"],
        **hw.describe(),
    }


def versions() -> dict:
    return {"transferlab": transferlab.__version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "python": platform.python_version()}


if __name__ == "__main__":
    run_stage("train", main)
