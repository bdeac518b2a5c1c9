"""evaluate: models/MODE.pt + data/split/test.csv -> metrics/eval.json (the headline numbers),
reports/eval.json (every metric, per-class detail, paired tests, each mode's mistakes with the
largest loss) and metrics/predictions/MODE.csv.

The only stage that reads the test split.
"""
import csv
import time
from pathlib import Path

import numpy as np

from transferlab.data import ImageSource, open_split_store
from transferlab.distributed import use_least_used_gpu
from transferlab.engine import Predictions, peak_device_memory_mb, peak_rss_mb, seed_everything
from transferlab.files import load_checkpoint, replaced_together, write_json
from transferlab.hardware import Hardware
from transferlab.images import Sample, read_split
from transferlab.metrics import classification_metrics, compare, headline, top_losses
from transferlab.models import MODES, Preprocess, head_of, rebuild_model
from transferlab.params import load_params
from transferlab.scoring import SCORING_MATH, predict_split, scoring_hardware
from transferlab.stages import cache_dir, require_inputs, run_stage

TEST_CSV = Path("data/split/test.csv")
OUTPUTS = ["metrics/eval.json", "reports/eval.json", "metrics/predictions/"]
PAIRS = (("finetune", "scratch"), ("extract", "scratch"), ("finetune", "extract"))


def main() -> None:
    start = time.perf_counter()
    require_inputs({str(TEST_CSV): "split", **{f"models/{mode}.pt": f"train-{mode}" for mode in MODES}})
    params = load_params()
    seed_everything(params.seed)
    use_least_used_gpu("auto", cache_dir() / "gpus")  # where there are several: queued experiments spread
    hw = scoring_hardware(params.evaluate)
    samples = read_split(TEST_CSV)
    report, right, rows, sources = {"classes": None}, {}, {}, {}
    for mode in MODES:
        checkpoint = load_checkpoint(f"models/{mode}.pt")
        pre = Preprocess(**checkpoint["preprocess"])
        store = (pre.resize_size, pre.interpolation)
        if store not in sources:  # the three modes share one store: decoded once
            sources[store] = ImageSource(open_split_store(TEST_CSV.parent, pre.resize_size, cache_dir(),
                                                          pre.interpolation))
        predictions, mode_hw = predict_test(checkpoint, samples, sources[store],
                                            params.evaluate.batch_size, hw, params.evaluate.tta)
        classes = report["classes"] = checkpoint["classes"]
        report[mode] = {**classification_metrics(predictions.targets, predictions.probs, classes),
                        "top_losses": top_losses(predictions.probs, predictions.targets, [s.path for s in samples],
                                                 classes),
                        "inference_images_per_s": predictions.stats.images_per_second, **mode_hw.describe(),
                        **SCORING_MATH, "tta": list(params.evaluate.tta)}
        right[mode] = predictions.probs.argmax(1) == predictions.targets
        rows[mode] = prediction_rows(samples, predictions, classes)
        print(f"{mode}: test accuracy {report[mode]['accuracy']:.4f} "
              f"(95% CI {report[mode]['accuracy_ci95_low']:.3f}-{report[mode]['accuracy_ci95_high']:.3f})")
    for first, second in PAIRS:
        report[f"{first}_vs_{second}"] = compare(right, first, second)
    report["wall_seconds"] = time.perf_counter() - start  # after imports: model building, inference, metrics
    report["peak_rss_mb"], report["peak_gpu_memory_mb"] = peak_rss_mb(), peak_device_memory_mb(hw.device)
    with replaced_together(*OUTPUTS) as (metrics, details, predictions_dir):  # all three or none
        write_json(metrics, {mode: headline(report[mode]) for mode in MODES})
        write_json(details, report)
        for mode in MODES:
            write_predictions(predictions_dir / f"{mode}.csv", rows[mode])


def predict_test(checkpoint: dict, samples: list[Sample], source: ImageSource, batch_size: int,
                 hw: Hardware, views: tuple[str, ...] = ("center",)) -> tuple[Predictions, Hardware]:
    """The checkpoint's class probabilities for every test image, the mean over `views`, at
    evaluate's precision and layout (measured only where params.yaml says auto)."""
    model = rebuild_model(checkpoint["arch"], checkpoint["arch_kwargs"], len(checkpoint["classes"]),
                          head_of(checkpoint))
    model.load_state_dict(checkpoint["state_dict"])
    return predict_split(model, checkpoint["arch"], Preprocess(**checkpoint["preprocess"]), checkpoint["classes"],
                         samples, source, batch_size, hw, cache_dir(), desc=f"test {checkpoint['mode']}",
                         views=views)


def prediction_rows(samples: list[Sample], predictions: Predictions, classes: list[str]) -> list[list]:
    """One row per test image, in the columns dvc's confusion-matrix template reads."""
    rows = []
    for sample, target, probs in zip(samples, predictions.targets, predictions.probs):
        best = int(np.argmax(probs))
        rows.append([sample.path, classes[target], classes[best], f"{probs[best]:.4f}"])
    return rows


def write_predictions(path: Path, rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "actual", "predicted", "confidence"])
        writer.writerows(rows)


if __name__ == "__main__":
    run_stage("evaluate", main, OUTPUTS)
