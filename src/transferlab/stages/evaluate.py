"""evaluate: models/MODE.pt + data/split/test.csv -> metrics/eval.json, metrics/predictions/MODE.csv.

The only stage that reads the test split.
"""
import csv
from pathlib import Path

import numpy as np

from transferlab.data import ImageDataset, build_transform, make_loader
from transferlab.engine import Hardware, Predictions, pick_hardware, predict, seed_everything
from transferlab.files import atomic_writer, load_checkpoint, write_json
from transferlab.images import read_split
from transferlab.metrics import classification_metrics, compare
from transferlab.models import MODES, Preprocess, rebuild_model
from transferlab.params import load_params
from transferlab.stages import CACHE_DIR, run_stage

TEST_CSV = Path("data/split/test.csv")
PREDICTIONS_DIR = Path("metrics/predictions")


def main() -> None:
    params = load_params()
    seed_everything(params.seed)
    hw = pick_hardware()
    report, right = {}, {}
    for mode in MODES:
        checkpoint = load_checkpoint(f"models/{mode}.pt")
        predictions, dataset = predict_test(checkpoint, params.evaluate.batch_size, hw)
        classes = checkpoint["classes"]
        report[mode] = {**classification_metrics(predictions.targets, predictions.probs, classes),
                        "inference_images_per_s": predictions.stats.images_per_second}
        right[mode] = predictions.probs.argmax(1) == predictions.targets
        write_predictions(PREDICTIONS_DIR / f"{mode}.csv", dataset, predictions, classes)
        print(f"{mode}: test accuracy {report[mode]['accuracy']:.4f} "
              f"(95% CI {report[mode]['accuracy_ci95_low']:.3f}-{report[mode]['accuracy_ci95_high']:.3f})")
    for first, second in (("finetune", "scratch"), ("extract", "scratch"), ("finetune", "extract")):
        report[f"{first}_vs_{second}"] = compare(right, first, second)
    write_json("metrics/eval.json", report)


def predict_test(checkpoint: dict, batch_size: int, hw: Hardware) -> tuple[Predictions, ImageDataset]:
    model = rebuild_model(checkpoint["arch"], checkpoint["arch_kwargs"], len(checkpoint["classes"]))
    model.load_state_dict(checkpoint["state_dict"])
    hw.prepare(model)
    pre = Preprocess(**checkpoint["preprocess"])
    dataset = ImageDataset(read_split(TEST_CSV), checkpoint["classes"], build_transform(pre, train=False),
                           min_side=pre.resize_size, cache_dir=CACHE_DIR)  # decoded once for all modes
    loader = make_loader(dataset, batch_size, False, 0, hw.workers, hw.pin_memory)
    return predict(model, loader, hw, desc=f"test {checkpoint['mode']}"), dataset


def write_predictions(path: Path, dataset: ImageDataset, predictions: Predictions, classes: list[str]) -> None:
    """One row per test image, in the columns dvc's confusion-matrix template reads."""
    with atomic_writer(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "actual", "predicted", "confidence"])
        for sample, target, probs in zip(dataset.samples, predictions.targets, predictions.probs):
            best = int(np.argmax(probs))
            writer.writerow([sample.path, classes[target], classes[best], f"{probs[best]:.4f}"])


if __name__ == "__main__":
    run_stage("evaluate", main)
