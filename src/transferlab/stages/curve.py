"""curve: the learning curve's summary (curves/dvc.yaml runs it from the project root, after
every point: stages/curve_point.py).

    python -m transferlab.stages.curve summary  -> curves/curve.json, curves/curve.md, curves/plots/

Puts the points curves/params.yaml lists together: the table, the transfer dividend and the
crossover, each claim resting on the paired test (curves.py).
"""
import sys
from pathlib import Path

from transferlab import curves
from transferlab.errors import UserError
from transferlab.figures import plot_learning_curve
from transferlab.files import read_json, replaced_together, write_json
from transferlab.params import load_curve_params
from transferlab.stages import run_stage
from transferlab.vega import write_offline_template

CURVE_PARAMS = Path("curves/params.yaml")
POINTS_DIR = Path("curves/points")
SUMMARY_OUTPUTS = ["curves/curve.json", "curves/curve.md", "curves/plots/"]


def summary() -> None:
    """The curve from the points curves/params.yaml lists."""
    curve = load_curve_params(CURVE_PARAMS)
    wanted = [POINTS_DIR / f"{mode}-{size}-s{seed}.json" for size in curve.images_per_class for mode in curve.modes
              for seed in curve.seeds]
    missing = [str(path) for path in wanted if not path.exists()]
    if missing:
        raise UserError(f"{len(missing)} points of the curve are missing, e.g. {missing[0]}; run `transferlab "
                        f"curve`, which runs every point curves/params.yaml lists")
    points = [read_json(path) for path in wanted]
    if len({p["test_images"] for p in points}) > 1:
        raise UserError("the points were scored on different test images (the split changed between them); run "
                        "`transferlab curve` again: it re-runs the points of the old split")
    trained, merged = curves.merge_everything(points, list(curve.images_per_class))
    rows = curves.table(trained)
    dividends, cross = curves.dividend(trained, rows), curves.crossover(trained, rows)
    report = {"budget": curve.budget, "seeds": list(curve.seeds), "rows": rows, "dividend": dividends,
              "crossover": cross, "same_as_all": merged.get("all", []), "seconds": curves.seconds(trained)}
    text = curves.markdown(rows, dividends, cross, merged)
    with replaced_together(*SUMMARY_OUTPUTS) as (json_path, md_path, plots_dir):
        write_json(json_path, report)
        md_path.write_text(text)
        curves.write_plot_data(rows, plots_dir)
        models = ", ".join(sorted({p.get("model", "?") for p in points}))
        plot_learning_curve(rows, plots_dir / "learning_curve.png", models)
    write_offline_template()  # `dvc plots show` draws the curve without a network, as the main plots
    print(text)


def main() -> None:
    if sys.argv[1:] != ["summary"]:
        sys.exit("usage: python -m transferlab.stages.curve summary")
    run_stage("curve", summary, SUMMARY_OUTPUTS)


if __name__ == "__main__":
    main()
