"""The PyTorch tutorial's recipe ("Finetuning Torchvision Models"), as the benchmark's baseline.

ImageFolder over the original files (every JPEG decoded again each epoch), fp32, batch 8, SGD
lr 1e-3 momentum 0.9, 4 DataLoader workers, and in feature-extraction mode the frozen backbone
runs forward over every image in every epoch. Same split files, model, head and seed as
transferlab, so only the recipe differs. Prints one JSON line: wall time, images/s, test accuracy.
"""
import argparse
import copy
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, transforms

from transferlab.engine import seed_everything, split_outputs
from transferlab.images import read_split
from transferlab.models import build_for_mode, trainable_parameters


def image_folder(samples, root: Path, transform) -> datasets.ImageFolder:
    """An ImageFolder over links to the original files of one split."""
    for i, sample in enumerate(samples):
        link = root / sample.label / f"{i:05d}{Path(sample.path).suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(sample.path).resolve())
    return datasets.ImageFolder(str(root), transform)


def tutorial_transforms(size: int, mean, std):
    train = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor(), transforms.Normalize(mean, std)])
    val = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                              transforms.ToTensor(), transforms.Normalize(mean, std)])
    return train, val


def run_epoch(model, loader, optimizer, device: torch.device) -> tuple[float, int, float]:
    """The tutorial's inner loop for one phase: (accuracy, images, seconds)."""
    training = optimizer is not None
    model.train(training)
    criterion, correct, seen, start = nn.CrossEntropyLoss(), 0, 0, time.perf_counter()
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        with torch.set_grad_enabled(training):
            outputs = model(inputs)
            logits, aux = split_outputs(outputs)
            loss = criterion(logits, labels) + sum(0.4 * criterion(a, labels) for a in aux)
            if training:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return correct / seen, seen, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--mode", required=True, choices=["finetune", "extract", "scratch"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--split-dir", default="data/split")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    start = time.perf_counter()
    device = torch.device(args.device)
    seed_everything(args.seed)
    split = Path(args.split_dir)
    classes = json.loads((split / "report.json").read_text())["classes"]
    built = build_for_mode(args.model, len(classes), args.mode, freeze="all" if args.mode == "extract" else "none")
    model, pre = built.model.to(device), built.preprocess
    train_tf, val_tf = tutorial_transforms(pre.crop_size, pre.mean, pre.std)
    with tempfile.TemporaryDirectory() as links:
        sets = {name: image_folder(read_split(split / f"{name}.csv"), Path(links) / name, tf)
                for name, tf in (("train", train_tf), ("val", val_tf), ("test", val_tf))}
        loaders = {name: torch.utils.data.DataLoader(ds, batch_size=8, shuffle=name == "train", num_workers=4)
                   for name, ds in sets.items()}
        optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.001, momentum=0.9)
        best_acc, best_state, train_images, train_seconds = -1.0, None, 0, 0.0
        loop_start = time.perf_counter()
        for _ in range(args.epochs):
            _, images, seconds = run_epoch(model, loaders["train"], optimizer, device)
            train_images, train_seconds = train_images + images, train_seconds + seconds
            val_acc, _, _ = run_epoch(model, loaders["val"], None, device)
            if val_acc > best_acc:
                best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
        loop_seconds = time.perf_counter() - loop_start
        model.load_state_dict(best_state)
        test_acc, _, _ = run_epoch(model, loaders["test"], None, device)
    print(json.dumps({"wall_seconds": time.perf_counter() - start, "loop_seconds": loop_seconds,
                      "train_images_per_s": train_images / train_seconds,
                      "test_accuracy": test_acc, "best_val_accuracy": best_acc,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
