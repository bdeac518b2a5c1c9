"""curve: the learning curve's stages (curves/dvc.yaml runs them from the project root).

    python -m transferlab.stages.curve point N MODE SEED  -> curves/points/MODE-N-sSEED.json
    python -m transferlab.stages.curve summary            -> curves/curve.json, curves/curve.md, curves/plots/

A point trains MODE on N training images per class (all: every one), drawn with SEED, for the
budget curves/params.yaml names, and scores it on the test split as evaluate does. It keeps no
checkpoint: what a curve needs of it is which test images it got right. The summary puts the
points curves/params.yaml lists together.
"""
import sys
import time
from pathlib import Path

from transferlab import curves
from transferlab.data import read_splits
from transferlab.errors import UserError
from transferlab.files import read_json, replaced_together, write_json
from transferlab.images import samples_digest
from transferlab.metrics import wilson_interval
from transferlab.models import MODES
from transferlab.params import load_curve_params, load_params, to_dict
from transferlab.stages import RESUME_DIR, cache_dir, require_inputs, run_stage
from transferlab.stages.evaluate import predict_split, scoring_hardware
from transferlab.training import Subset, train_mode
from transferlab.vega import write_offline_template

SPLIT_DIR = Path("data/split")
CURVE_PARAMS = Path("curves/params.yaml")
POINTS_DIR = Path("curves/points")
SUMMARY_OUTPUTS = ["curves/curve.json", "curves/curve.md", "curves/plots/"]


def point_path(mode: str, size, seed: int) -> Path:
    return POINTS_DIR / f"{mode}-{size}-s{seed}.json"


def point(size: str, mode: str, seed: int) -> None:
    """Train and score one point of the curve."""
    start = time.perf_counter()
    require_inputs({str(SPLIT_DIR / name): "split" for name in ("train.csv", "val.csv", "test.csv", "report.json")})
    params, budget = load_params(), load_curve_params(CURVE_PARAMS).budget
    samples, classes = read_splits(SPLIT_DIR), read_json(SPLIT_DIR / "report.json")["classes"]
    rows, drawn = curves.training_rows(samples["train"], None if size == "all" else int(size), seed, budget)
    train = params.for_mode(mode)
    data_key = samples_digest(samples["train"] + samples["val"])
    identity = [params.model, params.seed, seed, to_dict(train), rows, data_key]
    # Every seed's extract points share one embedding pass: it is cropped with the main seed.
    trained = train_mode(params.model, mode, train, seed, classes, samples, SPLIT_DIR, cache_dir(),
                         (RESUME_DIR, f"curve-{mode}-{size}-s{seed}", identity),
                         subset=Subset(rows, embed_seed=params.seed))
    built, result, hw = trained.built, trained.result, trained.hw
    fit_seconds = sum(r["train_seconds"] + r["val_seconds"] for r in result.history)  # the epochs themselves
    test_start = time.perf_counter()
    eval_hw = scoring_hardware(params.evaluate)
    predictions, eval_hw = predict_split(built.model, built.arch, built.preprocess, classes, samples["test"],
                                         trained.source, params.evaluate.batch_size, eval_hw,
                                         desc=f"test {mode} {size}/class")
    right = predictions.probs.argmax(1) == predictions.targets
    low, high = wilson_interval(int(right.sum()), len(right))
    write_json(point_path(mode, size, seed), {
        "mode": mode, "images_per_class": size if size == "all" else int(size), "seed": seed,
        "drawn": drawn, "budget": budget, "epochs": len(result.history), "steps_per_epoch": trained.steps_per_epoch,
        "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val.accuracy,
        "accuracy": float(right.mean()), "accuracy_ci95_low": low, "accuracy_ci95_high": high,
        "test_images": samples_digest(samples["test"]), "right": "".join("1" if r else "0" for r in right),
        "seconds": {"fit": fit_seconds, "test": time.perf_counter() - test_start,
                    "after_imports": time.perf_counter() - start},
        "hardware": hw.describe(), "evaluate_hardware": eval_hw.describe()})
    if trained.resume_path is not None:
        trained.resume_path.unlink()  # finished: the next run of this point starts afresh
    print(f"{mode}, {size} images per class, seed {seed}: test accuracy {right.mean():.4f} ({len(rows)} images an "
          f"epoch; {fit_seconds:.1f} s training)")


def summary() -> None:
    """The curve from the points curves/params.yaml lists."""
    curve = load_curve_params(CURVE_PARAMS)
    wanted = [point_path(mode, size, seed) for size in curve.images_per_class for mode in curve.modes
              for seed in curve.seeds]
    missing = [str(path) for path in wanted if not path.exists()]
    if missing:
        raise UserError(f"{len(missing)} points of the curve are missing, e.g. {missing[0]}; run `dvc repro "
                        f"curves/dvc.yaml`, which runs every point curves/params.yaml lists")
    points = [read_json(path) for path in wanted]
    if len({p["test_images"] for p in points}) > 1:
        raise UserError("the points were scored on different test images (the split changed between them); run "
                        "`dvc repro curves/dvc.yaml` again: it re-runs the points of the old split")
    rows = curves.table(points)
    dividends, cross = curves.dividend(rows), curves.crossover(points, rows)
    report = {"budget": curve.budget, "seeds": list(curve.seeds), "rows": rows, "dividend": dividends,
              "crossover": cross, "seconds": curves.seconds(points)}
    from transferlab.figures import plot_learning_curve  # matplotlib: only the summary draws
    with replaced_together(*SUMMARY_OUTPUTS) as (json_path, md_path, plots_dir):
        write_json(json_path, report)
        md_path.write_text(curves.markdown(rows, dividends, cross))
        curves.write_plot_data(rows, plots_dir)
        plot_learning_curve(rows, plots_dir / "learning_curve.png")
    write_offline_template()  # `dvc plots show` draws the curve without a network, as the main plots
    print(curves.markdown(rows, dividends, cross))


def main() -> None:
    command = sys.argv[1:2]
    if command == ["point"] and len(sys.argv) == 5 and sys.argv[3] in MODES:
        size = sys.argv[2]
        if size != "all" and not (size.isdigit() and int(size) > 0):
            sys.exit(f"curve point: images per class is {size!r}; give a whole number above 0, or all")
        run_stage("curve", lambda: point(size, sys.argv[3], int(sys.argv[4])),
                  [str(point_path(sys.argv[3], size, sys.argv[4]))])
    elif command == ["summary"] and len(sys.argv) == 2:
        run_stage("curve", summary, SUMMARY_OUTPUTS)
    else:
        sys.exit(f"usage: python -m transferlab.stages.curve point N {{{','.join(MODES)}}} SEED | summary")


if __name__ == "__main__":
    main()
