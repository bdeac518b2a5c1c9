"""What the learning curve's budget rule changes at its smallest size: fixed epochs against the
same optimizer steps as the full training set, per mode, over the same seeds.

    python benchmarks/curve.py --work DIR          # first: the curve, with budget: steps
    python benchmarks/curve_budget.py --work DIR   # then: its smallest size again with budget: epochs

Copies DIR/project (with its caches) to DIR/project-epochs, sets `budget: epochs` and only the
smallest size in curves/params.yaml, runs `transferlab curve` there, and prints both
rules side by side: optimizer steps, best epoch and test accuracy (mean over seeds, 95% interval).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml
from speed import bench_env, timed


def summary(project: Path) -> dict:
    points = [json.loads(p.read_text()) for p in (project / "curves/points").glob("*.json")]
    rows = json.loads((project / "curves/curve.json").read_text())["rows"]
    return {"points": points, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="the folder benchmarks/curve.py --work ran in")
    args = parser.parse_args()
    work = Path(args.work)
    steps_project, epochs_project = work / "project", work / "project-epochs"
    shutil.rmtree(epochs_project, ignore_errors=True)
    shutil.copytree(steps_project, epochs_project, symlinks=True)
    params_path = epochs_project / "curves/params.yaml"
    params = yaml.safe_load(params_path.read_text())
    smallest = min(n for n in params["curve"]["images_per_class"] if n != "all")
    params["curve"].update(images_per_class=[smallest], budget="epochs")
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**bench_env(work), "PYTHONPATH": str(epochs_project / "src")}
    wall, _ = timed([sys.executable, "-m", "transferlab.cli", "curve"], epochs_project, env)
    print(f"{smallest} images per class, budget: epochs, every mode and seed: {wall:.0f} s")
    print("| mode | rule | optimizer steps | best epoch (mean) | test accuracy | 95% interval |")
    print("|---|---|---|---|---|---|")
    for mode in ("finetune", "extract", "scratch"):
        for rule, project in (("same steps as all images", steps_project), ("fixed epochs", epochs_project)):
            found = summary(project)
            points = [p for p in found["points"] if p["mode"] == mode and p["images_per_class"] == smallest]
            row = next(r for r in found["rows"] if r["mode"] == mode and r["images_per_class"] == smallest)
            steps = points[0]["steps_per_epoch"] * points[0]["epochs"]
            best = sum(p["best_epoch"] for p in points) / len(points)
            print(f"| {mode} | {rule} | {steps} | {best:.1f} | {row['accuracy']:.3f} | "
                  f"{row['ci95_low']:.3f}-{row['ci95_high']:.3f} |")


if __name__ == "__main__":
    main()
