"""plot: training logs, metrics/eval.json, reports/eval.json and predictions -> plots/*.png."""
from pathlib import Path

from transferlab.figures import (
    plot_confusions,
    plot_curves,
    plot_prediction_grid,
    plot_test_accuracy,
    plot_top_losses,
    read_curve,
)
from transferlab.files import read_json, replaced_together
from transferlab.params import MODES, load_params
from transferlab.stages import require_inputs, run_stage
from transferlab.vega import write_offline_template

PLOTS = "plots/"


def log_curve(mode: str, name: str) -> tuple[list[int], list[float]]:
    return read_curve(Path("logs") / mode / "plots" / "metrics" / f"{name}.tsv")


def main() -> None:
    trained = {path: f"train-{m}" for m in MODES for path in (f"logs/{m}", f"reports/train/{m}.json")}
    require_inputs({**trained, "reports/eval.json": "evaluate", "metrics/predictions/finetune.csv": "evaluate"})
    params = load_params(check_model=False)  # builds no model: starts without torchvision
    modes = list(MODES)
    evaluation = read_json("reports/eval.json")
    classes = evaluation["classes"]
    epochs = {m: read_json(f"reports/train/{m}.json")["epochs"] for m in modes}  # those trained, not the cap
    with replaced_together(PLOTS) as (plots,):
        plot_curves({m: {"val": log_curve(m, "val/acc")} for m in modes},
                    f"validation accuracy per epoch, {params.model}", "accuracy", plots / "val_accuracy.png")
        plot_curves({m: {"train": log_curve(m, "train/loss"), "val": log_curve(m, "val/loss")} for m in modes},
                    f"loss per epoch (train dashed, val solid), {params.model}", "cross-entropy", plots / "loss.png")
        plot_test_accuracy(evaluation, modes, plots / "test_accuracy.png", params.model, epochs)
        plot_confusions(evaluation, modes, classes, plots / "confusion.png")
        plot_top_losses(evaluation, modes, plots / "top_losses.png")
        plot_prediction_grid(Path("metrics/predictions/finetune.csv"), params.plot.grid_images,
                             plots / "test_predictions.png", f"finetune {params.model}: test images, mistakes first")
        written = sorted(p.name for p in plots.glob("*.png"))
    print(f"wrote {', '.join(written)} in {PLOTS}")
    write_offline_template()  # for `dvc plots show`, offline (.dvc/config names it); not an output


if __name__ == "__main__":
    run_stage("plot", main, [PLOTS])
