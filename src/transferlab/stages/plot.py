"""plot: training logs, metrics/eval.json and predictions -> plots/*.png."""
from pathlib import Path

from transferlab.figures import (plot_confusions, plot_curves, plot_prediction_grid, plot_test_accuracy,
                                 read_curve)
from transferlab.files import read_json
from transferlab.params import MODES, load_params
from transferlab.stages import run_stage

PLOTS = Path("plots")


def log_curve(mode: str, name: str) -> tuple[list[int], list[float]]:
    return read_curve(Path("logs") / mode / "plots" / "metrics" / f"{name}.tsv")


def main() -> None:
    params = load_params(check_model=False)  # builds no model: starts without torchvision
    modes = list(MODES)
    evaluation = read_json("metrics/eval.json")
    classes = read_json("data/split/report.json")["classes"]
    plot_curves({m: {"val": log_curve(m, "val/acc")} for m in modes}, f"validation accuracy, {params.model}",
                "accuracy", PLOTS / "val_accuracy.png")
    plot_curves({m: {"train": log_curve(m, "train/loss"), "val": log_curve(m, "val/loss")} for m in modes},
                f"loss, {params.model}", "cross-entropy", PLOTS / "loss.png")
    plot_test_accuracy(evaluation, modes, PLOTS / "test_accuracy.png")
    plot_confusions(evaluation, modes, classes, PLOTS / "confusion.png")
    plot_prediction_grid(Path("metrics/predictions/finetune.csv"), params.plot.grid_images,
                         PLOTS / "test_predictions.png", f"finetune {params.model}: test images, mistakes first")
    print(f"wrote {', '.join(sorted(p.name for p in PLOTS.glob('*.png')))} in {PLOTS}/")


if __name__ == "__main__":
    run_stage("plot", main)
