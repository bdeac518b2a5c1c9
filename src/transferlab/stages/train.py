"""train MODE: split CSVs -> models/MODE.pt, logs/MODE/ (per-epoch curves), metrics/train/MODE.json.

MODE is finetune (all weights from ImageNet), extract (frozen ImageNet backbone, new head) or
scratch (random init). The checkpoint kept is the epoch with the best validation accuracy.
"""
import argparse
import platform
import resource
import time
from pathlib import Path

import torch
import torchvision
from dvclive import Live

import transferlab
from transferlab.data import ImageDataset, build_transform, make_loader, read_split
from transferlab.engine import Hardware, fit, make_optimizer, make_scheduler, pick_hardware, seed_everything
from transferlab.files import read_json, save_checkpoint, write_json
from transferlab.models import MODES, BuiltModel, Preprocess, build_for_mode, describe, trainable_parameters
from transferlab.params import TrainParams, load_params, to_dict
from transferlab.stages import run_stage

SPLIT_DIR = Path("data/split")


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
    train_loader, val_loader = make_loaders(built.preprocess, classes, train, hw, params.seed)
    optimizer = make_optimizer(trainable_parameters(built.model), train.optimizer, train.lr,
                               train.momentum, train.weight_decay)
    scheduler = make_scheduler(optimizer, train.scheduler, train.epochs, train.step_size, train.gamma)
    with Live(f"logs/{mode}", dvcyaml=False, save_dvc_exp=False) as live:
        result = fit(built.model, train_loader, val_loader, optimizer, scheduler, train.epochs, hw,
                     train.aux_loss_weight, on_epoch=lambda record: log_epoch(live, record))
    wall_seconds = time.perf_counter() - start
    save_checkpoint(f"models/{mode}.pt", {
        **describe(built), "format": 1, "mode": mode, "model": params.model, "classes": classes,
        "state_dict": result.best_state, "best_epoch": result.best_epoch,
        "params": {"seed": params.seed, "train": to_dict(train)}, "versions": versions()})
    write_json(f"metrics/train/{mode}.json", summary(result, built, hw, wall_seconds))
    print(f"{mode}: best val accuracy {result.best_val.accuracy:.4f} at epoch {result.best_epoch}")


def make_loaders(pre: Preprocess, classes: list[str], train: TrainParams, hw: Hardware, seed: int):
    """Train and val loaders; images decoded once, shrunk to what the transforms need."""
    def dataset(split: str, training: bool) -> ImageDataset:
        return ImageDataset(read_split(SPLIT_DIR / f"{split}.csv"), classes,
                            build_transform(pre, training), min_side=pre.resize_size)
    return (make_loader(dataset("train", True), train.batch_size, True, seed, hw.workers, hw.pin_memory),
            make_loader(dataset("val", False), train.batch_size, False, seed, hw.workers, hw.pin_memory))


def log_epoch(live: Live, record: dict) -> None:
    for name in ("loss", "acc"):
        live.log_metric(f"train/{name}", record[f"train_{name}"])
        live.log_metric(f"val/{name}", record[f"val_{name}"])
    live.next_step()


def summary(result, built: BuiltModel, hw: Hardware, wall_seconds: float) -> dict:
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
        "trainable_parameters": sum(p.numel() for p in trainable_parameters(built.model)),
        "parameters": sum(p.numel() for p in built.model.parameters()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **hw.describe(),
    }


def versions() -> dict:
    return {"transferlab": transferlab.__version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "python": platform.python_version()}


if __name__ == "__main__":
    run_stage("train", main)
